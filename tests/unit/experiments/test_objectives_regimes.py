"""The objectives-under-regimes experiment: its data and aggregation in-process, and the smoke
configuration end to end (real trainer and eval command, ~2 minutes on 2 CPU cores)."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from benchmarks.objectives_regimes import tasks
from benchmarks.objectives_regimes.config import preset
from benchmarks.objectives_regimes.results import curve, over_seeds, trajectories

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _read(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def test_nll_horizon_names_the_peak_and_the_plateau_onset():
    from benchmarks.objectives_regimes.report import _nll_horizon

    def run(ems):  # one seed: held-out-B exact-match at steps 100, 200, ...
        return {"B": {100 * (i + 1): {"exact_match": em} for i, em in enumerate(ems)}}

    # seed means 0.2, 0.5, 0.79, 0.9, 0.78, 0.8: highest at step 400; the last two checkpoints
    # (a third of six) average 0.79, first reached within 0.02 at step 300
    runs = [run([0.1, 0.5, 0.78, 0.9, 0.77, 0.8]), run([0.3, 0.5, 0.80, 0.9, 0.79, 0.8])]
    text = _nll_horizon({"nll": runs}, total_steps=1200)
    assert "highest (0.900) at step 400: 3.0x (meets the 3x target)" in text
    assert "level (mean over the last 2 checkpoints) is 0.790" in text
    assert "at step 300: the 1200-step runs are 4.0x (meets" in text
    # Still rising: the level is near the end, so the onset is late even though the curve is
    # smooth.
    late = _nll_horizon({"nll": [run([0.1, 0.2, 0.4, 0.6, 0.7, 0.8])]}, total_steps=600)
    assert "highest (0.800) at step 600: 1.0x (does NOT meet" in late
    assert "is 0.750; it first comes within 0.02 of that level at step 600" in late
    assert "cannot be assessed" in _nll_horizon({"nll": [run([0.0, 0.0])]}, total_steps=200)


def test_trajectory_table_thins_long_runs_to_every_kth_checkpoint_ending_at_the_last():
    from benchmarks.objectives_regimes.report import TRAJECTORY_COLUMNS, _trajectory_table

    runs = [{"B": {100 * i: {"exact_match": i / 100} for i in range(1, 31)}}]  # 30 checkpoints
    header, _, row = _trajectory_table({"nll": runs}, "B")
    steps = [int(cell.split()[1]) for cell in header.strip("|").split("|")[1:]]
    assert steps == list(range(300, 3001, 300)) and len(steps) <= TRAJECTORY_COLUMNS
    assert row.split("|")[2:-1] == [f" {s / 10000:.3f} " for s in steps]
    short = [{"B": {100 * i: {"exact_match": 0.5} for i in range(1, 5)}}]
    assert _trajectory_table({"nll": short}, "B")[0].count("step") == 4


def test_summary_puts_each_variants_last_exact_match_side_by_side_under_the_prior():
    from benchmarks.objectives_regimes.report import _summary_table

    def summaries(offset, seed):  # checkpoints 10 and 20; only the last counts
        return [
            {
                "data": f"/d/{stem}.jsonl",
                "iteration": it,
                "exact_match": 0.0 if it == 10 else offset + i / 10 + seed / 100,
            }
            for i, stem in enumerate(("a_heldout", "b_heldout", "a_noisy"))
            for it in (10, 20)
        ]

    offsets = {
        ("mix", "nll"): 0.5,
        ("mix", "deft"): 0.3,
        ("scratch", "nll"): 0.1,
        ("scratch", "deft"): 0.2,
    }
    results = {
        "config": {"objectives": ["nll", "deft"]},
        "runs": {
            f"{variant}/{objective}/{seed}": summaries(offset, seed)
            for (variant, objective), offset in offsets.items()
            for seed in (1, 3)
        },
    }
    header, _, prior, nll, deft = _summary_table(
        results, ["mix", "scratch"], {"clean A": 0.96, "B": 0.0, "noisy A": 0.01}
    )

    def cells(line):
        return [c.strip() for c in line.strip("|").split("|")]

    assert cells(header) == ["objective", "mix: clean A", "mix: B", "mix: noisy A", "scratch: B"]
    assert cells(prior)[1:] == ["0.960", "0.000", "0.010", "-"]  # scratch starts from no prior
    # seeds 1 and 3: mean offset + class + 0.02, sample sd 0.01414
    assert cells(nll) == ["nll", "0.520 ± 0.014", "0.620 ± 0.014", "0.720 ± 0.014", "0.220 ± 0.014"]
    assert cells(deft) == [
        "deft",
        "0.320 ± 0.014",
        "0.420 ± 0.014",
        "0.520 ± 0.014",
        "0.320 ± 0.014",
    ]


def test_data_held_out_prompts_never_in_training_and_corruption_is_wrong(tmp_path):
    config = dataclasses.replace(
        preset("smoke"), noise_rate=0.5, eval_samples=50, phase2_a_samples=400
    )
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

    runs = [
        trajectories([summary("b_heldout", 10, 0.2), summary("b_heldout", 20, 0.5)]),
        trajectories(
            [
                summary("b_heldout", 10, 0.4),
                summary("b_heldout", 20, 0.7),
                summary("b_heldout", 30, 0.9),
            ]
        ),
    ]
    steps, means, sds = curve(runs, "B", "exact_match")
    assert steps == [10, 20]  # only checkpoints every seed has
    assert means == pytest.approx([0.3, 0.6])
    assert sds == pytest.approx([2**0.5 * 0.1, 2**0.5 * 0.1])  # sample sd of two values
    assert over_seeds(runs, "B", "exact_match") == pytest.approx((0.7, 2**0.5 * 0.2))


def test_evaluations_reused_until_the_checkpoint_root_is_retrained(tmp_path, monkeypatch):
    from benchmarks.objectives_regimes import run, runner

    launches = []

    def fake_eval(command, log_path, nproc=1):
        """Stands in for megatron-deft-eval: one summary per root, tagged with the launch."""
        command = list(map(str, command))
        roots = command[command.index("--load") + 1].split(",")
        launches.append(roots)
        with open(command[command.index("--summary-output") + 1], "w") as handle:
            for root in roots:
                handle.write(json.dumps({"load": root, "launch": len(launches)}) + "\n")

    def train(root):
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        with open(os.path.join(root, runner.TRACKER), "w") as handle:
            handle.write("8")

    monkeypatch.setattr(runner, "run_logged", fake_eval)
    roots = [str(tmp_path / "ckpt" / name) for name in ("a", "b")]
    for root in roots:
        train(root)
    data = {name: f"{name}.jsonl" for name in run.EVAL_FILES}

    def evaluate():
        summaries = run.evaluate_all(preset("smoke"), str(tmp_path), roots, data, "tok.model")
        return {os.path.basename(root): [s["launch"] for s in summaries[root]] for root in roots}

    assert evaluate() == {"a": [1], "b": [1]} and launches == [roots]
    assert evaluate() == {"a": [1], "b": [1]} and len(launches) == 1  # reused
    before = os.stat(os.path.join(roots[0], runner.TRACKER)).st_mtime_ns
    train(roots[0])  # an interrupted run deleted and trained again
    tracker = os.path.join(roots[0], runner.TRACKER)
    if os.stat(tracker).st_mtime_ns == before:  # a coarse file-system clock
        os.utime(tracker, ns=(before + 10**9, before + 10**9))
    assert evaluate() == {"a": [2], "b": [1]} and launches[1:] == [roots[:1]]
    assert evaluate() == {"a": [2], "b": [1]} and len(launches) == 2
    # A launch that died before recording its checkpoints is never reused.
    os.remove(tmp_path / "evals" / "batch001.checkpoints.json")
    assert evaluate() == {"a": [3], "b": [1]} and launches[2:] == [roots[:1]]


def test_phase2_runs_get_the_presets_schedule_and_start_from_the_prior(tmp_path, monkeypatch):
    from benchmarks.objectives_regimes import run, runner

    commands = {}
    monkeypatch.setattr(
        runner,
        "train",
        lambda config, name, run_dir, args, concurrent, slot: commands.update(
            {name: [str(a) for a in args]}
        ),
    )
    data = {name: f"{name}.jsonl" for name in run.TRAIN_FILE.values()}
    for name, style in (("cpu-horizon", "cosine"), ("cpu-plateau", "constant")):
        config = preset(name)
        for variant in ("mix", "scratch"):
            run.train_phase2(
                config, str(tmp_path / name), data, "tok.model", "/prior", variant, "deft", 1
            )
            args = commands.pop(runner.run_name(variant, "deft", 1))
            flags = dict(zip(args, args[1:]))
            assert flags["--lr-decay-style"] == style
            assert flags["--lr"] == str(config.phase2_lr)
            assert flags["--train-iters"] == str(config.phase2_iters)
            assert ("--load" in args) == (variant != "scratch")


def test_interrupted_phase2_run_resumes_only_when_launched_with_the_same_arguments(
    tmp_path, monkeypatch
):
    from benchmarks.objectives_regimes import run, runner

    launches = []

    def fake_train(config, name, run_dir, args, concurrent, slot, resumed=False):
        args = [str(a) for a in args]
        save = args[args.index("--save") + 1]
        # What the launch finds: its checkpoints and its TensorBoard log at that moment.
        launches.append(
            {
                "args": args,
                "resumed": resumed,
                "tracker": runner.finished(save, 800),
                "tensorboard": os.listdir(args[args.index("--tensorboard-dir") + 1])
                if os.path.isdir(args[args.index("--tensorboard-dir") + 1])
                else [],
            }
        )

    def interrupted_at_800(save, run_dir):  # the killed run's last checkpoint and its log
        with open(os.path.join(save, runner.TRACKER), "w") as handle:
            handle.write("800")
        logs = runner.tensorboard_dir(run_dir, runner.run_name("mix", "deft", 1))
        os.makedirs(logs, exist_ok=True)
        open(os.path.join(logs, "events.out.tfevents.1"), "w").close()

    monkeypatch.setattr(runner, "train", fake_train)
    data = {name: f"{name}.jsonl" for name in run.TRAIN_FILE.values()}
    config = preset("cpu-plateau")
    run_dir = str(tmp_path)

    def phase2(config):
        return run.train_phase2(config, run_dir, data, "tok.model", "/prior", "mix", "deft", 1)

    save = phase2(config)
    first = launches.pop()
    assert not first["resumed"] and "--finetune" in first["args"]
    assert first["args"][first["args"].index("--load") + 1] == "/prior"

    interrupted_at_800(save, run_dir)
    phase2(config)
    resumed = launches.pop()
    assert resumed["resumed"] and "--finetune" not in resumed["args"]
    assert resumed["args"][resumed["args"].index("--load") + 1] == save
    assert resumed["tracker"] and resumed["tensorboard"] == ["events.out.tfevents.1"]
    # Everything but the starting point is the first launch's.
    assert resumed["args"][:-2] == first["args"][:-3]

    # Another learning rate: the interrupted run is not this one; it is deleted with its log.
    phase2(dataclasses.replace(config, phase2_lr=config.phase2_lr / 2))
    restarted = launches.pop()
    assert not restarted["resumed"] and "--finetune" in restarted["args"]
    assert not restarted["tracker"] and restarted["tensorboard"] == []

    # A root without a launch record (another tool, an older version): trained from the start.
    interrupted_at_800(save, run_dir)
    os.remove(os.path.join(save, runner.LAUNCH_RECORD))
    phase2(config)
    assert not launches.pop()["resumed"]


def test_wall_time_keeps_an_invocation_killed_before_it_finished(tmp_path):
    """A stopped session kills the driver without any cleanup; its time must still count."""
    killed = (
        "import os, signal, time\n"
        "from benchmarks.objectives_regimes.run import WallClock\n"
        f"with WallClock({str(tmp_path)!r}, period=0.05):\n"
        "    time.sleep(0.6)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    started = time.time()
    done = subprocess.run(
        [sys.executable, "-c", killed],
        cwd=REPO_ROOT,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    )
    upper = time.time() - started
    assert done.returncode == -9
    recorded = float((tmp_path / "wall_seconds.txt").read_text())
    assert 0.3 <= recorded <= upper

    from benchmarks.objectives_regimes.run import WallClock

    with WallClock(str(tmp_path)) as clock:  # the next invocation adds its own time
        time.sleep(0.2)
        total = clock.save()
    written = float((tmp_path / "wall_seconds.txt").read_text())  # to 0.1 s, after `total`
    assert recorded + 0.2 <= total <= written + 0.05


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_jobs_train_phase2_runs_concurrently_with_split_threads(tmp_path, monkeypatch, device):
    import threading

    from benchmarks.objectives_regimes import run, runner

    both_running = threading.Barrier(2, timeout=10)  # breaks unless two runs overlap
    launches = []  # (processes sharing the machine, CUDA_VISIBLE_DEVICES)
    running_gpus = set()  # GPUs of the phase-2 runs running now

    def fake_run_logged(command, log_path, processes_sharing=1, gpus=None, append=False):
        launches.append((processes_sharing, gpus))
        command = list(map(str, command))
        if "megatron_deft.train" in command:
            if "--finetune" in command:
                assert gpus is None or gpus not in running_gpus, "two runs on one GPU"
                running_gpus.add(gpus)
                both_running.wait()
            save = command[command.index("--save") + 1]
            os.makedirs(save, exist_ok=True)
            with open(os.path.join(save, runner.TRACKER), "w") as handle:
                handle.write(command[command.index("--train-iters") + 1])
            running_gpus.discard(gpus)
        elif "megatron_deft.eval" in command:
            with open(command[command.index("--summary-output") + 1], "w") as handle:
                for root in command[command.index("--load") + 1].split(","):
                    handle.write(json.dumps({"load": root}) + "\n")

    monkeypatch.setattr(runner, "run_logged", fake_run_logged)
    monkeypatch.setattr(runner, "train_tokenizer", lambda inputs, prefix, log: prefix + ".model")
    monkeypatch.setattr(runner, "visible_gpu_count", lambda: 4)
    config = dataclasses.replace(
        preset("smoke"), objectives=("nll", "deft"), seeds=(1, 2), device=device, nproc=2
    )
    results = run.run_experiment(config, str(tmp_path), jobs=2)
    assert sorted(results["runs"]) == sorted(
        f"mix/{o}/{s}" for o in ("nll", "deft") for s in (1, 2)
    )
    for key, summaries in results["runs"].items():
        variant, objective, seed = key.split("/")
        assert summaries[0]["load"].endswith(runner.run_name(variant, objective, int(seed)))
    # prior alone (2 ranks), four phase-2 runs two at a time (4 processes each), the evaluation
    assert [processes for processes, _ in launches] == [2, 4, 4, 4, 4, 2]
    phase2_gpus = {gpus for _, gpus in launches[1:-1]}
    assert phase2_gpus == ({"0,1", "2,3"} if device == "cuda" else {None})
    assert launches[0][1] is None and launches[-1][1] is None


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("regimes")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.objectives_regimes.run",
            "--config",
            "smoke",
            "--jobs",
            "2",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


@pytest.mark.integration
def test_smoke_report_has_a_row_of_numbers_per_objective(smoke_run):
    report = (smoke_run / "report.md").read_text()
    table = report.split("## Variant `mix`")[1].split("\n\n")[1].splitlines()
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert sorted(rows) == sorted(preset("smoke").objectives)
    for objective, line in rows.items():
        cells = [c.strip() for c in line.split("|")[2:-1]]
        assert len(cells) == 4
        for cell in cells:
            mean, sd = (float(x) for x in cell.split(" ± "))
            assert sd == 0.0  # one seed
            assert mean >= 0.0
    assert "Phase 1" in report and "Diagnostics per token class" in report


@pytest.mark.integration
def test_smoke_results_cover_every_checkpoint_file_and_objective(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    config = preset("smoke")
    assert sorted(results["runs"]) == sorted(f"mix/{o}/1" for o in config.objectives)
    expected_steps = list(
        range(config.save_interval, config.phase2_iters + 1, config.save_interval)
    )
    for key, summaries in results["runs"].items():
        runs = trajectories(summaries)
        for label, points in runs.items():
            assert sorted(points) == expected_steps, (key, label)
            for summary in points.values():
                assert 0.0 <= summary["exact_match"] <= 1.0
                assert summary["objective"].split(":")[0] == key.split("/")[1]
                assert summary["tokens"] > 0
    assert [s["iteration"] for s in results["prior"]] == [config.prior_iters] * 3


@pytest.mark.integration
def test_smoke_plots_written_embedded_and_published(smoke_run, tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.objectives_regimes.report import publish

    names = (
        "accuracy_mix.png",
        "gate_vs_p_mix.png",
        "exponent_mix.png",
        "train_classes_mix.png",
        "gate_histograms_mix.png",
    )
    report = (smoke_run / "report.md").read_text()
    for name in names:
        path = smoke_run / name
        assert path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}]({name})" in report
    publish(str(smoke_run), str(tmp_path / "evidence.md"), "the command")
    assert sorted(os.listdir(tmp_path / "evidence")) == sorted(names)
    assert "](evidence/train_classes_mix.png)" in (tmp_path / "evidence.md").read_text()


@pytest.mark.integration
def test_smoke_training_logs_per_token_class(smoke_run):
    """The trainer's per-class TensorBoard data, read back by the plotting tool, is consistent:
    the classes partition the loss tokens, and the gates are what each objective defines."""
    from tools.gate_dynamics_logs import read_run

    config = preset("smoke")
    for objective in config.objectives:
        run = read_run(str(smoke_run / "tensorboard" / f"mix-{objective}-s1"))
        assert sorted(run["classes"]) == ["b", "clean_a", "noisy_a"]
        steps = run["scalars"]["gate"][0]
        assert steps == list(
            range(config.save_interval, config.phase2_iters + 1, config.save_interval)
        )
        shares = [run["classes"][c]["token_fraction"] for c in run["classes"]]
        assert all(s[0] == steps for s in shares)
        assert [sum(v) for v in zip(*(s[1] for s in shares))] == pytest.approx([1.0] * len(steps))
        for stat, by_class in run["histograms"].items():
            everyone = by_class[None]
            assert list(everyone["steps"]) == steps
            # Every training sample is tagged: the classes partition the tokens.
            assert (sum(by_class[c]["num"] for c in run["classes"]) == everyone["num"]).all()
            assert (everyone["counts"].sum(axis=1) == everyone["num"]).all()
            for name in run["classes"]:
                assert by_class[name]["mean"] == pytest.approx(
                    run["classes"][name][stat][1], rel=1e-5
                )  # float32 scalars
        gates = run["histograms"]["gate"][None]["counts"]
        if objective == "nll":  # gate 1: every token in the top bin
            assert (gates[:, -1] == gates.sum(axis=1)).all()
        if objective in ("dft", "p"):  # gate = p_target token by token
            assert (gates == run["histograms"]["p_target"][None]["counts"]).all()
        assert ("exponent" in run["histograms"]) == (objective in ("nll", "p", "deft", "cayley"))


@pytest.mark.integration
def test_report_only_rebuilds_the_same_report_without_running(smoke_run, monkeypatch):
    from benchmarks.objectives_regimes import run

    def no_runs(*args, **kwargs):
        raise AssertionError("--report-only must not train or evaluate")

    monkeypatch.setattr(run, "run_experiment", no_runs)
    report = smoke_run / "report.md"
    before = report.read_text()
    report.unlink()
    assert run.main(["--config", "smoke", "--out", str(smoke_run), "--report-only"]) == 0
    assert report.read_text() == before  # same results, same wall time: same report
    with pytest.raises(SystemExit, match=r"other settings \(seeds\)"):
        run.main(["--config", "smoke", "--seeds", "2", "--out", str(smoke_run), "--report-only"])
    with pytest.raises(SystemExit, match="does not exist"):
        run.main(["--config", "smoke", "--out", str(smoke_run / "nowhere"), "--report-only"])


def test_summaries_from_before_the_exponent_rename_read_as_today():
    """The docs/evidence* runs' evaluation summaries call the exponent a "alpha"."""
    from benchmarks.objectives_regimes.results import trajectories

    today = {"data": "evals/a_heldout.jsonl", "iteration": 5, "exponent": 0.25, "gate": 0.5}
    legacy = {("alpha" if key == "exponent" else key): value for key, value in today.items()}
    assert trajectories([legacy]) == trajectories([today])
    assert trajectories([legacy])["clean A"][5]["exponent"] == 0.25
