"""--token-class-key: a per-sample class label read from JSONL and carried to every token of the
micro-batch (``token_class``), through tokenization, the cache and packing."""

import os

import numpy as np
import pytest

from megatron_deft.data import DataConfig, DataError, builder
from megatron_deft.data.jsonl import read_samples
from tests.unit.data.helpers import build_data, write_jsonl

# (prompt, response, class or None): unlabeled records have no "tag" key.
# No prompt or response is a substring of another record's text.
RECORDS = [
    ("the cat", "sat on", "noisy"),
    ("a mat", "and then it ran", "clean"),
    ("to the big", "red house", None),
    ("where many", "dogs live", "clean"),
    ("how much", "money does she", "b"),
]


def _write(path, records=RECORDS):
    rows = []
    for prompt, response, tag in records:
        row = {"prompt": prompt, "response": response}
        if tag is not None:
            row["tag"] = tag
        rows.append(row)
    return write_jsonl(path, rows)


def test_jsonl_reads_the_class_and_rejects_a_non_string(tmp_path):
    path = _write(tmp_path / "d.jsonl")
    samples, _ = read_samples([path], class_key="tag")
    assert [s.token_class for s in samples] == [tag for *_, tag in RECORDS]
    without, _ = read_samples([path])
    assert all(s.token_class is None for s in without)
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"prompt": "a", "response": "b", "tag": "x"}, {"prompt": "a", "response": "b", "tag": 3}],
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*'tag' must be a non-empty string"):
        read_samples([bad], class_key="tag")


@pytest.mark.parametrize("pack", [False, True])
def test_every_token_of_a_sample_carries_its_class(tmp_path, sp_model_path, pack):
    config = dict(
        train_data=[_write(tmp_path / "d.jsonl")],
        seq_length=64,
        pack_sequences=pack,
        tokenizer_model=sp_model_path,
        token_class_key="tag",
    )
    data = build_data(config, global_batch_size=len(RECORDS), micro_batch_size=len(RECORDS))
    names = data.train.class_names
    assert names == ("b", "clean", "noisy")  # sorted distinct labels
    seen = set()
    for mb in next(iter(data.train.eval_batches())).microbatches:
        for row in range(mb["tokens"].shape[0]):
            segments, classes = mb["segment_ids"][row], mb["token_class"][row]
            assert (classes[segments < 0] == -1).all()  # padding is unlabeled
            for segment in range(int(segments.max()) + 1):
                where = segments == segment
                ids = classes[where].unique().tolist()
                assert len(ids) == 1, "one class per sample"
                # The sample's decoded text identifies its record, independently of the pipeline.
                text = data.tokenizer.decode(mb["tokens"][row][where].tolist())
                (record_tag,) = [tag for p, r, tag in RECORDS if p in text and r in text]
                assert ids[0] == (-1 if record_tag is None else names.index(record_tag))
                seen.add(record_tag)
    assert seen == {tag for *_, tag in RECORDS}


def test_the_cache_keeps_classes_and_the_key_is_part_of_it(tmp_path, sp_model_path, monkeypatch):
    path = _write(tmp_path / "d.jsonl")
    cache = str(tmp_path / "cache")
    config = dict(
        train_data=[path],
        seq_length=64,
        tokenizer_model=sp_model_path,
        token_class_key="tag",
        data_cache_dir=cache,
    )
    fresh = build_data(config, 1, 1).train.samples

    def must_not_tokenize(*args):
        raise AssertionError("cache miss")

    monkeypatch.setattr(builder, "_tokenize_split", must_not_tokenize)
    hit = build_data(config, 1, 1).train.samples
    assert hit.class_names == fresh.class_names == ("b", "clean", "noisy")
    assert np.array_equal(hit.classes, fresh.classes)
    assert hit.classes.tolist() == [2, 1, -1, 1, 0]
    with pytest.raises(AssertionError, match="cache miss"):  # another key is another entry
        build_data({**config, "token_class_key": "other"}, 1, 1)
    assert len(os.listdir(cache)) == 1


def test_preprocessed_sets_refuse_a_class_key():
    with pytest.raises(ValueError, match="--token-class-key needs JSONL data"):
        DataConfig(data_path=["prefix"], token_class_key="tag")
