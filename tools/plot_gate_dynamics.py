#!/usr/bin/env python3
"""Plot the objective's training dynamics from TensorBoard logs of megatron-deft-train runs.

One PNG with a panel per statistic the trainer logs (``train/<name>``): mean gate, mean exponent
a (q-log objectives), mean p_target, mean Renyi-2 entropy H2 = -log sum p^2, confident-conflict
fraction and NLL, one line per run. Runs without a statistic (e.g. a for dft/eaft) are skipped
in that panel.

    python tools/plot_gate_dynamics.py runs/regimes/tensorboard/mix-* --out gate_dynamics.png
"""

import argparse
import glob
import os
import sys
from typing import Dict, List, Optional, Tuple

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STATS = (("gate", "mean gate"), ("alpha", "mean exponent a"), ("p_target", "mean p_target"),
         ("renyi2_entropy", "mean Renyi-2 entropy H2"),
         ("confident_conflict", "confident-conflict fraction"), ("nll", "NLL"))
Series = Tuple[List[int], List[float]]


def read_scalars(logdir: str, prefix: str = "train/") -> Dict[str, Series]:
    """{stat name: (steps, values)} of every ``prefix``-tagged scalar in ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
        raise FileNotFoundError(f"{logdir}: no TensorBoard event files")
    events = EventAccumulator(logdir, size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for tag in events.Tags()["scalars"]:
        if tag.startswith(prefix):
            points = events.Scalars(tag)
            out[tag[len(prefix):]] = ([p.step for p in points], [p.value for p in points])
    return out


def plot(runs: Dict[str, Dict[str, Series]], out: str) -> str:
    """One panel per statistic in STATS present in any run; written atomically to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_deft.utils.figures import save_figure

    present = [(key, title) for key, title in STATS if any(key in r for r in runs.values())]
    if not present:
        raise ValueError("none of the runs logged " + ", ".join(k for k, _ in STATS))
    columns = min(3, len(present))
    rows = -(-len(present) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
    for axis, (key, title) in zip(axes.flat, present):
        for label, scalars in runs.items():
            if key in scalars:
                axis.plot(*scalars[key], label=label)
        axis.set(title=title, xlabel="iteration")
    for axis in list(axes.flat)[len(present):]:
        axis.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    return save_figure(figure, out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdirs", nargs="+", help="TensorBoard directories (--tensorboard-dir)")
    parser.add_argument("--out", default="gate_dynamics.png", help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        runs = {os.path.basename(os.path.normpath(d)): read_scalars(d) for d in args.logdirs}
        print(f"wrote {plot(runs, args.out)}")
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
