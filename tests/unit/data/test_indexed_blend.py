"""--data-path syntax and weighted blends of preprocessed sets: parsing errors, hand-computed
counts and interleave, and end to end the rows' sources in the given proportions, by seed."""

import importlib.util
import os
import random

import numpy as np
import pytest

from megatron_deft.data import DataConfig, parse_data_path
from megatron_deft.data.blend import blend_counts, interleave
from tests.unit.data.helpers import REPO_ROOT, build_data, write_jsonl


@pytest.mark.parametrize(
    "data_path,prefixes,weights",
    [
        (["a"], ["a"], None),
        ("a b", ["a", "b"], None),
        (["0.7", "a", "0.3", "b"], ["a", "b"], [0.7, 0.3]),
        ("7 a, 3 b", ["a", "b"], [0.7, 0.3]),
        ([2, "a"], ["a"], [1.0]),
    ],
)
def test_parse_data_path(data_path, prefixes, weights):
    got_prefixes, got_weights = parse_data_path(data_path)
    assert got_prefixes == prefixes
    if weights is None:
        assert got_weights is None
    else:
        np.testing.assert_allclose(got_weights, weights, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    "data_path,message",
    [
        (["0.7", "a", "0.3"], "must alternate weight and prefix"),
        (["0.7", "a", "b", "0.3"], "must alternate weight and prefix"),
        (["a", "0.3", "b"], "mixes weights and prefixes"),
        (["0", "a", "1", "b"], "must be positive"),
        (["-1", "a", "2", "b"], "must be positive"),
        (["nan", "a"], "must be positive and finite"),
        ([], "is empty"),
    ],
)
def test_bad_data_path_fails_at_config(data_path, message):
    with pytest.raises(ValueError, match=message):
        parse_data_path(data_path)
    if data_path:
        with pytest.raises(ValueError, match=message):
            DataConfig(data_path=data_path)


def test_jsonl_and_preprocessed_are_exclusive():
    with pytest.raises(ValueError, match="--train-data .* or --data-path .*, not both"):
        DataConfig(data_path=["a"], train_data="a.jsonl")
    with pytest.raises(ValueError, match="--valid-data or --valid-data-prefix, not both"):
        DataConfig(valid_data_prefix=["a"], valid_data="a.jsonl")


def test_counts_and_interleave_by_hand():
    # 0.7 * 10 = 7, 0.3 * 10 = 3 exactly; 1/3 of 10 = 3.33 each, one extra to the first.
    assert blend_counts(np.array([0.7, 0.3]), 10).tolist() == [7, 3]
    assert blend_counts(np.array([1, 1, 1]) / 3, 10).tolist() == [4, 3, 3]
    # 3.5, 1.75, 1.75: floors 3, 1, 1; the two missing rows go to the largest remainders.
    assert blend_counts(np.array([0.5, 0.25, 0.25]), 7).tolist() == [3, 2, 2]
    # counts [2, 1]: set 0 at (0.5)/2=0.25, (1.5)/2=0.75; set 1 at 0.5/1=0.5.
    sets, positions = interleave(np.array([2, 1]))
    assert sets.tolist() == [0, 1, 0] and positions.tolist() == [0, 0, 1]
    sets, positions = interleave(np.array([700, 300]))
    share = np.cumsum(sets == 0) / np.arange(1, 1001)
    assert np.all(np.abs(share * np.arange(1, 1001) - 0.7 * np.arange(1, 1001)) <= 1.0)
    for index, count in enumerate((700, 300)):
        assert positions[sets == index].tolist() == list(range(count))  # each set in order


