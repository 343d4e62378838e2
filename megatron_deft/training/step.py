"""One training / evaluation step through megatron-core's pipeline schedule.

Loss normalisation (Megatron's ``calculate_per_token_loss`` semantics): for every micro-batch the
last pipeline stage returns ``(sum of per-token losses, number of loss tokens, report)``. The
schedule backpropagates the *sum*, adds up the token counts, and ``finalize_model_grads`` sums the
gradients over data-parallel ranks and scales them by 1 / (global token count). The optimizer thus
sees the gradient of

    L = sum_{tokens t in the global batch} loss_t / #loss tokens in the global batch,

independent of how the global batch is split into micro-batches and DP ranks.

MoE: megatron-core's routers add their load-balancing and z-losses inside the backward
(``MoEAuxLossAutoScaler``), each micro-batch's scaled by the T tokens the rank routes (T / TP
under sequence parallelism), and the same 1 / (global token count) then applies:
L += (T / TP) sum_m (alpha A_m + beta Z_m) / #loss tokens (README, "Mixture of experts").
Their values and the expert load are added to the step metrics (``moe_metrics``).

The logged statistics are sums over valid tokens of the objective's per-token stats, reduced the
same way and divided by the same count; the per-token-class histograms of gate, p_target and a
(``token_classes``) ride in the same report vector, so one all-reduce carries everything.
"""

import math
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.optimizer import clip_grads
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_deft.data.batch import as_stream, is_thd
from megatron_deft.objectives.linear_vocab_parallel import loss_of_output
from megatron_deft.objectives.token_stats import STAT_NAMES
from megatron_deft.training import moe_metrics
from megatron_deft.training.token_classes import bin_token_stats, histogram_shape

# Order of the per-micro-batch report vector: sums over the counted tokens of the loss, their
# count, every token statistic (token_stats.TOKEN_STATS; 0 where the objective has none) and the
# confident-conflict indicator.
REPORT_KEYS = ("loss", "tokens", *STAT_NAMES, "confident_conflict")
_LN2 = math.log(2.0)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


def loss_func(labels, loss_mask, token_class, objective, num_classes, vocab_size, config, output):
    """Per-micro-batch loss on the last stage: (sum loss, #tokens, {"report": sums}).

    The report is float64 [len(REPORT_KEYS) + prod(histogram_shape)]: the token sums of
    REPORT_KEYS, then the flattened token-class histograms (``token_classes``).

    Args:
        labels: [b, s] global token ids, -100 where no loss.
        loss_mask: [b, s] 1.0 where the token carries loss.
        token_class: [b, s] class id per token (-1: unlabeled).
        num_classes: classes of the training data (0: histogram of all tokens only).
        vocab_size: the tokenizer's vocabulary; the padding ids above it are not in the softmax.
        output: the last stage's output (``loss_of_output``): OutputLayerInput, or logits
            [b, s, V/tp]; the logits are never gathered.
    """
    loss, stats = loss_of_output(
        output,
        labels,
        objective,
        loss_mask,
        parallel_state.get_tensor_model_parallel_group(),
        vocab_size,
        sequence_parallel=config.parallel.sequence_parallel,
    )
    valid = stats["valid"]
    # Confident conflict: the model puts < 10% on the target while being peaked (sum p^2 > 0.5,
    # i.e. Renyi-2 entropy < ln 2).
    conflict = valid & (stats["p_target"] < 0.1) & (stats["renyi2_entropy"] < _LN2)
    num_tokens = valid.sum().to(torch.int)
    loss_sum = loss.sum()
    zeros = torch.zeros_like(loss)
    values = [loss, valid, *(stats.get(name, zeros) for name in STAT_NAMES), conflict]
    # Summed in float64, as the histograms: the logged means agree with theirs to rounding.
    report = torch.stack([value.detach().double().sum() for value in values])
    histograms = bin_token_stats(stats, token_class, num_classes, objective)
    return loss_sum, num_tokens, {"report": torch.cat([report, histograms.reshape(-1)])}


def model_inputs(batch: dict) -> dict:
    """GPTModel keyword inputs of a micro-batch: a THD stream ([1, t] ids, ``as_stream``) with
    megatron-core's ``PackedSeqParams``, or rows [b, s] with the dense mask when the batch has
    one (``--attention-backend unfused``), else with none (causal)."""
    inputs = dict(input_ids=batch["tokens"], position_ids=batch["position_ids"])
    if not is_thd(batch):
        return dict(inputs, attention_mask=batch.get("attention_mask"))
    cu_seqlens, longest = batch["cu_seqlens"], batch["max_seqlen"]
    packed = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        cu_seqlens_q_padded=cu_seqlens,
        cu_seqlens_kv_padded=cu_seqlens,
        max_seqlen_q=longest,
        max_seqlen_kv=longest,
    )
    return dict(inputs, attention_mask=None, packed_seq_params=packed)


