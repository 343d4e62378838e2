"""results.json -> report.md (tables) + PNG plots in the run directory."""

import dataclasses
import json
import os

from benchmarks.objectives_regimes import plots, runner
from benchmarks.objectives_regimes.results import (
    CLASSES,
    MEASURES,
    curve,
    fmt,
    over_seeds,
    trajectories,
)

VARIANT_TEXT = {
    "mix": "B + task-A samples whose answer is corrupted with probability r (from the prior)",
    "clean": "B + clean task-A samples (r = 0, from the prior)",
    "forget": "B only, no task A in the mix (from the prior): A retention",
    "scratch": "B only from random init (no prior): the truly model-weak regime",
}
DYNAMICS_TEXT = (
    "Training-time dynamics per token class (seed {seed}, from each run's TensorBoard logs; a "
    "row per objective; the classes are the training samples' tags: `b` = task B, `clean_a` = "
    "task A with the true answer, `noisy_a` = task A with a corrupted answer). The first figure "
    "gives the token-mean gate, exponent a (q-log objectives) and p_target of each class at "
    "every log step, and each class' path in the (mean p_target, mean gate) plane (square: "
    "first log step, star: last). An objective that ignores confident conflicts should give "
    "`noisy_a` a lower gate than `clean_a` once the prior disagrees with the corrupted labels; "
    "NLL's gate is 1 for every token. The second figure shows the whole gate distribution of "
    "each class over the iterations (colour: share of the log step's tokens per bin, cyan: the "
    "mean), which tells a class whose tokens are all down-weighted a little from one split "
    "into ignored and fully trained tokens."
)
SUMMARY_CLASSES = {
    "mix": ("clean A", "B", "noisy A"),
    "clean": ("clean A", "B"),
    "forget": ("clean A", "B"),
    "scratch": ("B",),
}
"""The exact-match columns of each variant in the cross-variant summary: what it tests (a variant
without noisy samples has no noise to fit; scratch has no prior to keep)."""
DIAGNOSTICS = (
    ("p_target", "mean p_target"),
    ("sum_p2", "mean Σp²"),
    ("exponent", "mean a"),
    ("gate", "mean gate"),
)


def _by_objective(results: dict, variant: str) -> dict:
    """{objective: [per-seed trajectories]} of one variant."""
    out = {}
    for key, summaries in results["runs"].items():
        run_variant, objective, _ = key.split("/")
        if run_variant == variant:
            out.setdefault(objective, []).append(trajectories(summaries))
    return {o: out[o] for o in results["config"]["objectives"] if o in out}


def _accuracy_table(by_objective: dict) -> list:
    labels = list(CLASSES.values())
    lines = [
        "| objective | " + " | ".join(f"EM {label}" for label in labels) + " | NLL B (per token) |",
        "|---" * (len(labels) + 2) + "|",
    ]
    for objective, runs in by_objective.items():
        cells = [fmt(*over_seeds(runs, label, "exact_match")) for label in labels]
        cells.append(fmt(*over_seeds(runs, "B", "nll")))
        lines.append(f"| {objective} | " + " | ".join(cells) + " |")
    return lines


