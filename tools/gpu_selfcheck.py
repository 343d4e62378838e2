"""GPU self-check: one command, about 8 minutes on one H100/H200, no network.

    python tools/gpu_selfcheck.py --wheels WHEEL_DIR --out docs/gpu.md
    python tools/gpu_selfcheck.py --device cpu --tiny --out gpu-dry-run.md   # the flow, on CPU

Steps, each with its share of --budget-s (a step past its share is stopped and reported as
such; the report is rewritten after every step, so a run stopped from outside still leaves the
finished steps' results):

1. wheels: every wheel in WHEEL_DIR whose distribution is not installed (or in another version)
   is installed with ``pip --no-index --no-deps`` into a temporary folder put first on the
   PYTHONPATH of the steps below (e.g. megatron-core and math-verify with its dependencies on a
   machine that has only torch); nothing is downloaded.
2. ``pytest -m cuda``: the tests that need a GPU (NCCL and training steps, the KV-cache
   generation, FP8 and the TE spec where Transformer Engine is importable, ...).
3. benchmarks/train_bench.py: a Llama-3.2-1B-shaped model (16 layers, h 2048, 32 / 8 heads,
   SwiGLU 8192, vocab 128256), packed SFT rows of 4096 tokens from --mock-data, 30 steps
   (5 warm-up) per variant: deft, deft with selective and with full recomputation, nll, and
   megatron-core's own cross entropy: tokens/s, MFU, peak memory.
4. benchmarks/loss_bench.py on the GPU: the objectives against megatron-core's cross entropy,
   and the fused output layer + loss with its Triton and its PyTorch chunk loop (and
   cut-cross-entropy's kernel as the NLL peer when its wheel is among the wheels).

The report (Markdown, the format of docs/gpu.md) names the device, the driver and the versions
of Python, torch, CUDA, triton, megatron-core and Transformer Engine.
"""

import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_VARIANTS = ["deft", "deft+selective", "deft+full", "nll", "megatron-ce"]
# (step name, share of the budget), from the first H200 run: the cuda tests took ~190 s (three
# torchrun launches and compiles), the five 1B variants ~170 s, the two loss benchmarks ~85 s.
SHARES = {"pytest -m cuda": 0.42, "train_bench": 0.38, "loss_bench": 0.2}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", help="folder of wheels to install where missing")
    parser.add_argument("--out", default="gpu-selfcheck.md", help="the Markdown report")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes and few steps (checks the flow)"
    )
    parser.add_argument("--budget-s", type=float, default=480, help="all steps together")
    parser.add_argument("--print-versions", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def wheel_name_version(path: str):
    """(distribution, version) from a wheel's file name (name-version-...-platform.whl)."""
    name, version = os.path.basename(path).split("-")[:2]
    return name, version


def missing_wheels(folder: str) -> list:
    """The wheels of ``folder`` whose distribution is absent here or installed in another
    version."""
    missing = []
    for path in sorted(glob.glob(os.path.join(folder, "*.whl"))):
        name, version = wheel_name_version(path)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            missing.append(path)
    return missing


def install_wheels(folder: str) -> tuple:
    """Installs the missing wheels into a fresh folder: (folder or None, report lines)."""
    if not os.path.isdir(folder):
        raise SystemExit(f"gpu_selfcheck: --wheels {folder}: not a folder")
    wheels = missing_wheels(folder)
    if not wheels:
        return None, ["every wheel in the folder is installed already"]
    site = tempfile.mkdtemp(prefix="deft-selfcheck-site-")
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    command += ["--no-compile", "--no-cache-dir", "--target", site, *wheels]
    subprocess.run(command, check=True)
    return site, [f"installed {os.path.basename(path)}" for path in wheels]


def print_versions() -> None:
    """Prints the device and package versions as JSON (run in a child with the steps' PYTHONPATH:
    ``--print-versions``)."""
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    info["CUDA (torch)"] = str(torch.version.cuda)
    for name in ("triton", "megatron-core", "transformer-engine"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = (
            f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} "
            f"SMs, compute capability {props.major}.{props.minor}"
        )
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        try:
            driver = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            driver = "unknown"
        info["driver"] = driver.strip()
    else:
        info["device"] = f"no GPU ({platform.processor() or platform.machine()})"
    print(json.dumps(info))


def versions(env: dict) -> dict:
    """:func:`print_versions` of a child with the steps' environment."""
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--print-versions"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        return {"versions": "could not be read: " + " ".join(done.stderr.split()[-20:])}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_step(name: str, command: list, env: dict, timeout: float) -> dict:
    """Run one step, echoing its output as it comes; killed after ``timeout`` seconds."""
    print(f"\n=== {name}: {' '.join(command)} (up to {timeout:.0f} s)", flush=True)
    start, lines = time.monotonic(), []
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: torchrun's workers are stopped too
    )
    watchdog = threading.Timer(timeout, os.killpg, (process.pid, signal.SIGKILL))
    watchdog.start()
    try:
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
        code = process.wait()
    finally:
        watchdog.cancel()
    killed = code < 0 and time.monotonic() - start >= timeout
    status = "stopped at its time limit" if killed else f"exit {code}"
    return {"name": name, "status": status, "seconds": time.monotonic() - start, "lines": lines}


