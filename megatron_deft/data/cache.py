"""On-disk cache of tokenized splits: restarts (and ranks that come second) skip tokenization.

A cache entry is keyed by a hash of everything tokenization depends on: the *contents* of the
data files (SHA-256, in order) and of the tokenizer's files, and the settings that change the
result (format, keys, seq_length, over-long policy, bad-sample mode). Content, not path, size
and mtime: a file rewritten with the same size and mtime (a copy tool preserving stamps, a
coarse-mtime file system) still misses the cache instead of silently serving stale tokens. An
entry is stored under the digests of the bytes actually tokenized (hashed while they are read),
so a file changing during tokenization cannot leave tokens under the wrong key. Entries are
written to a temporary file and renamed, so concurrent ranks never read a partial entry; an
unreadable (corrupt) entry is discarded with a warning and rebuilt.
"""

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from typing import Dict, List, Optional, Tuple

import numpy as np

from megatron_deft.data.sft_dataset import TokenizedSamples

logger = logging.getLogger(__name__)

CACHE_VERSION = 3  # bump when tokenization output (or the key) changes for the same inputs
_READ_BYTES = 1 << 20

# What np.load and the entry's fields raise for a truncated or overwritten file.
_CORRUPT = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


def file_digest(path: str) -> str:
    """SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_READ_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(file_digests: List[str], tokenizer_model: str, settings: Dict) -> str:
    """Hex digest naming the cache entry of one split: ``file_digests`` are the data files'
    :func:`file_digest` in order (the key does not depend on where the files are)."""
    payload = {
        "version": CACHE_VERSION,
        "files": list(file_digests),
        "tokenizer": _tree_digest(tokenizer_model),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def load_cached(cache_dir: str, key: str) -> Optional[Tuple[TokenizedSamples, Dict]]:
    """``(samples, report dict)`` of a stored entry, or None if there is none or it is corrupt
    (then it is deleted with a warning, and the caller tokenizes and stores it again)."""
    path = _entry_path(cache_dir, key)
    if not os.path.isfile(path):
        return None
    try:
        return _read_entry(path)
    except _CORRUPT as error:
        logger.warning("%s: corrupt tokenized-data cache entry (%s); rebuilding it", path, error)
        try:
            os.unlink(path)
        except FileNotFoundError:  # another rank discarded it first
            pass
        return None


def _read_entry(path: str) -> Tuple[TokenizedSamples, Dict]:
    with np.load(path, allow_pickle=False) as entry:
        samples = TokenizedSamples(
            entry["ids"],
            entry["loss_flags"],
            entry["offsets"],
            entry["classes"],
            tuple(json.loads(str(entry["class_names"]))),
        )
        report = json.loads(str(entry["report"]))
    return samples, report


def save_cached(cache_dir: str, key: str, samples: TokenizedSamples, report: Dict) -> str:
    """Stores an entry atomically; returns its path."""
    os.makedirs(cache_dir, exist_ok=True)
    path = _entry_path(cache_dir, key)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(
                handle,
                ids=samples.ids,
                loss_flags=samples.loss_flags,
                offsets=samples.offsets,
                classes=samples.classes,
                class_names=np.array(json.dumps(list(samples.class_names))),
                report=np.array(json.dumps(report)),
            )
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _entry_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"sft-{key}.npz")


def _tree_digest(path: str) -> List:
    """The digest of a tokenizer file, or ``[[name relative to path, digest], ...]`` of a
    tokenizer directory."""
    if not os.path.isdir(path):
        return [file_digest(path)]
    return [
        [os.path.relpath(os.path.join(root, name), path), file_digest(os.path.join(root, name))]
        for root, _, names in sorted(os.walk(path))
        for name in sorted(names)
    ]
