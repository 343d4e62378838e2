"""Token-level SFT objectives on vocab-parallel logits, exact under tensor parallelism.

Each tensor-parallel (TP) rank r holds the logit shard z[..., r*V/tp:(r+1)*V/tp]. The full softmax is
never materialised or gathered. With m = max_v z_v (global),

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

The objective (see registry.py) turns (log p, sum p^2, ...) into a per-token loss and a detached gate;
the gradient is gate * (softmax(z) - onehot(y)), which every rank computes on its own shard from the
saved exp(z - m) and S1: the backward pass needs no communication.

Collectives per forward call on the TP group (none when the group has one rank):
    nll, p, dft, tsallis, deft, cayley: 1 MAX all-reduce [N] + 1 SUM all-reduce [N, 3]
    eaft: 1 all-gather of the local top-k logits [N, k] (its first column gives the global max, so no
          MAX all-reduce is needed) + 1 SUM all-reduce [N, 3]
    cayley with `mean_group`: + 1 SUM all-reduce of [sum p, count] on that group.
"""

import math
from typing import Optional, Union

import torch
import torch.distributed as dist

from megatron_deft.conventions import IGNORE_INDEX
from megatron_deft.objectives.registry import Objective, parse_objective

CAYLEY_EXPONENT_MIN = 1e-3

# Per-token statistics returned by the autograd Function, in column order of its stats tensor.
_STAT_NAMES = ("gate", "p_target", "nll", "renyi2_entropy", "exponent", "topk_entropy")


# ---------------------------------------------------------------------------------------------------
# Stage functions (pure per-token math; shared by the autograd Function and usable on their own)
# ---------------------------------------------------------------------------------------------------


