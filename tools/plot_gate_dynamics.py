#!/usr/bin/env python3
"""Plot the objective's training dynamics from TensorBoard logs of megatron-deft-train runs.

Writes ``--out`` (e.g. ``dyn.png``): one panel per statistic the trainer logs as a ``train/<stat>``
scalar (mean gate, mean exponent a of q-log objectives, mean p_target, mean Renyi-2 entropy
H2 = -log sum p^2, confident-conflict fraction, NLL), one line per run; runs without a statistic
(e.g. a for dft/eaft) are left out of that panel.

When the runs were trained with ``--token-class-key`` (``train_class/<class>/...`` tags), also

- ``dyn_classes.png``: a row per run; the per-class token means of the gate, the exponent a
  and p_target over the iterations (``train_class/<class>/<stat>``; one colour per class in every
  panel, token shares from ``.../token_fraction`` in the legend), and the path of each class in
  the (mean p_target, mean gate) plane, points growing and darkening with the iteration;
- ``dyn_gate_histograms.png`` and, when a run has an exponent, ``dyn_exponent_histograms.png``: a
  row per run, a column for all tokens (``train/<stat>_histogram``) and one per class
  (``train_class/<class>/<stat>_histogram``); each a heatmap over (iteration, value) of the share
  of that step's tokens in the bin, with the token mean (sum / num) drawn on top.

    python tools/plot_gate_dynamics.py runs/regimes/tensorboard/mix-* --out gate_dynamics.png
"""

import argparse
import os
import sys
from typing import Dict, List, Optional

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.gate_dynamics_logs import ALL_TOKENS, read_run, read_scalars  # noqa: E402

__all__ = [
    "read_run",
    "read_scalars",
    "class_names",
    "plot",
    "plot_classes",
    "plot_histograms",
    "plot_class_dynamics",
    "run_labels",
    "main",
]

