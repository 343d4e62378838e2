"""Single-process checks of linear_vocab_parallel_loss (the output layer fused with the objective):
loss, d hidden, d weight and stats against the float64 reference on the full logits hidden @ W^T,
and against the unfused vocab_parallel_loss; memory never holds a tokens x V tensor."""

import pytest
import torch

from megatron_deft.objectives import linear_vocab_parallel_loss, vocab_parallel_loss
from megatron_deft.objectives.linear_vocab_parallel import (
    CHUNK_ELEMENTS,
    MIN_CHUNK_TOKENS,
    chunk_tokens,
    logit_tiles,
)
from megatron_deft.utils.memory import peak_extra_bytes
from tests.unit.objectives.reference import reference
from tests.unit.objectives.test_vocab_parallel_loss import OBJECTIVES, THRESHOLDS

SEQ, BATCH, HIDDEN, VOCAB = 7, 3, 16, 37


def make_inputs(seed=0, dtype=torch.float64, vocab=VOCAB):
    """hidden [s, b, h], weight [V, h] (logits of scale ~3), target with -100s, loss mask."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, HIDDEN, generator=g, dtype=torch.float64) * 0.75
    target = torch.randint(0, vocab, (SEQ, BATCH), generator=g)
    target[0, :] = -100
    target[SEQ // 2, 1] = -100
    loss_mask = torch.ones(SEQ, BATCH)
    loss_mask[-1, 0] = 0
    return hidden.to(dtype), weight.to(dtype), target, loss_mask


def token_weights():
    return torch.linspace(0.5, 1.5, SEQ * BATCH, dtype=torch.float64).reshape(SEQ, BATCH)


def fused(hidden, weight, target, objective, loss_mask=None, **kw):
    """(loss, stats, d hidden, d weight) of the fused path, upstream gradient token_weights()."""
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, stats = linear_vocab_parallel_loss(h, w, target, objective, loss_mask, **kw)
    (loss.double() * token_weights()).sum().backward()
    return loss, stats, h.grad, w.grad


def float64_reference(hidden, weight, target, objective, loss_mask=None, vocab_size=None):
    """The same quantities from reference.py on the full float64 logits (real ids only)."""
    h = hidden.double().clone().requires_grad_(True)
    w = weight.double().clone().requires_grad_(True)
    logits = h @ w.t()
    loss, stats = reference(logits[..., :vocab_size], target, objective, loss_mask)
    (loss * token_weights()).sum().backward()
    return loss, stats, h.grad, w.grad


def assert_close(ours, ref, rtol, atol, what):
    err = (ours.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert torch.allclose(ours.double(), ref.double(), rtol=rtol, atol=atol), f"{what}: {err:.3g}"


@pytest.mark.parametrize("objective", OBJECTIVES + THRESHOLDS)
@pytest.mark.parametrize("chunk_size", [1, 4, None])  # 4 does not divide the 19 valid tokens
@pytest.mark.parametrize(
    "dtype, rtol, atol", [(torch.float64, 1e-10, 1e-12), (torch.float32, 2e-5, 2e-6)]
)
def test_matches_the_float64_reference(objective, chunk_size, dtype, rtol, atol):
    hidden, weight, target, mask = make_inputs(dtype=dtype)
    loss, stats, d_hidden, d_weight = fused(
        hidden, weight, target, objective, mask, chunk_size=chunk_size
    )
    ref_loss, ref_stats, ref_dh, ref_dw = float64_reference(hidden, weight, target, objective, mask)
    assert loss.dtype == torch.float32 if dtype != torch.float64 else loss.dtype == dtype
    assert_close(loss, ref_loss, rtol, atol, "loss")
    assert_close(d_hidden, ref_dh, rtol, atol, "d hidden")
    assert_close(d_weight, ref_dw, rtol, atol, "d weight")
    assert set(stats) == set(ref_stats)
    for name, value in ref_stats.items():
        assert_close(stats[name], value, rtol, atol, name)


@pytest.mark.parametrize("objective", ["deft", "eaft:k=3", "cayley"])
def test_more_tokens_than_ids_recompute_in_token_chunks(objective):
    """19 valid tokens over 11 ids: the backward tiles are token chunks over every id (d weight
    accumulates across them) instead of column blocks over every token."""
    hidden, weight, target, mask = make_inputs(seed=9, vocab=11)
    assert logit_tiles(19, 11, 4 * 11) == (4, 11) and logit_tiles(19, 37, 4 * 37) == (19, 7)
    loss, stats, d_hidden, d_weight = fused(hidden, weight, target, objective, mask, chunk_size=4)
    ref_loss, ref_stats, ref_dh, ref_dw = float64_reference(hidden, weight, target, objective, mask)
    assert_close(loss, ref_loss, 1e-10, 1e-12, "loss")
    assert_close(d_hidden, ref_dh, 1e-10, 1e-12, "d hidden")
    assert_close(d_weight, ref_dw, 1e-10, 1e-12, "d weight")


@pytest.mark.parametrize("objective", ["nll", "deft", "eaft:k=3"])
def test_padding_ids_are_outside_the_softmax(objective):
    """The last 5 output rows are Megatron's vocabulary padding (vocab_size = V - 5): the result is
    the reference on the real ids, and the padding rows get no gradient."""
    hidden, weight, target, mask = make_inputs(seed=3)
    weight[-5:] = 4.0  # padding logits would win the max and the top-k if they were counted
    target = target.clamp(max=VOCAB - 6)
    loss, stats, d_hidden, d_weight = fused(
        hidden, weight, target, objective, mask, vocab_size=VOCAB - 5, chunk_size=5
    )
    ref = float64_reference(hidden, weight[:-5], target, objective, mask)
    assert_close(loss, ref[0], 1e-10, 1e-12, "loss")
    assert_close(d_hidden, ref[2], 1e-10, 1e-12, "d hidden")
    assert_close(d_weight[:-5], ref[3], 1e-10, 1e-12, "d weight")
    assert torch.count_nonzero(d_weight[-5:]) == 0


@pytest.mark.parametrize("objective", OBJECTIVES + THRESHOLDS)
def test_fp32_equals_the_unfused_path(objective):
    """Same loss, stats and gradients as vocab_parallel_loss on the logits hidden @ W^T, to 1e-6
    of each tensor's largest entry (the two sum the same fp32 terms in different orders)."""
    hidden, weight, target, mask = make_inputs(seed=5, dtype=torch.float32)
    loss, stats, d_hidden, d_weight = fused(hidden, weight, target, objective, mask, chunk_size=3)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_loss, ref_stats = vocab_parallel_loss(h @ w.t(), target, objective, mask)
    (ref_loss.double() * token_weights()).sum().backward()
    pairs = {
        "loss": (loss, ref_loss),
        "d hidden": (d_hidden, h.grad),
        "d weight": (d_weight, w.grad),
    }
    pairs.update({name: (stats[name], value) for name, value in ref_stats.items()})
    assert torch.equal(pairs.pop("valid")[0], ref_stats["valid"])
    for what, (ours, ref) in pairs.items():
        assert_close(ours, ref, 1e-6, 1e-6 * ref.abs().max().item(), what)


