"""Token-level SFT objectives on vocab-parallel logits, exact under tensor parallelism.

Each tensor-parallel (TP) rank r holds the logit shard z[..., r*V/tp:(r+1)*V/tp]. The full softmax
is never materialised or gathered. With m = max_v z_v (global),

    t  = z_y - m                        (nonzero on the rank that owns target id y only)
    S1 = sum_v exp(z_v - m)             (per-rank partial sums)
    S2 = sum_v exp(z_v - m)^2 = sum_v exp(2 (z_v - m))

and after one SUM all-reduce of the stacked [t, S1, S2]:

    log p      = t - log S1             (p = softmax(z)_y)
    sum_v p_v^2 = S2 / S1^2             (Renyi-2 entropy H2 = -log sum p^2)

Megatron pads the vocabulary to a multiple of (divisible-by x TP); with `vocab_size` the padding
ids (>= vocab_size, at the end of the last shards) are not part of the softmax: they are left out
of m, S1, S2 and the top-k, so their probability and gradient are exactly 0. The distribution is
then the unpadded model's (a Hugging Face export's) and does not depend on how much padding a
TP size adds.

The objective (see registry.py) turns (log p, sum p^2, ...) into a per-token loss and a detached
gate; the gradient is gate * (softmax(z) - onehot(y)), which every rank computes on its own shard
from the saved exp(z - m) and S1: the backward pass needs no communication.

Collectives per forward call on the TP group (none when the group has one rank):
    nll, p, dft, tsallis, deft, cayley: 1 MAX all-reduce [N] + 1 SUM all-reduce [N, 3]
    eaft: 1 all-gather of the local top-k logits [N, k] (its first column gives the global max, so
          no MAX all-reduce is needed) + 1 SUM all-reduce [N, 3]
    cayley with `mean_group`: + 1 SUM all-reduce of [sum p, count] on that group.
"""

import math
from typing import Optional, Union

import torch
import torch.distributed as dist

from megatron_deft.conventions import IGNORE_INDEX
from megatron_deft.objectives.registry import Objective, parse_objective
from megatron_deft.objectives.specs import TokenQuantities, objective_terms
from megatron_deft.objectives.token_stats import STAT_NAMES, stats_of

# Columns of the autograd Function's stats tensor: the token statistics, then the counted mask.
STAT_COLUMNS = (*STAT_NAMES, "valid")


# --------------------------------------------------------------------------------------------------
# Stage functions (pure per-token math; shared by the autograd Function and usable on their own)
# --------------------------------------------------------------------------------------------------


