"""Sequence packing: row plans, block-diagonal attention, cu_seqlens, unpacking, and that a packed
row gives every sample the same per-token loss as running it alone (tiny float64 model)."""

import math

import numpy as np
import pytest
import torch

from megatron_deft.data.batch import collate_rows, unpack_batch
from megatron_deft.data.jsonl import Sample
from megatron_deft.data.packing import build_row, plan_rows
from megatron_deft.data.sft_dataset import tokenize_samples
from tests.unit.data.helpers import CharTokenizer

SEQ = 96


def _random_samples(num, seed=0):
    rng = np.random.default_rng(seed)
    letters = "abcdefghij"
    samples = []
    for k in range(num):
        prompt = "".join(rng.choice(list(letters), size=rng.integers(1, 20)))
        reply = "".join(rng.choice(list(letters), size=rng.integers(1, 15)))
        samples.append(Sample((("user", prompt), ("assistant", reply)), "f", k + 1))
    return tokenize_samples(samples, CharTokenizer(), SEQ)[0]


def _packed_batch(tokenized, rows):
    layouts = [build_row(tokenized, row, SEQ, pad_id=0) for row in rows]
    return collate_rows(layouts, packed=True)


def test_plan_rows_places_every_sample_once_within_capacity():
    lengths = np.random.default_rng(1).integers(1, SEQ + 1, size=500)
    rows = plan_rows(lengths, SEQ, pack=True)
    placed = sorted(k for row in rows for k in row)
    assert placed == list(range(500))
    assert all(sum(lengths[k] for k in row) <= SEQ for row in rows)
    assert rows == plan_rows(lengths, SEQ, pack=True)  # deterministic
    # Best-fit decreasing is near the lower bound ceil(total / SEQ) on uniform lengths.
    assert len(rows) <= math.ceil(lengths.sum() / SEQ) * 1.05 + 1
    assert plan_rows(lengths, SEQ, pack=False) == [(k,) for k in range(500)]
    with pytest.raises(ValueError, match="exceeds seq_length"):
        plan_rows(np.array([SEQ + 1]), SEQ, pack=True)


def _reference_segments(tokenized, row):
    """[(start, end)] of each sample in the row, from the sample lengths alone."""
    spans, start = [], 0
    for k in row:
        spans.append((start, start + int(tokenized.lengths[k])))
        start = spans[-1][1]
    return spans


def test_attention_is_block_diagonal_causal_and_cu_seqlens_match():
    tokenized = _random_samples(40)
    rows = plan_rows(tokenized.lengths, SEQ, pack=True)[-4:]  # the last rows are the least full
    assert any(len(row) > 2 for row in rows)
    assert any(sum(tokenized.lengths[k] for k in row) < SEQ for row in rows)
    batch = _packed_batch(tokenized, rows)
    mask = batch["attention_mask"]
    assert mask.shape == (4, 1, SEQ, SEQ) and mask.dtype == torch.bool
    expected_cu = [0]
    for b, row in enumerate(rows):
        spans = _reference_segments(tokenized, row)
        owner = np.full(SEQ, -1)
        for segment, (lo, hi) in enumerate(spans):
            owner[lo:hi] = segment
            assert batch["position_ids"][b, lo:hi].tolist() == list(range(hi - lo))
            expected_cu.append(b * SEQ + hi)
        if spans[-1][1] < SEQ:
            expected_cu.append((b + 1) * SEQ)  # the padding run is one segment
        allowed = np.zeros((SEQ, SEQ), dtype=bool)
        for i in range(SEQ):
            for j in range(SEQ):
                allowed[i, j] = (i == j) or (j <= i and owner[i] == owner[j] >= 0)
        assert np.array_equal(~mask[b, 0].numpy(), allowed)
    assert (~mask).any(-1).all()  # no query row is fully masked
    assert batch["cu_seqlens"].tolist() == expected_cu and batch["cu_seqlens"].dtype == torch.int32
    assert batch["max_seqlen"] == max(np.diff(expected_cu))


