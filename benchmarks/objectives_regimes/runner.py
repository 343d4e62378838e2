"""Subprocess launches of the project's own commands: tokenizer training, megatron-deft-train
(torchrun) and megatron-deft-eval (torchrun). Every launch logs to ``RUN/logs/<name>.log``; a
failure stops the experiment with the log's tail.

Evaluations are kept in ``RUN/evals/batchNNN.jsonl`` (one eval launch each) with
``batchNNN.checkpoints.json`` next to it: {checkpoint root: checkpoint_fingerprint} at launch
time. A root's summaries are reused only while its fingerprint is unchanged, so a retrained root
(an interrupted run is deleted and trained again) is evaluated again.
"""

import json
import os
import subprocess
import sys

from megatron_deft.conventions import TRACKER

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LaunchFailed(RuntimeError):
    """A launched command exited non-zero."""


def run_logged(
    command: list, log_path: str, processes: int = 1, gpus: str = None, append: bool = False
) -> None:
    """Run ``command`` from the repository root, output to ``log_path`` (after what is there
    with ``append``); raise on failure. ``processes``: how many processes share the machine
    meanwhile (this launch's ranks times the launches running at once); each gets an equal
    share of the cores as OMP threads, since oversubscribed CPU threads slow every run down
    many times over. ``gpus``: the launch's CUDA_VISIBLE_DEVICES (None: inherited)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS=str(threads))
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    with open(log_path, "a" if append else "w", encoding="utf-8") as log:
        log.write(" ".join(map(str, command)) + "\n")
        log.flush()
        done = subprocess.run(
            list(map(str, command)), cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        tail = open(log_path, encoding="utf-8").read()[-3000:]
        raise LaunchFailed(f"{command[0]} ... failed (exit {done.returncode}); {log_path}:\n{tail}")


def torchrun(module: str, args: list, nproc: int) -> list:
    # --standalone: the rendezvous binds a free port itself, so concurrent launches (--jobs)
    # cannot race for one.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        nproc,
        "-m",
        module,
        *args,
    ]


def train_tokenizer(inputs: list, prefix: str, log_path: str) -> str:
    """Character-level SentencePiece model over every text of ``inputs``: digits are single
    tokens, so arithmetic is not hidden behind arbitrary merges."""
    run_logged(
        [
            sys.executable,
            os.path.join(REPO_ROOT, "tools", "train_tokenizer.py"),
            "--input",
            *inputs,
            "--model-type",
            "char",
            "--no-byte-fallback",
            "--vocab-size",
            64,
            "--model-prefix",
            prefix,
            "--num-threads",
            1,
        ],
        log_path,
    )
    return prefix + ".model"


WARMUP_ITERS = 10
"""Linear LR warmup of every run (phase 1 and phase 2)."""


def model_args(config, tokenizer_model: str) -> list:
    """Flags shared by every training run (architecture, batch, data format, device)."""
    return [
        "--device",
        config.device,
        "--tensor-model-parallel-size",
        config.tensor_model_parallel_size,
        "--num-layers",
        config.num_layers,
        "--hidden-size",
        config.hidden_size,
        "--num-attention-heads",
        config.num_attention_heads,
        "--seq-length",
        config.seq_length,
        "--micro-batch-size",
        config.micro_batch_size,
        "--global-batch-size",
        config.global_batch_size,
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        tokenizer_model,
        "--make-vocab-size-divisible-by",
        16,
        "--lr-warmup-iters",
        WARMUP_ITERS,
        "--weight-decay",
        0.0,
        # At least one log step per checkpoint: short runs (smoke) still get training dynamics.
        "--log-interval",
        min(10, config.save_interval),
        *config.extra_train_args,
    ]


def run_name(variant: str, objective: str, seed: int) -> str:
    """A phase-2 run's name: its checkpoint root, TensorBoard directory and log file."""
    return f"{variant}-{objective}-s{seed}"


def tensorboard_dir(run_dir: str, name: str) -> str:
    return os.path.join(run_dir, "tensorboard", name)


def visible_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def train(
    config,
    name: str,
    run_dir: str,
    args: list,
    concurrent: int = 1,
    slot: int = 0,
    resumed: bool = False,
) -> None:
    """One megatron-deft-train run; ``args`` adds data, objective, schedule and checkpoints.
    ``concurrent`` such runs execute at once, this one in ``slot`` (0..concurrent-1): they
    split the CPU threads and, on CUDA with enough GPUs, each gets its own ``config.nproc``
    of them (otherwise they share). A ``resumed`` run continues its log."""
    command = torchrun("megatron_deft.train", args, config.nproc)
    gpus = None
    if (
        config.device == "cuda"
        and concurrent > 1
        and visible_gpu_count() >= concurrent * config.nproc
    ):
        gpus = ",".join(str(slot * config.nproc + rank) for rank in range(config.nproc))
    run_logged(
        command,
        os.path.join(run_dir, "logs", f"{name}.log"),
        config.nproc * concurrent,
        gpus,
        append=resumed,
    )