def _summary_table(results: dict, variants: list, prior_em: dict) -> list:
    """One row per objective, the last checkpoint's exact-match (mean ± sd over seeds) of every
    variant side by side (SUMMARY_CLASSES), and a first row with the prior's own: where each
    variant starts from."""
    columns = [(v, label) for v in variants for label in SUMMARY_CLASSES[v]]
    lines = [
        "| objective | " + " | ".join(f"{v}: {label}" for v, label in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    start = [
        f"{prior_em[label]:.3f}" if v != "scratch" and label in prior_em else "-"
        for v, label in columns
    ]
    lines.append("| (prior, before SFT) | " + " | ".join(start) + " |")
    by_variant = {v: _by_objective(results, v) for v in variants}
    for objective in results["config"]["objectives"]:
        cells = [
            fmt(*over_seeds(by_variant[v].get(objective, []), label, "exact_match"))
            for v, label in columns
        ]
        lines.append(f"| {objective} | " + " | ".join(cells) + " |")
    return lines


TRAJECTORY_COLUMNS = 12
"""At most this many checkpoints per trajectory table (every k-th, counted back from the last);
the plots and results.json hold them all."""


def _trajectory_table(by_objective: dict, label: str) -> list:
    steps = sorted(
        {step for runs in by_objective.values() for step in curve(runs, label, "exact_match")[0]}
    )
    stride = -(-len(steps) // TRAJECTORY_COLUMNS)
    steps = steps[::-1][::stride][::-1]
    lines = [
        "| objective | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---" * (len(steps) + 1) + "|",
    ]
    for objective, runs in by_objective.items():
        xs, means, _ = curve(runs, label, "exact_match")
        row = dict(zip(xs, means))
        lines.append(
            f"| {objective} | "
            + " | ".join(f"{row[s]:.3f}" if s in row else "" for s in steps)
            + " |"
        )
    return lines


def _diagnostics_table(by_objective: dict) -> list:
    lines = [
        "| objective | class | " + " | ".join(t for _, t in DIAGNOSTICS) + " |",
        "|---" * (len(DIAGNOSTICS) + 2) + "|",
    ]
    for objective, runs in by_objective.items():
        for label in CLASSES.values():
            cells = [fmt(*over_seeds(runs, label, key)) for key, _ in DIAGNOSTICS]
            lines.append(f"| {objective} | {label} | " + " | ".join(cells) + " |")
    return lines


PLATEAU_TOLERANCE = 0.02
"""Exact-match within this of NLL's plateau level counts as having reached it (held-out sets of
~100 samples move by 0.01 per answer)."""


def _nll_horizon(by_objective: dict, total_steps: int) -> str:
    """When NLL reaches its best held-out-B exact-match (mean over seeds), against the run length
    (want >= 3x).

    On a flat but noisy curve the arg-max lands anywhere on the plateau, and it sits above the
    plateau by the noise, so both are reported: the arg-max, and the first checkpoint within
    PLATEAU_TOLERANCE of the plateau level (the mean over the last third of the checkpoints).
    A curve still rising at the end has a level near its end, reached late, so it cannot meet
    3x this way: meeting it takes a curve flat (within the tolerance) over the last 2/3 of the
    run."""
    runs = by_objective.get("nll")
    if not runs:
        return "NLL was not run; no horizon check."
    steps, means, _ = curve(runs, "B", "exact_match")
    if not steps:
        return "no NLL checkpoints."
    best_value = max(means)
    if best_value == 0.0:
        return (
            f"NLL never produced an exact held-out-B answer in {total_steps} steps, so the "
            "3x-the-best-step horizon cannot be assessed (B is not learned at this budget)."
        )

    def versus(step: int) -> str:
        ratio = total_steps / step
        return f"{ratio:.1f}x ({'meets' if ratio >= 3 else 'does NOT meet'} the 3x target)"

    best = steps[means.index(best_value)]
    last_third = means[len(means) - max(1, len(means) // 3) :]
    level = sum(last_third) / len(last_third)
    onset = next(s for s, m in zip(steps, means) if m >= level - PLATEAU_TOLERANCE)
    return (
        f"NLL's held-out-B exact-match is highest ({best_value:.3f}) at step {best}: "
        f"{versus(best)}. Its plateau level (mean over the last {len(last_third)} "
        f"checkpoints) is {level:.3f}; it first comes within {PLATEAU_TOLERANCE} of that "
        f"level at step {onset}: the {total_steps}-step runs are {versus(onset)}."
    )


def _prior_section(results: dict, threshold: float = 0.95) -> tuple:
    prior = trajectories(results["prior"])
    em = {label: points[max(points)]["exact_match"] for label, points in prior.items() if points}
    a_em = em.get("clean A", float("nan"))
    status = "reached" if a_em >= threshold else "NOT reached"
    lines = [
        f"Phase 1 (NLL on task A, {results['config']['prior_iters']} steps): held-out A "
        f"exact-match **{a_em:.3f}** (target ≥ {threshold:.2f}: {status}); "
        f"B {em.get('B', float('nan')):.3f} (B is new to the prior by construction)."
    ]
    return lines, em


def _figures(by_objective: dict, variant: str, run_dir: str, config: dict, prior_em: dict) -> list:
    """The variant's PNGs (written to ``run_dir``) as report lines."""
    figures = [
        plots.accuracy_curves(by_objective, variant, run_dir, prior_em),
        plots.gate_vs_p(by_objective, variant, run_dir),
        plots.exponent_curves(by_objective, variant, run_dir),
    ]
    lines = [f"![{name}]({name})" for name in map(os.path.basename, figures)] + [""]
    seed = config["seeds"][0]
    dynamics = plots.training_dynamics(run_dir, variant, list(by_objective), seed)
    if dynamics:
        lines += [DYNAMICS_TEXT.format(seed=seed), ""]
        lines += [f"![{name}]({name})" for name in map(os.path.basename, dynamics)] + [""]
    return lines


def write_report(results: dict, run_dir: str) -> str:
    config = results["config"]
    lines = [
        f"# Objectives under regimes: `{config['name']}` configuration",
        "",
        f"Machine: {results['machine']}. Wall time: {results['wall_seconds'] / 60:.1f} min. "
        f"Seeds: {list(config['seeds'])}. Phase-2 steps: {config['phase2_iters']} "
        f"(checkpoint + evaluation every {config['save_interval']}), LR "
        f"{config['phase2_lr']} ({config['phase2_lr_decay_style']} after "
        f"{runner.WARMUP_ITERS} warmup steps), global batch {config['global_batch_size']}, "
        f"TP {config['tensor_model_parallel_size']}, noise rate r = {config['noise_rate']}. "
        "Numbers are mean ± sd over seeds at the last checkpoint; EM = greedy exact-match.",
        "",
        "What each column measures: "
        + "; ".join(f"**{k}**: {v}" for k, v in MEASURES.items())
        + ".",
        "",
    ]
    prior_lines, prior_em = _prior_section(results)
    lines += ["## Phase 1: the prior", ""] + prior_lines + [""]
    variants = [v for v in config["variants"] if _by_objective(results, v)]
    if len(variants) > 1:
        lines += [
            "## Summary: every variant at the last checkpoint",
            "",
            "Greedy exact-match, mean ± sd over seeds (the sections below have the "
            "trajectories and diagnostics). **clean A** is retention (and, in `mix`, "
            "robustness to the corrupted A samples), **B** new learning, **noisy A** the "
            "fit to the corrupted labels.",
            "",
        ]
        lines += _summary_table(results, variants, prior_em) + [""]
    for variant in variants:
        by_objective = _by_objective(results, variant)
        lines += [f"## Variant `{variant}`: {VARIANT_TEXT[variant]}", ""]
        lines += _accuracy_table(by_objective) + [""]
        lines += [_nll_horizon(by_objective, config["phase2_iters"]), ""]
        for label in CLASSES.values():
            lines += [f"Trajectory of EM {label} (mean over seeds):", ""]
            lines += _trajectory_table(by_objective, label) + [""]
        lines += (
            [
                "Diagnostics per token class at the last checkpoint (each objective's own "
                "gate/exponent on the evaluation files' response tokens; a only for q-log "
                "objectives):",
                "",
            ]
            + _diagnostics_table(by_objective)
            + [""]
        )
        if plots.HAVE_MATPLOTLIB:
            lines += _figures(
                by_objective, variant, run_dir, config, prior_em if variant != "scratch" else {}
            )
    if not plots.HAVE_MATPLOTLIB:
        lines += ["(plots skipped: matplotlib is not installed)", ""]
    path = os.path.join(run_dir, "report.md")
    temp = path + ".tmp"
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    os.replace(temp, path)
    return path


def publish(run_dir: str, target: str, command: str) -> str:
    """Copy report.md to ``target`` (e.g. docs/evidence.md) with its PNGs next to it in
    ``<target stem>/``, links rewritten, and the command that produced it on top."""
    import re
    import shutil

    stem = os.path.splitext(os.path.basename(target))[0]
    figures = os.path.join(os.path.dirname(os.path.abspath(target)), stem)
    os.makedirs(figures, exist_ok=True)
    with open(os.path.join(run_dir, "report.md"), encoding="utf-8") as handle:
        text = handle.read()
    for name in re.findall(r"!\[[^\]]*\]\(([^)/]+\.png)\)", text):
        shutil.copyfile(os.path.join(run_dir, name), os.path.join(figures, name))
        text = text.replace(f"]({name})", f"]({stem}/{name})")
    header = f"<!-- generated by `{command}`; do not edit by hand -->\n\n"
    with open(target + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(header + text)
    os.replace(target + ".tmp", target)
    return target


def config_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))
