"""Held-out scoring of response tokens: NLL and the objective's per-token statistics.

For a batch of tokenized conversations (ids + loss flags from the data pipeline's chat format)
the model predicts token t+1 from tokens <= t; a target carries a score where its loss flag is
set (the response and its closing EOS, exactly the tokens training puts loss on). The objective
machinery (the fused output layer + objective, or the objective on logits) gives, per target,
p_target, the Renyi-2 entropy H2 = -log sum_v p_v^2, the gate and (q-log objectives) the
exponent a. All sums are over targets; :func:`summarize` turns them into token means.
"""

from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_deft.data.packing import IGNORE_INDEX, next_token_targets
from megatron_deft.evaluation.generation import causal_inputs
from megatron_deft.evaluation.pipeline import last_stage_result
from megatron_deft.objectives.linear_vocab_parallel import loss_of_output
from megatron_deft.objectives.token_stats import STAT_NAMES, stats_of

# Token sums of one split: "tokens" counts the scored targets, then every token statistic
# (token_stats.TOKEN_STATS; 0 where the objective has none) and sum_v p_v^2.
SUM_KEYS = ("tokens", *STAT_NAMES, "sum_p2")
# Bins of p_target for the gate-vs-p_target curve: [i/10, (i+1)/10), the last one closed.
P_BINS = 10


def empty_sums(device) -> torch.Tensor:
    """float64 [len(SUM_KEYS) + 2 * P_BINS]: token sums, then per-bin counts and gate sums."""
    return torch.zeros(len(SUM_KEYS) + 2 * P_BINS, dtype=torch.float64, device=device)


@torch.no_grad()
def score_batch(
    model,
    samples: Sequence[Tuple[List[int], List[bool]]],
    pad_id: int,
    objective,
    vocab_size: int,
    group=None,
) -> torch.Tensor:
    """Sums (see :func:`empty_sums`) over the response targets of ``samples``, on every
    pipeline stage (computed on the last).

    Args:
        model: this pipeline stage's GPT chunk.
        samples: (ids, loss_flags) per conversation, right-padded here into [b, s].
        vocab_size: the tokenizer's vocabulary (the padding ids above it are not in the softmax).
    """
    device = next(model.parameters()).device
    width = max(len(ids) for ids, _ in samples)
    tokens = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, flags) in enumerate(samples):
        tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(ids) - 1] = torch.from_numpy(next_token_targets(ids, flags))
    tokens, labels = tokens.to(device), labels.to(device)
    return last_stage_result(
        model,
        causal_inputs(tokens),
        lambda output: token_sums(output, labels, objective, vocab_size, group),
        empty_sums(device),
    )


def token_sums(output, labels, objective, vocab_size: int, group) -> torch.Tensor:
    """:func:`empty_sums` of the last stage's output (the fused output layer's input, or
    [b, s, V/tp] logits) against [b, s] labels (IGNORE_INDEX: none)."""
    device = labels.device
    _, stats = loss_of_output(output, labels, objective, None, group, vocab_size)
    valid = stats["valid"]
    p = stats["p_target"]
    zeros = torch.zeros_like(p)
    per_token = {name: stats.get(name, zeros) for name in STAT_NAMES}
    per_token.update(tokens=valid.double(), sum_p2=torch.exp(-stats["renyi2_entropy"]) * valid)
    sums = empty_sums(device)
    for index, key in enumerate(SUM_KEYS):
        sums[index] = per_token[key].double().sum()
    bins = (p[valid].double() * P_BINS).long().clamp(max=P_BINS - 1)
    base = len(SUM_KEYS)
    sums[base : base + P_BINS] += torch.bincount(bins, minlength=P_BINS).double()
    sums[base + P_BINS :] += torch.bincount(
        bins, weights=stats["gate"][valid].double(), minlength=P_BINS
    )
    return sums


def summarize(sums: torch.Tensor, objective) -> Dict[str, object]:
    """Token means of the sums (of the statistics ``objective`` has), plus
    ``gate_by_p_target``: [[p_lo, p_hi, tokens, mean gate]]."""
    values = sums.tolist()
    count = max(values[0], 1.0)
    out = {"tokens": int(values[0])}
    absent = set(STAT_NAMES) - {stat.name for stat in stats_of(objective)}
    for index, key in enumerate(SUM_KEYS[1:], start=1):
        if key not in absent:
            out[key] = values[index] / count
    base = len(SUM_KEYS)
    out["gate_by_p_target"] = [
        [
            i / P_BINS,
            (i + 1) / P_BINS,
            int(values[base + i]),
            values[base + P_BINS + i] / values[base + i] if values[base + i] else None,
        ]
        for i in range(P_BINS)
    ]
    return out


def all_reduce_sums(sums: torch.Tensor, group) -> torch.Tensor:
    """Sum over data-parallel ranks (each scored different samples)."""
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(sums, group=group)
    return sums