STATS = (
    ("gate", "mean gate"),
    ("exponent", "mean exponent a"),
    ("p_target", "mean p_target"),
    ("renyi2_entropy", "mean Renyi-2 entropy H2"),
    ("confident_conflict", "confident-conflict fraction"),
    ("nll", "NLL"),
)
CLASS_STATS = (
    ("gate", "mean gate"),
    ("exponent", "mean exponent a"),
    ("p_target", "mean p_target"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(runs: Dict[str, dict], out: str) -> str:
    """One panel per statistic in STATS present in any run; ``runs``: {label: read_scalars()}.
    Written atomically to ``out``."""
    from megatron_deft.utils.figures import save_figure

    present = [(key, title) for key, title in STATS if any(key in r for r in runs.values())]
    if not present:
        raise ValueError("none of the runs logged " + ", ".join(k for k, _ in STATS))
    columns = min(3, len(present))
    rows = -(-len(present) // columns)
    figure, axes = _pyplot().subplots(
        rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False
    )
    for axis, (key, title) in zip(axes.flat, present):
        for label, scalars in runs.items():
            if key in scalars:
                axis.plot(*scalars[key], label=label)
        axis.set(title=title, xlabel="iteration")
    for axis in list(axes.flat)[len(present) :]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    return save_figure(figure, out)


def class_names(runs: Dict[str, dict]) -> List[str]:
    """Every token class of any run, in order of first appearance (fixes each class' colour)."""
    names = {}
    for run in runs.values():
        names.update(dict.fromkeys(run["classes"]))
        for by_class in run["histograms"].values():
            names.update(dict.fromkeys(n for n in by_class if n is not ALL_TOKENS))
    return list(names)


def _class_colours(runs: Dict[str, dict]) -> Dict[str, tuple]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    return {name: palette[i % len(palette)] for i, name in enumerate(class_names(runs))}


def _note(axis, text: str) -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes, fontsize=8)
    axis.set(xticks=[], yticks=[])


def plot_classes(runs: Dict[str, dict], out: str) -> str:
    """Per-class token means over the iterations and each class' (p_target, gate) path; a row
    per run of ``runs`` ({label: read_run()}). Written atomically to ``out``."""
    from megatron_deft.utils.figures import save_figure

    colours = _class_colours(runs)
    stats = [
        (key, title)
        for key, title in CLASS_STATS
        if any(key in by_stat for r in runs.values() for by_stat in r["classes"].values())
    ]
    figure, axes = _pyplot().subplots(
        len(runs), len(stats) + 1, squeeze=False, figsize=(4.2 * (len(stats) + 1), 3.3 * len(runs))
    )
    for row, (label, run) in zip(axes, runs.items()):
        for axis, (key, title) in zip(row, stats):
            axis.set(title=f"{label}: {title}", xlabel="iteration")
            lines = {n: s[key] for n, s in run["classes"].items() if key in s}
            if not lines:
                _note(axis, f"{title} not logged for this run")
            for name, (steps, values) in lines.items():
                axis.plot(
                    steps,
                    values,
                    color=colours[name],
                    marker=".",
                    label=_with_share(name, run["classes"][name]),
                )
            if lines:
                axis.legend(fontsize=7)
        _gate_vs_p_target(row[-1], run["classes"], colours)
        row[-1].set_title(f"{label}: gate vs p_target per class")
    return save_figure(figure, out)


def _with_share(name: str, stats: dict) -> str:
    """``name (x% of tokens)``: the class' mean share of the loss tokens over the log steps."""
    if "token_fraction" not in stats:
        return name
    shares = stats["token_fraction"][1]
    return f"{name} ({100 * sum(shares) / len(shares):.0f}% of tokens)"


def _gate_vs_p_target(axis, classes: dict, colours: dict) -> None:
    """Each class' (mean p_target, mean gate) at every log step it has both; markers grow and
    darken with the iteration, a square marks the first step and a star the last."""
    from matplotlib.lines import Line2D

    axis.set(xlabel="mean p_target", ylabel="mean gate")
    drawn = False
    for name, stats in classes.items():
        if "gate" not in stats or "p_target" not in stats:
            continue
        p_target, gate = dict(zip(*stats["p_target"])), dict(zip(*stats["gate"]))
        steps = sorted(set(p_target) & set(gate))
        if not steps:
            continue
        xs, ys = [p_target[s] for s in steps], [gate[s] for s in steps]
        ramp = [(i + 1) / len(steps) for i in range(len(steps))]  # (0, 1]: later = stronger
        axis.plot(xs, ys, color=colours[name], lw=0.8, alpha=0.5, label=name)
        axis.scatter(
            xs,
            ys,
            s=[10 + 40 * r for r in ramp],
            edgecolors="none",
            c=[(*colours[name][:3], 0.2 + 0.8 * r) for r in ramp],
        )
        axis.scatter(xs[:1], ys[:1], marker="s", s=60, facecolors="none", color=colours[name])
        axis.scatter(xs[-1:], ys[-1:], marker="*", s=140, color=colours[name])
        drawn = True
    if not drawn:
        _note(axis, "no class logged both gate and p_target")
        return
    handles, _ = axis.get_legend_handles_labels()
    handles += [
        Line2D([], [], ls="", marker="s", mfc="none", mec="k", label="first step"),
        Line2D([], [], ls="", marker="*", ms=10, color="k", label="last step"),
    ]
    axis.legend(handles=handles, fontsize=7)


def plot_histograms(runs: Dict[str, dict], stat: str, out: str) -> Optional[str]:
    """Heatmaps of ``stat``'s histograms over the iterations: a row per run that logged them, a
    column for all tokens and one per class. Returns ``out``, or None (nothing written) when no
    run has ``stat`` histograms (e.g. the exponent of dft/eaft)."""
    from matplotlib.colors import PowerNorm

    from megatron_deft.utils.figures import save_figure

    rows = {
        label: run["histograms"][stat] for label, run in runs.items() if run["histograms"].get(stat)
    }
    if not rows:
        return None
    columns = [ALL_TOKENS, *class_names(runs)]
    figure, axes = _pyplot().subplots(
        len(rows), len(columns), squeeze=False, figsize=(3.9 * len(columns), 3.0 * len(rows))
    )
    # sqrt colour scale: a bin with 1% of the tokens is still visible next to one with 90%.
    norm = PowerNorm(0.5, vmin=0.0, vmax=1.0)
    explained = False
    for row, (label, by_class) in zip(axes, rows.items()):
        for axis, name in zip(row, columns):
            axis.set(
                title=f"{label}: {name if name is not ALL_TOKENS else 'all tokens'}",
                xlabel="iteration",
                ylabel="exponent a" if stat == "exponent" else stat,
            )
            if name not in by_class:
                _note(axis, "no tokens of this class")
                continue
            colour_bar = figure.colorbar(_heatmap(axis, by_class[name], norm), ax=axis, pad=0.02)
            if axis is row[-1]:
                colour_bar.set_label("share of the log step's tokens")
            if not explained:  # the cyan line's legend, once
                axis.legend(fontsize=7, framealpha=0.6)
                explained = True
    return save_figure(figure, out)


def _heatmap(axis, series: dict, norm):
    """One series of read_run(): columns = log steps, rows = bins; the mean line on top."""
    import numpy as np

    num = np.maximum(series["num"], 1.0)[:, None]  # a step without tokens stays all zero
    mesh = axis.pcolormesh(
        _step_edges(series["steps"]),
        series["edges"],
        (series["counts"] / num).T,
        cmap="magma",
        norm=norm,
        shading="flat",
    )
    axis.plot(series["steps"], series["mean"], color="cyan", lw=1.2, label="token mean")
    return mesh


def _step_edges(steps):
    """Cell boundaries around the log steps: midpoints, the ends half a gap outside."""
    import numpy as np

    steps = np.asarray(steps, dtype=np.float64)
    if len(steps) == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    middles = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[2 * steps[0] - middles[0]], middles, [2 * steps[-1] - middles[-1]]])


def plot_class_dynamics(runs: Dict[str, dict], out: str) -> List[str]:
    """The per-class figures next to ``out`` (``X.png`` -> ``X_classes.png``,
    ``X_gate_histograms.png``, ``X_exponent_histograms.png``); none when no run has classes."""
    if not class_names(runs):
        return []
    stem, extension = os.path.splitext(out)
    extension = extension or ".png"
    written = [plot_classes(runs, f"{stem}_classes{extension}")]
    for stat in ("gate", "exponent"):
        written.append(plot_histograms(runs, stat, f"{stem}_{stat}_histograms{extension}"))
    return [path for path in written if path]


def run_labels(logdirs: List[str]) -> List[str]:
    """Each directory's base name, or its full path where two base names coincide."""
    names = [os.path.basename(os.path.normpath(d)) for d in logdirs]
    return [n if names.count(n) == 1 else os.path.normpath(d) for n, d in zip(names, logdirs)]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdirs", nargs="+", help="TensorBoard directories (--tensorboard-dir)")
    parser.add_argument("--out", default="gate_dynamics.png", help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        runs = {label: read_run(d) for label, d in zip(run_labels(args.logdirs), args.logdirs)}
        written = [plot({label: run["scalars"] for label, run in runs.items()}, args.out)]
        written += plot_class_dynamics(runs, args.out)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
