"""Data order: determinism by seed, independence from the parallel layout, exact resume, evaluation
pass, and the end-to-end builder producing the micro-batch contract."""

import random

import numpy as np
import pytest
import torch

from megatron_deft.data.jsonl import Sample
from megatron_deft.data.loader import SFTDataLoader
from megatron_deft.data.packing import plan_rows
from megatron_deft.data.sft_dataset import tokenize_samples
from tests.unit.data.helpers import CharTokenizer, build_data, make_sentence, write_jsonl

SEQ = 48
NUM_SAMPLES = 10


@pytest.fixture(scope="module")
def tokenized():
    # Sample k's reply is the character chr(256 + k), which no template text uses: the largest
    # token id of a row tells which sample it holds.
    samples = [
        Sample((("user", "q"), ("assistant", chr(256 + k) * (k + 1))), "f", k + 1)
        for k in range(NUM_SAMPLES)
    ]
    return tokenize_samples(samples, CharTokenizer(), SEQ)[0]


def _loader(tokenized, global_batch=4, micro=2, dp_rank=0, dp_size=1, seed=7):
    rows = plan_rows(tokenized.lengths, SEQ, pack=False)
    return SFTDataLoader(tokenized, rows, SEQ, 0, global_batch, micro, dp_rank, dp_size, seed)


def _row_ids(batch):
    """The sample (= row, unpacked) each micro-batch row holds, read back from its tokens;
    None for an all-padding row."""
    ids = [int(row.max()) - CharTokenizer().encode(chr(256))[0] for row in batch["tokens"]]
    return [i if i >= 0 else None for i in ids]


def _global_order(loaders, steps):
    """Rows of each global batch, gathered over DP ranks in rank order."""
    order = []
    for _ in range(steps):
        rows = []
        for loader in loaders:
            for micro in loader.next_global_batch().microbatches:
                rows += _row_ids(micro)
        order.append(rows)
    return order


def test_every_epoch_is_a_seeded_permutation(tokenized):
    loader = _loader(tokenized)
    stream = loader.stream_rows(0, 3 * NUM_SAMPLES).reshape(3, NUM_SAMPLES)
    for epoch in stream:
        assert sorted(epoch.tolist()) == list(range(NUM_SAMPLES))
    assert not np.array_equal(stream[0], stream[1])  # reshuffled per epoch
    assert np.array_equal(stream, _loader(tokenized).stream_rows(0, 3 * NUM_SAMPLES).reshape(3, -1))
    assert not np.array_equal(
        stream, _loader(tokenized, seed=8).stream_rows(0, 3 * NUM_SAMPLES).reshape(3, -1)
    )
    assert _global_order([_loader(tokenized)], 7) == [
        stream.reshape(-1)[4 * i : 4 * i + 4].tolist() for i in range(7)
    ]


