"""Runs of the real entry point (``python -m megatron_deft.train``, or torchrun for several
ranks) on a tiny random model and synthetic data, for tests of what a user sees: exit codes,
console lines, files left in --save."""

import os
import socket
import subprocess
import sys

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))

TINY = [
    "--device", "cpu", "--mock-data", "--vocab-size", "64", "--num-layers", "1",
    "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "16",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--log-interval", "1",
    "--distributed-timeout-minutes", "1",
]  # fmt: skip
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(args, nproc: int = 1) -> list:
    """The command line of one run: a single process, or torchrun with ``nproc`` ranks."""
    if nproc == 1:
        launcher = [sys.executable, "-m", "megatron_deft.train"]
    else:
        launcher = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(_free_port()), "-m", "megatron_deft.train",
        ]  # fmt: skip
    return launcher + TINY + [str(arg) for arg in args]


def train_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    return dict(env, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")


def start_train(args, nproc: int = 1, **popen_kwargs) -> subprocess.Popen:
    return subprocess.Popen(train_command(args, nproc), env=train_env(), **popen_kwargs)


def run_train(args, nproc: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    """One run to its end; ``.output`` holds stdout + stderr."""
    done = subprocess.run(
        train_command(args, nproc),
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    done.output = done.stdout + done.stderr
    return done


def lines_with(output: str, text: str) -> list:
    return [line for line in output.splitlines() if text in line]
