"""The experiment's data: task A (addition, the prior), task B (digit sorting, new), and task-A
samples whose answers are corrupted (confident conflicts once the prior knows A).

Held-out prompts never occur in any training file (training draws reject them), so held-out
exact-match measures generalisation, not memorisation.
"""

import os
import random

from megatron_deft.data.synthetic_tasks import addition, sort_digits, write_jsonl

FILES = ("prior_train", "a_heldout", "b_heldout", "mix", "clean", "b_only", "a_noisy")


def _draw(task, rng, count, exclude=frozenset()):
    """``count`` samples (repeats allowed) whose prompts are not in ``exclude``."""
    out = []
    for _ in range(100 * count):
        sample = task(rng)
        if sample["prompt"] not in exclude:
            out.append(sample)
            if len(out) == count:
                return out
    raise RuntimeError("task space too small for the requested held-out split")


def _unique(task, rng, count):
    """``count`` samples with distinct prompts (the held-out sets)."""
    out, seen = [], set()
    for _ in range(100 * count):
        sample = task(rng)
        if sample["prompt"] not in seen:
            seen.add(sample["prompt"])
            out.append(sample)
            if len(out) == count:
                return out
    raise RuntimeError("task space too small for the requested held-out split")


def corrupt(sample: dict, rng: random.Random, digits: int) -> dict:
    """The same prompt with a wrong sum of plausible size (never the true one)."""
    truth = int(sample["response"])
    wrong = truth
    while wrong == truth:
        wrong = rng.randrange(2 * 10**digits - 1)
    return {"prompt": sample["prompt"], "response": str(wrong), "tag": "noisy_a"}


def write_data(config, directory: str) -> dict:
    """Writes every JSONL file; returns {name: path} (see FILES) and the count of corrupted A."""
    rng = random.Random(config.data_seed)
    task_a = lambda r: addition(r, config.addition_digits)  # noqa: E731
    task_b = lambda r: sort_digits(r, config.sort_length)  # noqa: E731
    a_heldout = _unique(task_a, rng, config.eval_samples)
    b_heldout = _unique(task_b, rng, config.eval_samples)
    a_exclude = frozenset(s["prompt"] for s in a_heldout)
    b_exclude = frozenset(s["prompt"] for s in b_heldout)
    prior = _draw(task_a, rng, config.prior_samples, a_exclude)
    b_train = [dict(s, tag="b") for s in _draw(task_b, rng, config.phase2_b_samples, b_exclude)]
    a_train = [
        dict(s, tag="clean_a") for s in _draw(task_a, rng, config.phase2_a_samples, a_exclude)
    ]
    noisy = [
        corrupt(s, rng, config.addition_digits) if rng.random() < config.noise_rate else s
        for s in a_train
    ]
    files = {
        "prior_train": prior,
        "a_heldout": a_heldout,
        "b_heldout": b_heldout,
        "mix": _shuffled(b_train + noisy, rng),
        "clean": _shuffled(b_train + a_train, rng),
        "b_only": b_train,
        "a_noisy": [s for s in noisy if s["tag"] == "noisy_a"][: config.eval_samples],
    }
    paths = {}
    for name, samples in files.items():
        paths[name] = os.path.join(directory, f"{name}.jsonl")
        write_jsonl(paths[name], samples)
    return paths


def _shuffled(samples, rng):
    samples = list(samples)
    rng.shuffle(samples)
    return samples