def evaluate(config, run_dir: str, loads: list, data: list, tokenizer_model: str) -> list:
    """One megatron-deft-eval launch over every checkpoint of every root in ``loads`` (each
    with its own training objective's statistics); returns the summaries."""
    evals = os.path.join(run_dir, "evals")
    os.makedirs(evals, exist_ok=True)
    # A failed launch's partial batch file (no .checkpoints.json) is overwritten.
    index = len([name for name in os.listdir(evals) if name.endswith(".jsonl")])
    summary_path = os.path.join(evals, f"batch{index:03d}.jsonl")
    fingerprints = {root: checkpoint_fingerprint(root) for root in loads}
    args = [
        "--load",
        ",".join(loads),
        "--iteration",
        "all",
        "--eval-data",
        ",".join(data),
        "--tokenizer-model",
        tokenizer_model,
        "--device",
        config.device,
        "--tensor-model-parallel-size",
        config.tensor_model_parallel_size,
        "--max-new-tokens",
        config.max_new_tokens,
        "--micro-batch-size",
        64,
        "--summary-output",
        summary_path,
    ]
    command = torchrun("megatron_deft.eval", args, config.nproc)
    run_logged(command, os.path.join(run_dir, "logs", f"eval{index:03d}.log"), config.nproc)
    record = summary_path[: -len(".jsonl")] + ".checkpoints.json"
    with open(record + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(fingerprints, handle, indent=1)
    os.replace(record + ".tmp", record)
    return read_jsonl(summary_path)


def evaluated(run_dir: str, loads: list) -> dict:
    """{root: summaries} of the roots in ``loads`` that an earlier launch evaluated with the
    checkpoints they hold now (same fingerprint); the latest such launch wins."""
    evals = os.path.join(run_dir, "evals")
    names = sorted(os.listdir(evals)) if os.path.isdir(evals) else []
    current = {root: checkpoint_fingerprint(root) for root in loads}
    out = {}
    for name in names:
        if not name.endswith(".checkpoints.json"):
            continue
        with open(os.path.join(evals, name), encoding="utf-8") as handle:
            recorded = json.load(handle)
        valid = [
            root
            for root, fingerprint in recorded.items()
            if fingerprint is not None and current.get(root) == fingerprint
        ]
        if valid:
            batch = name[: -len(".checkpoints.json")] + ".jsonl"
            summaries = read_jsonl(os.path.join(evals, batch))
            out.update({root: [s for s in summaries if s["load"] == root] for root in valid})
    return out


def read_jsonl(path: str) -> list:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def finished(save: str, iterations: int) -> bool:
    """True when ``save`` holds the final checkpoint of a run of ``iterations`` steps."""
    tracker = os.path.join(save, TRACKER)
    return os.path.isfile(tracker) and open(tracker).read().strip() == str(iterations)


LAUNCH_RECORD = "launch_args.json"
"""Written into a run's checkpoint root before it starts: the arguments it was launched with."""


def record_launch(save: str, args: list) -> None:
    os.makedirs(save, exist_ok=True)
    path = os.path.join(save, LAUNCH_RECORD)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(list(map(str, args)), handle)
    os.replace(path + ".tmp", path)


def resumable(save: str, args: list) -> bool:
    """True when ``save`` holds checkpoints of a run launched with exactly ``args`` (its
    record_launch), which it can therefore continue."""
    record = os.path.join(save, LAUNCH_RECORD)
    if not (os.path.isfile(record) and os.path.isfile(os.path.join(save, TRACKER))):
        return False
    with open(record, encoding="utf-8") as handle:
        return json.load(handle) == list(map(str, args))


def checkpoint_fingerprint(save: str):
    """Identifies the run whose checkpoints ``save`` holds: the tracker's iteration and its
    modification time in ns (rewritten at every save, so a retrained root gets a new one);
    None without checkpoints."""
    tracker = os.path.join(save, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker, encoding="utf-8") as handle:
        iteration = handle.read().strip()
    return f"{iteration}@{os.stat(tracker).st_mtime_ns}"