@pytest.mark.parametrize(
    "tokens, vocab_local", [(8192, 128256), (8001, 128256), (600, 128256), (4096, 16032), (9, 50)]
)
def test_default_chunks_are_the_fewest_and_even(tokens, vocab_local):
    cap = max(MIN_CHUNK_TOKENS, CHUNK_ELEMENTS // vocab_local)
    chunk = chunk_tokens(tokens, vocab_local)
    chunks = -(-tokens // chunk)
    assert chunk <= cap and chunks == -(-tokens // cap)
    assert tokens - (chunks - 1) * chunk > chunk - chunks  # the last chunk is nearly as large


def test_default_chunking_equals_the_unfused_path():
    """1100 tokens x 33000 ids: two default chunks of 550 through the reused chunk buffers."""
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(1100, 1, 8, generator=g)
    weight = torch.randn(33000, 8, generator=g)
    target = torch.randint(0, 33000, (1100, 1), generator=g)
    assert chunk_tokens(1100, 33000) == 550
    grads = []
    for loss_of in (
        lambda h, w: linear_vocab_parallel_loss(h, w, target, "deft")[0],
        lambda h, w: vocab_parallel_loss(h @ w.t(), target, "deft")[0],
    ):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = loss_of(h, w)
        loss.sum().backward()
        grads.append((loss, h.grad, w.grad))
    for what, ours, ref in zip(("loss", "d hidden", "d weight"), *grads):
        assert_close(ours, ref, 1e-5, 1e-6 * ref.abs().max().item(), what)


@pytest.mark.parametrize("objective", ["nll", "deft", "cayley", "eaft"])
def test_bf16_follows_the_unfused_bf16_path(objective):
    """bf16 hidden and weight: the matmul runs in bf16 (as the output layer's), the loss in fp32;
    the result follows the unfused path on the bf16 logits to bf16 rounding."""
    hidden, weight, target, mask = make_inputs(seed=6, dtype=torch.bfloat16)
    loss, stats, d_hidden, d_weight = fused(hidden, weight, target, objective, mask, chunk_size=4)
    assert loss.dtype == torch.float32 and d_hidden.dtype == d_weight.dtype == torch.bfloat16
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_loss, _ = vocab_parallel_loss(h @ w.t(), target, objective, mask)
    (ref_loss.double() * token_weights()).sum().backward()
    assert_close(loss, ref_loss, 1e-5, 1e-6, "loss")  # same bf16 logits, fp32 loss
    assert_close(d_hidden, h.grad, 2e-2, 2e-2, "d hidden")
    assert_close(d_weight, w.grad, 2e-2, 2e-2, "d weight")


@pytest.mark.parametrize("objective", ["deft", "eaft"])
def test_one_token_and_all_tokens_masked(objective):
    hidden, weight, target, _ = make_inputs(seed=7)
    one = torch.full_like(target, -100)
    one[2, 1] = target[2, 1].clamp(min=0)
    loss, _, d_hidden, d_weight = fused(hidden, weight, one, objective)
    ref = float64_reference(hidden, weight, one, objective)
    assert_close(loss, ref[0], 1e-10, 1e-12, "loss")
    assert_close(d_hidden, ref[2], 1e-10, 1e-12, "d hidden")
    assert_close(d_weight, ref[3], 1e-10, 1e-12, "d weight")
    none = torch.full_like(target, -100)
    loss, stats, d_hidden, d_weight = fused(hidden, weight, none, objective)
    assert not loss.any() and not d_hidden.any() and not d_weight.any()
    assert not stats["valid"].any() and not stats["gate"].any()


def test_bad_arguments_are_one_line_errors():
    hidden, weight, target, _ = make_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"weight must be \[V/tp, h\] with h = 16"):
        linear_vocab_parallel_loss(hidden, weight[:, :8], target)
    with pytest.raises(ValueError, match="target shape"):
        linear_vocab_parallel_loss(hidden, weight, target[:3])
    with pytest.raises(ValueError, match="target id 40 .* outside"):
        linear_vocab_parallel_loss(hidden, weight, target.clamp(min=40))
    with pytest.raises(ValueError, match="unknown name"):
        linear_vocab_parallel_loss(hidden, weight, target, "nope")


@pytest.mark.parametrize("objective", ["nll", "deft", "cayley", "eaft"])
def test_never_allocates_a_tokens_by_vocab_tensor(objective):
    """Allocation budget: 4096 tokens x 4096 vocab in chunks of 64 tokens. The unfused path needs at
    least one [4096, 4096] fp32 buffer (64 MiB); the fused one may hold two chunks of logits, the
    weight- and hidden-sized gradients and per-token vectors, well under an eighth of that."""
    tokens, vocab, hidden_size, chunk = 4096, 4096, 32, 64
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(tokens, 1, hidden_size, generator=g) * 0.1).requires_grad_(True)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.1).requires_grad_(True)
    target = torch.randint(0, vocab, (tokens, 1), generator=g)

    def step():
        loss, _ = linear_vocab_parallel_loss(hidden, weight, target, objective, chunk_size=chunk)
        loss.sum().backward()

    logits_bytes = tokens * vocab * 4
    allowed = 4 * (2 * chunk * vocab + 2 * vocab * hidden_size + 3 * tokens * hidden_size)
    allowed += 64 * tokens * 8  # per-token vectors ([N] fp32/int64)
    assert allowed < logits_bytes / 8
    peak = peak_extra_bytes(step)
    assert peak <= allowed, f"peak {peak / 2**20:.2f} MiB > {allowed / 2**20:.2f} MiB"