def step_commands(args, json_path: str) -> dict:
    """{step: command}, the shapes chosen by --device / --tiny."""
    python, device = sys.executable, args.device
    pytest = [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    pytest += ["-p", "no:warnings"]  # the report keeps results, not import notices
    pytest += ["--continue-on-collection-errors", "-rfEs"]
    bench = [python, "benchmarks/train_bench.py", "--device", device, "--json", json_path]
    loss = [python, "benchmarks/loss_bench.py", "--device", device, "--tp", "1"]
    if args.tiny:
        bench += "--model small --seq-length 128 --global-batch-size 2 --iters 3 --warmup 1".split()
        loss_runs = [loss + "--tokens 256 --vocab 1024 --repeats 1 --warmup 1".split()]
    else:
        bench += "--model 1b --seq-length 4096 --global-batch-size 4 --iters 30 --warmup 5".split()
        loss_runs = [
            loss + "--dtype bf16 --tokens 16384 --vocab 128256".split(),
            loss + "--dtype bf16 --output-layer --fused-kernels triton torch".split(),
        ]
    bench += ["--variants", *(BENCH_VARIANTS[:2] if args.tiny else BENCH_VARIANTS)]
    return {"pytest -m cuda": [pytest], "train_bench": [bench], "loss_bench": loss_runs}


def _bench_rows(path: str) -> list:
    """train_bench's results so far (it rewrites the file after every variant)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def report(info: dict, setup_lines: list, steps: list, bench_rows: list) -> str:
    """The Markdown report (docs/gpu.md's format)."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = ["# GPU self-check", ""]
    out += [f"Written by `python tools/gpu_selfcheck.py` on {when} ({platform.node()}).", ""]
    out += ["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in info.items()), ""]
    out += ["Wheels: " + ("; ".join(setup_lines) if setup_lines else "none given") + ".", ""]
    for step in steps:
        out += [f"## {step['name']}", "", f"{step['status']}, {step['seconds']:.0f} s.", ""]
        if step["name"] == "train_bench" and bench_rows:
            out += [_bench_table(bench_rows), ""]
        body = [line for line in step["lines"] if _kept(step["name"], line)]
        out += ["```", *body[-60:], "```", ""]
    return "\n".join(out)


def _kept(step: str, line: str) -> bool:
    """The lines of a step's output worth keeping in the report."""
    if step == "loss_bench":
        return line.startswith(("|", "#"))
    if step == "train_bench":
        return line.startswith("#") or "Error" in line or "error" in line
    return not line.startswith(("  warnings.warn", "UserWarning"))


def _bench_table(rows: list) -> str:
    sys.path[:0] = [REPO, os.path.join(REPO, "benchmarks")]
    from train_bench import format_table

    return format_table(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.print_versions:
        print_versions()
        return 0
    started = time.monotonic()
    site, setup_lines = install_wheels(args.wheels) if args.wheels else (None, [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, REPO, os.environ.get("PYTHONPATH")) if p)
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    info = versions(env)
    json_path = os.path.join(tempfile.mkdtemp(prefix="deft-selfcheck-"), "bench.json")
    steps, failed = [], False
    commands = [
        (name, command) for name, runs in step_commands(args, json_path).items() for command in runs
    ]
    for index, (name, command) in enumerate(commands):
        # this run's part of the time left: its step's share, split over the step's runs
        left = args.budget_s - (time.monotonic() - started)
        weights = [SHARES[n] / sum(n == other for other, _ in commands) for n, _ in commands]
        step = run_step(name, command, env, max(left * weights[index] / sum(weights[index:]), 10))
        steps.append(step)
        failed |= step["status"] != "exit 0"
        with open(args.out, "w", encoding="utf-8") as handle:
            handle.write(report(info, setup_lines, steps, _bench_rows(json_path)))
    print(f"\ngpu_selfcheck: wrote {args.out} in {time.monotonic() - started:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