def _records(marker, n, seed):
    """Samples whose text names their set: ``marker`` appears in every response, nowhere else."""
    rng = random.Random(seed)
    words = ["the", "sun", "is", "warm", "and", "we", "walk", "to", "a", "house", "by", "sea"]
    sentence = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))  # noqa: E731
    return [{"prompt": sentence(), "response": f"{marker} {sentence()}"} for _ in range(n)]


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory, sp_model_path):
    path = os.path.join(REPO_ROOT, "tools", "preprocess_sft_data.py")
    spec = importlib.util.spec_from_file_location("preprocess_sft_data_tool", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    root = tmp_path_factory.mktemp("blend")
    prefixes = []
    for marker, count in (("cat", 60), ("dogs", 140)):
        data = write_jsonl(root / f"{marker}.jsonl", _records(marker, count, len(marker)))
        argv = [
            "--input",
            data,
            "--output-prefix",
            str(root / marker),
            "--no-progress",
            "--tokenizer-model",
            sp_model_path,
            "--workers",
            "1",
        ]
        assert tool.main(argv) == 0
        prefixes.append(str(root / marker))
    return prefixes


def _row_sources(loader, tokenizer, steps):
    """Which set each row of the global batches came from, read from the decoded tokens."""
    sources = []
    for _ in range(steps):
        for micro in loader.next_global_batch().microbatches:
            for tokens, mask in zip(micro["tokens"], micro["loss_mask"]):
                last_target = int(np.flatnonzero(mask.numpy())[-1])
                text = tokenizer.decode(tokens[: last_target + 2].tolist())
                assert ("cat" in text) != ("dogs" in text), text
                sources.append("cat" if "cat" in text else "dogs")
    return np.array(sources)


def test_blend_draws_rows_in_the_given_proportions(two_sets, sp_model_path):
    cat, dogs = two_sets

    def build(data_path, seed=3, dp_rank=0, dp_size=1):
        config = dict(data_path=data_path, seq_length=64, seed=seed, tokenizer_model=sp_model_path)
        return build_data(config, 20, 5, dp_rank=dp_rank, dp_size=dp_size)

    data = build(["0.7", cat, "0.3", dogs])
    # A blend epoch has 60 + 140 = 200 rows: 140 from `cat` (each row 2-3x), 60 from `dogs`.
    assert data.train.num_rows == 200 and data.reports[0].num_rows == 200
    sources = _row_sources(data.train, data.tokenizer, steps=30)  # 600 rows = 3 epochs
    for epoch in sources.reshape(3, 200):
        assert np.count_nonzero(epoch == "cat") == 140
    assert abs(np.mean(sources[:100] == "cat") - 0.7) < 0.12  # any window, roughly

    rows, _ = data.train.rows_at(0, 600)
    cat_rows = [row for row in rows[:200] if row[0] < 60]
    assert sorted(cat_rows.count(row) for row in set(cat_rows)) == [2] * 40 + [3] * 20
    # `dogs` gives 60 of its 140 rows per epoch, a further part of it each epoch: the first
    # epoch without repeats, the first three (180 of its stream) all of its rows.
    dog_rows = [[row for row in epoch if row[0] >= 60] for epoch in (rows[:200], rows[200:400])]
    assert len(set(dog_rows[0])) == 60 and not set(dog_rows[0]) & set(dog_rows[1])
    assert {row for row in rows if row[0] >= 60} == {(k,) for k in range(60, 200)}

    # Deterministic by seed; independent of the data-parallel layout; other seeds differ.
    same = _row_sources(build([0.7, cat, 0.3, dogs]).train, data.tokenizer, steps=30)
    assert np.array_equal(same, sources)
    scaled = _row_sources(build(f"7 {cat} 3 {dogs}").train, data.tokenizer, steps=30)
    assert np.array_equal(scaled, sources)
    ranks = [build(["0.7", cat, "0.3", dogs], dp_rank=r, dp_size=2).train for r in range(2)]
    split = [_row_sources(rank, data.tokenizer, steps=1) for rank in ranks]
    assert np.array_equal(np.concatenate(split), sources[:20])
    other = build(["0.7", cat, "0.3", dogs], seed=4).train
    assert not np.array_equal(_row_sources(other, data.tokenizer, steps=30), sources)


def test_union_and_single_prefix_use_every_sample_once(two_sets, sp_model_path):
    cat, dogs = two_sets
    config = dict(seq_length=64, tokenizer_model=sp_model_path)
    union = build_data(dict(data_path=[cat, dogs], **config), 20, 5)
    assert union.train.num_rows == 200 and union.reports[0].num_samples == 200
    sources = _row_sources(union.train, union.tokenizer, steps=10)
    assert np.count_nonzero(sources == "cat") == 60
    weighted_single = build_data(dict(data_path=["0.3", cat], **config), 20, 5)
    single = build_data(dict(data_path=[cat], **config), 20, 5)
    assert np.array_equal(
        weighted_single.train.stream_rows(0, 120), single.train.stream_rows(0, 120)
    )
    assert single.train.rows == [(k,) for k in range(60)]


def test_blended_rows_walk_each_set_through_its_own_epochs():
    """An equal blend of a 6-row and a 2-row set: 4 slots each per blend epoch, in the same
    places every epoch. The 6-row set fills its slots with the next 4 entries of its stream of
    permutations, so two epochs use all 6 of its rows; the 2-row set gives each row twice."""
    from megatron_deft.data.blend import BlendedRows

    big = [(k,) for k in range(6)]
    small = [(6 + k,) for k in range(2)]
    blend = BlendedRows([big, small], np.array([0.5, 0.5]), seed=3)
    epochs = [blend.epoch(e) for e in range(3)]
    assert list(blend) == epochs[0] and len(blend) == 8 and blend[3] == epochs[0][3]
    slots = [[row[0] < 6 for row in rows] for rows in epochs]
    assert slots[0] == slots[1] == slots[2] and sum(slots[0]) == 4
    stream = [row for rows in epochs for row, is_big in zip(rows, slots[0]) if is_big]
    # the big set's stream: whole permutations of its 6 rows back to back
    assert sorted(stream[:6]) == big and sorted(stream[6:12]) == big
    assert set(epochs[0]) | set(epochs[1]) >= set(big)
    for rows in epochs:
        assert sorted(row for row in rows if row[0] >= 6) == [(6,), (6,), (7,), (7,)]
    again = BlendedRows([big, small], np.array([0.5, 0.5]), seed=3)
    assert (
        again.epoch(2) == epochs[2]
        and BlendedRows([big, small], np.array([0.5, 0.5]), seed=4).epoch(1) != epochs[1]
    )
