"""tools/plot_gate_dynamics.py: reads the trainer's TensorBoard scalars back and plots them."""

import importlib.util
import os

import pytest

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _tool():
    path = os.path.join(REPO_ROOT, "tools", "plot_gate_dynamics.py")
    spec = importlib.util.spec_from_file_location("plot_gate_dynamics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(directory, with_alpha: bool):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    for step in (1, 2, 3):
        writer.add_scalar("train/gate", 0.5 * step, step)
        writer.add_scalar("train/p_target", 0.1 * step, step)
        if with_alpha:
            writer.add_scalar("train/alpha", 0.25 * step, step)
        writer.add_scalar("valid/nll", 9.0, step)  # not a train/ scalar: ignored
    writer.close()


def test_reads_back_the_written_scalars_and_plots(tmp_path):
    tool = _tool()
    _write_run(tmp_path / "deft", with_alpha=True)
    _write_run(tmp_path / "dft", with_alpha=False)
    scalars = tool.read_scalars(str(tmp_path / "deft"))
    assert sorted(scalars) == ["alpha", "gate", "p_target"]
    assert scalars["gate"][0] == [1, 2, 3]
    assert scalars["gate"][1] == pytest.approx([0.5, 1.0, 1.5])
    assert scalars["alpha"][1] == pytest.approx([0.25, 0.5, 0.75])
    assert "alpha" not in tool.read_scalars(str(tmp_path / "dft"))
    pytest.importorskip("matplotlib")
    out = tmp_path / "dyn.png"
    assert tool.main([str(tmp_path / "deft"), str(tmp_path / "dft"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_logs_is_a_one_line_error(tmp_path, capsys):
    assert _tool().main([str(tmp_path / "nothing"), "--out", str(tmp_path / "x.png")]) == 1
    assert "no TensorBoard event files" in capsys.readouterr().err
