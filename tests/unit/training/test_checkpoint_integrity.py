"""Checkpoint integrity through the entry point: every file's size and CRC-32 recorded at save
(checked against the files on disk), and a damaged checkpoint refused on --load with one line
naming the file, never a traceback and never a fresh start."""

import json
import os
import re
import shutil
import zlib

import pytest

from megatron_deft.training import checkpointing, checksums
from megatron_deft.training.checkpointing import CheckpointError
from tests.unit.training.train_cli import lines_with, run_train

pytestmark = pytest.mark.integration  # launches training processes

ITERS = ["--train-iters", 2, "--lr-decay-iters", 4]
LOAD = ITERS + ["--make-vocab-size-divisible-by", 256]  # TP=1 pads as the TP=2 save (128 x 2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 2-rank (TP=2) run's checkpoint of iteration 2, so the shards come from both ranks."""
    root = tmp_path_factory.mktemp("integrity") / "ckpt"
    save = ITERS + ["--make-vocab-size-divisible-by", 128, "--tensor-model-parallel-size", 2]
    done = run_train(save + ["--save", root], nproc=2)
    assert done.returncode == 0, done.output[-3000:]
    return root


def _damaged_copy(saved, tmp_path, damage) -> tuple:
    """(root, damaged file) of a copy of ``saved`` with ``damage(iter_dir)`` applied."""
    root = tmp_path / "ckpt"
    shutil.copytree(saved, root)
    return root, damage(root / "iter_0000002")


def _flip_shard_bytes(directory):
    path = directory / "__1_0.distcp"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))
    return path


def _truncate_shard(directory):
    path = directory / "__0_1.distcp"
    path.write_bytes(path.read_bytes()[:1000])
    return path


def _remove_shard(directory):
    path = directory / "__1_1.distcp"
    path.unlink()
    return path


def _garbage_common(directory):
    path = directory / "common.pt"
    path.write_bytes(os.urandom(path.stat().st_size))
    return path


DAMAGES = {
    "flipped": (_flip_shard_bytes, "checksum mismatch"),
    "truncated": (_truncate_shard, "truncated"),
    "missing": (_remove_shard, "missing"),
    "garbage_common": (_garbage_common, "checksum mismatch"),
}


def test_manifest_lists_every_file_with_its_size_and_crc32(saved):
    directory = saved / "iter_0000002"
    manifest = json.loads((directory / "checksums.json").read_text())
    assert manifest["algorithm"] == "crc32"
    on_disk = sorted(name for name in os.listdir(directory) if name != "checksums.json")
    assert sorted(manifest["files"]) == on_disk  # the shards' sums were collected and removed
    assert sum(name.endswith(".distcp") for name in on_disk) == 4
    for name in on_disk:
        data = (directory / name).read_bytes()
        assert manifest["files"][name] == {"size": len(data), "crc32": zlib.crc32(data)}, name


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_damage_is_found_and_named(saved, tmp_path, damage):
    """The verification the entry point runs before loading (in process, each kind of damage):
    exactly one problem, naming the damaged file and why; a damaged common.pt also stops the
    common-state read that precedes the sharded load."""
    apply, reason = DAMAGES[damage]
    root, path = _damaged_copy(saved, tmp_path, apply)
    directory = str(root / "iter_0000002")
    [problem] = checksums.verify_files(directory, checksums.read_manifest(directory))
    assert problem.startswith(f"{path}: ") and reason in problem
    if damage == "garbage_common":
        with pytest.raises(CheckpointError, match=re.escape(f"{path}: checksum mismatch")):
            checkpointing.read_common_state(directory)
        with pytest.raises(CheckpointError, match="unreadable checkpoint"):
            checkpointing.read_common_state(directory, verify=False)


def test_damaged_checkpoint_is_one_line_naming_the_file(saved, tmp_path):
    """Through the entry point: one line, exit 1, no fresh start."""
    root, path = _damaged_copy(saved, tmp_path, _flip_shard_bytes)
    done = run_train(LOAD + ["--train-iters", 4, "--load", root])
    assert done.returncode == 1, done.output[-3000:]
    assert "Traceback" not in done.output
    [line] = lines_with(done.output, str(path))
    assert "checksum mismatch" in line
    assert not lines_with(done.output, "iteration      1/")  # no fresh start


def test_unverified_load_of_a_damaged_checkpoint_is_still_one_line(saved, tmp_path):
    """--no-verify-checkpoint and a missing shard: megatron-core's own read fails; one line naming
    the checkpoint instead of its traceback."""
    root, _ = _damaged_copy(saved, tmp_path, _remove_shard)
    done = run_train(LOAD + ["--train-iters", 4, "--load", root, "--no-verify-checkpoint"])
    assert done.returncode == 1, done.output[-3000:]
    assert "Traceback" not in done.output
    [line] = lines_with(done.output, "unreadable checkpoint")
    assert str(root / "iter_0000002") in line
    assert not lines_with(done.output, "iteration      1/")


def test_intact_checkpoint_verifies_and_resumes(saved, tmp_path):
    root, _ = _damaged_copy(saved, tmp_path, lambda directory: None)
    done = run_train(LOAD + ["--train-iters", 3, "--load", root])
    assert done.returncode == 0, done.output[-3000:]
    assert lines_with(done.output, "loaded ") and lines_with(done.output, "iteration      3/3")
    assert not lines_with(done.output, "iteration      1/")
