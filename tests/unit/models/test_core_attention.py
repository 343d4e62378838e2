"""Our core attention (models/core_attention.py) against a float64 softmax(q k^T / sqrt(d)) v
on an explicit mask: THD segments (sdpa per sample; FlexAttention's document-causal mask, its
forward on CPU and forward + backward on CUDA), BSHD rows with a dense mask, causal and the
KV-cache decode shape, grouped-query attention throughout; and the THD path's peak memory at
s = 2048 against the dense path's (allocation accounting, as tests/unit/objectives/test_memory.py).
"""

import math

import pytest
import torch

from megatron_deft.models import core_attention
from megatron_deft.models.attention_backend import FLEX_MIN_HEAD_SIZE
from megatron_deft.models.core_attention import (
    document_causal,
    document_ids,
    flex_thd,
    sdpa_bshd,
    sdpa_thd,
)
from megatron_deft.utils.memory import peak_extra_bytes

HEADS, GROUPS, D = 4, 2, 8  # grouped-query attention: 2 query heads per key/value head
LENGTHS = [5, 9, 1, 7, 10]  # samples, then a padding run (a segment of its own)


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _segment_mask(lengths) -> torch.Tensor:
    """[t, t] bool, True = may attend: same segment and key <= query (built from the lengths,
    independently of cu_seqlens)."""
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    total = len(segment)
    return (segment[:, None] == segment[None]) & torch.ones(total, total, dtype=torch.bool).tril()


