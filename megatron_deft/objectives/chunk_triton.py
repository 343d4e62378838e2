"""Triton kernels for the fused output-layer loss's chunk loop (``linear_vocab_parallel``).

The PyTorch chunk loop copies each chunk of logits [C, V'] to fp32 and makes several passes over
it (max, exp in place, sum, sum of squares; backward: exp, scale, scatter, then a cast back for
the matmul): about 26 bytes of memory traffic per logit in bf16, more than the chunk's matmul
costs on a GPU. These kernels read the matmul's output once, in its own dtype, and compute in
fp32 registers:

- ``chunk_partials``: per row of the chunk, over its `real` columns (padding ids excluded),

      m = max_v z_v,   S1 = sum_v e^(z_v - m),   S2 = sum_v e^(2 (z_v - m)),
      z_y (0 where the target is not among these columns),

  as an online reduction: each lane keeps (m, s1, s2) and folds a logit z in with one
  exponential, x = e^(-|z - m|): z > m gives (z, s1 x + 1, s2 x^2 + 1), else (m, s1 + x,
  s2 + x^2); the lanes are merged at the end. One program per row. Output [C, 4] fp32.
- ``logits_grad_``: d logits, written over the logits in their dtype (the next matmuls' input),

      dz_v = e^(z_v - m) * scale - onehot [v = column],  0 on the padding columns (v >= real),

  one program per (row, block of columns).

Used on CUDA tensors when triton is importable (``linear_vocab_parallel_loss(kernel=...)``
chooses); tests run them on CPU tensors with ``TRITON_INTERPRET=1``.
"""

import torch
import triton
import triton.language as tl

PARTIALS_BLOCK = 1024
"""Columns each lane group of ``chunk_partials`` folds per step (one program per row)."""
GRAD_BLOCK = 2048
"""Columns per program of ``logits_grad_``."""


@triton.jit
def _partials_kernel(
    logits,
    row_stride,
    column,
    owns,
    out,
    real,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one row of the tile; its first real >= 1 columns
    base = logits + row * row_stride
    lanes = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s1 = tl.zeros((BLOCK,), tl.float32)
    s2 = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, real, BLOCK):
        inside = start + lanes < real
        z = tl.load(base + start + lanes, mask=inside, other=float("-inf")).to(tl.float32)
        d = tl.where(inside, z - m, float("-inf"))  # a lane's first logit: d = +inf, x = 0
        x = tl.exp(-tl.abs(d))
        up = d > 0
        s1 = tl.where(up, s1 * x + 1.0, s1 + x)
        s2 = tl.where(up, s2 * x * x + 1.0, s2 + x * x)
        m = tl.maximum(m, z)
    row_max = tl.max(m, axis=0)
    rescale = tl.exp(m - row_max)  # 0 on lanes that saw no logit (m = -inf)
    sum_exp = tl.sum(s1 * rescale, axis=0)
    sum_exp_sq = tl.sum(s2 * rescale * rescale, axis=0)
    target = tl.load(base + tl.load(column + row)).to(tl.float32)
    tl.store(out + row * 4, row_max)
    tl.store(out + row * 4 + 1, tl.where(tl.load(owns + row) != 0, target, 0.0))
    tl.store(out + row * 4 + 2, sum_exp)
    tl.store(out + row * 4 + 3, sum_exp_sq)


@triton.jit
def _grad_kernel(
    logits, row_stride, row_max, scale, onehot, column, columns, real, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < columns
    pointers = logits + row * row_stride + cols
    z = tl.load(pointers, mask=inside, other=0.0).to(tl.float32)
    grad = tl.exp(z - tl.load(row_max + row)) * tl.load(scale + row)
    grad = tl.where(cols < real, grad, 0.0)
    grad = tl.where(cols == tl.load(column + row), grad - tl.load(onehot + row), grad)
    tl.store(pointers, grad.to(logits.dtype.element_ty), mask=inside)


def chunk_partials(logits, column, owns, real):
    """[C, 4] fp32 = [m, z_y, S1, S2] of `logits` [C, V'] (row-contiguous, any float dtype) over
    its first `real` >= 1 columns; `column` [C] the target's column (read where `owns` [C])."""
    assert logits.stride(-1) == 1, "chunk_partials: rows must be contiguous"
    out = torch.empty((logits.shape[0], 4), dtype=torch.float32, device=logits.device)
    if logits.shape[0]:
        column, owns = column.contiguous(), owns.contiguous()
        _partials_kernel[(logits.shape[0],)](
            logits, logits.stride(0), column, owns, out, real, BLOCK=PARTIALS_BLOCK
        )
    return out


def logits_grad_(logits, row_max, scale, onehot, column, real):
    """Writes d logits over `logits` [C, V'] (see the module docstring) and returns it.
    row_max, scale, onehot [C] fp32; column [C] int, the target's column in this block (-1 when
    not in it); real: the block's columns from which on are padding ids."""
    assert logits.stride(-1) == 1, "logits_grad_: rows must be contiguous"
    rows, columns = logits.shape
    if rows and columns:
        row_max, scale, onehot, column = (v.contiguous() for v in (row_max, scale, onehot, column))
        grid = (rows, triton.cdiv(columns, GRAD_BLOCK))
        _grad_kernel[grid](
            logits,
            logits.stride(0),
            row_max,
            scale,
            onehot,
            column,
            columns,
            real,
            BLOCK=GRAD_BLOCK,
        )
    return logits
