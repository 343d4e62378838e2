"""The tokenized-data cache: hits reproduce the uncached result, any input change misses."""

import os
import random

import numpy as np
import pytest

from megatron_deft.data import builder
from tests.unit.data.helpers import build_data, make_sentence, write_jsonl


def _records(n, seed=0):
    rng = random.Random(seed)
    return [{"prompt": make_sentence(rng), "response": make_sentence(rng)} for _ in range(n)]


def _build(config):
    data = build_data(config, global_batch_size=2, micro_batch_size=1)
    samples = data.train.samples
    return data, (samples.ids.tolist(), samples.loss_flags.tolist(), samples.offsets.tolist())


def test_cache_hit_matches_and_changes_miss(tmp_path, sp_model_path, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", _records(30) + ['{"broken'])
    cache = tmp_path / "cache"
    config = dict(
        train_data=[path],
        seq_length=64,
        pack_sequences=True,
        skip_bad_samples=True,
        tokenizer_model=sp_model_path,
        data_cache_dir=str(cache),
    )
    fresh, fresh_arrays = _build(config)
    assert len(os.listdir(cache)) == 1 and os.listdir(cache)[0].endswith(".npz")

    real_tokenize = builder._tokenize_split

    def must_not_tokenize(*args):
        raise AssertionError("cache miss")

    monkeypatch.setattr(builder, "_tokenize_split", must_not_tokenize)
    hit, hit_arrays = _build(config)
    assert hit_arrays == fresh_arrays
    assert hit.reports == fresh.reports and hit.reports[0].skipped == {"malformed_json": 1}
    assert np.array_equal(hit.train.stream_rows(0, 20), fresh.train.stream_rows(0, 20))

    # Any change of what tokenization depends on must miss the cache.
    with pytest.raises(AssertionError, match="cache miss"):
        _build({**config, "seq_length": 32})
    write_jsonl(tmp_path / "train.jsonl", _records(31))
    with pytest.raises(AssertionError, match="cache miss"):
        _build(config)
    monkeypatch.setattr(builder, "_tokenize_split", real_tokenize)
    changed, _ = _build(config)
    assert changed.reports[0].num_samples == 31 and len(os.listdir(cache)) == 2


def _same_size_rewrite(path):
    """Rewrites the file with other content of the same size and restores its mtime."""
    stat = os.stat(path)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    changed = text.replace("the", "ThE")
    assert changed != text and len(changed.encode()) == stat.st_size
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(changed)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns


def test_cache_is_keyed_on_content_not_stamps(tmp_path, sp_model_path):
    path = write_jsonl(tmp_path / "train.jsonl", _records(20))
    config = dict(
        train_data=[path],
        seq_length=64,
        tokenizer_model=sp_model_path,
        data_cache_dir=str(tmp_path / "cache"),
    )
    _, before = _build(config)
    _same_size_rewrite(path)
    _, after = _build(config)
    _, uncached = _build({**config, "data_cache_dir": None})
    assert after == uncached and after != before


def test_corrupt_entry_is_discarded_and_rebuilt(tmp_path, sp_model_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", _records(20))
    cache = tmp_path / "cache"
    config = dict(
        train_data=[path], seq_length=64, tokenizer_model=sp_model_path, data_cache_dir=str(cache)
    )
    _, fresh = _build(config)
    (entry,) = os.listdir(cache)
    for garbage in (b"not a zip file", (cache / entry).read_bytes()[:100]):  # overwritten, cut
        (cache / entry).write_bytes(garbage)
        with caplog.at_level("WARNING", logger="megatron_deft.data.cache"):
            _, rebuilt = _build(config)
        assert rebuilt == fresh
        assert f"{cache / entry}: corrupt tokenized-data cache entry" in caplog.text
        caplog.clear()
        assert os.listdir(cache) == [entry]
        assert builder.load_cached(str(cache), entry[len("sft-") : -len(".npz")]) is not None
