"""The output layer and the objective fused: per-token loss from hidden states, logits never held.

``linear_vocab_parallel_loss(hidden, weight, target, ...)`` returns what
``vocab_parallel_loss(hidden @ weight.T, target, ...)`` returns, without a [tokens, V/tp] tensor.
Only the tokens that carry loss (``valid``, N of them) are computed. The logits are formed in
tiles of as many logits as C tokens have (``chunk_tokens``: C up to 512 tokens or 32M logits,
whichever is more), in one buffer every tile reuses: column blocks [N, V'] of the shard when
N <= V/tp, else token chunks [C, V/tp] (``logit_tiles``).

Forward, per tile, on this rank's vocab shard (real columns only, padding ids excluded):

    z   = h_tile @ W_tile^T                    (the input dtype's matmul)
    m_b = max_v z_v,   S1_b = sum_v exp(z_v - m_b),   S2_b = sum_v exp(2 (z_v - m_b)),
    z_y (where the target is in the tile),  (eaft: the tile's top-k of z)

merged into each token's running [m_r, z_y, S1_r, S2_r] over the shard exactly as shards are
merged over TP ranks (the larger max, the sums rescaled to it; top-k of the two top-k's). Then,
for the whole call, the same two collectives as ``vocab_parallel_loss``: the global max m (a MAX
all-reduce of m_r; eaft: the all-gather of the local top-k, whose first column is m) and one SUM
all-reduce of [z_y - m (owner only), S1_r e^(m_r - m), S2_r e^(2 (m_r - m))]. The objective
(``terms_from_partials``, shared with the unfused path) gives loss, gate and stats.

Saved for backward: the inputs (hidden, weight) and per-token vectors [N_valid]: m, gate / S1,
gate, the target's local column and an owns-target mask. Backward recomputes the logits in the
same tiles and turns each into its gradient in place,

    dz = g * gate * (softmax(z) - onehot(y)),   softmax(z) = exp(z - m) / S1 (0 on padding),
    d h += dz @ W_tile,   d W_tile += dz^T @ h  (fp32 sums across tiles),

with no collective: ``d hidden`` is this rank's share; the output layer's own collective sums it
over the TP ranks (the all-reduce of ColumnParallelLinear's input, or its reduce-scatter under
sequence parallelism), applied here by megatron-core's region mappings. Four matmuls instead of
the unfused three (the logits are recomputed once).

The work on each tile's logits is one of ``CHUNK_KERNELS``: PyTorch ops on an fp32 copy (any
device), or, on CUDA when triton is importable, the Triton kernels of ``chunk_triton``, which read
the matmul's output once in its own dtype (bf16: no fp32 copy; d logits in bf16, as megatron-core's
output layer gets them).
"""

import importlib
import importlib.util
from typing import Callable, NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from megatron_deft.objectives.registry import Objective, parse_objective
from megatron_deft.objectives.vocab_parallel import (
    all_reduce_max,
    check_target,
    compute_dtype_of,
    gather_topk,
    group_size_rank,
    local_max,
    local_topk,
    real_columns,
    stats_dict,
    target_columns,
    terms_from_partials,
    vocab_parallel_loss,
)


class OutputLayerInput(NamedTuple):
    """What a model's last stage hands the loss instead of logits: the output layer's input and
    weight (see megatron_deft.models.gpt.SFTGPTModel)."""

    hidden: torch.Tensor
    """Final-norm hidden states [s, b, h] ([s/tp, b, h] under sequence parallelism)."""
    weight: torch.Tensor
    """This rank's output-layer weight [V/tp, h] (the word embedding when tied)."""


CHUNK_ELEMENTS = 1 << 25
"""Default chunk: at most about this many logits (128 MiB in fp32) per chunk, ..."""
MIN_CHUNK_TOKENS = 512
"""... but at least this many tokens: the chunk's matmul [C, h] x [h, V/tp] runs below full speed
with fewer rows (2-core CPU, V/tp = 128256, h = 1024: 130-row chunks took 1.7x the time per token
of 512-row ones)."""


