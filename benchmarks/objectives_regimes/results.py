"""Evaluation summaries -> per-run trajectories and mean ± sd over seeds.

A run's summaries (from megatron-deft-eval, one per checkpoint x file) become
``{token class: {iteration: summary}}`` with the classes below; aggregation is over seeds at
equal iterations.
"""

import statistics
from typing import Dict, List

from megatron_deft.conventions import LEGACY_STAT_NAMES

# Evaluation file stem -> token class label used in tables and plots.
CLASSES = {"a_heldout": "clean A", "b_heldout": "B", "a_noisy": "noisy A"}
# What exact-match on each class measures.
MEASURES = {
    "clean A": "retention / noise robustness (held-out A)",
    "B": "new learning (held-out B)",
    "noisy A": "fit to the corrupted labels (training A samples with wrong answers)",
}


def class_of(path: str) -> str:
    stem = path.replace("\\", "/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    return CLASSES[stem]


def trajectories(summaries: List[dict]) -> Dict[str, Dict[int, dict]]:
    """{class: {iteration: summary}}; summaries written before a statistic's rename (the
    docs/evidence* runs' exponent ``alpha``) get today's keys."""
    out: Dict[str, Dict[int, dict]] = {label: {} for label in CLASSES.values()}
    for summary in summaries:
        summary = {LEGACY_STAT_NAMES.get(key, key): value for key, value in summary.items()}
        out[class_of(summary["data"])][summary["iteration"]] = summary
    return out


def mean_sd(values: List[float]) -> tuple:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def over_seeds(
    runs: List[Dict[str, Dict[int, dict]]], label: str, key: str, iteration: int = None
) -> tuple:
    """mean, sd of ``key`` for class ``label`` at ``iteration`` (default: each run's last)."""
    values = []
    for run in runs:
        points = run[label]
        if not points:
            continue
        at = max(points) if iteration is None else iteration
        if at in points:
            values.append(points[at].get(key))
    return mean_sd(values)


def curve(runs: List[Dict[str, Dict[int, dict]]], label: str, key: str) -> tuple:
    """(iterations, means, sds) of ``key`` over the checkpoints every run has."""
    common = sorted(set.intersection(*(set(r[label]) for r in runs))) if runs else []
    stats = [over_seeds(runs, label, key, it) for it in common]
    return common, [m for m, _ in stats], [s for _, s in stats]


def fmt(mean: float, sd: float, digits: int = 3) -> str:
    if mean != mean:  # nan
        return "n/a"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"
