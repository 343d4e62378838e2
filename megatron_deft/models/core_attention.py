"""Core attention of the local layer spec without a dense mask: ``scaled_dot_product_attention``
(``sdpa``) or FlexAttention (``flex``), consuming megatron-core's ``PackedSeqParams``.

megatron-core's ``SelfAttention`` hands its ``core_attention`` (after RoPE, per TP rank):

- THD (``packed_seq_params.qkv_format == "thd"``): query [t, np, d], key/value [t, ng, d] of one
  stream of ``t`` tokens cut into segments ``[cu[i], cu[i+1])`` (``cu = cu_seqlens_q``; the
  loader's padded variants equal it: no padding inside a segment). Token ``q`` attends ``k`` iff
  both are in the same segment and ``k <= q``: softmax(q k^T / sqrt(d)) v per segment. Returns
  [t, np * d].
- BSHD: query [sq, b, np, d], key/value [sk, b, ng, d]. With ``attention_mask`` ([b, 1, sq, sk]
  bool, True = masked; evaluation scoring passes one) exactly that mask; else causal (sq == sk),
  or no mask when megatron-core says so (a KV-cache decode step, its queries after every cached
  key). Returns [sq, b, np * d].

Grouped-query attention (ng < np) shares each key/value head among np / ng query heads
(``enable_gqa``). ``sdpa`` runs the segments one by one, so memory grows with sum_i len_i^2
(the scores of each sample, kept for backward), never with t^2. ``flex`` runs the whole stream in
one compiled kernel with a block-sparse document-causal mask (CUDA; memory linear in t).
"""

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention import SDPBackend, sdpa_kernel


def document_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int [t]: the segment index of every stream position (``cu_seqlens`` int [n+1], 0..t)."""
    positions = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:], positions, right=True)


def document_causal(documents: torch.Tensor):
    """FlexAttention mask_mod: query ``q`` may attend key ``k`` iff same segment and k <= q."""

    def mask_mod(batch, head, q, k):
        return (documents[q] == documents[k]) & (k <= q)

    return mask_mod


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process (eager flex materialises the full scores)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


_last_block_mask = [None, None]  # [cu_seqlens, its BlockMask]: every layer sees the same tensor


def document_block_mask(cu_seqlens: torch.Tensor, total: int):
    """FlexAttention's block-sparse form of :func:`document_causal` for a stream of ``total``
    tokens; built once per micro-batch (the layers share one ``cu_seqlens`` tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if _last_block_mask[0] is not cu_seqlens:
        mask_mod = document_causal(document_ids(cu_seqlens, total))
        mask = create_block_mask(mask_mod, None, None, total, total, cu_seqlens.device)
        _last_block_mask[:] = cu_seqlens, mask  # holding the tensor keeps its identity unique
    return _last_block_mask[1]


def flex_thd(query, key, value, cu_seqlens, scale: float) -> torch.Tensor:
    """[t, np, d] x [t, ng, d] -> [t, np, d]: the stream through FlexAttention (CUDA)."""
    mask = document_block_mask(cu_seqlens, query.shape[0])
    q, k, v = (x.transpose(0, 1)[None] for x in (query, key, value))  # [1, heads, t, d]
    out = _compiled_flex()(
        q, k, v, block_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )
    return out[0].transpose(0, 1)


def sdpa_thd(query, key, value, cu_seqlens, scale: float, dropout: float) -> torch.Tensor:
    """[t, np, d] x [t, ng, d] -> [t, np, d]: causal SDPA on each segment on its own."""
    bounds = cu_seqlens.tolist()
    gqa = key.shape[1] != query.shape[1]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[lo:hi].transpose(0, 1) for x in (query, key, value))  # [heads, n, d]
        parts.append(
            F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa
            ).transpose(0, 1)
        )
    return torch.cat(parts)


def sdpa_bshd(query, key, value, attention_mask, causal: bool, scale, dropout) -> torch.Tensor:
    """[sq, b, np, d] x [sk, b, ng, d] -> [sq, b, np, d]; ``attention_mask`` True = masked."""
    q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
    sq, sk = q.shape[2], k.shape[2]
    allowed = None if attention_mask is None else ~attention_mask
    if allowed is None and causal and sq != sk:  # the last sq positions of sk (bottom right)
        allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=allowed,
        dropout_p=dropout,
        is_causal=allowed is None and causal,
        scale=scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.permute(2, 0, 1, 3)


def _sdpa_kernels(device: torch.device):
    """CPU: SDPA's math kernel. Its result for a head does not depend on how many heads the
    call holds (CPU's flash kernel blocks them differently by their number, so TP layouts
    would differ in rounding); its memory is still per sample (sum_i len_i^2). CUDA: SDPA's
    own choice (flash / memory-efficient)."""
    if device.type == "cpu":
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


class PackedCoreAttention(MegatronModule):
    """Drop-in ``core_attention`` for megatron-core's local spec (module docstring);
    ``kernel``: "sdpa" or "flex" (for THD streams; BSHD rows always take SDPA)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout=None,
        softmax_scale=None,
        cp_comm_type=None,
        pg_collection=None,
        kernel: str = "sdpa",
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1 or config.softmax_type != "vanilla":
            raise ValueError("PackedCoreAttention: no context parallelism or softmax variants")
        self.attn_mask_type, self.kernel = attn_mask_type, kernel
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if attention_bias is not None:
            raise ValueError("PackedCoreAttention takes no attention bias")
        dropout = self.dropout if self.training else 0.0
        with self._dropout_rng(dropout), _sdpa_kernels(query.device):
            if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
                out = self._thd(query, key, value, packed_seq_params.cu_seqlens_q, dropout)
            else:
                mask_type = attn_mask_type or self.attn_mask_type
                causal = mask_type != AttnMaskType.no_mask
                out = sdpa_bshd(
                    query, key, value, attention_mask, causal, self.softmax_scale, dropout
                )
        return out.reshape(*out.shape[:-2], -1)

    def _thd(self, query, key, value, cu_seqlens, dropout):
        if self.kernel == "flex":
            return flex_thd(query, key, value, cu_seqlens, self.softmax_scale)
        return sdpa_thd(query, key, value, cu_seqlens, self.softmax_scale, dropout)

    def _dropout_rng(self, dropout: float):
        """megatron-core's rule: without sequence parallelism attention dropout draws from the
        tensor-parallel RNG tracker (each TP rank's heads differ)."""
        if dropout == 0 or self.config.sequence_parallel:
            return contextlib.nullcontext()
        return tensor_parallel.get_cuda_rng_tracker().fork()
