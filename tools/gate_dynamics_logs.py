"""Reading a megatron-deft-train TensorBoard directory back into plain lists and numpy arrays.

The tags (megatron_deft/training/metrics.py): ``train/<stat>`` scalars, ``train/<stat>_histogram``
histograms of all loss tokens and, with ``--token-class-key``, ``train_class/<class>/<stat>``
scalars (token means, ``token_fraction``) and ``train_class/<class>/<stat>_histogram``. Used by
tools/plot_gate_dynamics.py and the objectives-regimes report. Statistics come back under their
current names: logs written before a rename (the docs/evidence* runs log the exponent a as
``alpha``) read as today's (megatron_deft.conventions.LEGACY_STAT_NAMES).
"""

import glob
import os
from typing import Dict, List, Tuple

import numpy as np

from megatron_deft.conventions import LEGACY_STAT_NAMES

Series = Tuple[List[int], List[float]]
ALL_TOKENS = None
"""Class key of the histograms over all loss tokens (``train/<stat>_histogram``), as in the
trainer's split_histograms."""


def _load(logdir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        raise FileNotFoundError(f"{logdir}: no TensorBoard event files")
    events = EventAccumulator(logdir, size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def _scalars(events, prefix: str) -> Dict[str, Series]:
    out = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(prefix):
            points = events.Scalars(tag)
            out[_current(tag[len(prefix) :])] = (
                [p.step for p in points],
                [p.value for p in points],
            )
    return out


def _current(key: str) -> str:
    """``key`` (``stat`` or ``class/stat``) with a legacy statistic name renamed."""
    head, slash, stat = key.rpartition("/")
    return head + slash + LEGACY_STAT_NAMES.get(stat, stat)


def read_scalars(logdir: str, prefix: str = "train/") -> Dict[str, Series]:
    """{stat name: (steps, values)} of every ``prefix``-tagged scalar in ``logdir``."""
    return _scalars(_load(logdir), prefix)


def read_run(logdir: str) -> dict:
    """Everything the dynamics plots use from one run:

    - ``scalars``: {stat: (steps, values)} of the ``train/<stat>`` scalars;
    - ``classes``: {class: {stat: (steps, values)}} of ``train_class/<class>/<stat>``;
    - ``histograms``: {stat: {class or ALL_TOKENS: series}} of the ``<stat>_histogram`` tags, a
      series being the dict of _histogram_series.

    Class names may contain '/': the statistic is the last path component of the tag.
    """
    events = _load(logdir)
    classes: Dict[str, Dict[str, Series]] = {}
    for key, series in _scalars(events, "train_class/").items():
        name, stat = key.rsplit("/", 1)
        classes.setdefault(name, {})[stat] = series
    histograms: Dict[str, dict] = {}
    for tag in events.Tags()["histograms"]:
        head, _, stat = tag.rpartition("/")
        if not stat.endswith("_histogram"):
            continue
        if head == "train":
            name = ALL_TOKENS
        elif head.startswith("train_class/"):
            name = head[len("train_class/") :]
        else:
            continue
        series = _histogram_series(events.Histograms(tag), f"{logdir}: {tag}")
        histograms.setdefault(_current(stat[: -len("_histogram")]), {})[name] = series
    return {"scalars": _scalars(events, "train/"), "classes": classes, "histograms": histograms}


def _histogram_series(events: list, where: str) -> dict:
    """One histogram tag over its log steps (T steps, B bins):

        steps   int64   [T]
        edges   float64 [B + 1]  bin boundaries, the same at every step
        counts  float64 [T, B]   tokens per bin
        num     float64 [T]      tokens (the sum of counts)
        mean    float64 [T]      token mean of the statistic, sum / num (nan without tokens)

    TensorBoard stores only the upper edges (bucket_limit); the lower edge of the first bin is
    one bin width below, as the trainer's bins are equal (for one bin: the logged minimum).
    """
    upper = [tuple(e.histogram_value.bucket_limit) for e in events]
    if len(set(upper)) > 1:
        changed = next(e.step for e, u in zip(events, upper) if u != upper[0])
        raise ValueError(
            f"{where}: the histogram bins change at step {changed}; "
            "plot the runs in separate TensorBoard directories"
        )
    limits = np.asarray(upper[0], dtype=np.float64)
    first = events[0].histogram_value
    below = 2 * limits[0] - limits[1] if len(limits) > 1 else first.min
    values = [e.histogram_value for e in events]
    num = np.array([h.num for h in values], dtype=np.float64)
    total = np.array([h.sum for h in values], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(num > 0, total / num, np.nan)
    return {
        "steps": np.array([e.step for e in events], dtype=np.int64),
        "edges": np.concatenate([[below], limits]),
        "counts": np.array([h.bucket for h in values], dtype=np.float64),
        "num": num,
        "mean": mean,
    }