def _reference(q, k, v, allowed) -> torch.Tensor:
    """float64 attention: q [..., np, sq, d], k/v [..., ng, sk, d], allowed [sq, sk] (or
    broadcastable); key/value head g serves query heads g * np/ng .. (g + 1) * np/ng - 1."""
    q, k, v = q.double(), k.double(), v.double()
    repeat = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(repeat, -3), v.repeat_interleave(repeat, -3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def _qkv(t, seed=0, requires_grad=False, head_size=D):
    g = torch.Generator().manual_seed(seed)
    shapes = [(t, HEADS, head_size), (t, GROUPS, head_size), (t, GROUPS, head_size)]
    return [torch.randn(*shape, generator=g).requires_grad_(requires_grad) for shape in shapes]


def _thd_reference(q, k, v, lengths):
    """[t, np, d] float64 of the THD stream on the segment mask."""
    heads_first = [x.transpose(0, 1) for x in (q, k, v)]
    return _reference(*heads_first, _segment_mask(lengths)).transpose(0, 1)


def test_sdpa_thd_is_causal_attention_inside_each_segment_forward_and_backward():
    q, k, v = _qkv(sum(LENGTHS), requires_grad=True)
    ours = sdpa_thd(q, k, v, _cu(LENGTHS), 1 / math.sqrt(D), dropout=0.0)
    weights = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((ours * weights).sum(), (q, k, v))
    reference = _thd_reference(q, k, v, LENGTHS)
    expected = torch.autograd.grad((reference * weights.double()).sum(), (q, k, v))
    torch.testing.assert_close(ours, reference.float(), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)
    # The comparison is not vacuous: one segment over the whole stream differs.
    leaky = sdpa_thd(q, k, v, _cu([sum(LENGTHS)]), 1 / math.sqrt(D), dropout=0.0)
    assert (leaky - ours).abs().max() > 1e-2


def test_sdpa_thd_attention_dropout_is_random_unbiased_and_stays_in_its_segment():
    """dropout 0.5: a seed fixes the draw, other seeds differ; the mean over 400 draws is the
    dropout-free output (kept weights are scaled by 1 / (1 - p)); changing the last segment's
    values leaves the other segments' outputs as they were under the same seed."""
    q, k, v = _qkv(sum(LENGTHS), seed=4)
    cu, scale = _cu(LENGTHS), 1 / math.sqrt(D)

    def dropped(seed, values=v):
        torch.manual_seed(seed)
        return sdpa_thd(q, k, values, cu, scale, dropout=0.5)

    plain = sdpa_thd(q, k, v, cu, scale, dropout=0.0)
    assert torch.equal(dropped(0), dropped(0)) and not torch.allclose(dropped(0), dropped(1))
    assert (dropped(0) - plain).abs().max() > 0.1
    mean = torch.stack([dropped(seed) for seed in range(400)]).mean(0)
    assert (mean - plain).abs().max() < 0.25 and (mean - plain).abs().mean() < 0.04
    other = v.clone()
    other[-LENGTHS[-1] :] += 1.0
    kept = slice(0, sum(LENGTHS) - LENGTHS[-1])
    assert torch.equal(dropped(3, other)[kept], dropped(3)[kept])
    assert not torch.allclose(dropped(3, other)[-1], dropped(3)[-1])


def test_document_causal_mask_mod_is_the_segment_mask():
    total = sum(LENGTHS)
    documents = document_ids(_cu(LENGTHS), total)
    assert documents.tolist() == [i for i, n in enumerate(LENGTHS) for _ in range(n)]
    index = torch.arange(total)
    dense = document_causal(documents)(0, 0, index[:, None], index[None])
    assert torch.equal(dense, _segment_mask(LENGTHS))


def test_flex_thd_forward_on_cpu_matches_the_reference(monkeypatch):
    """flex_thd as it runs on CUDA, its compiled kernel swapped for eager flex_attention (CPU
    has a forward only)."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(core_attention, "_compiled_flex", lambda: flex_attention)
    q, k, v = _qkv(sum(LENGTHS), seed=2)
    with pytest.warns(UserWarning):  # eager flex_attention: "use torch.compile"
        ours = flex_thd(q, k, v, _cu(LENGTHS), 1 / math.sqrt(D))
    torch.testing.assert_close(ours, _thd_reference(q, k, v, LENGTHS).float())


@pytest.mark.cuda
def test_flex_thd_compiled_on_cuda_matches_sdpa_thd_forward_and_backward():
    lengths = [300, 17, 500, 207]  # 1024 tokens, uneven samples
    d = FLEX_MIN_HEAD_SIZE  # the compiled kernel's smallest
    qkv = _qkv(sum(lengths), seed=3, head_size=d)
    q, k, v = (x.cuda().detach().requires_grad_(True) for x in qkv)
    cu = _cu(lengths).cuda()
    flex = flex_thd(q, k, v, cu, 1 / math.sqrt(d))
    grads = torch.autograd.grad(flex.square().sum(), (q, k, v))
    sdpa = sdpa_thd(q, k, v, cu, 1 / math.sqrt(d), dropout=0.0)
    expected = torch.autograd.grad(sdpa.square().sum(), (q, k, v))
    torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def _bshd(sq, sk, b=2, seed=4):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, HEADS, D, generator=g)
    k, v = (torch.randn(sk, b, GROUPS, D, generator=g) for _ in range(2))
    return q, k, v


def _bshd_reference(q, k, v, allowed):
    """[sq, b, np, d] float64; allowed [b, 1, sq, sk] or [sq, sk]."""
    q, k, v = (x.permute(1, 2, 0, 3) for x in (q, k, v))
    return _reference(q, k, v, allowed).permute(2, 0, 1, 3).float()


@pytest.mark.parametrize("sq, sk", [(12, 12), (1, 12), (3, 12)])
def test_sdpa_bshd_causal_and_decode(sq, sk):
    """Causal rows (sq == sk), a KV-cache step's queries at the end of the cached keys (sq <
    sk: bottom-right causal) and a decode step without mask (megatron-core's no_mask)."""
    q, k, v = _bshd(sq, sk)
    allowed = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    ours = sdpa_bshd(q, k, v, None, True, 1 / math.sqrt(D), 0.0)
    torch.testing.assert_close(ours, _bshd_reference(q, k, v, allowed))
    unmasked = sdpa_bshd(q, k, v, None, False, 1 / math.sqrt(D), 0.0)
    everything = torch.ones(sq, sk, dtype=torch.bool)
    torch.testing.assert_close(unmasked, _bshd_reference(q, k, v, everything))


def test_sdpa_bshd_honours_a_dense_mask():
    """Evaluation scoring passes its [b, 1, s, s] mask (True = masked): exactly that one."""
    q, k, v = _bshd(10, 10)
    masked = torch.rand(2, 1, 10, 10, generator=torch.Generator().manual_seed(5)) > 0.5
    masked &= ~torch.eye(10, dtype=torch.bool)  # no empty softmax row
    ours = sdpa_bshd(q, k, v, masked, True, 1 / math.sqrt(D), 0.0)
    torch.testing.assert_close(ours, _bshd_reference(q, k, v, ~masked))


def test_thd_attention_memory_at_2048_is_per_sample_not_dense():
    """Forward + backward of a 2048-token stream of 4 samples: our peak stays within two
    fp32 score blocks per sample (sum len_i^2, 18 MiB here) plus a few q-sized tensors; the
    dense [np, s, s] path (megatron-core's unfused math: scores, masked softmax, probabilities
    kept for backward) allocates several s^2 blocks (64 MiB each)."""
    heads, groups, d, lengths = 4, 2, 32, [700, 600, 500, 248]
    total = sum(lengths)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(total, heads, d, generator=g, requires_grad=True)
    k, v = (torch.randn(total, groups, d, generator=g, requires_grad=True) for _ in range(2))
    scale = 1 / math.sqrt(d)

    def thd():
        with core_attention._sdpa_kernels(q.device):  # the kernel the module runs on CPU
            sdpa_thd(q, k, v, _cu(lengths), scale, dropout=0.0).sum().backward()

    masked = ~_segment_mask(lengths)

    def dense():
        keys, values = (x.repeat_interleave(heads // groups, 1).transpose(0, 1) for x in (k, v))
        scores = torch.bmm(q.transpose(0, 1), keys.transpose(1, 2)) * scale  # [np, s, s]
        probs = scores.masked_fill(masked, float("-inf")).softmax(-1)
        torch.bmm(probs, values).sum().backward()

    block = 4 * heads  # fp32 bytes per score entry over the heads
    budget = 2 * block * sum(n * n for n in lengths) + 16 * q.numel() * 4
    ours, theirs = peak_extra_bytes(thd), peak_extra_bytes(dense)
    assert ours <= budget, f"THD peak {ours / 2**20:.1f} MiB > budget {budget / 2**20:.1f} MiB"
    assert theirs >= 2 * block * total * total > budget  # the dense path would fail the budget