def qlog_loss(log_p: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """(1 - p^a) / a written as -expm1(a log p) / a: exact for small a, and -log p at a = 0."""
    safe = torch.where(exponent == 0, torch.ones_like(exponent), exponent)
    return torch.where(exponent == 0, -log_p, -torch.expm1(exponent * log_p) / safe)


def topk_entropy(top_logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax over the top-k logits [N, k], divided by ln k (0 when k = 1). -> [N]."""
    k = top_logits.shape[-1]
    if k == 1:
        return torch.zeros(top_logits.shape[:-1], dtype=top_logits.dtype, device=top_logits.device)
    log_q = torch.log_softmax(top_logits, dim=-1)
    q_log_q = torch.where(log_q == float("-inf"), 0.0, log_q.exp() * log_q)  # 0 log 0 = 0
    return -q_log_q.sum(-1) / math.log(k)


def cayley_exponent(
    p: torch.Tensor, valid: torch.Tensor, mean_group: Optional[dist.ProcessGroup] = None
) -> torch.Tensor:
    """a = clamp(f + (1 - f) p / (2 - p), 1e-3, 1) with f = 0.5 * mean(p over valid tokens).

    The mean is over the valid tokens of this call's tensors; with `mean_group` it is taken over the
    union of those tokens on every rank of that group (e.g. data parallel). No valid token: f = 0.
    """
    totals = torch.stack(
        [torch.where(valid, p, torch.zeros_like(p)).sum(), valid.sum().to(p.dtype)]
    )
    if mean_group is not None and dist.get_world_size(mean_group) > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=mean_group)
    floor = 0.5 * totals[0] / totals[1].clamp(min=1)
    return (floor + (1 - floor) * p / (2 - p)).clamp(CAYLEY_EXPONENT_MIN, 1.0)


def objective_terms(
    objective: Objective,
    log_p: torch.Tensor,
    sum_p2: torch.Tensor,
    valid: torch.Tensor,
    top_entropy: Optional[torch.Tensor] = None,
    mean_group: Optional[dist.ProcessGroup] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-token (loss, gate, exponent) from log p [N], sum p^2 [N] and the valid mask [N].

    exponent is None for the weighted-NLL family (dft, eaft). Gate and exponent are detached by
    construction (the inputs carry no autograd history inside the Function).
    """
    p = log_p.exp()
    if objective.family == "wnll":
        if objective.name == "dft":
            weight = p
        else:  # eaft
            weight = top_entropy.clamp(min=0).pow(objective.param("alpha"))
        # 0 * -log p is 0 (the limit p log p -> 0 as p -> 0), not 0 * inf = nan
        return torch.where(weight == 0, 0.0, -weight * log_p), weight, None
    exponents = {
        "nll": lambda: torch.zeros_like(p),
        "p": lambda: torch.ones_like(p),
        "tsallis": lambda: torch.full_like(p, objective.param("q")),
        "deft": lambda: sum_p2,
        "cayley": lambda: cayley_exponent(p, valid, mean_group),
    }
    exponent = exponents[objective.name]()
    # p^0 is 1 also where p = 0 (a target logit of -inf): exp(0 * -inf) would be nan
    gate = torch.exp(torch.where(exponent == 0, 0.0, exponent * log_p))
    return qlog_loss(log_p, exponent), gate, exponent


# ---------------------------------------------------------------------------------------------------
# Communication helpers (each is exactly one collective when the group has more than one rank)
# ---------------------------------------------------------------------------------------------------


def _group_size_rank(group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _global_max(shard: torch.Tensor, real: int, group, dtype: torch.dtype) -> torch.Tensor:
    """max over the real vocab of [N, V/tp] (its first `real` columns) -> [N] in `dtype`: one MAX
    all-reduce. A shard of padding only contributes -inf."""
    if real == 0:
        row_max = torch.full(shard.shape[:-1], float("-inf"), dtype=dtype, device=shard.device)
    else:  # amax, not max: max(dim) also computes the argmax indices, which are never used.
        row_max = shard[..., :real].amax(dim=-1).to(dtype)
    if _group_size_rank(group)[0] > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    return row_max


def _global_topk(
    shard: torch.Tensor, real: int, vocab_size: int, k: int, group, dtype: torch.dtype
) -> torch.Tensor:
    """The k largest logits over the real vocab (`vocab_size` ids, this shard's first `real`
    columns), [N, V/tp] -> [N, min(k, vocab_size)] in `dtype`, descending.

    Each rank contributes its local top-min(k, V/tp), -inf where its shard has fewer real
    columns (equal shapes for the gather); one all-gather of [N, k_local] per rank.
    """
    world, _ = _group_size_rank(group)
    k_local = min(k, shard.shape[-1])
    local = shard[..., :real].topk(min(k_local, real), dim=-1).values.to(dtype)  # [N, <= k_local]
    if local.shape[-1] < k_local:
        fill = local.new_full((*local.shape[:-1], k_local - local.shape[-1]), float("-inf"))
        local = torch.cat([local, fill], dim=-1)
    if world > 1:
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local.contiguous(), group=group)
        local = torch.cat(gathered, dim=-1)  # [N, tp * k_local]
    return local.topk(min(k, vocab_size), dim=-1).values


# ---------------------------------------------------------------------------------------------------
# The autograd Function
# ---------------------------------------------------------------------------------------------------


class _VocabParallelObjective(torch.autograd.Function):
    """Per-token objective on a vocab shard. Inputs are flattened: logits [N, V/tp], target [N].

    Saved for backward: exp(z - m) in the compute dtype ([N, V/tp], the only shard-sized buffer; it is
    the caller's own logits tensor when `inplace` and the dtype is already the compute dtype), plus
    per-token [N] vectors: gate / S1, gate, local target index and an owns-target mask.
    Backward (no collectives): grad = exp(z - m) * (gate * g / S1) - gate * g * onehot(y), written into
    the saved buffer unless `reusable_backward` (then into a new one, so backward may run again).
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
        world, rank = _group_size_rank(group)
        vocab_local = logits.shape[-1]
        real = min(max(vocab_size - rank * vocab_local, 0), vocab_local)  # non-padding columns
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32

        # Which rank owns each target, and its column on that rank.
        local_target = target - rank * vocab_local
        owns_target = valid & (local_target >= 0) & (local_target < vocab_local)
        local_target = torch.where(owns_target, local_target, torch.zeros_like(local_target))

        top_logits = None
        if objective.topk:
            top_logits = _global_topk(
                logits, real, vocab_size, objective.topk, group, compute_dtype
            )  # [N, k]
            row_max = top_logits[:, 0]
        else:
            row_max = _global_max(logits, real, group, compute_dtype)  # [N]

        if logits.dtype != compute_dtype:
            # bf16/fp16: the fp32 copy is the only new shard-sized buffer. (A promoting torch.sub would
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
        target_shifted, sum_exp, sum_exp_sq = partials.unbind(-1)

        log_p = target_shifted - sum_exp.log()
        sum_p2 = sum_exp_sq / sum_exp.square()
        top_entropy = topk_entropy(top_logits) if top_logits is not None else None
        loss, gate, exponent = objective_terms(
            objective, log_p, sum_p2, valid, top_entropy, mean_group
        )

        zero = torch.zeros_like(log_p)
        loss, gate = torch.where(valid, loss, zero), torch.where(valid, gate, zero)
        stats = [gate, log_p.exp(), -log_p, -sum_p2.log(), exponent, top_entropy]
        stats = torch.stack(
            [torch.where(valid, s, zero) if s is not None else zero for s in stats], -1
        )

        ctx.save_for_backward(work, gate / sum_exp, gate, local_target, owns_target)
        ctx.input_dtype = logits.dtype
        ctx.reusable_backward = reusable_backward
        ctx.consumed = False
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        if ctx.consumed:
            raise RuntimeError(
                "vocab_parallel_loss: backward ran twice through the same graph, but the first backward "
                "reused the saved softmax buffer to save memory. Pass reusable_backward=True to allow "
                "retain_graph / repeated backward (costs one extra logits-sized buffer in backward)."
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


# ---------------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------------


def _check_inputs(logits, target, loss_mask, world: int, vocab_size: Optional[int]):
    """Validates the arguments; returns (the real vocabulary size, default all V/tp * tp ids;
    the valid-token mask [...]: not -100 and, with a loss mask, where it is not 0)."""
    if not torch.is_tensor(logits) or not logits.is_floating_point() or logits.dim() < 1:
        raise TypeError(
            f"vocab_parallel_loss: logits must be a floating tensor [..., V/tp], got {logits!r:.80}"
        )
    padded = logits.shape[-1] * world
    if vocab_size is None:
        vocab_size = padded
    if not 1 <= vocab_size <= padded:
        raise ValueError(
            f"vocab_parallel_loss: vocab_size {vocab_size} must be in [1, {padded}] (the "
            f"padded vocab V/tp * tp = {logits.shape[-1]} * {world})"
        )
    if not torch.is_tensor(target) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"vocab_parallel_loss: target must be an int64/int32 tensor, got {getattr(target, 'dtype', type(target))}"
        )
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"vocab_parallel_loss: target shape {tuple(target.shape)} must equal logits shape without "
            f"the vocab dim {tuple(logits.shape[:-1])} (logits {tuple(logits.shape)})"
        )
    if loss_mask is not None and tuple(loss_mask.shape) != tuple(target.shape):
        raise ValueError(
            f"vocab_parallel_loss: loss_mask shape {tuple(loss_mask.shape)} must equal target shape "
            f"{tuple(target.shape)}"
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
            f"vocab_parallel_loss: target id {int(target[position])} at index {position} is outside "
            f"[0, {vocab_size}) (vocab size {vocab_size}{padding}; V/tp = {logits.shape[-1]}, "
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
            Rank r of `group` holds vocab ids [r*V/tp, (r+1)*V/tp). Math runs in fp32 (fp64 for fp64).
        target: global token ids [...]; IGNORE_INDEX (-100) marks tokens without loss.
        objective: a name such as "deft", "nll", "tsallis:q=0.5", "eaft:k=20,alpha=1" or an Objective
            (see megatron_deft.objectives.registry).
        loss_mask: optional [...] tensor; tokens where it is 0 get loss 0 and gradient 0. It selects
            tokens, it does not weight them.
        group: the tensor-parallel process group (None: the logits hold the whole vocab).
        vocab_size: the real vocabulary; ids >= vocab_size are Megatron's padding and get
            probability 0 (left out of the softmax, the top-k and the gradient). None: every
            column is a real id.
        mean_group: cayley only: also average its mean target probability over this group (e.g. the
            data-parallel group), one extra all-reduce.
        inplace: reuse the caller's logits as the work buffer when they are already fp32 (fp64 for
            fp64); afterwards they hold exp(z - max) and then the gradient. Saves one [..., V/tp] buffer.
        reusable_backward: keep the saved buffer intact in backward so the graph can be back-propagated
            more than once (retain_graph, gradcheck), at the cost of one extra buffer in backward.

    Returns:
        loss: [...] fp32 per-token loss, 0 at ignored tokens, differentiable w.r.t. logits.
        stats: dict of detached [...] tensors, 0 at ignored tokens: `gate` (multiplies softmax - onehot
            in the gradient), `p_target`, `nll` (-log p_target, exact even where p underflows),
            `renyi2_entropy` (-log sum p^2), `valid` (bool), plus `exponent`
            (the exponent a) for the q-log objectives and `topk_entropy` (normalised) for eaft.

    Raises:
        ValueError: unknown objective, mismatched shapes, or a target id outside [0, vocab_size)
            other than -100 where the loss mask is not 0.
    """
    objective = parse_objective(objective)
    world, _ = _group_size_rank(group)
    vocab_size, valid = _check_inputs(logits, target, loss_mask, world, vocab_size)

    batch_shape = target.shape
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
    stat_dict = {name: stats[:, i].reshape(batch_shape) for i, name in enumerate(_STAT_NAMES)}
    if objective.family != "qlog":
        del stat_dict["exponent"]
    if not objective.topk:
        del stat_dict["topk_entropy"]
    stat_dict["valid"] = valid
    return loss.reshape(batch_shape), stat_dict
