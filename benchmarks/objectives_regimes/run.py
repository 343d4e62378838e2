"""One command for the whole objectives-under-regimes experiment (see README.md).

    python -m benchmarks.objectives_regimes.run --config smoke --out runs/regimes-smoke
    python -m benchmarks.objectives_regimes.run --config full --out runs/regimes  # the benchmark
    # GPUs: --device cuda --nproc 8 --tp 2 (and e.g. --extra-train-args=--bf16)
    # 2 CPU cores: --jobs 2 trains two phase-2 runs at once, one thread each (~1.3x throughput)
    # one node, 8 GPUs: --device cuda --jobs 8 (each run on its own GPU)

Steps: write the data (tasks.py), train a character SentencePiece tokenizer, phase 1 (the prior:
NLL on task A), phase 2 (every variant x objective x seed from the prior, or from scratch), all
checkpoints evaluated by one megatron-deft-eval launch, then results.json, report.md and PNGs in
--out. Repeating the command reuses finished runs and evaluations and resumes interrupted runs
from their last checkpoint.
"""

import argparse
import itertools
import json
import os
import platform
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from benchmarks.objectives_regimes import runner, tasks
from benchmarks.objectives_regimes.config import PRESETS, preset
from benchmarks.objectives_regimes.report import config_dict, publish, write_report

EVAL_FILES = ("a_heldout", "b_heldout", "a_noisy")
TRAIN_FILE = {"mix": "mix", "clean": "clean", "forget": "b_only", "scratch": "b_only"}


def train_prior(config, run_dir: str, data: dict, tokenizer: str) -> str:
    save = os.path.join(run_dir, "ckpt", "prior")
    if not runner.finished(save, config.prior_iters):
        runner.train(
            config,
            "prior",
            run_dir,
            runner.model_args(config, tokenizer)
            + [
                "--train-data",
                data["prior_train"],
                "--sft-objective",
                "nll",
                "--train-iters",
                config.prior_iters,
                "--lr",
                config.prior_lr,
                "--seed",
                config.data_seed,
                "--save",
                save,
                "--tensorboard-dir",
                runner.tensorboard_dir(run_dir, "prior"),
            ],
        )
    return save


def train_phase2(
    config,
    run_dir: str,
    data: dict,
    tokenizer: str,
    prior: str,
    variant: str,
    objective: str,
    seed: int,
    concurrent: int = 1,
    slot: int = 0,
) -> str:
    """One phase-2 run into ``ckpt/<name>``: skipped when finished; an interrupted run launched
    with the same arguments resumes from its last checkpoint (the trainer's resume is exact);
    anything else there is deleted with its TensorBoard log and trained from the start."""
    name = runner.run_name(variant, objective, seed)
    save = os.path.join(run_dir, "ckpt", name)
    if runner.finished(save, config.phase2_iters):
        return save
    args = runner.model_args(config, tokenizer) + [
        "--train-data",
        data[TRAIN_FILE[variant]],
        "--sft-objective",
        objective,
        "--train-iters",
        config.phase2_iters,
        "--lr",
        config.phase2_lr,
        "--lr-decay-style",
        config.phase2_lr_decay_style,
        "--seed",
        seed,
        "--save",
        save,
        "--save-interval",
        config.save_interval,
        "--tensorboard-dir",
        runner.tensorboard_dir(run_dir, name),
        "--token-class-key",
        "tag",
    ]  # per-class gate histograms (tasks.py tags every sample)
    start = args + (["--load", prior, "--finetune"] if variant != "scratch" else [])
    if runner.resumable(save, start):
        runner.train(config, name, run_dir, args + ["--load", save], concurrent, slot, resumed=True)
        return save
    # Checkpoints and logs of another run would be evaluated and plotted as if this run's.
    shutil.rmtree(save, ignore_errors=True)
    shutil.rmtree(runner.tensorboard_dir(run_dir, name), ignore_errors=True)
    runner.record_launch(save, start)
    runner.train(config, name, run_dir, start, concurrent, slot)
    return save


def evaluate_all(config, run_dir: str, loads: list, data: dict, tokenizer: str) -> dict:
    """{checkpoint root: its summaries}; a root's summaries from an earlier launch are reused
    while it holds the same checkpoints (runner.checkpoint_fingerprint), so a retrained root
    is evaluated again."""
    done = runner.evaluated(run_dir, loads)
    missing = [root for root in loads if root not in done]
    if missing:
        summaries = runner.evaluate(
            config, run_dir, missing, [data[name] for name in EVAL_FILES], tokenizer
        )
        done.update({root: [s for s in summaries if s["load"] == root] for root in missing})
    return {root: done[root] for root in loads}


