"""Runs started again over an earlier one, through the entry point: a restart from iteration 0
replaces the earlier TensorBoard steps, a tracker naming a missing iteration stops every rank
with exit 1, and a non-finite streak neither writes checkpoints nor advises resuming into it."""

import os
import re

import pytest

from tests.unit.training.train_cli import lines_with, run_train

pytestmark = pytest.mark.integration  # launches training processes

_LOSS = re.compile(r"iteration +(\d+)/\d+ \| loss ([0-9.]+)")


def _console_losses(output: str) -> dict:
    return {int(m.group(1)): float(m.group(2)) for m in _LOSS.finditer(output)}


def test_restart_from_iteration_0_replaces_the_earlier_attempts_tensorboard_steps(tmp_path):
    from tools.gate_dynamics_logs import read_scalars

    board = ["--tensorboard-dir", tmp_path / "tb"]
    first = run_train(["--train-iters", 4, "--seed", 1] + board)
    assert first.returncode == 0, first.output[-3000:]
    # other weights and data; packed rows (several samples each)
    second = run_train(["--train-iters", 2, "--seed", 2, "--pack-sequences"] + board)
    assert second.returncode == 0, second.output[-3000:]
    [line] = lines_with(second.output, "iteration      2/2 | ")
    consumed = dict(re.findall(r"(samples|rows) (\d+)", line))
    assert int(consumed["rows"]) == 8  # 2 global batches of 4 rows
    assert int(consumed["samples"]) > 8  # the log names samples, not rows
    expected = _console_losses(second.output)
    assert sorted(expected) == [1, 2]
    assert _console_losses(first.output)[1] != pytest.approx(expected[1], rel=1e-3)
    steps, losses = read_scalars(str(tmp_path / "tb"))["loss"]
    assert steps == [1, 2]  # the first attempt's 1-4 are gone, not kept beside the new ones
    assert losses == pytest.approx([expected[1], expected[2]], rel=1e-5)


def test_tracker_naming_a_missing_iteration_exits_1_on_every_rank(tmp_path):
    root = tmp_path / "ckpt"
    os.makedirs(root)
    (root / "latest_checkpointed_iteration.txt").write_text("5\n")
    done = run_train(["--train-iters", 2, "--load", root], nproc=2)
    assert done.returncode == 1
    message = f"{root}: no checkpoint directory for iteration 5"
    assert len(lines_with(done.output, message)) == 2  # one line per rank
    # torchrun's summary: both ranks exited 1 (a rank still tearing down when the other exits
    # with an error is killed by torchrun: exit code -15, or -6 on an abort)
    assert set(re.findall(r"exitcode\s*:\s*(-?\d+)", done.output)) == {"1"}
    assert set(re.findall(r"rank\s*:\s*(\d+) \(local_rank", done.output)) == {"0", "1"}
    assert not lines_with(done.output, "iteration      1/")


def test_non_finite_streak_writes_no_checkpoint_and_names_the_last_one_before_it(tmp_path):
    """--lr 1e36: the first update makes the weights ~1e36, so every later forward overflows
    and its update is skipped; periodic saves stop with the streak."""
    save = tmp_path / "ckpt"
    done = run_train(
        ["--train-iters", 10, "--lr", 1e36, "--max-skipped-iters", 3]
        + ["--save", save, "--save-interval", 1]
    )
    assert done.returncode == 1, done.output[-3000:]
    assert "Traceback" not in done.output
    assert sorted(n for n in os.listdir(save) if n.startswith("iter_")) == ["iter_0000001"]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    [line] = lines_with(done.output, "stopping at iteration 4: 3 consecutive iterations")
    assert f"resume from {save / 'iter_0000001'}" in line
    assert len(lines_with(done.output, "not saving iteration")) == 2  # 2 and 3; 4 stops