def topk_entropy(top_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax over the top-k logits [N, k], divided by ln k (0 when k = 1). -> [N]."""
    k = top_logits.shape[-1]
    if k == 1:
        return torch.zeros(top_logits.shape[:-1], dtype=top_logits.dtype, device=top_logits.device)
    log_q = torch.log_softmax(top_logits, dim=-1)
    q_log_q = torch.where(log_q == float("-inf"), 0.0, log_q.exp() * log_q)  # 0 log 0 = 0
    return -q_log_q.sum(-1) / math.log(k)


def terms_from_partials(
    objective: Objective,
    partials: torch.Tensor,
    top_logits: Optional[torch.Tensor],
    valid: torch.Tensor,
    mean_group: Optional[dist.ProcessGroup] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [N], gate [N], stats [N, len(STAT_COLUMNS)]), 0 at tokens not counted, from the
    summed partials [N, 3] = [z_y - m, S1, S2] (m the global max) and, for eaft, the global
    top-k logits [N, k]: log p = (z_y - m) - log S1, sum_v p_v^2 = S2 / S1^2. The objective's
    spec (specs.py) turns them into loss and gate; its `valid` column marks the tokens counted
    (the valid ones its threshold keeps)."""
    target_shifted, sum_exp, sum_exp_sq = partials.unbind(-1)
    log_p = target_shifted - sum_exp.log()
    sum_p2 = sum_exp_sq / sum_exp.square()
    top_entropy = topk_entropy(top_logits) if top_logits is not None else None
    quantities = TokenQuantities(log_p, sum_p2, top_entropy, valid, mean_group)
    loss, gate, exponent, counted = objective_terms(
        objective.spec, dict(objective.params), quantities
    )
    zero = torch.zeros_like(log_p)
    values = {
        "gate": gate,
        "p_target": log_p.exp(),
        "nll": -log_p,
        "renyi2_entropy": -sum_p2.log(),
        "exponent": exponent,
        "topk_entropy": top_entropy,
    }
    stats = [values[name] for name in STAT_NAMES]
    stats = [torch.where(counted, s, zero) if s is not None else zero for s in stats]
    return loss, gate, torch.stack([*stats, counted.to(zero.dtype)], -1)


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The loss runs in fp32 (fp64 for fp64 inputs), whatever the logits' dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def real_columns(vocab_local: int, rank: int, vocab_size: int) -> int:
    """How many of rank's V/tp columns are real ids (< vocab_size); the rest are padding."""
    return min(max(vocab_size - rank * vocab_local, 0), vocab_local)


def target_columns(
    target: torch.Tensor, valid: torch.Tensor, rank: int, vocab_local: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(each valid target's column in rank's shard, 0 where not owned; whether rank owns it)."""
    local_target = target - rank * vocab_local
    owns_target = valid & (local_target >= 0) & (local_target < vocab_local)
    return torch.where(owns_target, local_target, torch.zeros_like(local_target)), owns_target


# --------------------------------------------------------------------------------------------------
# Communication helpers (each is exactly one collective when the group has more than one rank)
# --------------------------------------------------------------------------------------------------


def group_size_rank(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    """(size, rank) of the TP group; (1, 0) for None."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def local_max(shard: torch.Tensor, real: int, dtype: torch.dtype) -> torch.Tensor:
    """max over the first `real` columns of [N, V/tp] -> [N] in `dtype`; -inf if real = 0."""
    if real == 0:
        return torch.full(shard.shape[:-1], float("-inf"), dtype=dtype, device=shard.device)
    # amax, not max: max(dim) also computes the argmax indices, which are never used.
    return shard[..., :real].amax(dim=-1).to(dtype)


def all_reduce_max(row_max: torch.Tensor, group) -> torch.Tensor:
    """The global max [N] of every rank's `row_max` [N] (in place): one MAX all-reduce."""
    if group_size_rank(group)[0] > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    return row_max


def local_topk(shard: torch.Tensor, real: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The top-min(k, V/tp) of the first `real` columns of [N, V/tp], descending, in `dtype`,
    filled with -inf where the shard has fewer real columns (equal shapes on every rank)."""
    k_local = min(k, shard.shape[-1])
    local = shard[..., :real].topk(min(k_local, real), dim=-1).values.to(dtype)  # [N, <= k_local]
    if local.shape[-1] < k_local:
        fill = local.new_full((*local.shape[:-1], k_local - local.shape[-1]), float("-inf"))
        local = torch.cat([local, fill], dim=-1)
    return local


def gather_topk(local: torch.Tensor, k: int, vocab_size: int, group) -> torch.Tensor:
    """The global top-min(k, vocab_size) [N, .] of every rank's `local_topk` [N, k_local],
    descending (its first column is the global max): one all-gather of [N, k_local]."""
    world, _ = group_size_rank(group)
    if world > 1:
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local.contiguous(), group=group)
        local = torch.cat(gathered, dim=-1)  # [N, tp * k_local]
    return local.topk(min(k, vocab_size), dim=-1).values


# --------------------------------------------------------------------------------------------------
# The autograd Function
# --------------------------------------------------------------------------------------------------


class _VocabParallelObjective(torch.autograd.Function):
    """Per-token objective on a vocab shard. Inputs are flattened: logits [N, V/tp], target [N].

    Saved for backward: exp(z - m) in the compute dtype ([N, V/tp], the only shard-sized buffer; it
    is the caller's own logits tensor when `inplace` and the dtype is already the compute dtype),
    plus per-token [N] vectors: gate / S1, gate, local target index and an owns-target mask.
    Backward (no collectives): grad = exp(z - m) * (gate * g / S1) - gate * g * onehot(y), written
    into the saved buffer unless `reusable_backward` (then into a new one, so backward may run
    again).
    """

    @staticmethod
    def forward(
        ctx,
        logits,
        target,
        valid,
        objective,
        vocab_size,
        group,
        mean_group,
        inplace,
        reusable_backward,
    ):
        world, rank = group_size_rank(group)
        vocab_local = logits.shape[-1]
        real = real_columns(vocab_local, rank, vocab_size)
        compute_dtype = compute_dtype_of(logits.dtype)
        local_target, owns_target = target_columns(target, valid, rank, vocab_local)

        top_logits = None
        if objective.topk:
            local = local_topk(logits, real, objective.topk, compute_dtype)
            top_logits = gather_topk(local, objective.topk, vocab_size, group)  # [N, k]
            row_max = top_logits[:, 0]
        else:
            row_max = all_reduce_max(local_max(logits, real, compute_dtype), group)  # [N]

        if logits.dtype != compute_dtype:
            # bf16/fp16: the fp32 copy is the only new shard-sized buffer. (A promoting torch.sub
            # would
            # first materialise an fp32 copy of the input on CPU and then a second buffer.)
            work = logits.to(compute_dtype).sub_(row_max.unsqueeze(-1))
        elif inplace:
            # The caller gave us their buffer: z - m in place, no new shard-sized tensor.
            work = logits.sub_(row_max.unsqueeze(-1))
        else:
            # One pass writes z - m into the only new shard-sized buffer.
            work = torch.sub(logits, row_max.unsqueeze(-1))
        target_shifted = work.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
        target_shifted = torch.where(owns_target, target_shifted, torch.zeros_like(target_shifted))
        work.exp_()  # in place: exp(z - m), kept for backward
        if real < vocab_local:
            work[:, real:] = 0  # padding ids: probability 0, so gradient 0
        sum_exp = work.sum(dim=-1)
        # ||e||^2 via a reduction kernel: no e*e temporary of the shard's size.
        sum_exp_sq = torch.linalg.vector_norm(work, dim=-1).square()
        partials = torch.stack([target_shifted, sum_exp, sum_exp_sq], dim=-1)  # [N, 3]
        if world > 1:
            dist.all_reduce(partials, op=dist.ReduceOp.SUM, group=group)
        loss, gate, stats = terms_from_partials(objective, partials, top_logits, valid, mean_group)

        ctx.save_for_backward(work, gate / partials[:, 1], gate, local_target, owns_target)
        ctx.input_dtype = logits.dtype
        ctx.reusable_backward = reusable_backward
        ctx.consumed = False
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        if ctx.consumed:
            raise RuntimeError(
                "vocab_parallel_loss: backward ran twice through the same graph, but the first "
                "backward reused the saved softmax buffer to save memory. Pass "
                "reusable_backward=True to allow retain_graph / repeated backward (costs one extra "
                "logits-sized buffer in backward)."
            )
        exp_shifted, gate_over_sum, gate, local_target, owns_target = ctx.saved_tensors
        grad_loss = grad_loss.to(exp_shifted.dtype)
        scale = (gate_over_sum * grad_loss).unsqueeze(-1)  # [N, 1]
        if ctx.reusable_backward:
            grad = exp_shifted * scale
        else:
            ctx.consumed = True
            grad = exp_shifted.mul_(
                scale
            )  # in place: softmax * gate * g, the buffer is not needed again
        onehot_term = torch.where(owns_target, gate * grad_loss, torch.zeros_like(gate))
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -onehot_term.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def _check_inputs(logits, target, loss_mask, world: int, vocab_size: Optional[int]):
    """Validates the arguments; returns (the real vocabulary size, default all V/tp * tp ids;
    the valid-token mask [...]: not -100 and, with a loss mask, where it is not 0)."""
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.dim() < 1:
        raise TypeError(
            f"vocab_parallel_loss: logits must be a floating tensor [..., V/tp], got {logits!r:.80}"
        )
    return check_target(
        "vocab_parallel_loss",
        target,
        loss_mask,
        tuple(logits.shape[:-1]),
        logits.shape[-1],
        world,
        vocab_size,
        f"logits {tuple(logits.shape)}",
    )


def check_target(
    caller: str,
    target,
    loss_mask,
    batch_shape: tuple,
    vocab_local: int,
    world: int,
    vocab_size: Optional[int],
    shapes: str,
):
    """Validates target / loss_mask against the token shape `batch_shape` and the vocabulary
    (V/tp = vocab_local on each of `world` ranks); returns (vocab size, valid mask). `shapes`
    names the caller's tensors in the messages."""
    padded = vocab_local * world
    if vocab_size is None:
        vocab_size = padded
    if not 1 <= vocab_size <= padded:
        raise ValueError(
            f"{caller}: vocab_size {vocab_size} must be in [1, {padded}] (the padded vocab "
            f"V/tp * tp = {vocab_local} * {world})"
        )
    if not torch.is_tensor(target) or target.dtype not in (torch.int64, torch.int32):
        kind = getattr(target, "dtype", type(target))
        raise TypeError(f"{caller}: target must be an int64/int32 tensor, got {kind}")
    if tuple(target.shape) != batch_shape:
        raise ValueError(
            f"{caller}: target shape {tuple(target.shape)} must equal the token shape "
            f"{batch_shape} ({shapes})"
        )
    if loss_mask is not None and tuple(loss_mask.shape) != batch_shape:
        raise ValueError(
            f"{caller}: loss_mask shape {tuple(loss_mask.shape)} must equal target shape "
            f"{batch_shape}"
        )
    valid = target != IGNORE_INDEX
    if loss_mask is not None:
        valid = valid & (loss_mask != 0)
    # Only valid positions are read, so the ids elsewhere do not matter.
    bad = valid & ((target < 0) | (target >= vocab_size))
    if bad.any():  # one host sync; a wrong id would otherwise silently read another token's logit
        position = tuple(int(i) for i in bad.nonzero()[0])
        padding = f", padded to {padded}" if padded != vocab_size else ""
        raise ValueError(
            f"{caller}: target id {int(target[position])} at index {position} is outside "
            f"[0, {vocab_size}) (vocab size {vocab_size}{padding}; V/tp = {vocab_local}, "
            f"tp = {world}); use {IGNORE_INDEX} for tokens without loss"
        )
    return vocab_size, valid


def vocab_parallel_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    objective: Union[str, Objective] = "deft",
    loss_mask: Optional[torch.Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    *,
    vocab_size: Optional[int] = None,
    mean_group: Optional[dist.ProcessGroup] = None,
    inplace: bool = False,
    reusable_backward: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Per-token SFT objective on vocab-parallel logits. Not reduced: the caller sums / counts.

    Args:
        logits: this rank's vocab shard [..., V/tp] (e.g. [s, b, V/tp]), fp32, bf16, fp16 or fp64.
            Rank r of `group` holds vocab ids [r*V/tp, (r+1)*V/tp). Math runs in fp32 (fp64 for
            fp64).
        target: global token ids [...]; IGNORE_INDEX (-100) marks tokens without loss.
        objective: a name such as "deft", "nll", "tsallis:q=0.5", "eaft:k=20,alpha=1" or an
            Objective (see megatron_deft.objectives.registry).
        loss_mask: optional [...] tensor; tokens where it is 0 get loss 0 and gradient 0. It selects
            tokens, it does not weight them.
        group: the tensor-parallel process group (None: the logits hold the whole vocab).
        vocab_size: the real vocabulary; ids >= vocab_size are Megatron's padding and get
            probability 0 (left out of the softmax, the top-k and the gradient). None: every
            column is a real id.
        mean_group: cayley only: also average its mean target probability over this group (e.g. the
            data-parallel group), one extra all-reduce.
        inplace: reuse the caller's logits as the work buffer when they are already fp32 (fp64 for
            fp64); afterwards they hold exp(z - max) and then the gradient. Saves one [..., V/tp]
            buffer.
        reusable_backward: keep the saved buffer intact in backward so the graph can be
            back-propagated more than once (retain_graph, gradcheck), at the cost of one extra
            buffer in backward.

    Returns:
        loss: [...] fp32 per-token loss, 0 at ignored tokens, differentiable w.r.t. logits.
        stats: dict of detached [...] tensors, 0 at ignored tokens: `gate` (multiplies softmax -
            onehot in the gradient), `p_target`, `nll` (-log p_target, exact even where p
            underflows), `renyi2_entropy` (-log sum p^2), `valid` (bool), plus `exponent`
            (the exponent a) for the q-log objectives and `topk_entropy` (normalised) for eaft.

    Raises:
        ValueError: unknown objective, mismatched shapes, or a target id outside [0, vocab_size)
            other than -100 where the loss mask is not 0.
    """
    objective = parse_objective(objective)
    world, _ = group_size_rank(group)
    vocab_size, valid = _check_inputs(logits, target, loss_mask, world, vocab_size)

    loss, stats = _VocabParallelObjective.apply(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1).long(),
        valid.reshape(-1),
        objective,
        vocab_size,
        group,
        mean_group,
        inplace,
        reusable_backward,
    )
    return loss.reshape(target.shape), stats_dict(stats, objective, valid)


def stats_dict(stats: torch.Tensor, objective: Objective, valid: torch.Tensor) -> dict:
    """The Function's stats columns [N, len(STAT_COLUMNS)] as {name: [...]} in valid's shape:
    the statistics the objective has (token_stats.stats_of) and `valid` (bool), the tokens
    counted in the mean."""
    named = {name: stats[:, i].reshape(valid.shape) for i, name in enumerate(STAT_COLUMNS)}
    kept = {stat.name: named[stat.name] for stat in stats_of(objective)}
    return {**kept, "valid": named["valid"] > 0}
