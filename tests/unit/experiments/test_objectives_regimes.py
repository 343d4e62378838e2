"""The objectives-under-regimes experiment: its data and aggregation in-process, and the smoke
configuration end to end (real trainer and eval command, ~2 minutes on 2 CPU cores)."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from benchmarks.objectives_regimes import tasks
from benchmarks.objectives_regimes.config import OBJECTIVES, preset
from benchmarks.objectives_regimes.results import curve, over_seeds, trajectories

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _read(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def test_data_held_out_prompts_never_in_training_and_corruption_is_wrong(tmp_path):
    config = dataclasses.replace(preset("smoke"), noise_rate=0.5, eval_samples=50,
                                 phase2_a_samples=400)
    paths = tasks.write_data(config, str(tmp_path))
    held_out_a = {s["prompt"] for s in _read(paths["a_heldout"])}
    held_out_b = {s["prompt"] for s in _read(paths["b_heldout"])}
    assert len(held_out_a) == len(held_out_b) == 50
    for name in ("prior_train", "mix", "clean", "b_only"):
        prompts = {s["prompt"] for s in _read(paths[name])}
        assert not prompts & (held_out_a | held_out_b), name
    mix = _read(paths["mix"])
    a_samples = [s for s in mix if s["prompt"].startswith("What is")]
    noisy = [s for s in a_samples if s["tag"] == "noisy_a"]
    for sample in noisy:
        a, b = map(int, re.findall(r"\d+", sample["prompt"]))
        assert int(sample["response"]) != a + b
    for sample in a_samples:
        if sample["tag"] == "clean_a":
            a, b = map(int, re.findall(r"\d+", sample["prompt"]))
            assert int(sample["response"]) == a + b
    assert len(a_samples) == 400 and 150 < len(noisy) < 250  # r = 0.5, binomial sd 10
    a_noisy = _read(paths["a_noisy"])  # the corrupted training samples (mix is shuffled)
    assert len(a_noisy) == 50 and all(sample in noisy for sample in a_noisy)
    assert len([s for s in _read(paths["clean"]) if s.get("tag") == "noisy_a"]) == 0


def test_mean_and_sd_over_seeds_at_each_checkpoint():
    def summary(data, iteration, em):
        return {"data": f"/x/{data}.jsonl", "iteration": iteration, "exact_match": em}

    runs = [trajectories([summary("b_heldout", 10, 0.2), summary("b_heldout", 20, 0.5)]),
            trajectories([summary("b_heldout", 10, 0.4), summary("b_heldout", 20, 0.7),
                          summary("b_heldout", 30, 0.9)])]
    steps, means, sds = curve(runs, "B", "exact_match")
    assert steps == [10, 20]  # only checkpoints every seed has
    assert means == pytest.approx([0.3, 0.6])
    assert sds == pytest.approx([2 ** 0.5 * 0.1, 2 ** 0.5 * 0.1])  # sample sd of two values
    assert over_seeds(runs, "B", "exact_match") == pytest.approx((0.7, 2 ** 0.5 * 0.2))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("regimes")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.objectives_regimes.run", "--config", "smoke",
         "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_smoke_report_has_a_row_of_numbers_per_objective(smoke_run):
    report = (smoke_run / "report.md").read_text()
    table = report.split("## Variant `mix`")[1].split("\n\n")[1].splitlines()
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert sorted(rows) == sorted(OBJECTIVES)
    for objective, line in rows.items():
        cells = [c.strip() for c in line.split("|")[2:-1]]
        assert len(cells) == 4
        for cell in cells:
            mean, sd = (float(x) for x in cell.split(" ± "))
            assert sd == 0.0  # one seed
            assert mean >= 0.0
    assert "Phase 1" in report and "Diagnostics per token class" in report


def test_smoke_results_cover_every_checkpoint_file_and_objective(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    config = preset("smoke")
    assert sorted(results["runs"]) == sorted(f"mix/{o}/1" for o in OBJECTIVES)
    expected_steps = list(range(config.save_interval, config.phase2_iters + 1,
                                config.save_interval))
    for key, summaries in results["runs"].items():
        runs = trajectories(summaries)
        for label, points in runs.items():
            assert sorted(points) == expected_steps, (key, label)
            for summary in points.values():
                assert 0.0 <= summary["exact_match"] <= 1.0
                assert summary["objective"].split(":")[0] == key.split("/")[1]
                assert summary["tokens"] > 0
    assert [s["iteration"] for s in results["prior"]] == [config.prior_iters] * 3


def test_smoke_plots_written(smoke_run):
    pytest.importorskip("matplotlib")
    for name in ("accuracy_mix.png", "gate_vs_p_mix.png", "alpha_mix.png"):
        path = smoke_run / name
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
