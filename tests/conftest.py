"""Shared fixture: launch a multi-process test worker under torchrun (gloo, CPU).

Tests are in two sets: the fast unit subset (``python -m pytest -q -m "not integration" tests``)
and the ``integration`` set, which launches training or evaluation processes (every test using
the ``torchrun`` fixture is marked automatically; others that start the trainer, the quick start
or an experiment driver carry ``@pytest.mark.integration``). ``python -m pytest -q tests`` runs
both, as CI does. Tests marked ``@pytest.mark.cuda`` need a GPU: they skip without one, and the
GPU self-check runs them with ``-m cuda``.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if not torch.cuda.is_available():
    # Triton kernels (where triton is installed) run in its interpreter on CPU tensors. Set before
    # any test module imports triton: triton.language's own jit functions are built at import.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Worker scripts import their helpers (common.py) from here.
WORKER_HELPERS = os.path.join(os.path.dirname(__file__), "unit", "training", "workers")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(script: str, nproc: int, out_dir, *args, timeout: int = 300) -> dict:
    """Run the worker `script` (a path) on `nproc` ranks; returns the results.json it wrote to
    out_dir. A failing rank fails the calling test with the workers' output."""
    path = os.pathsep.join([REPO_ROOT, WORKER_HELPERS, os.path.dirname(os.path.abspath(script))])
    if os.environ.get("PYTHONPATH"):  # e.g. the GPU self-check's folder of installed wheels
        path += os.pathsep + os.environ["PYTHONPATH"]
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(_free_port()),
        script,
        str(out_dir),
        *map(str, args),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        name = os.path.basename(script)
        raise AssertionError(
            f"{name} on {nproc} ranks failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
        )
    with open(os.path.join(out_dir, "results.json")) as handle:
        return json.load(handle)


@pytest.fixture(scope="session")
def torchrun():
    return run_torchrun


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "integration: launches training/evaluation processes (multi-process, slow)"
    )
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA GPU (skipped without one); the GPU self-check runs these"
    )


def pytest_collection_modifyitems(items):
    for item in items:
        if "torchrun" in item.fixturenames:
            item.add_marker(pytest.mark.integration)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
