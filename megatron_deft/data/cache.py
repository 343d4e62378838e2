"""On-disk cache of tokenized splits: restarts (and ranks that come second) skip tokenization.

A cache entry is keyed by a hash of everything tokenization depends on: each data file's path,
size and mtime, the tokenizer's files (same stamps), and the settings that change the result
(format, keys, seq_length, over-long policy, bad-sample mode). Editing any input therefore
misses the cache instead of silently reusing stale tokens. Entries are written to a temporary
file and renamed, so concurrent ranks never read a partial entry.
"""

import hashlib
import json
import os
import tempfile
from typing import Dict, List, Optional, Tuple

import numpy as np

from megatron_deft.data.sft_dataset import TokenizedSamples

CACHE_VERSION = 2  # bump when tokenization output changes for the same inputs


def cache_key(paths: List[str], tokenizer_model: str, settings: Dict) -> str:
    """Hex digest naming the cache entry of one split."""
    payload = {
        "version": CACHE_VERSION,
        "files": [_stamp(path) for path in paths],
        "tokenizer": _tree_stamp(tokenizer_model),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def load_cached(cache_dir: str, key: str) -> Optional[Tuple[TokenizedSamples, Dict]]:
    """``(samples, report dict)`` of a stored entry, or None if there is none."""
    path = _entry_path(cache_dir, key)
    if not os.path.isfile(path):
        return None
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


def _stamp(path: str) -> List:
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def _tree_stamp(path: str) -> List:
    if not os.path.isdir(path):
        return [_stamp(path)]
    return [
        _stamp(os.path.join(root, name))
        for root, _, names in sorted(os.walk(path))
        for name in sorted(names)
    ]
