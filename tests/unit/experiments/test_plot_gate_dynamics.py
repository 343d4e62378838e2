"""tools/plot_gate_dynamics.py: reads the trainer's TensorBoard scalars and histograms back
(exactly the values written here with SummaryWriter) and writes its PNGs."""

import importlib.util
import os

import numpy as np
import pytest

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tool():
    path = os.path.join(REPO_ROOT, "tools", "plot_gate_dynamics.py")
    spec = importlib.util.spec_from_file_location("plot_gate_dynamics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The exponent a's tag name: today's, and the one of logs written before the rename (the
# docs/evidence* runs), which the readers return under today's name.
EXPONENT_NAMES = ["exponent", "alpha"]


def _write_run(directory, exponent_name: str = None):
    """``exponent_name``: the exponent's tag name (None: an objective without one)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    for step in (1, 2, 3):
        writer.add_scalar("train/gate", 0.5 * step, step)
        writer.add_scalar("train/p_target", 0.1 * step, step)
        if exponent_name:
            writer.add_scalar(f"train/{exponent_name}", 0.25 * step, step)
        writer.add_scalar("valid/nll", 9.0, step)  # not a train/ scalar: ignored
    writer.close()


# Histograms written by _write_class_run: (tag, step) -> (bin edges [B + 1], counts [B], sum).
# Dyadic edges and values keep every number exact in float64.
EDGES_1 = np.linspace(0.0, 1.0, 9)
EDGES_2 = np.linspace(0.0, 2.0, 5)  # a Tsallis exponent q = 2 is binned over [0, 2]
HISTOGRAMS = {
    ("train/gate_histogram", 10): (EDGES_1, [0, 3, 0, 0, 1, 0, 0, 4], 4.75),
    ("train/gate_histogram", 20): (EDGES_1, [1, 0, 0, 0, 0, 0, 2, 9], 10.5),
    ("train_class/b/gate_histogram", 10): (EDGES_1, [0, 3, 0, 0, 0, 0, 0, 4], 4.25),
    ("train_class/b/gate_histogram", 20): (EDGES_1, [1, 0, 0, 0, 0, 0, 2, 6], 7.0),
    ("train_class/noisy/a/gate_histogram", 20): (EDGES_1, [0, 0, 0, 0, 0, 0, 0, 3], 2.875),
    ("train_class/b/exponent_histogram", 10): (EDGES_2, [0, 0, 5, 2], 8.0),
}
CLASS_SCALARS = {
    "train_class/b/gate": {10: 0.5, 20: 0.75},
    "train_class/b/token_fraction": {10: 0.875, 20: 0.75},
    "train_class/noisy/a/gate": {20: 0.96875},
    "train_class/noisy/a/p_target": {20: 0.25},
}


def _write_class_run(directory, exponent_name: str = "exponent"):
    """``exponent_name``: as in _write_run."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    for step in (10, 20):
        writer.add_scalar("train/gate", 0.5, step)
    for tag, points in CLASS_SCALARS.items():
        for step, value in points.items():
            writer.add_scalar(tag, value, step)
    for (tag, step), (edges, counts, total) in HISTOGRAMS.items():
        if "exponent" in tag and not exponent_name:
            continue
        tag = tag.replace("exponent", exponent_name or "exponent")
        filled = np.nonzero(counts)[0]
        writer.add_histogram_raw(
            tag,
            min=edges[filled[0]],
            max=edges[filled[-1] + 1],
            num=sum(counts),
            sum=total,
            sum_squares=total,
            bucket_limits=edges[1:].tolist(),
            bucket_counts=counts,
            global_step=step,
        )
    writer.close()


@pytest.mark.parametrize("exponent_name", EXPONENT_NAMES)
def test_reads_back_the_written_scalars_and_plots(tmp_path, exponent_name):
    tool = _tool()
    _write_run(tmp_path / "deft", exponent_name)
    _write_run(tmp_path / "dft")
    scalars = tool.read_scalars(str(tmp_path / "deft"))
    assert sorted(scalars) == ["exponent", "gate", "p_target"]
    assert scalars["gate"][0] == [1, 2, 3]
    assert scalars["gate"][1] == pytest.approx([0.5, 1.0, 1.5])
    assert scalars["exponent"][1] == pytest.approx([0.25, 0.5, 0.75])
    assert "exponent" not in tool.read_scalars(str(tmp_path / "dft"))
    pytest.importorskip("matplotlib")
    out = tmp_path / "dyn.png"
    assert tool.main([str(tmp_path / "deft"), str(tmp_path / "dft"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    # No train_class/ data: no per-class figures.
    assert sorted(os.listdir(tmp_path)) == ["deft", "dft", "dyn.png"]


@pytest.mark.parametrize("exponent_name", EXPONENT_NAMES)
def test_reads_back_class_scalars_and_histograms_exactly(tmp_path, exponent_name):
    tool = _tool()
    _write_class_run(tmp_path / "run", exponent_name)
    run = tool.read_run(str(tmp_path / "run"))
    assert run["scalars"] == {"gate": ([10, 20], [0.5, 0.5])}
    # Class "noisy/a" contains the tag separator: the statistic is the last component.
    expected = {}
    for tag, points in CLASS_SCALARS.items():
        name, stat = tag[len("train_class/") :].rsplit("/", 1)
        expected.setdefault(name, {})[stat] = (list(points), list(points.values()))
    assert run["classes"] == expected
    histograms = run["histograms"]
    assert {stat: sorted(by_class, key=str) for stat, by_class in histograms.items()} == {
        "gate": [None, "b", "noisy/a"],
        "exponent": ["b"],
    }  # None: all tokens
    for (tag, step), (edges, counts, total) in HISTOGRAMS.items():
        head, stat = tag.rsplit("/", 1)
        name = None if head == "train" else head[len("train_class/") :]
        series = histograms[stat[: -len("_histogram")]][name]
        at = list(series["steps"]).index(step)
        np.testing.assert_array_equal(series["edges"], edges)
        np.testing.assert_array_equal(series["counts"][at], counts)
        assert series["num"][at] == sum(counts)
        assert series["mean"][at] == total / sum(counts)
    assert list(histograms["gate"]["noisy/a"]["steps"]) == [20]
    assert list(histograms["gate"][None]["steps"]) == [10, 20]


def test_histogram_bins_that_change_between_steps_are_a_clear_error(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    for step, upper in ((1, 1.0), (2, 2.0)):
        writer.add_histogram_raw(
            "train/exponent_histogram",
            min=0.0,
            max=upper,
            num=1,
            sum=0.5,
            sum_squares=0.25,
            bucket_limits=[upper / 2, upper],
            bucket_counts=[1, 0],
            global_step=step,
        )
    writer.close()
    with pytest.raises(
        ValueError, match="train/exponent_histogram: the histogram bins change at step 2"
    ):
        _tool().read_run(str(tmp_path))


def test_class_figures_written_next_to_out(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    tool = _tool()
    _write_class_run(tmp_path / "logs" / "deft")
    _write_run(tmp_path / "logs" / "dft")
    out = tmp_path / "dyn.png"
    assert (
        tool.main(
            [str(tmp_path / "logs" / "deft"), str(tmp_path / "logs" / "dft"), "--out", str(out)]
        )
        == 0
    )
    names = ["dyn.png", "dyn_classes.png", "dyn_gate_histograms.png", "dyn_exponent_histograms.png"]
    for name in names:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC, name
    assert capsys.readouterr().out.split() == [
        w for n in names for w in ("wrote", str(tmp_path / n))
    ]
    # Classes but no exponent histograms (dft, eaft): no exponent figure.
    _write_class_run(tmp_path / "logs" / "eaft", exponent_name=None)
    assert tool.main([str(tmp_path / "logs" / "eaft"), "--out", str(tmp_path / "e.png")]) == 0
    assert sorted(p.name for p in tmp_path.glob("e*.png")) == [
        "e.png",
        "e_classes.png",
        "e_gate_histograms.png",
    ]


def test_run_labels_stay_distinct():
    labels = _tool().run_labels(["/x/a/tb", "/y/a/tb/", "/z/deft"])
    assert labels == ["/x/a/tb", "/y/a/tb", "deft"]


def test_missing_logs_is_a_one_line_error(tmp_path, capsys):
    assert _tool().main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 1
    assert "no TensorBoard event files" in capsys.readouterr().err


def test_logs_without_train_scalars_are_a_one_line_error(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(tmp_path)) as writer:
        writer.add_scalar("valid/nll", 1.0, 1)
    pytest.importorskip("matplotlib")
    assert _tool().main([str(tmp_path), "--out", str(tmp_path / "x.png")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: none of the runs logged") and error.count("\n") == 1
