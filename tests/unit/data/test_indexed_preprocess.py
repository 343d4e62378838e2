"""Preprocessed (indexed .bin/.idx) data: tools/preprocess_sft_data.py, then loading it gives
exactly the micro-batches of the JSONL path; identical files for any worker count; the same
bad-line handling; tokenizer mismatches and damaged sets fail clearly; opening memory-maps."""

import json
import os
import random

import numpy as np
import psutil
import pytest
import torch

from megatron_deft.data import DataError, RecordFormat, TokenizerConfig
from megatron_deft.data.indexed import IndexedSamples, payload_paths
from tests.unit.data.helpers import (
    build_data,
    load_tool,
    load_train_tokenizer_tool,
    make_sentence,
    write_jsonl,
)

SEQ = 48


@pytest.fixture(scope="module")
def tool():
    """tools/preprocess_sft_data.py, imported by path (it loads megatron.core when writing)."""
    return load_tool("preprocess_sft_data")


def _preprocess(tool, inputs, prefix, sp_model, *extra):
    argv = ["--input", *inputs, "--output-prefix", str(prefix), "--tokenizer-model", sp_model]
    assert tool.main(argv + ["--no-progress", "--workers", "1", *extra]) == 0
    return str(prefix)


def _pair_records(n, seed):
    rng = random.Random(seed)
    # Every fifth response is long enough to exceed SEQ (truncation/drop are exercised).
    return [
        {"prompt": make_sentence(rng), "response": make_sentence(rng, 3, 8 if k % 5 else 60)}
        for k in range(n)
    ]


def _message_records(n, seed):
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


def _assert_same_batches(expected, actual, steps):
    """Every key of every micro-batch (dtype and values) and the loss-token counts."""
    for _ in range(steps):
        want, got = expected.next_global_batch(), actual.next_global_batch()
        assert got.num_loss_tokens == want.num_loss_tokens
        assert len(got.microbatches) == len(want.microbatches)
        for want_micro, got_micro in zip(want.microbatches, got.microbatches):
            assert got_micro.keys() == want_micro.keys()
            for key, value in want_micro.items():
                if torch.is_tensor(value):
                    assert got_micro[key].dtype == value.dtype, key
                    assert torch.equal(got_micro[key], value), key
                else:
                    assert got_micro[key] == value, key
    assert actual.state_dict() == expected.state_dict()


@pytest.mark.parametrize("pack,overlong", [(True, "truncate"), (False, "drop")])
def test_preprocessed_batches_equal_jsonl_batches(tmp_path, tool, sp_model_path, pack, overlong):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", _pair_records(70, 1) + ['{"broken'])
    chats = write_jsonl(tmp_path / "chats.jsonl", [""] + _message_records(30, 2))
    valid = write_jsonl(tmp_path / "valid.jsonl", _pair_records(9, 3))
    both = _preprocess(
        tool, [pairs, chats], tmp_path / "bin" / "both", sp_model_path, "--skip-bad-samples"
    )
    one = [
        _preprocess(tool, [path], tmp_path / "bin" / name, sp_model_path, "--skip-bad-samples")
        for name, path in (("pairs", pairs), ("chats", chats))
    ]
    valid_prefix = _preprocess(tool, [valid], tmp_path / "bin" / "valid", sp_model_path)
    common = dict(
        seq_length=SEQ,
        pack_sequences=pack,
        overlong=overlong,
        seed=5,
        skip_bad_samples=True,
        tokenizer_model=sp_model_path,
    )
    jsonl_config = dict(train_data=[pairs, chats], valid_data=[valid], **common)
    binary_configs = [
        dict(data_path=[both], valid_data_prefix=[valid_prefix], **common),
        dict(data_path=" ".join(one), valid_data_prefix=valid_prefix, **common),  # union
    ]
    for binary_config in binary_configs:
        for dp_rank in range(2):
            expected = build_data(jsonl_config, 8, 2, dp_rank=dp_rank, dp_size=2)
            actual = build_data(binary_config, 8, 2, dp_rank=dp_rank, dp_size=2)
            assert actual.reports == expected.reports
            # More steps than rows per rank: crosses epoch boundaries (reshuffles).
            _assert_same_batches(expected.train, actual.train, steps=30)
            for want, got in zip(expected.valid.eval_batches(), actual.valid.eval_batches()):
                assert all(
                    torch.equal(got.microbatches[i][k], v)
                    for i, micro in enumerate(want.microbatches)
                    for k, v in micro.items()
                    if torch.is_tensor(v)
                )
    report = expected.reports[0]
    assert report.skipped == {"malformed_json": 1}
    assert (report.num_truncated if overlong == "truncate" else report.num_dropped_overlong) > 0