def run_experiment(config, run_dir: str, jobs: int = 1) -> dict:
    """Phase 1, then every (variant, objective, seed) phase-2 run, ``jobs`` at a time (on a
    small CPU machine two single-thread runs finish sooner than one after the other with two
    threads each), then one evaluation launch over every checkpoint."""
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with WallClock(run_dir) as clock:
        data = tasks.write_data(config, os.path.join(run_dir, "data"))
        tokenizer = runner.train_tokenizer(
            [data["prior_train"], data["mix"], data["a_heldout"], data["b_heldout"]],
            os.path.join(run_dir, "tokenizer", "char"),
            os.path.join(run_dir, "logs", "tok.log"),
        )
        prior = train_prior(config, run_dir, data, tokenizer)
        runs = list(itertools.product(config.variants, config.objectives, config.seeds))
        concurrent = max(1, min(jobs, len(runs)))

        free_slots = queue.Queue()  # a run holds a slot (its GPUs on CUDA) while it trains
        for slot in range(concurrent):
            free_slots.put(slot)

        def phase2(run: tuple) -> str:
            slot = free_slots.get()
            try:
                save = train_phase2(config, run_dir, data, tokenizer, prior, *run, concurrent, slot)
            finally:
                free_slots.put(slot)
            print(f"[{clock.elapsed():6.0f}s] trained {' '.join(map(str, run))}", flush=True)
            return save

        with ThreadPoolExecutor(concurrent) as pool:
            saves = list(pool.map(phase2, runs))  # re-raises the first failed launch
        roots = {"/".join(map(str, run)): save for run, save in zip(runs, saves)}
        summaries = evaluate_all(config, run_dir, [prior, *roots.values()], data, tokenizer)
        return {
            "config": config_dict(config),
            "prior": summaries[prior],
            "runs": {key: summaries[root] for key, root in roots.items()},
            "wall_seconds": clock.save(),
            "machine": machine(),
        }


class WallClock:
    """Seconds spent on ``run_dir`` over every invocation, stopped ones included.

    The running total is rewritten to ``wall_seconds.txt`` every ``period`` seconds (and on
    exit), so an invocation killed mid-run loses at most ``period`` seconds of it; the next
    invocation starts from that total."""

    def __init__(self, run_dir: str, period: float = 60.0):
        self.path = os.path.join(run_dir, "wall_seconds.txt")
        self.period = period
        self.previous = 0.0
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as handle:
                self.previous = float(handle.read())
        elif os.path.isfile(os.path.join(run_dir, "results.json")):  # written before this file
            with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as handle:
                self.previous = json.load(handle)["wall_seconds"]
        self.started = time.time()
        self._stopped = threading.Event()
        self._writing = threading.Lock()  # the beat and the caller share one temporary file
        self._beat = threading.Thread(target=self._save_periodically, daemon=True)

    def __enter__(self) -> "WallClock":
        self._beat.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopped.set()
        self._beat.join()
        self.save()

    def elapsed(self) -> float:
        """Seconds of this invocation."""
        return time.time() - self.started

    def save(self) -> float:
        """Writes (atomically) and returns the total over every invocation."""
        with self._writing:
            total = self.previous + self.elapsed()
            with open(self.path + ".tmp", "w", encoding="utf-8") as handle:
                handle.write(f"{total:.1f}\n")
            os.replace(self.path + ".tmp", self.path)
        return total

    def _save_periodically(self) -> None:
        while not self._stopped.wait(self.period):
            self.save()


def machine() -> str:
    cores = os.cpu_count()
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # the description must never fail the experiment
        gpu = "unknown GPU"
    return (
        f"{platform.node()} ({platform.machine()}, {cores} CPU cores, {gpu}; wall time "
        "includes whatever else the machine ran meanwhile)"
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="smoke", help=f"preset: {', '.join(PRESETS)}")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--device", help="override the preset's device (cpu, cuda)")
    parser.add_argument("--nproc", type=int, help="processes per run (TP x DP)")
    parser.add_argument("--tp", type=int, help="tensor-model-parallel size")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    parser.add_argument("--objectives", nargs="+", help="override the preset's objectives")
    parser.add_argument("--variants", nargs="+", help="override the preset's variants")
    parser.add_argument("--phase2-iters", type=int, help="override the preset's phase-2 steps")
    parser.add_argument(
        "--save-interval",
        type=int,
        help="override the preset's phase-2 checkpoint/evaluation interval",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="phase-2 runs trained at once: they share the CPU cores; on "
        "CUDA each gets its own --nproc GPUs when there are enough",
    )
    parser.add_argument("--extra-train-args", default="", help="appended to every train command")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild report.md and the PNGs from --out's results.json (same "
        "flags as the run) without training or evaluating",
    )
    parser.add_argument(
        "--publish",
        metavar="FILE.md",
        help="also copy the report (and its PNGs) here, e.g. docs/evidence.md",
    )
    return parser.parse_args(argv)


def saved_results(path: str, config) -> dict:
    """results.json of an earlier invocation with this configuration (for --report-only); a
    setting that file predates takes the current default."""
    if not os.path.isfile(path):
        raise SystemExit(f"--report-only: {path} does not exist; run the experiment first")
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    expected = config_dict(config)
    differing = sorted(
        key for key, value in results["config"].items() if expected.get(key, value) != value
    )
    if differing:
        raise SystemExit(
            f"--report-only: {path} was produced with other settings "
            f"({', '.join(differing)}); pass the flags it was run with"
        )
    results["config"] = {**expected, **results["config"]}
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {
        key: value
        for key, value in dict(
            device=args.device,
            nproc=args.nproc,
            tensor_model_parallel_size=args.tp,
            seeds=tuple(args.seeds) if args.seeds else None,
            objectives=tuple(args.objectives) if args.objectives else None,
            variants=tuple(args.variants) if args.variants else None,
            phase2_iters=args.phase2_iters,
            save_interval=args.save_interval,
            extra_train_args=tuple(args.extra_train_args.split()) or None,
        ).items()
        if value is not None
    }
    config = preset(args.config, **overrides)
    path = os.path.join(args.out, "results.json")
    if args.report_only:
        results = saved_results(path, config)
    else:
        results = run_experiment(config, args.out, args.jobs)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
        os.replace(path + ".tmp", path)
    print(f"wrote {write_report(results, args.out)}")
    if args.publish:
        command = "python -m benchmarks.objectives_regimes.run " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        print(f"wrote {publish(args.out, args.publish, command)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
