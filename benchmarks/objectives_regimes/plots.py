"""PNG figures of the experiment (matplotlib, optional: without it the report says so).

- ``accuracy_<variant>.png``: exact-match over phase-2 steps per objective, one panel per class.
- ``gate_vs_p_<variant>.png``: mean gate per p_target bin at the last checkpoint, per class.
- ``exponent_<variant>.png``: mean exponent a over steps (q-log objectives), per class.
- ``train_classes_<variant>.png``, ``gate_histograms_<variant>.png``: the training-time dynamics
  per token class of the training data (tools/plot_gate_dynamics.py on one seed's TensorBoard
  logs, a row per objective).
"""

import os

from benchmarks.objectives_regimes import runner
from benchmarks.objectives_regimes.results import CLASSES, curve, over_seeds
from megatron_deft.utils.figures import save_figure

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    HAVE_MATPLOTLIB = True
except ImportError:
    HAVE_MATPLOTLIB = False


def _panels(title: str):
    figure, axes = plt.subplots(1, len(CLASSES), figsize=(5 * len(CLASSES), 3.8), squeeze=False)
    figure.suptitle(title)
    return figure, axes[0]


def accuracy_curves(by_objective: dict, variant: str, out_dir: str, prior_em: dict) -> str:
    figure, axes = _panels(f"exact-match during phase 2 ({variant}); mean ± sd over seeds")
    for axis, label in zip(axes, CLASSES.values()):
        for objective, runs in by_objective.items():
            steps, means, sds = curve(runs, label, "exact_match")
            if prior_em and label in prior_em:  # iteration 0 = the prior itself
                steps, means, sds = [0] + steps, [prior_em[label]] + means, [0.0] + sds
            axis.errorbar(steps, means, yerr=sds, label=objective, marker="o", ms=3, capsize=2)
        axis.set(title=label, xlabel="phase-2 step", ylabel="exact-match", ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=8)
    return save_figure(figure, os.path.join(out_dir, f"accuracy_{variant}.png"))


def gate_vs_p(by_objective: dict, variant: str, out_dir: str) -> str:
    figure, axes = _panels(f"gate vs p_target at the last checkpoint ({variant})")
    for axis, label in zip(axes, CLASSES.values()):
        for objective, runs in by_objective.items():
            bins = _pooled_bins(runs, label)
            xs = [(lo + hi) / 2 for lo, hi, count, gate in bins if count]
            ys = [gate for _, _, count, gate in bins if count]
            axis.plot(xs, ys, marker="o", ms=3, label=objective)
        axis.set(title=label, xlabel="p_target (bin centre)", ylabel="mean gate")
    axes[0].legend(fontsize=8)
    return save_figure(figure, os.path.join(out_dir, f"gate_vs_p_{variant}.png"))


def _pooled_bins(runs, label):
    """[lo, hi, tokens, token-weighted mean gate] per bin, pooled over seeds (last checkpoint)."""
    pooled = None
    for run in runs:
        points = run[label]
        if not points:
            continue
        bins = points[max(points)]["gate_by_p_target"]
        if pooled is None:
            pooled = [[lo, hi, 0, 0.0] for lo, hi, _, _ in bins]
        for slot, (_, _, count, gate) in zip(pooled, bins):
            slot[2] += count
            slot[3] += (gate or 0.0) * count
    return [[lo, hi, n, g / n if n else None] for lo, hi, n, g in (pooled or [])]


def exponent_curves(by_objective: dict, variant: str, out_dir: str) -> str:
    figure, axes = _panels(f"mean exponent a over phase 2 ({variant}; q-log objectives)")
    for axis, label in zip(axes, CLASSES.values()):
        for objective, runs in by_objective.items():
            if over_seeds(runs, label, "exponent")[0] != over_seeds(runs, label, "exponent")[0]:
                continue  # no exponent (weighted-NLL objectives): nan
            steps, means, _ = curve(runs, label, "exponent")
            axis.plot(steps, means, marker="o", ms=3, label=objective)
        axis.set(title=label, xlabel="phase-2 step", ylabel="mean a")
    axes[0].legend(fontsize=8)
    return save_figure(figure, os.path.join(out_dir, f"exponent_{variant}.png"))


def training_dynamics(run_dir: str, variant: str, objectives, seed: int) -> list:
    """``train_classes_<variant>.png`` and ``gate_histograms_<variant>.png`` from the TensorBoard
    logs of the runs of ``seed`` (a row per objective); [] when no run logged token classes
    (runs trained before phase 2 passed ``--token-class-key``)."""
    from tools import plot_gate_dynamics as tool

    runs = {
        objective: tool.read_run(
            runner.tensorboard_dir(run_dir, runner.run_name(variant, objective, seed))
        )
        for objective in objectives
    }
    if not tool.class_names(runs):
        return []
    written = [
        tool.plot_classes(runs, os.path.join(run_dir, f"train_classes_{variant}.png")),
        tool.plot_histograms(runs, "gate", os.path.join(run_dir, f"gate_histograms_{variant}.png")),
    ]
    return [path for path in written if path]
