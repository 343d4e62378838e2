"""Parquet input: the same records as JSONL and as Parquet (several row groups) give the same
samples, tokens, rows, reports and preprocessed files; bad rows are named ``file:row N``; rows
are streamed a batch at a time; the tokenized-data cache keys on the Parquet file's content."""

import dataclasses
import json
import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_deft.data import DataError, RecordFormat, TokenizerConfig, builder, sources
from megatron_deft.data.jsonl import ReadReport, iter_samples, read_samples
from tests.unit.data.helpers import build_data, load_tool, make_sentence, write_jsonl

SEQ = 48
ROW_GROUP = 7  # rows per row group: every file below has several


def _pairs(n, seed):
    rng = random.Random(seed)
    return [
        {
            "prompt": make_sentence(rng),
            "response": make_sentence(rng, 3, 8 if k % 5 else 60),
            "kind": rng.choice(["clean", "noisy"]),
        }
        for k in range(n)
    ]


def _chats(n, seed):
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "system", "content": make_sentence(rng, 1, 4)},
                {"role": "user", "content": make_sentence(rng)},
                {"role": "assistant", "content": make_sentence(rng, 1, 12)},
                {"role": "user", "content": make_sentence(rng, 1, 5)},
                {"role": "assistant", "content": make_sentence(rng, 1, 12)},
            ]
        }
        for _ in range(n)
    ]


def _write_both(tmp_path, name, records):
    """(JSONL path, Parquet path) holding ``records``; the Parquet file has several row groups
    and, for chat records, a list<struct<role, content>> column."""
    jsonl = write_jsonl(tmp_path / f"{name}.jsonl", records)
    parquet = str(tmp_path / f"{name}.parquet")
    table = pa.Table.from_pylist(records)
    pq.write_table(table, parquet, row_group_size=ROW_GROUP)
    assert pq.ParquetFile(parquet).metadata.num_row_groups > 1
    return jsonl, parquet


def _path_free(report):
    """A split report without the messages that name the files."""
    return dataclasses.replace(report, skipped_examples=[])


def test_parquet_and_jsonl_give_the_same_samples_tokens_and_rows(tmp_path, sp_model_path):
    pairs = _write_both(tmp_path, "pairs", _pairs(40, 1))
    chats = _write_both(tmp_path, "chats", _chats(25, 2))
    valid = _write_both(tmp_path, "valid", _pairs(9, 3))
    messages_type = pq.read_schema(chats[1]).field("messages").type
    assert pa.types.is_list(messages_type) and pa.types.is_struct(messages_type.value_type)
    assert sorted(field.name for field in messages_type.value_type) == ["content", "role"]
    built = []
    for kind in (0, 1):  # 0: JSONL, 1: Parquet
        settings = dict(
            train_data=[pairs[kind], chats[kind]],
            valid_data=[valid[kind]],
            token_class_key="kind",
            seq_length=SEQ,
            pack_sequences=True,
            tokenizer_model=sp_model_path,
        )
        built.append(build_data(settings, 4, 2))
    jsonl, parquet = built
    for want, got in ((jsonl.train, parquet.train), (jsonl.valid, parquet.valid)):
        for field in ("ids", "loss_flags", "offsets", "classes", "class_names"):
            assert np.array_equal(getattr(got.samples, field), getattr(want.samples, field)), field
        assert np.array_equal(got.stream_rows(0, 30), want.stream_rows(0, 30))
    assert [_path_free(r) for r in parquet.reports] == [_path_free(r) for r in jsonl.reports]
    assert parquet.reports[0].num_samples == 65

    samples = [read_samples([path], RecordFormat())[0] for path in chats]
    assert [s.messages for s in samples[1]] == [s.messages for s in samples[0]]
    assert [s.line for s in samples[1]] == list(range(25))  # rows from 0, lines from 1
    assert samples[1][3].location == f"{chats[1]}:row 3"


def _with_bad_rows(records):
    """``records`` with an empty response at row 3 and a non-string one at row 9."""
    records = [dict(r) for r in records]
    records[3]["response"] = ""
    records[9]["response"] = None  # Parquet: a null in a string column
    return records


def test_bad_row_is_named_by_row_and_skips_are_counted(tmp_path, sp_model_path):
    _, parquet = _write_both(tmp_path, "bad", _with_bad_rows(_pairs(20, 4)))
    with pytest.raises(DataError) as error:
        read_samples([parquet], RecordFormat())
    assert str(error.value) == (
        f"{parquet}:row 3: record key 'response' is empty (a response must have text)"
    )
    samples, report = read_samples([parquet], RecordFormat(skip_bad_samples=True))
    assert len(samples) == report.num_samples == 18
    assert report.skipped == {"empty_response": 1, "invalid": 1}
    assert report.examples == [
        f"{parquet}:row 3: record key 'response' is empty (a response must have text)",
        f"{parquet}:row 9: record key 'response' must be a string, got NoneType",
    ]
    assert [s.line for s in samples] == [r for r in range(20) if r not in (3, 9)]


def test_unreadable_parquet_names_the_file(tmp_path):
    path = write_jsonl(tmp_path / "not.parquet", [{"prompt": "p", "response": "r"}])
    with pytest.raises(DataError, match=r"not\.parquet: is not a readable Parquet file"):
        read_samples([path], RecordFormat())
    empty = str(tmp_path / "empty.parquet")
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("prompt", pa.string())])), empty)
    with pytest.raises(DataError, match=r"empty\.parquet: contains no usable samples"):
        read_samples([empty], RecordFormat())