@pytest.mark.parametrize("dp_size,micro", [(2, 1), (2, 2), (4, 1)])
def test_order_is_independent_of_parallel_layout(tokenized, dp_size, micro):
    reference = _global_order([_loader(tokenized, global_batch=4, micro=4)], 6)
    ranks = [_loader(tokenized, 4, micro, rank, dp_size) for rank in range(dp_size)]
    assert _global_order(ranks, 6) == reference
    assert all(len(r.next_global_batch().microbatches) == 4 // (dp_size * micro) for r in ranks)


def test_resume_continues_exactly_across_epochs(tokenized):
    uninterrupted = _loader(tokenized)
    expected = _global_order([uninterrupted], 9)  # 36 rows: crosses three epoch boundaries
    first = _loader(tokenized)
    _global_order([first], 4)
    state = first.state_dict()
    assert state["rows_consumed"] == 16
    resumed = _loader(tokenized)
    resumed.load_state_dict(dict(state))
    assert _global_order([resumed], 5) == expected[4:]
    assert resumed.epoch == 36 // NUM_SAMPLES


def test_resume_refuses_other_seed_or_data(tokenized):
    state = _loader(tokenized).state_dict()
    with pytest.raises(ValueError, match="seed=7 but this run has 8"):
        _loader(tokenized, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="num_rows=10 but this run has 9"):
        rows = plan_rows(tokenized.lengths, SEQ, pack=False)[:9]
        SFTDataLoader(tokenized, rows, SEQ, 0, 4, 2, seed=7).load_state_dict(state)


def test_global_loss_tokens_and_eval_pass(tokenized):
    ranks = [_loader(tokenized, 4, 1, rank, 2) for rank in range(2)]
    shares = [r.next_global_batch() for r in ranks]
    counted = sum(float(m["loss_mask"].sum()) for share in shares for m in share.microbatches)
    assert shares[0].num_loss_tokens == shares[1].num_loss_tokens == counted
    seen = []
    batches = [list(r.eval_batches()) for r in ranks]
    assert len(batches[0]) == len(batches[1]) == 3  # 10 rows in global batches of 4
    total = 0.0
    for rank_batches in batches:
        for share in rank_batches:
            for micro in share.microbatches:
                has_loss = micro["loss_mask"].sum(-1) > 0
                seen += [row for row, real in zip(_row_ids(micro), has_loss) if real]
                total += float(micro["loss_mask"].sum())
    assert sorted(seen) == list(range(NUM_SAMPLES))  # every row once; fill rows carry no loss
    assert total == sum(share.num_loss_tokens for share in batches[0])
    assert ranks[0].rows_consumed == 4  # evaluation does not move the training position


def test_invalid_batch_layout(tokenized):
    with pytest.raises(ValueError, match="divisible by micro_batch_size"):
        _loader(tokenized, global_batch=6, micro=2, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank=2"):
        _loader(tokenized, dp_rank=2, dp_size=2)


def test_build_sft_data_end_to_end(tmp_path, sp_model_path):
    py_rng = random.Random(0)
    train = [
        {"question": make_sentence(py_rng), "answer": make_sentence(py_rng)} for _ in range(40)
    ]
    train[5] = '{"question": "broken'
    train[9] = {"question": "no answer"}
    train[11] = {"question": "q", "answer": " ".join(["the cat"] * 200)}  # over-long
    config = dict(
        train_data=[write_jsonl(tmp_path / "train.jsonl", train)],
        valid_data=[write_jsonl(tmp_path / "valid.jsonl", train[20:30])],
        prompt_key="question",
        response_key="answer",
        seq_length=128,
        pack_sequences=True,
        overlong="drop",
        skip_bad_samples=True,
        seed=3,
        tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=sp_model_path,
    )
    data = build_data(config, global_batch_size=4, micro_batch_size=2, dp_rank=1, dp_size=2)
    train_report = data.reports[0]
    assert train_report.skipped == {"malformed_json": 1, "missing_key": 1}
    assert train_report.num_dropped_overlong == 1 and train_report.num_samples == 37
    assert train_report.num_rows < 37 and train_report.packing_efficiency > 0.6
    assert data.valid is not None and data.reports[1].num_samples == 10
    micro = data.train.next_global_batch().microbatches[0]
    expected = {
        "tokens": (torch.int64, (2, 128)),
        "labels": (torch.int64, (2, 128)),
        "loss_mask": (torch.float32, (2, 128)),
        "position_ids": (torch.int64, (2, 128)),
        "segment_ids": (torch.int64, (2, 128)),
        "attention_mask": (torch.bool, (2, 1, 128, 128)),
    }
    for key, (dtype, shape) in expected.items():
        assert micro[key].dtype == dtype and tuple(micro[key].shape) == shape, key
    assert torch.equal(micro["loss_mask"], (micro["labels"] != -100).float())
    assert micro["cu_seqlens"][-1] == 2 * 128 and isinstance(micro["max_seqlen"], int)


def test_resume_refuses_the_same_counts_made_of_other_rows(tokenized):
    """Reordered rows (as from other blend weights or another sample order) keep the row and
    token counts: only the rows' digest tells the saved position no longer names the same rows."""
    rows = plan_rows(tokenized.lengths, SEQ, pack=False)
    state = SFTDataLoader(tokenized, rows, SEQ, 0, 4, 2, seed=7).state_dict()
    reordered = SFTDataLoader(tokenized, rows[::-1], SEQ, 0, 4, 2, seed=7)
    assert {k: v for k, v in reordered.state_dict().items() if k != "rows_digest"} == {
        k: v for k, v in state.items() if k != "rows_digest"
    }
    with pytest.raises(ValueError, match="rows_digest=.* blend weights or order"):
        reordered.load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "rows_digest"}  # checkpoint without it
    reordered.load_state_dict(older)
    assert reordered.rows_consumed == 0


def test_blend_resume_refuses_other_rows_in_later_blend_epochs_only(tokenized):
    """Two blends with the same first blend epoch, one set's unused rows swapped for other
    samples: epoch 0 is identical, epoch 1 is not, and the digest (which covers every set's
    rows) refuses the resume. A batch straddling the epoch boundary reads both epochs' rows."""
    from megatron_deft.data.blend import BlendedRows

    weights = np.array([0.5, 0.5])
    big, small = [(k,) for k in range(6)], [(6,), (7,)]
    blend = BlendedRows([big, small], weights, seed=3)
    unused = sorted(set(big) - set(blend))
    assert len(unused) == 2  # epoch 0 has 4 big slots
    swapped = [(8,) if row == unused[0] else row for row in big]
    other = BlendedRows([swapped, small], weights, seed=3)
    assert other.epoch(0) == blend.epoch(0) and other.epoch(1) != blend.epoch(1)

    loader = SFTDataLoader(tokenized, blend, SEQ, 0, 4, 2, seed=7)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="rows_digest"):
        SFTDataLoader(tokenized, other, SEQ, 0, 4, 2, seed=7).load_state_dict(state)

    rows, loss_tokens = loader.rows_at(6, 4)  # positions 6, 7 of epoch 0 and 0, 1 of epoch 1
    perm0, perm1 = loader.stream_rows(6, 2), loader.stream_rows(8, 2)
    assert rows == [blend.epoch(0)[r] for r in perm0] + [blend.epoch(1)[r] for r in perm1]
    assert loss_tokens == sum(int(tokenized.loss_token_counts[row[0]]) for row in rows)
