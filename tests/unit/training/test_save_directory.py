"""One run per --save directory (an exclusive lock held by rank 0, released when the run ends or
is killed) and the removal of what interrupted saves left there."""

import os
import signal
import subprocess
import time

import pytest

from megatron_deft.training.checkpointing import TRACKER, checkpoint_dir
from megatron_deft.training.save_directory import LOCK_FILE, remove_leftovers
from tests.unit.training.train_cli import lines_with, run_train, start_train

pytestmark = pytest.mark.integration  # launches training processes


def _wait_for_lock_holder(path, process, timeout=180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the first run ended early"
        if os.path.isfile(path) and f"pid {process.pid}" in open(path).read():
            return
        time.sleep(0.5)
    raise AssertionError(f"{path} never named pid {process.pid}")


def test_second_run_on_a_locked_save_directory_stops_and_a_killed_run_frees_it(tmp_path):
    save = tmp_path / "ckpt"
    first = start_train(
        ["--train-iters", 100000, "--save", save],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_lock_holder(save / LOCK_FILE, first)
        second = run_train(["--train-iters", 2, "--save", save])
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)  # as a lost run would end: no clean-up of its own
        first.wait()
    assert second.returncode == 1, second.output[-3000:]
    assert "Traceback" not in second.output
    [line] = lines_with(second.output, f"--save {save} is in use by another run")
    assert f"pid {first.pid}" in line
    assert not os.path.exists(save / TRACKER)  # the second run wrote nothing

    # The kernel released the killed run's lock; a new run also clears an interrupted save.
    os.makedirs(checkpoint_dir(str(save), 7) + ".partial")
    third = run_train(["--train-iters", 2, "--save", save])
    assert third.returncode == 0, third.output[-3000:]
    assert sorted(os.listdir(save)) == [LOCK_FILE, "iter_0000002", TRACKER]


def test_leftovers_are_removed_except_the_only_copy_of_the_tracked_iteration(tmp_path):
    root = str(tmp_path)
    names = [
        "iter_0000003",
        "iter_0000003.stale",  # a finished re-save's old copy: iter_0000003 exists
        "iter_0000004.partial",
        "iter_0000005.stale",  # the tracker's iteration, stopped between _publish's renames
        "iter_0000005.partial",
        "notes.partial",  # not a checkpoint: never touched
    ]
    for name in names:
        os.makedirs(os.path.join(root, name))
    for name, text in ((TRACKER, "5\n"), (TRACKER + ".tmp", "6")):
        with open(os.path.join(root, name), "w") as handle:
            handle.write(text)
    removed = remove_leftovers(root)
    assert removed == [
        "iter_0000003.stale",
        "iter_0000004.partial",
        "iter_0000005.partial",
        TRACKER + ".tmp",
    ]
    assert sorted(os.listdir(root)) == [
        "iter_0000003",
        "iter_0000005.stale",
        TRACKER,
        "notes.partial",
    ]
