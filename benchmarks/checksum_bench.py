"""Benchmark: what checkpoint checksums cost per GB (megatron_deft/training/checksums.py).

    python benchmarks/checksum_bench.py                 # 1 GiB, in a temporary directory
    python benchmarks/checksum_bench.py --gib 4 --dir /fast/scratch

- save: writing the bytes through the checksumming file the shard writers use (CRC-32 computed
  as they are written) vs a plain file, both fsync'ed; the difference is the hashing.
- verify: ``verify_files`` of the written file (read + CRC-32 + size check), as every load does
  unless --no-verify-checkpoint. The file was just written, so it is read from the page cache:
  this is the CPU cost; a cold read adds the storage's read time on top.
- crc32 in memory: the hashing alone (zlib.crc32 over bytes already in memory), the CPU part of
  both.
Each is the median of ``--repeats`` runs, in seconds per GiB.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
import zlib

from megatron_deft.training.checksums import SUM_SUFFIX, HashingFile, verify_files

_BLOCK = 64 << 20  # bytes per write, about a large tensor's


def _write(path: str, opener, block: bytes, blocks: int) -> float:
    start = time.perf_counter()
    with opener(path, "wb") as handle:
        for _ in range(blocks):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    return time.perf_counter() - start


def _verify(path: str, size: int, crc: int) -> float:
    directory, name = os.path.split(path)
    start = time.perf_counter()
    problems = verify_files(directory, {name: {"size": size, "crc32": crc}})
    elapsed = time.perf_counter() - start
    assert not problems, problems
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp directory)")
    args = parser.parse_args()
    block = os.urandom(_BLOCK)
    blocks = (args.gib << 30) // _BLOCK
    times = {"crc32 in memory": [], "plain write": [], "checksummed write": [], "verify": []}
    for _ in range(args.repeats):
        start, crc = time.perf_counter(), 0
        for _ in range(blocks):
            crc = zlib.crc32(block, crc)
        times["crc32 in memory"].append(time.perf_counter() - start)
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = os.path.join(directory, "shard.distcp")
        for _ in range(args.repeats):
            times["plain write"].append(_write(path, open, block, blocks))
            times["checksummed write"].append(_write(path, HashingFile, block, blocks))
            with open(path + SUM_SUFFIX) as handle:
                assert json.load(handle)["crc32"] == crc  # the writer's sum is the file's
            times["verify"].append(_verify(path, blocks * _BLOCK, crc))
    per_gib = {key: statistics.median(values) / args.gib for key, values in times.items()}
    print(f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, ", end="")
    print(f"{datetime.date.today()}, {args.gib} GiB x {args.repeats}")
    for key, seconds in per_gib.items():
        print(f"{key:18s} {seconds:.3f} s/GiB")
    extra = per_gib["checksummed write"] - per_gib["plain write"]
    print(f"{'hashing on save':18s} {extra:+.3f} s/GiB (checksummed - plain write)")


if __name__ == "__main__":
    main()
