"""One command for the whole objectives-under-regimes experiment (see README.md).

    python -m benchmarks.objectives_regimes.run --config smoke --out runs/regimes-smoke
    python -m benchmarks.objectives_regimes.run --config full --out runs/regimes  # the benchmark
    # GPUs: --device cuda --nproc 8 --tp 2 (and e.g. --extra-train-args=--bf16)

Steps: write the data (tasks.py), train a character SentencePiece tokenizer, phase 1 (the prior:
NLL on task A), phase 2 (every variant x objective x seed from the prior, or from scratch), all
checkpoints evaluated by one megatron-deft-eval launch, then results.json, report.md and PNGs in
--out. Repeating the command reuses finished runs and evaluations.
"""

import argparse
import json
import os
import platform
import shutil
import sys
import time

from benchmarks.objectives_regimes import runner, tasks
from benchmarks.objectives_regimes.config import preset
from benchmarks.objectives_regimes.report import config_dict, publish, write_report

EVAL_FILES = ("a_heldout", "b_heldout", "a_noisy")
TRAIN_FILE = {"mix": "mix", "clean": "clean", "forget": "b_only", "scratch": "b_only"}


def train_prior(config, run_dir: str, data: dict, tokenizer: str) -> str:
    save = os.path.join(run_dir, "ckpt", "prior")
    if not runner.finished(save, config.prior_iters):
        runner.train(config, "prior", run_dir, runner.model_args(config, tokenizer) + [
            "--train-data", data["prior_train"], "--sft-objective", "nll",
            "--train-iters", config.prior_iters, "--lr", config.prior_lr,
            "--seed", config.data_seed, "--save", save,
            "--tensorboard-dir", runner.tensorboard_dir(run_dir, "prior")])
    return save


def train_phase2(config, run_dir: str, data: dict, tokenizer: str, prior: str,
                 variant: str, objective: str, seed: int) -> str:
    name = runner.run_name(variant, objective, seed)
    save = os.path.join(run_dir, "ckpt", name)
    if runner.finished(save, config.phase2_iters):
        return save
    # An interrupted run's checkpoints would be evaluated as if they belonged to this one.
    shutil.rmtree(save, ignore_errors=True)
    args = runner.model_args(config, tokenizer) + [
        "--train-data", data[TRAIN_FILE[variant]], "--sft-objective", objective,
        "--train-iters", config.phase2_iters, "--lr", config.phase2_lr, "--seed", seed,
        "--save", save, "--save-interval", config.save_interval,
        "--tensorboard-dir", runner.tensorboard_dir(run_dir, name),
        "--token-class-key", "tag"]  # per-class gate histograms (tasks.py tags every sample)
    if variant != "scratch":
        args += ["--load", prior, "--finetune"]
    runner.train(config, name, run_dir, args)
    return save


def evaluate_all(config, run_dir: str, loads: list, data: dict, tokenizer: str) -> dict:
    """{checkpoint root: its summaries}; a root's summaries from an earlier launch are reused
    while it holds the same checkpoints (runner.checkpoint_fingerprint), so a retrained root
    is evaluated again."""
    done = runner.evaluated(run_dir, loads)
    missing = [root for root in loads if root not in done]
    if missing:
        summaries = runner.evaluate(config, run_dir, missing,
                                    [data[name] for name in EVAL_FILES], tokenizer)
        done.update({root: [s for s in summaries if s["load"] == root] for root in missing})
    return {root: done[root] for root in loads}


def run_experiment(config, run_dir: str) -> dict:
    started = time.time()
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    data = tasks.write_data(config, os.path.join(run_dir, "data"))
    tokenizer = runner.train_tokenizer(
        [data["prior_train"], data["mix"], data["a_heldout"], data["b_heldout"]],
        os.path.join(run_dir, "tokenizer", "char"), os.path.join(run_dir, "logs", "tok.log"))
    prior = train_prior(config, run_dir, data, tokenizer)
    roots = {}
    for variant in config.variants:
        for objective in config.objectives:
            for seed in config.seeds:
                roots[f"{variant}/{objective}/{seed}"] = train_phase2(
                    config, run_dir, data, tokenizer, prior, variant, objective, seed)
                print(f"[{time.time() - started:6.0f}s] trained {variant} {objective} "
                      f"seed {seed}", flush=True)
    summaries = evaluate_all(config, run_dir, [prior, *roots.values()], data, tokenizer)
    return {"config": config_dict(config), "prior": summaries[prior],
            "runs": {key: summaries[root] for key, root in roots.items()},
            "wall_seconds": _accumulated_wall(run_dir, time.time() - started),
            "machine": machine()}


def _accumulated_wall(run_dir: str, seconds: float) -> float:
    """Wall time over every invocation on ``run_dir`` (a resumed run keeps its earlier time)."""
    path = os.path.join(run_dir, "wall_seconds.txt")
    previous = 0.0
    if os.path.isfile(path):
        previous = float(open(path, encoding="utf-8").read())
    elif os.path.isfile(os.path.join(run_dir, "results.json")):  # written before this file
        with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as handle:
            previous = json.load(handle)["wall_seconds"]
    total = previous + seconds
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(f"{total:.1f}\n")
    os.replace(path + ".tmp", path)
    return total


def machine() -> str:
    cores = os.cpu_count()
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # the description must never fail the experiment
        gpu = "unknown GPU"
    return (f"{platform.node()} ({platform.machine()}, {cores} CPU cores, {gpu}; wall time "
            "includes whatever else the machine ran meanwhile)")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="smoke", help="preset: smoke or full")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--device", help="override the preset's device (cpu, cuda)")
    parser.add_argument("--nproc", type=int, help="processes per run (TP x DP)")
    parser.add_argument("--tp", type=int, help="tensor-model-parallel size")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the preset's seeds")
    parser.add_argument("--objectives", nargs="+", help="override the preset's objectives")
    parser.add_argument("--variants", nargs="+", help="override the preset's variants")
    parser.add_argument("--extra-train-args", default="", help="appended to every train command")
    parser.add_argument("--publish", metavar="FILE.md",
                        help="also copy the report (and its PNGs) here, e.g. docs/evidence.md")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = {key: value for key, value in dict(
        device=args.device, nproc=args.nproc, tensor_model_parallel_size=args.tp,
        seeds=tuple(args.seeds) if args.seeds else None,
        objectives=tuple(args.objectives) if args.objectives else None,
        variants=tuple(args.variants) if args.variants else None,
        extra_train_args=tuple(args.extra_train_args.split()) or None,
    ).items() if value is not None}
    config = preset(args.config, **overrides)
    results = run_experiment(config, args.out)
    path = os.path.join(args.out, "results.json")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {write_report(results, args.out)}")
    if args.publish:
        command = "python -m benchmarks.objectives_regimes.run " + " ".join(
            argv if argv is not None else sys.argv[1:])
        print(f"wrote {publish(args.out, args.publish, command)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