def test_rows_are_streamed_a_batch_at_a_time(tmp_path, monkeypatch):
    _, parquet = _write_both(tmp_path, "big", _pairs(5 * sources.PARQUET_BATCH_ROWS // 4, 5))

    def whole_file(*args, **kwargs):
        raise AssertionError("the whole file was loaded")

    monkeypatch.setattr(pq.ParquetFile, "read", whole_file)
    monkeypatch.setattr(pq, "read_table", whole_file)
    pulled = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def counting_iter_batches(self, *args, **kwargs):
        for batch in real_iter_batches(self, *args, **kwargs):
            pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting_iter_batches)
    samples = iter_samples([parquet], RecordFormat(), ReadReport())
    next(samples)
    assert pulled == [sources.PARQUET_BATCH_ROWS]  # one batch read for the first sample
    assert 1 + sum(1 for _ in samples) == 5 * sources.PARQUET_BATCH_ROWS // 4
    assert sum(pulled) == 5 * sources.PARQUET_BATCH_ROWS // 4


def test_preprocessed_parquet_equals_preprocessed_jsonl(tmp_path, sp_model_path):
    tool = load_tool("preprocess_sft_data")
    pairs = _write_both(tmp_path, "pairs", _with_bad_rows(_pairs(30, 6)))
    chats = _write_both(tmp_path, "chats", _chats(12, 7))
    sidecars = []
    for kind, name in ((0, "jsonl"), (1, "parquet")):
        prefix = str(tmp_path / name / "set")
        argv = ["--input", pairs[kind], chats[kind], "--output-prefix", prefix]
        argv += ["--tokenizer-model", sp_model_path, "--skip-bad-samples", "--no-progress"]
        assert tool.main(argv + ["--workers", "2", "--chunk-lines", "5"]) == 0
        with open(prefix + ".json", encoding="utf-8") as handle:
            sidecars.append(json.load(handle))
    for name in ("set_tokens.bin", "set_tokens.idx", "set_lossmask.bin", "set_loss_counts.npy"):
        with (
            open(tmp_path / "jsonl" / name, "rb") as want,
            open(tmp_path / "parquet" / name, "rb") as got,
        ):
            assert got.read() == want.read(), name
    jsonl, parquet = sidecars
    assert parquet["num_samples"] == jsonl["num_samples"] == 40
    assert parquet["skipped"] == jsonl["skipped"] == {"empty_response": 1, "invalid": 1}
    assert parquet["skipped_examples"][0].startswith(f"{pairs[1]}:row 3: ")
    _, bad = _write_both(tmp_path, "bad", _with_bad_rows(_pairs(10, 8)))
    with pytest.raises(DataError, match=r"bad\.parquet:row 3: record key 'response' is empty"):
        tool.preprocess_sft_data(
            [bad], str(tmp_path / "x"), TokenizerConfig(tokenizer_model=sp_model_path)
        )


def test_cache_keys_on_parquet_content(tmp_path, sp_model_path, monkeypatch):
    _, parquet = _write_both(tmp_path, "train", _pairs(20, 9))
    config = dict(
        train_data=[parquet],
        seq_length=SEQ,
        tokenizer_model=sp_model_path,
        data_cache_dir=str(tmp_path / "cache"),
    )
    fresh = build_data(config).train.samples.ids

    def must_not_tokenize(*args):
        raise AssertionError("cache miss")

    real_tokenize = builder._tokenize_split
    monkeypatch.setattr(builder, "_tokenize_split", must_not_tokenize)
    assert np.array_equal(build_data(config).train.samples.ids, fresh)
    _write_both(tmp_path, "train", _pairs(20, 10))
    with pytest.raises(AssertionError, match="cache miss"):
        build_data(config)
    monkeypatch.setattr(builder, "_tokenize_split", real_tokenize)
    build_data(config)
    assert len(os.listdir(tmp_path / "cache")) == 2


def test_file_changed_while_read_fails(tmp_path, monkeypatch):
    """The cache's digest must be of the rows read: an in-place rewrite mid-read is an error."""
    _, parquet = _write_both(tmp_path, "train", _pairs(3 * ROW_GROUP, 11))
    real_iter_batches = pq.ParquetFile.iter_batches

    def rewriting_iter_batches(self, *args, **kwargs):
        for batch in real_iter_batches(self, *args, **kwargs):
            yield batch
            with open(parquet, "r+b") as handle:  # same inode: the reader's handle sees it
                handle.seek(4)
                handle.write(b"\0")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", rewriting_iter_batches)
    with pytest.raises(DataError, match=r"train\.parquet: changed while it was being read"):
        read_samples([parquet], RecordFormat())


def test_evaluator_names_a_parquet_row(tmp_path):
    from megatron_deft.config import ConfigError
    from megatron_deft.evaluation.evaluator import eval_item

    chats = _chats(ROW_GROUP + 1, 12)
    chats[2]["messages"] = chats[2]["messages"][:4]  # ends with a user turn: no reference
    _, parquet = _write_both(tmp_path, "eval", chats)
    samples, _ = read_samples([parquet], RecordFormat())
    with pytest.raises(ConfigError, match=rf"^{parquet}:row 2: the last message must be"):
        eval_item(2, samples[2], tokenizer=None)
