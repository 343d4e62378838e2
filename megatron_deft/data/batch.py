"""Rows -> the micro-batch dict the trainer consumes, and back (for tests and diagnostics).

Micro-batch (CPU tensors, ``b`` rows of ``s`` tokens; Megatron conventions):

- ``tokens``         int64   [b, s]
- ``labels``         int64   [b, s]  next-token targets, -100 where no loss
- ``loss_mask``      float32 [b, s]  1.0 exactly where ``labels != -100``
- ``position_ids``   int64   [b, s]  restart at 0 for every packed sample
- ``segment_ids``    int64   [b, s]  sample index within its row, -1 on padding
- ``token_class``    int64   [b, s]  the sample's class id (``--token-class-key``), -1 on
  padding and unlabeled samples; only read by the training diagnostics
- ``attention_mask`` bool    [b, 1, s, s]  True = masked out: query ``i`` may attend key ``j``
  iff ``j <= i`` and both are in the same sample, or ``i == j`` (a pad token sees itself only,
  so no softmax row is empty). Omitted with ``with_attention_mask=False`` (THD runs do not
  need the O(s^2) tensor).
- packed only: ``cu_seqlens`` int32 [n+1], cumulative segment lengths over the ``b*s`` flattened
  tokens (each sample, and each row's padding run, is a segment) and ``max_seqlen`` (int), i.e.
  ``PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
  max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)`` (the padded variants are the same
  tensor: no sample is padded inside its segment).

THD: a packed micro-batch without the dense mask (:func:`is_thd`) reaches the model as ONE
stream, its ``b`` rows concatenated (:func:`as_stream`, Megatron-LM's layout): every [b, s]
tensor becomes [1, b*s], which ``cu_seqlens`` already indexes. Labels, loss mask and token
classes move with their tokens, so the per-token losses, their sum and count are unchanged. The
stream length b*s is a multiple of TP under sequence parallelism because s is (checked at
startup), so no extra padding is needed.
"""

from typing import Dict, List, Sequence

import numpy as np
import torch

ROW_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "segment_ids", "token_class")


def collate_rows(
    rows: Sequence[Dict[str, np.ndarray]], packed: bool, with_attention_mask: bool = True
):
    """Stacks row layouts (``packing.build_row``) into one micro-batch dict (module docstring)."""
    batch = {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in ROW_KEYS}
    if with_attention_mask:
        batch["attention_mask"] = attention_mask_from_segments(batch["segment_ids"])
    if packed:
        batch["cu_seqlens"], batch["max_seqlen"] = cu_seqlens_from_segments(batch["segment_ids"])
    return batch


def is_thd(batch: Dict[str, torch.Tensor]) -> bool:
    """A packed micro-batch (``cu_seqlens``) built without the dense mask runs as THD."""
    return "cu_seqlens" in batch and "attention_mask" not in batch


def as_stream(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The THD view of a micro-batch: every [b, s] tensor of ``ROW_KEYS`` as [1, b*s] (rows
    concatenated in order); ``cu_seqlens`` and ``max_seqlen`` unchanged."""
    return {key: value.reshape(1, -1) if key in ROW_KEYS else value for key, value in batch.items()}


def attention_mask_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids -> [b, 1, s, s] bool, True = masked (block-diagonal causal)."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()  # [s(query), s(key)]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [b, s, s]
    in_sample = same & (segment_ids[:, :, None] >= 0)
    allowed = (in_sample & causal) | torch.eye(s, dtype=torch.bool)
    return ~allowed[:, None]  # [b, 1, s, s]


def cu_seqlens_from_segments(segment_ids: torch.Tensor):
    """[b, s] segment ids -> (cu_seqlens int32 [n+1] over the flattened b*s tokens, max_seqlen)."""
    b, s = segment_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]  # a row start always opens a segment
    boundaries = torch.nonzero(starts.reshape(-1)).reshape(-1)
    cu_seqlens = torch.cat([boundaries, torch.tensor([b * s])]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def unpack_batch(batch: Dict[str, torch.Tensor]) -> List[List[Dict[str, torch.Tensor]]]:
    """Splits every row of a micro-batch back into its samples.

    Returns ``samples[row][i]``: a dict with ``tokens``, ``labels``, ``loss_mask``,
    ``position_ids`` and ``token_class`` ([n_i] each) of the ``i``-th sample of ``row``, padding
    removed. Running a model on each sample alone must give the same per-token loss as on the
    packed row.
    """
    out = []
    for row in range(batch["tokens"].shape[0]):
        segments = batch["segment_ids"][row]
        samples = []
        for segment in range(int(segments.max()) + 1):
            where = segments == segment
            samples.append(
                {key: batch[key][row][where] for key in ROW_KEYS if key != "segment_ids"}
            )
        out.append(samples)
    return out
