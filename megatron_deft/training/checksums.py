"""Checksums of a checkpoint's files: computed while they are written, verified on load.

``CHECKSUMS`` (``checksums.json`` inside ``iter_N``) holds, for every file of the checkpoint,
its size and CRC-32 (zlib). CRC-32 detects every error burst of up to 32 bits and any other
corruption with probability 1 - 2^-32; it is not a defence against deliberate tampering.

Where the bytes are hashed: megatron-core's torch_dist writer (``FileSystemWriterAsync``) writes
the sharded tensors (``*.distcp``, nearly all of a checkpoint's bytes) in worker processes it
forks, through the name ``open`` of its module. While :func:`hashing_shard_writes` is active
that name is a :class:`HashingFile`: each shard is hashed as its bytes are written (no second
read) and its sum is left next to it (``<shard>.crc32``) for rank 0 to collect into the manifest
(the workers are other processes). The few small files megatron-core writes itself (common.pt,
metadata.json, .metadata: kilobytes) are hashed by reading them back when the manifest is made.
"""

import contextlib
import json
import os
import zlib

from megatron.core.dist_checkpointing.strategies import filesystem_async

CHECKSUMS = "checksums.json"
SHARD_SUFFIX = ".distcp"
SUM_SUFFIX = ".crc32"  # a shard's sum, written by the process that wrote the shard
_CHUNK = 16 << 20


class HashingFile:
    """A binary file opened for writing whose bytes are CRC-32'd as they are written; on close
    the sum and size go to ``<path>.crc32``. Only sequential writes (a seek would make the
    running sum wrong, so it is refused)."""

    def __init__(self, path: str, mode: str):
        self._path, self._file = path, open(path, mode)
        self._crc, self._size = 0, 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._crc = zlib.crc32(view, self._crc)
        self._size += view.nbytes
        return self._file.write(view)

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, *args):
        raise OSError(f"{self._path}: checksummed shards are written sequentially")

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.close()
        with open(self._path + SUM_SUFFIX, "w", encoding="utf-8") as handle:
            json.dump({"size": self._size, "crc32": self._crc}, handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


@contextlib.contextmanager
def hashing_shard_writes():
    """Inside: megatron-core's torch_dist writer hashes every shard it writes (see the module
    docstring). Its worker processes are forked inside, so they inherit the replacement."""
    filesystem_async.open = HashingFile
    try:
        yield
    finally:
        del filesystem_async.open  # back to the builtin


def _crc32_of(path: str) -> int:
    crc = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _entry(directory: str, name: str) -> dict:
    """{size, crc32} of one file: a shard's from the sum its writer left (which is removed),
    any other file's by reading it."""
    path = os.path.join(directory, name)
    if not name.endswith(SHARD_SUFFIX):
        return {"size": os.path.getsize(path), "crc32": _crc32_of(path)}
    try:
        with open(path + SUM_SUFFIX, encoding="utf-8") as handle:
            entry = json.load(handle)
    except FileNotFoundError:
        raise OSError(f"{path}: its writer left no checksum") from None
    os.remove(path + SUM_SUFFIX)
    return entry


def write_manifest(directory: str) -> None:
    """Write ``directory/checksums.json`` (all its files) atomically: temp file, fsync, rename."""
    names = sorted(
        name
        for name in os.listdir(directory)
        if not name.endswith(SUM_SUFFIX) and name != CHECKSUMS
    )
    manifest = {"algorithm": "crc32", "files": {name: _entry(directory, name) for name in names}}
    temp = os.path.join(directory, CHECKSUMS + ".tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, os.path.join(directory, CHECKSUMS))


def read_manifest(directory: str):
    """{file name: {size, crc32}} of the checkpoint, or None when it has no manifest (written
    before checksums existed, or by another tool). A damaged manifest is a ValueError."""
    path = os.path.join(directory, CHECKSUMS)
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
        return dict(manifest["files"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: unreadable checksum manifest ({error})") from None


def verify_files(directory: str, files: dict) -> list:
    """One line per file of ``files`` (a manifest's entries) that is missing, has another size
    or another CRC-32 than at save; empty when all match."""
    problems = []
    for name, expected in files.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing (listed in {CHECKSUMS})")
        elif os.path.getsize(path) != expected["size"]:
            problems.append(
                f"{path}: {os.path.getsize(path)} bytes, {expected['size']} when saved (truncated "
                "or overwritten)"
            )
        elif _crc32_of(path) != expected["crc32"]:
            problems.append(f"{path}: checksum mismatch (the file is corrupted)")
    return problems
