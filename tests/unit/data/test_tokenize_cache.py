"""The tokenized-data cache: hits reproduce the uncached result, any input change misses."""

import os
import random

import numpy as np
import pytest

from megatron_deft.data import DataConfig, build_sft_data, builder
from tests.unit.data.helpers import make_sentence, write_jsonl


def _records(n, seed=0):
    rng = random.Random(seed)
    return [{"prompt": make_sentence(rng), "response": make_sentence(rng)} for _ in range(n)]


def _build(config):
    data = build_sft_data(config, global_batch_size=2, micro_batch_size=1)
    samples = data.train.samples
    return data, (samples.ids.tolist(), samples.loss_flags.tolist(), samples.offsets.tolist())


def test_cache_hit_matches_and_changes_miss(tmp_path, sp_model_path, monkeypatch):
    path = write_jsonl(tmp_path / "train.jsonl", _records(30) + ['{"broken'])
    cache = tmp_path / "cache"
    config = DataConfig(
        train_data_path=[path],
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
        _build(DataConfig(**{**config.__dict__, "seq_length": 32}))
    write_jsonl(tmp_path / "train.jsonl", _records(31))
    with pytest.raises(AssertionError, match="cache miss"):
        _build(config)
    monkeypatch.setattr(builder, "_tokenize_split", real_tokenize)
    changed, _ = _build(config)
    assert changed.reports[0].num_samples == 31 and len(os.listdir(cache)) == 2