def test_unpack_recovers_each_sample_as_if_unpacked():
    tokenized = _random_samples(30)
    rows = plan_rows(tokenized.lengths, SEQ, pack=True)
    batch = _packed_batch(tokenized, rows)
    unpacked = unpack_batch(batch)
    for row, samples in zip(rows, unpacked):
        assert len(samples) == len(row)
        for k, sample in zip(row, samples):
            alone = build_row(tokenized, (k,), SEQ, pad_id=0)
            n = int(tokenized.lengths[k])
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert sample[key].tolist() == alone[key][:n].tolist()
            assert not alone["loss_mask"][n:].any()


class _TinyCausalLM(torch.nn.Module):
    """Embedding + learned positions + one attention layer + LM head, float64."""

    def __init__(self, vocab=300, dim=16, max_pos=SEQ):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, dim, dtype=torch.float64)
        self.pos = torch.nn.Embedding(max_pos, dim, dtype=torch.float64)
        self.qkv = torch.nn.Linear(dim, 3 * dim, dtype=torch.float64)
        self.head = torch.nn.Linear(dim, vocab, dtype=torch.float64)

    def forward(self, tokens, position_ids, attention_mask):
        # tokens/position_ids [b, s]; attention_mask [b, 1, s, s] True = masked
        x = self.embed(tokens) + self.pos(position_ids)  # [b, s, d]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = (q @ k.transpose(1, 2)) / math.sqrt(q.shape[-1])  # [b, s, s]
        scores = scores.masked_fill(attention_mask[:, 0], float("-inf"))
        return self.head(x + scores.softmax(-1) @ v)  # [b, s, vocab]

    def forward_thd(self, tokens, position_ids, cu_seqlens):
        """The THD path: tokens flattened to [b*s], causal attention inside each cu_seqlens
        segment, no mask tensor (what a varlen kernel computes)."""
        flat = self.embed(tokens.reshape(-1)) + self.pos(position_ids.reshape(-1))  # [t, d]
        out = torch.empty(flat.shape[0], self.head.out_features, dtype=flat.dtype)
        for lo, hi in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
            n = hi - lo
            causal = ~torch.ones(n, n, dtype=torch.bool).tril()
            out[lo:hi] = self.forward(
                tokens.reshape(-1)[None, lo:hi],
                position_ids.reshape(-1)[None, lo:hi],
                causal[None, None],
            )[0]
        return out.reshape(*tokens.shape, -1)  # [b, s, vocab]


def _per_token_loss(model, batch):
    logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    loss = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), batch["labels"], reduction="none"
    )
    return loss * batch["loss_mask"]


def test_packing_does_not_change_any_sample_loss():
    tokenized = _random_samples(25, seed=3)
    rows = plan_rows(tokenized.lengths, SEQ, pack=True)
    assert sum(len(row) > 1 for row in rows) >= len(rows) // 2
    model = _TinyCausalLM()
    packed_loss = _per_token_loss(model, _packed_batch(tokenized, rows))  # [rows, s]
    # Every sample alone in its own padded row, all in one forward pass: [num_samples, s]
    alone = collate_rows([build_row(tokenized, (k,), SEQ, 0) for k in range(len(tokenized))], False)
    alone_loss = _per_token_loss(model, alone)
    for b, row in enumerate(rows):
        for k, (lo, hi) in zip(row, _reference_segments(tokenized, row)):
            torch.testing.assert_close(
                packed_loss[b, lo:hi], alone_loss[k, : hi - lo], rtol=0, atol=1e-12
            )
    # The comparison is not vacuous: a plain causal mask over the packed row changes losses.
    leaky = _packed_batch(tokenized, rows)
    leaky["attention_mask"] = ~torch.ones(SEQ, SEQ, dtype=torch.bool).tril().expand(
        len(rows), 1, SEQ, SEQ
    )
    assert not torch.allclose(_per_token_loss(model, leaky), packed_loss)


def test_cu_seqlens_path_matches_the_mask_path_on_every_sample_token():
    tokenized = _random_samples(25, seed=4)
    rows = plan_rows(tokenized.lengths, SEQ, pack=True)
    batch = _packed_batch(tokenized, rows)
    model = _TinyCausalLM()
    with_mask = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
    thd = model.forward_thd(batch["tokens"], batch["position_ids"], batch["cu_seqlens"])
    real = batch["segment_ids"] >= 0  # padding runs differ (THD lets them attend each other)
    torch.testing.assert_close(thd[real], with_mask[real], rtol=0, atol=1e-12)