def test_chat_template_tokenizer_batches_equal_jsonl_batches(tmp_path, tool, hf_chat_dir):
    chats = write_jsonl(tmp_path / "chats.jsonl", _message_records(40, 12))
    prefix = _preprocess(
        tool,
        [chats],
        tmp_path / "hf",
        hf_chat_dir,
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--workers",
        "2",
        "--chunk-lines",
        "8",
    )
    common = dict(
        seq_length=64,
        pack_sequences=True,
        tokenizer_model=hf_chat_dir,
        tokenizer_type="HuggingFaceTokenizer",
    )
    expected = build_data(dict(train_data=[chats], **common), 4, 2)
    actual = build_data(dict(data_path=[prefix], **common), 4, 2)
    assert actual.reports == expected.reports and expected.reports[0].num_truncated > 0
    _assert_same_batches(expected.train, actual.train, steps=25)


def test_workers_write_identical_files(tmp_path, tool, sp_model_path):
    records = _pair_records(150, 4) + ["[1, 2]"] + _pair_records(9, 5)
    data = write_jsonl(tmp_path / "d.jsonl", records)
    prefixes = [
        _preprocess(
            tool,
            [data],
            tmp_path / f"w{workers}",
            sp_model_path,
            "--skip-bad-samples",
            "--workers",
            str(workers),
            "--chunk-lines",
            "16",
        )
        for workers in (1, 2)
    ]
    files = [payload_paths(prefix) for prefix in prefixes]
    for role in files[0]:
        with open(files[0][role], "rb") as one, open(files[1][role], "rb") as two:
            assert one.read() == two.read(), role
    sidecar = json.load(open(files[0]["json"]))
    assert sidecar["num_samples"] == 159 and sidecar["skipped"] == {"invalid": 1}
    assert sidecar["skipped_examples"] == [f"{data}:151: expected a JSON object, got list"]
    assert sidecar["token_dtype"] == "uint16"  # vocab 400: the smallest dtype
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


BAD_LINES = [
    "{not json",
    '"a string"',
    '{"question": "no known keys"}',
    '{"prompt": "p"}',
    '{"prompt": "p", "response": "   "}',
    '{"prompt": "p", "response": 3}',
    '{"messages": []}',
]


@pytest.mark.parametrize("bad", BAD_LINES)
def test_bad_lines_fail_like_jsonl(tmp_path, tool, sp_model_path, bad):
    # A bad line before the first good one also checks format detection order (`auto`).
    path = write_jsonl(tmp_path / "bad.jsonl", [bad] + _pair_records(3, 6) + [bad, ""])
    with pytest.raises(DataError) as jsonl_error:
        build_data(dict(train_data=[path], tokenizer_model=sp_model_path), 1, 1)
    argv = [
        "--input",
        path,
        "--output-prefix",
        str(tmp_path / "x"),
        "--tokenizer-model",
        sp_model_path,
        "--no-progress",
        "--workers",
        "2",
        "--chunk-lines",
        "2",
    ]
    with pytest.raises(DataError) as tool_error:
        tool.preprocess_sft_data(
            [path],
            str(tmp_path / "x"),
            TokenizerConfig(tokenizer_model=sp_model_path),
            RecordFormat(),
            workers=2,
            chunk_lines=2,
        )
    assert str(tool_error.value) == str(jsonl_error.value)
    assert tool.main(argv) == 1
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # nothing written, no temporaries


def test_skipped_lines_and_empty_files_match_jsonl(tmp_path, tool, sp_model_path):
    records = [BAD_LINES[0]] + _pair_records(4, 7) + BAD_LINES[1:] + ["\xff"] + _pair_records(2, 8)
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    prefix = _preprocess(
        tool,
        [path],
        tmp_path / "mixed",
        sp_model_path,
        "--skip-bad-samples",
        "--workers",
        "2",
        "--chunk-lines",
        "3",
    )
    config = dict(skip_bad_samples=True, tokenizer_model=sp_model_path)
    expected = build_data(dict(train_data=[path], **config), 1, 1).reports[0]
    actual = build_data(dict(data_path=[prefix], **config), 1, 1).reports[0]
    assert actual == expected
    assert sum(expected.skipped.values()) == len(BAD_LINES) + 1
    empty = write_jsonl(tmp_path / "empty.jsonl", ["{bad", ""])
    with pytest.raises(DataError) as jsonl_error:
        build_data(dict(train_data=[path, empty], **config), 1, 1)
    with pytest.raises(DataError) as tool_error:
        tool.preprocess_sft_data(
            [path, empty],
            str(tmp_path / "e"),
            TokenizerConfig(tokenizer_model=sp_model_path),
            RecordFormat(skip_bad_samples=True),
        )
    assert str(tool_error.value) == str(jsonl_error.value)
    assert "empty.jsonl: contains no usable samples" in str(tool_error.value)