def chunk_tokens(tokens: int, vocab_local: int) -> int:
    """Default tokens per chunk: the fewest chunks of at most max(MIN_CHUNK_TOKENS, CHUNK_ELEMENTS /
    (V/tp)) tokens, made equal (600 tokens at V/tp = 128256: two chunks of 300, not 512 + 88)."""
    cap = max(MIN_CHUNK_TOKENS, CHUNK_ELEMENTS // vocab_local)
    chunks = max(1, -(-tokens // cap))
    return max(1, -(-tokens // chunks))


def logit_tiles(tokens: int, vocab_local: int, elements: int) -> tuple[int, int]:
    """(rows, columns) of the tiles of about `elements` logits that the forward and the backward
    form. With no more tokens than local ids, column blocks over every token: the forward merges
    each block's partials into the running ones (as across TP ranks), the backward writes each
    block's d W rows once and accumulates only d hidden [N, h]; otherwise token chunks over every
    id (d hidden written once, d W [V/tp, h] accumulating). Token chunks alone made the
    [C, V/tp] x [V/tp, h] matmul for d hidden slow (small C, huge V/tp): at N = 4096,
    V/tp = 128256, h = 1024 on CPU the fused call took 52 s with them, 43 s with column blocks in
    the backward (three plain matmuls + cross entropy: 36 s)."""
    if tokens <= vocab_local:
        return max(1, tokens), max(1, elements // max(tokens, 1))
    return max(1, elements // vocab_local), vocab_local


class _ChunkBuffers(NamedTuple):
    """The flat buffers every chunk (tile) of logits reuses: a fresh chunk-sized allocation per
    chunk costs page faults, ~7% of the chunk's matmul on CPU."""

    matmul: torch.Tensor
    """The matmul's output in the input dtype (also the input-dtype copy of d logits)."""
    work: Optional[torch.Tensor]
    """Its copy in the compute dtype (fp32), None when the input dtype is already that."""

    @classmethod
    def allocate(cls, elements, weight, dtype):
        matmul = weight.new_empty(elements)
        work = None if weight.dtype == dtype else weight.new_empty(elements, dtype=dtype)
        return cls(matmul, work)

    @staticmethod
    def _view(buffer, rows, columns):
        return buffer[: rows * columns].view(rows, columns)

    def logits(self, h, weight):
        """h @ W^T [C, V'] (h [C, h], W [V', h]) in these buffers, in the work dtype."""
        shape = (h.shape[0], weight.shape[0])
        logits = torch.mm(h, weight.t(), out=self._view(self.matmul, *shape))
        return logits if self.work is None else self._view(self.work, *shape).copy_(logits)

    def in_input_dtype(self, grad):
        """d logits [C, V'] in the input dtype, for the matmul giving d hidden."""
        if self.work is None:
            return grad
        return self._view(self.matmul, *grad.shape).copy_(grad)


def _block_target(local_target, first, columns):
    """(the target's column in the block [first, first + columns) of the shard, -1 where it is
    not in it; whether it is)."""
    column = local_target - first
    inside = (column >= 0) & (column < columns)
    return torch.where(inside, column, -1), inside


def _chunk_partials(logits, column, owns, real, dtype):
    """A tile's reductions over its first `real` >= 1 columns of `logits` [C, V'] (fp32;
    overwritten): [C, 4] = [m, z_y (0 where not `owns`), S1, S2] (S relative to m)."""
    logits = logits[:, :real]
    row_max = local_max(logits, real, dtype)
    target = torch.where(owns, logits.gather(-1, column.unsqueeze(-1)).squeeze(-1), 0.0)
    exp = logits.sub_(row_max.unsqueeze(-1)).exp_()  # in place: no second chunk-sized buffer
    sum_exp_sq = torch.linalg.vector_norm(exp, dim=-1).square()  # no exp * exp temporary
    return torch.stack([row_max, target, exp.sum(-1), sum_exp_sq], -1)


def _merge_partials(a, b):
    """[n, 4] partials [m, z_y, S1, S2] of two disjoint column ranges -> those of both: the
    larger max, the sums rescaled to it (a range with no real column has m = -inf, S = 0), z_y
    from the range that holds the target (the other's is 0)."""
    row_max = torch.maximum(a[:, 0], b[:, 0])
    shift = torch.where(row_max > float("-inf"), row_max, 0.0)  # no -inf - -inf
    rescale_a, rescale_b = torch.exp(a[:, 0] - shift), torch.exp(b[:, 0] - shift)
    return torch.stack(
        [
            row_max,
            a[:, 1] + b[:, 1],
            a[:, 2] * rescale_a + b[:, 2] * rescale_b,
            a[:, 3] * rescale_a.square() + b[:, 3] * rescale_b.square(),
        ],
        -1,
    )


def _local_partials(kernels, buffers, tiles, h, weight, local_target, owns, real, k, dtype):
    """This rank's [N, 4] = [m_r, z_y (0 where not owned), S1_r, S2_r] over its real columns
    (m_r = -inf, S = 0 without any) and its top-min(k, V/tp) [N, .] (-inf filled; None without
    k), from tiles of logits (``logit_tiles``) in `buffers`: each tile's partials merged into
    its rows' running ones; columns that are all padding are never formed."""
    tile_rows, tile_columns = tiles
    local = torch.zeros((h.shape[0], 4), dtype=dtype, device=h.device)
    local[:, 0] = float("-inf")
    top = None
    if k:
        shape = (h.shape[0], min(k, weight.shape[0]))
        top = torch.full(shape, float("-inf"), dtype=dtype, device=h.device)
    for i in range(0, h.shape[0], tile_rows):
        part = slice(i, i + tile_rows)
        for j in range(0, real, tile_columns):
            block = weight[j : j + tile_columns]
            column, inside = _block_target(local_target[part], j, block.shape[0])
            logits, block_real = buffers.logits(h[part], block), min(real - j, block.shape[0])
            if k:  # before the partials, which may overwrite the logits
                merged = torch.cat([top[part], local_topk(logits, block_real, k, dtype)], -1)
                top[part] = merged.topk(top.shape[1], dim=-1).values
            partials = kernels.partials(
                logits, column.clamp(min=0), owns[part] & inside, block_real, dtype
            )
            local[part] = _merge_partials(local[part], partials)
    return local, top


def _logits_grad(grad, row_max, scale, onehot, column, real):
    """dz [C, V'] of a tile, written over its recomputed logits `grad` (fp32): exp(z - m) * scale,
    minus onehot at the target's `column` (-1: not in this tile), 0 on the padding ids (the
    tile's columns from `real` on)."""
    grad[:, :real].sub_(row_max.unsqueeze(-1)).exp_().mul_(scale.unsqueeze(-1))
    grad[:, real:] = 0
    return grad.scatter_add_(-1, column.clamp(min=0).unsqueeze(-1), -onehot.unsqueeze(-1))


def _chunk_triton():
    """The Triton kernels' module, imported on first use (triton is a GPU-side dependency)."""
    return importlib.import_module("megatron_deft.objectives.chunk_triton")


def _triton_partials(logits, column, owns, real, dtype):
    """``_chunk_partials`` by the Triton kernel, on `logits` in the matmul's dtype (kept); fp32,
    the compute dtype of every input dtype it is chosen for."""
    return _chunk_triton().chunk_partials(logits, column, owns, real)


def _triton_logits_grad(grad, row_max, scale, onehot, column, real):
    """``_logits_grad`` by the Triton kernel, d logits in the matmul's dtype."""
    return _chunk_triton().logits_grad_(grad, row_max, scale, onehot, column, real)


class ChunkKernels(NamedTuple):
    """One implementation of the chunk loop's work on a chunk's logits [C, V']."""

    partials: Callable
    """(logits, column, owns, real >= 1, dtype) -> [C, 4] = [m, z_y, S1, S2] in `dtype`, see
    ``_chunk_partials``; may overwrite the logits."""
    logits_grad: Callable
    """(logits, row_max, scale, onehot, column, real >= 1) -> d logits, over them; see
    ``_logits_grad``."""
    fp32_work: bool
    """Whether the matmul's output is first copied to the compute dtype (fp32 for bf16 / fp16);
    else the kernels read it in its own dtype and d logits comes back in it."""


CHUNK_KERNELS = {
    "torch": ChunkKernels(_chunk_partials, _logits_grad, fp32_work=True),
    "triton": ChunkKernels(_triton_partials, _triton_logits_grad, fp32_work=False),
}
"""The chunk loop's implementations: PyTorch ops (any device), or the Triton kernels of
``chunk_triton`` (CUDA by default; CPU under ``TRITON_INTERPRET=1``)."""


def default_kernel(hidden: torch.Tensor) -> str:
    """'triton' for CUDA tensors in fp32 / bf16 / fp16 when triton is importable, else 'torch'."""
    usable = hidden.is_cuda and hidden.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return "triton" if usable and importlib.util.find_spec("triton") else "torch"


def _add_matmul(out, a, b):
    """out += a @ b, in place (a temporary product when out has another dtype than a and b)."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out.add_(a @ b)


class _LinearVocabParallelObjective(torch.autograd.Function):
    """hidden [N, h] (replicated over TP), weight [V/tp, h], target / valid [N] -> loss [N],
    stats [N, len(STAT_NAMES)]; see the module docstring for what is saved and communicated."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        target,
        valid,
        objective,
        vocab_size,
        group,
        mean_group,
        chunk_size,
        kernel,
    ):
        world, rank = group_size_rank(group)
        real = real_columns(weight.shape[0], rank, vocab_size)
        dtype = compute_dtype_of(hidden.dtype)
        kernels = CHUNK_KERNELS[kernel]
        work_dtype = dtype if kernels.fp32_work else weight.dtype  # of the chunk's logits
        rows = valid.nonzero().squeeze(-1)  # only tokens with loss are computed
        h = hidden.index_select(0, rows)
        local_target, owns = target_columns(target[rows], valid[rows], rank, weight.shape[0])
        k = objective.topk
        chunk = max(1, min(chunk_size or chunk_tokens(len(rows), weight.shape[0]), len(rows)))
        elements = chunk * weight.shape[0]
        tiles = logit_tiles(len(rows), weight.shape[0], elements)
        local, tops = _local_partials(
            kernels,
            _ChunkBuffers.allocate(elements, weight, work_dtype),
            tiles,
            h,
            weight,
            local_target,
            owns,
            real,
            k,
            dtype,
        )
        row_max, target_logit, sum_exp, sum_exp_sq = local.unbind(-1)
        top = None
        if k:
            top = gather_topk(tops, k, vocab_size, group)
            global_max = top[:, 0]
        else:
            global_max = all_reduce_max(row_max.clone(), group)
        rescale = torch.exp(row_max - global_max)  # 0 where this rank has no real column
        partials = torch.stack(
            [
                torch.where(owns, target_logit - global_max, 0.0),
                sum_exp * rescale,
                sum_exp_sq * rescale.square(),
            ],
            -1,
        )
        if world > 1:
            dist.all_reduce(partials, op=dist.ReduceOp.SUM, group=group)
        loss, gate, stats = terms_from_partials(objective, partials, top, valid[rows], mean_group)
        gate_over_sum = gate / partials[:, 1]
        ctx.save_for_backward(
            hidden, weight, rows, global_max, gate_over_sum, gate, local_target, owns
        )
        ctx.real, ctx.tiles, ctx.dtype = real, tiles, dtype
        ctx.kernels, ctx.work_dtype = kernels, work_dtype
        full_loss = loss.new_zeros(target.shape).index_copy_(0, rows, loss)
        full_stats = stats.new_zeros((*target.shape, stats.shape[-1])).index_copy_(0, rows, stats)
        ctx.mark_non_differentiable(full_stats)
        return full_loss, full_stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        hidden, weight, rows, row_max, gate_over_sum, gate, local_target, owns = ctx.saved_tensors
        g = grad_loss.index_select(0, rows).to(ctx.dtype)
        scale, onehot = gate_over_sum * g, torch.where(owns, gate * g, 0.0)
        h = hidden.index_select(0, rows)
        h_work = h.to(ctx.work_dtype)  # d W's other factor, in d logits' dtype
        grad_h = torch.zeros_like(h, dtype=ctx.dtype)
        tile_rows, tile_columns = ctx.tiles
        # d W sums over token chunks in the compute dtype; over column blocks each block of it is
        # one matmul over every token, written straight in the weight's dtype
        w_dtype = ctx.dtype if tile_rows < len(rows) else weight.dtype
        grad_w = torch.zeros_like(weight, dtype=w_dtype) if ctx.needs_input_grad[1] else None
        buffers = _ChunkBuffers.allocate(tile_rows * tile_columns, weight, ctx.work_dtype)
        for i in range(0, len(rows), tile_rows):
            for j in range(0, ctx.real, tile_columns):  # all-padding columns: no gradient
                part, block = slice(i, i + tile_rows), weight[j : j + tile_columns]
                column, inside = _block_target(local_target[part], j, block.shape[0])
                dz = ctx.kernels.logits_grad(
                    buffers.logits(h[part], block),
                    row_max[part],
                    scale[part],
                    torch.where(inside, onehot[part], 0.0),
                    column,
                    min(ctx.real - j, block.shape[0]),
                )
                _add_matmul(grad_h[part], buffers.in_input_dtype(dz), block)
                if grad_w is not None:
                    _add_matmul(grad_w[j : j + tile_columns], dz.t(), h_work[part])
        grad_hidden = torch.zeros_like(hidden).index_copy_(0, rows, grad_h.to(hidden.dtype))
        grad_weight = grad_w.to(weight.dtype) if grad_w is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def _enter_output_layer(hidden, group, sequence_parallel: bool):
    """What megatron-core's ColumnParallelLinear does to its input: under sequence parallelism
    all-gather the sequence (backward: reduce-scatter), else an identity whose backward sums the
    TP ranks' input gradients (all-reduce). Nothing without TP."""
    if group_size_rank(group)[0] == 1:
        return hidden
    from megatron.core.tensor_parallel import mappings

    if sequence_parallel:
        return mappings.gather_from_sequence_parallel_region(hidden, True, group)
    return mappings.copy_to_tensor_model_parallel_region(hidden, group)


def linear_vocab_parallel_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    objective: Union[str, Objective] = "deft",
    loss_mask: Optional[torch.Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    *,
    mean_group: Optional[dist.ProcessGroup] = None,
    sequence_parallel: bool = False,
    chunk_size: Optional[int] = None,
    kernel: Optional[str] = None,
) -> tuple[torch.Tensor, dict]:
    """Per-token SFT objective of the output layer ``hidden @ weight.T``, never materialising
    the logits. Not reduced: the caller sums / counts.

    Args:
        hidden: final-norm output [s, b, h] (all tokens; with ``sequence_parallel`` this rank's
            [s/tp, b, h], gathered here). Any float dtype; the matmul runs in it, the loss in fp32.
        weight: this rank's output-layer shard [V/tp, h] (the embedding when tied); rank r of
            `group` holds vocab ids [r*V/tp, (r+1)*V/tp).
        target: global token ids [s, b]; -100 marks tokens without loss.
        objective, loss_mask, group, vocab_size, mean_group: as for ``vocab_parallel_loss``.
        sequence_parallel: `hidden` is sequence-parallel (all-gathered forward, reduce-scattered
            backward, as megatron-core's output layer does).
        chunk_size: tokens per chunk (default: ``chunk_tokens``).
        kernel: the chunk loop's implementation, a key of ``CHUNK_KERNELS`` ("torch" or
            "triton"; default: ``default_kernel``, Triton for CUDA tensors).

    Returns:
        (loss [s, b] fp32, stats): exactly ``vocab_parallel_loss``'s outputs for the logits
        ``hidden @ weight.T``; gradients flow to `hidden` (summed over the TP ranks by the output
        layer's collective) and `weight`.
    """
    objective = parse_objective(objective)
    if not (torch.is_tensor(hidden) and hidden.is_floating_point() and hidden.dim() >= 2):
        raise TypeError(
            "linear_vocab_parallel_loss: hidden must be a float [s, b, h] tensor, "
            f"got {hidden!r:.80}"
        )
    if not torch.is_tensor(weight) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_vocab_parallel_loss: weight must be [V/tp, h] with h = {hidden.shape[-1]}, "
            f"got {tuple(getattr(weight, 'shape', ()))}"
        )
    hidden = _enter_output_layer(hidden, group, sequence_parallel)
    world, _ = group_size_rank(group)
    shapes = f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
    vocab_size, valid = check_target(
        "linear_vocab_parallel_loss",
        target,
        loss_mask,
        tuple(hidden.shape[:-1]),
        weight.shape[0],
        world,
        vocab_size,
        shapes,
    )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_vocab_parallel_loss: chunk_size must be >= 1, got {chunk_size}")
    kernel = kernel or default_kernel(hidden)
    if kernel not in CHUNK_KERNELS:
        raise ValueError(
            f"linear_vocab_parallel_loss: kernel must be one of {sorted(CHUNK_KERNELS)}, "
            f"got {kernel!r}"
        )
    loss, stats = _LinearVocabParallelObjective.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        target.reshape(-1).long(),
        valid.reshape(-1),
        objective,
        vocab_size,
        group,
        mean_group,
        chunk_size,
        kernel,
    )
    return loss.reshape(target.shape), stats_dict(stats, objective, valid)


def loss_of_output(
    output,
    labels: torch.Tensor,
    objective: Union[str, Objective],
    loss_mask: Optional[torch.Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    sequence_parallel: bool = False,
) -> tuple[torch.Tensor, dict]:
    """(per-token loss, stats) [b, s] of a last stage's output against labels [b, s]: an
    OutputLayerInput goes through the fused output layer + objective (its [s, b] results come
    back as [b, s] views); logits [b, s, V/tp] through ``vocab_parallel_loss`` in place (the
    caller does not use them afterwards: megatron's own cross entropy does the same)."""
    if isinstance(output, OutputLayerInput):
        mask = None if loss_mask is None else loss_mask.t()
        loss, stats = linear_vocab_parallel_loss(
            output.hidden,
            output.weight,
            labels.t(),
            objective,
            mask,
            group,
            vocab_size,
            sequence_parallel=sequence_parallel,
        )
        return loss.t(), {name: value.t() for name, value in stats.items()}
    return vocab_parallel_loss(
        output, labels, objective, loss_mask, group, vocab_size=vocab_size, inplace=True
    )