def forward_step(config, objective, num_classes, vocab_size, data_iterator, model):
    """megatron-core forward_step_func: run one micro-batch through this model chunk."""
    device = next(model.parameters()).device
    batch = _to_device(next(data_iterator), device)
    if is_thd(batch):
        batch = as_stream(batch)  # [1, b*s]: the labels follow their tokens
    # last stage: OutputLayerInput or logits [b, s, V/tp]; other stages: hidden [s, b, h]
    # (THD: b = 1, s = the stream length)
    output = model(**model_inputs(batch))
    return output, partial(
        loss_func,
        batch["labels"],
        batch["loss_mask"],
        batch["token_class"],
        objective,
        num_classes,
        vocab_size,
        config,
    )


def _report_length(objective, num_classes: int) -> int:
    return len(REPORT_KEYS) + math.prod(histogram_shape(objective, num_classes))


def _reduce_reports(outputs: list, length: int, device) -> torch.Tensor:
    """Sum the micro-batch reports over DP on the last stage and share them with every rank."""
    sums = torch.zeros(length, dtype=torch.float64, device=device)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        for output in outputs:
            sums += output["report"].to(device)
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    # Every rank needs the loss (non-finite -> all skip the update together).
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    dist.broadcast(sums, src=last, group=parallel_state.get_pipeline_model_parallel_group())
    return sums


def metrics_from_sums(sums: torch.Tensor, objective, num_classes: int) -> dict:
    """Token means of the reported sums (REPORT_KEYS: the loss, every token statistic and the
    confident-conflict fraction); ``tokens`` is the global loss-token count;
    ``token_class_counts`` the summed histograms [num_classes + 1, Q, NUM_BINS + 2] (CPU)."""
    scalars, histograms = sums[: len(REPORT_KEYS)], sums[len(REPORT_KEYS) :]
    values = dict(zip(REPORT_KEYS, scalars.tolist()))
    count = max(values["tokens"], 1.0)
    metrics = {key: value / count for key, value in values.items() if key != "tokens"}
    metrics["tokens"] = int(values["tokens"])
    metrics["token_class_counts"] = histograms.cpu().view(histogram_shape(objective, num_classes))
    return metrics


def run_microbatches(
    model,
    microbatches: list,
    config,
    objective,
    vocab_size: int,
    forward_only: bool,
    num_classes: int = 0,
) -> dict:
    """Forward (and backward) every micro-batch of this rank's share of one global batch;
    ``vocab_size``: the tokenizer's (unpadded) vocabulary; ``num_classes``: token classes of the
    data (``token_class`` ids of the micro-batches)."""
    forward_backward = get_forward_backward_func()
    # Each model chunk (virtual stage) walks the same micro-batches.
    iterators = [iter(microbatches) for _ in model]
    # The hidden states passed between pipeline stages: [s, b, h], or [b*s, 1, h] for THD.
    rows, length = microbatches[0]["tokens"].shape
    if is_thd(microbatches[0]):
        rows, length = 1, rows * length
    outputs = forward_backward(
        forward_step_func=partial(forward_step, config, objective, num_classes, vocab_size),
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=length,
        micro_batch_size=rows,
        forward_only=forward_only,
    )
    device = next(model[0].parameters()).device
    sums = _reduce_reports(outputs, _report_length(objective, num_classes), device)
    return metrics_from_sums(sums, objective, num_classes)


def _guarded_update(optimizer, loss_is_finite: bool):
    """megatron optimizer step split open so a non-finite loss or grad norm skips the update.

    Returns (updated, grad_norm). The grad norm is all-reduced over model/DP ranks inside
    megatron, so every rank takes the same decision.
    """
    optimizer.prepare_grads()
    grad_norm = optimizer.get_grad_norm()
    if not (loss_is_finite and math.isfinite(grad_norm)):
        return False, grad_norm
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = inner.get_parameters()
        if inner.config.clip_grad > 0.0 and params:
            # Looked up at call time: the CPU compat layer may have wrapped it.
            clip_grads.clip_grad_by_total_norm_fp32(params, inner.config.clip_grad, grad_norm)
    return optimizer.step_with_ready_grads(), grad_norm


def train_step(
    model,
    optimizer,
    scheduler,
    microbatches,
    config,
    objective,
    vocab_size: int,
    num_classes: int = 0,
    expert_load=None,
) -> dict:
    """Zero grads, forward+backward all micro-batches, then a guarded optimizer step.
    ``expert_load`` (an ``moe_metrics.ExpertLoad``, MoE runs only): add the router losses and
    expert load of the iteration to the metrics."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    metrics = run_microbatches(
        model,
        microbatches,
        config,
        objective,
        vocab_size,
        forward_only=False,
        num_classes=num_classes,
    )
    if expert_load is not None:
        device = next(model[0].parameters()).device
        metrics.update(moe_metrics.collect(config, expert_load, len(microbatches), device))
    updated, grad_norm = _guarded_update(optimizer, math.isfinite(metrics["loss"]))
    if updated:
        scheduler.step(increment=1)
    metrics.update(grad_norm=grad_norm, updated=updated)
    return metrics


@torch.no_grad()
def eval_step(model, microbatches, config, objective, vocab_size: int) -> dict:
    """Forward-only pass over one global batch; returns the token-mean metrics."""
    return run_microbatches(model, microbatches, config, objective, vocab_size, forward_only=True)