def test_other_tokenizer_and_damaged_sets_fail_clearly(tmp_path, tool, sp_model_path):
    data = write_jsonl(tmp_path / "d.jsonl", _pair_records(20, 9))
    prefix = _preprocess(tool, [data], tmp_path / "set", sp_model_path)
    # Same type and vocabulary size, different merges: only the fingerprint tells them apart.
    rng = random.Random(11)
    corpus = write_jsonl(
        tmp_path / "other.jsonl",
        [
            {
                "prompt": " ".join(
                    rng.choice(["zebra", "quartz", "lynx", "fjord", "glyph", "onyx"])
                    for _ in range(12)
                ),
                "response": make_sentence(rng),
            }
            for _ in range(300)
        ],
    )
    assert (
        load_train_tokenizer_tool().main(
            ["--input", corpus, "--vocab-size", "400", "--model-prefix", str(tmp_path / "other")]
        )
        == 0
    )
    other = dict(data_path=[prefix], tokenizer_model=str(tmp_path / "other.model"))
    with pytest.raises(
        DataError,
        match=r"set\.json: was preprocessed with tokenizer "
        r"SentencePieceTokenizer .*\(vocab 400, fingerprint (\w+)\) but this run "
        r"uses SentencePieceTokenizer \(vocab 400, fingerprint (?!\1)\w+\)",
    ):
        build_data(other, 1, 1)

    paths = payload_paths(prefix)
    with open(paths["tokens_bin"], "r+b") as handle:
        handle.truncate(os.path.getsize(paths["tokens_bin"]) - 2)
    with pytest.raises(DataError, match=r"inconsistent preprocessed data set.*_tokens\.bin has"):
        IndexedSamples(prefix, SEQ)
    os.unlink(paths["lossmask_idx"])
    with pytest.raises(
        DataError,
        match=r"not a complete preprocessed data set: missing .*"
        r"_lossmask\.idx",
    ):
        IndexedSamples(prefix, SEQ)
    with pytest.raises(DataError, match="nowhere: is not a complete"):
        build_data(dict(data_path=["0.5", "nowhere", "0.5", prefix], tokenizer_model=sp_model_path))


def test_opening_maps_the_data_without_reading_it(tmp_path, tool, sp_model_path):
    """Resident memory after opening 200k samples grows by far less than the token files; the
    same measurement does see the files once every token is read (so it can fail)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = _preprocess(
        tool,
        [write_jsonl(tmp_path / "d.jsonl", _pair_records(3, 10))],
        tmp_path / "big",
        sp_model_path,
    )
    # Replace the payload with 200k synthetic samples of 50-250 tokens (sidecar updated).
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 250, size=200_000)
    paths = payload_paths(prefix)
    for role, dtype, high in (("tokens", np.uint16, 400), ("lossmask", np.uint8, 2)):
        builder = IndexedDatasetBuilder(paths[role + "_bin"], dtype=dtype)
        values = rng.integers(0, high, size=int(lengths.sum()), dtype=dtype)
        builder.add_document(values, lengths.tolist())
        builder.finalize(paths[role + "_idx"])
    np.save(paths["loss_counts"], np.full(len(lengths), 7, dtype=np.int32))
    sidecar = json.load(open(paths["json"]))
    json.dump(dict(sidecar, num_samples=len(lengths)), open(paths["json"], "w"))
    file_bytes = os.path.getsize(paths["tokens_bin"]) + os.path.getsize(paths["lossmask_bin"])

    process = psutil.Process()
    before = process.memory_info().rss
    samples = IndexedSamples(prefix, seq_length=256)
    opened = process.memory_info().rss
    assert len(samples) == 200_000 and samples.loss_token_counts.sum() == 7 * 200_000
    assert np.array_equal(samples.lengths, lengths)
    # What opening keeps is O(num_samples) small integers (~40 bytes a sample), not the tokens.
    assert opened - before < 0.1 * file_bytes, (opened - before, file_bytes)
    # Reading every token maps the files in: the measurement above would have seen it.
    total = int(samples._tokens.bin_reader._bin_buffer_mmap.sum())
    total += int(samples._flags.bin_reader._bin_buffer_mmap.sum())
    assert total > 0 and process.memory_info().rss - opened > 0.5 * file_bytes
