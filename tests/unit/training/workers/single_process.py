"""torchrun worker (1 rank): global per-token normalisation, packed rows, non-finite handling,
logging and TensorBoard.

Writes OUT_DIR/results.json; the pytest side asserts on it.
"""

import logging
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from common import config_for, full_weights, logits_of, write_results

from megatron_deft.data.batch import as_stream, is_thd
from megatron_deft.models import attention_backend
from megatron_deft.training import checkpointing, step
from megatron_deft.training.trainer import Trainer, TrainingStopped


def _main_grads(model) -> dict:
    return {name: p.main_grad.detach().clone() for name, p in model[0].module.named_parameters()}


def per_token_normalisation(result: dict) -> None:
    """Megatron schedule over 4 uneven micro-batches vs one autograd pass over the whole batch
    with loss = sum(token CE) / global token count (F.cross_entropy on the real vocab's logits)."""
    trainer = Trainer(
        config_for(
            1, 1, ["--micro-batch-size", 1, "--global-batch-size", 4, "--sft-objective", "nll"]
        )
    )
    model = trainer.model
    microbatches = trainer.train_loader.next_global_batch().microbatches
    counts = [int(mb["loss_mask"].sum()) for mb in microbatches]

    for chunk in model:
        chunk.zero_grad_buffer()
    metrics = step.run_microbatches(
        model,
        microbatches,
        trainer.config,
        trainer.objective,
        trainer.vocab_size,
        forward_only=False,
    )
    schedule_grads = _main_grads(model)

    for chunk in model:
        chunk.zero_grad_buffer()
    whole = {
        key: torch.cat([mb[key] for mb in microbatches])
        for key in ("tokens", "position_ids", "labels")
    }
    logits = logits_of(model[0].module, whole["tokens"], whole["position_ids"], None)  # causal
    # The padding ids of the output layer (vocab 500 padded to 512) are outside the softmax.
    assert logits.shape[-1] > trainer.vocab_size == 500
    logits = logits[..., : trainer.vocab_size]
    token_losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).double(),
        whole["labels"].reshape(-1),
        ignore_index=-100,
        reduction="none",
    )
    loss = token_losses.sum() / sum(counts)
    loss.backward()
    reference_grads = _main_grads(model)

    per_micro = token_losses.reshape(len(counts), -1).sum(-1)
    result.update(
        counts=counts,
        schedule_loss=metrics["loss"],
        schedule_nll=metrics["nll"],
        schedule_tokens=metrics["tokens"],
        reference_loss=loss.item(),
        mean_of_microbatch_means=sum((s / c).item() for s, c in zip(per_micro, counts) if c)
        / sum(1 for c in counts if c),
        max_grad_relative_error=max(
            (
                (schedule_grads[k] - reference_grads[k]).abs().max()
                / reference_grads[k].abs().max().clamp_min(1e-30)
            ).item()
            for k in reference_grads
        ),
        grad_norm=sum(g.double().pow(2).sum() for g in reference_grads.values()).sqrt().item(),
    )
    trainer.close(keep_process_group=True)


class _NaNInjector:
    """Forward hook on the final norm: makes the training loss NaN in the iterations ``nan_at``,
    and records the weights and LR-schedule steps that the iterations ``watch`` start from."""

    def __init__(self, trainer, nan_at, watch):
        self.trainer, self.nan_at, self.watch = trainer, set(nan_at), set(watch)
        self.start_of = {}

    def __call__(self, module, inputs, output):
        if not module.training:  # validation
            return output
        iteration = self.trainer.iteration + 1  # the one running
        if iteration in self.watch and iteration not in self.start_of:
            model, scheduler = self.trainer.model, self.trainer.scheduler
            self.start_of[iteration] = (full_weights(model), scheduler.num_steps)
        return output * float("nan") if iteration in self.nan_at else output


def non_finite_handling(result: dict, out_dir: str) -> None:
    """Iteration 2 non-finite, 3 recovers, 4 and 5 non-finite: stops at 5 (--max-skipped-iters
    2). What happened is read from the console lines and the weights each iteration starts from."""
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("megatron_deft").addHandler(handler)
    logging.getLogger("megatron_deft").setLevel(logging.INFO)
    tensorboard = os.path.join(out_dir, "tensorboard")
    ckpt = os.path.join(out_dir, "nan-ckpt")
    trainer = Trainer(
        config_for(
            1,
            1,
            [
                "--train-iters",
                10,
                "--max-skipped-iters",
                2,
                "--log-interval",
                1,
                "--tensorboard-dir",
                tensorboard,
                "--sft-objective",
                "deft",
                "--save",
                ckpt,
                "--eval-interval",
                3,
                "--eval-iters",
                1,
            ],
        )
    )
    injector = _NaNInjector(trainer, nan_at=(2, 4, 5), watch=(2, 3))
    trainer.model[0].module.decoder.final_layernorm.register_forward_hook(injector)
    try:
        trainer.train()
        result["stop_message"] = None
    except TrainingStopped as error:
        result["stop_message"] = str(error)
    result["stopped_at_iteration"] = trainer.iteration

    def skipped(iteration):
        return any(line.startswith(f"iteration {iteration}: non-finite") for line in records)

    (before, steps_before), (after_skip, steps_after) = injector.start_of[2], injector.start_of[3]
    result["skipped_updated_flag"] = not skipped(2)
    result["weights_changed_by_skipped_iteration"] = any(
        not torch.equal(before[k], after_skip[k]) for k in before
    )
    result["scheduler_advanced_on_skip"] = steps_after != steps_before
    result["recovered_updated_flag"] = not skipped(3)
    [line] = [line for line in records if line.startswith("iteration      3/10 | loss ")]
    result["recovered_loss"] = float(line.split(" | ")[1].split()[1])

    with torch.no_grad():
        next(trainer.model[0].module.parameters()).view(-1)[0] = float("nan")
    try:
        trainer.save()
        result["nan_save"] = "saved"
    except checkpointing.CheckpointError as error:
        result["nan_save"] = str(error)
    result["nan_save_left_tracker"] = checkpointing.read_tracker(ckpt)
    trainer.close(keep_process_group=True)
    logging.getLogger("megatron_deft").removeHandler(handler)
    result["log_lines"] = records
    result["tensorboard_dir"] = tensorboard


def _token_losses(model, labels, **inputs) -> torch.Tensor:
    """Per-token cross entropy [n] of the targets ``labels`` ([b, s], -100: none) for the
    model's logits [b, s, V] on ``inputs`` (GPTModel keywords)."""
    logits = logits_of(model, **inputs)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    )
    return losses[labels.reshape(-1) != -100]


PACKED = ["--pack-sequences", "--micro-batch-size", 2, "--global-batch-size", 4]
PACKED += ["--seq-length", 64]


def packing_matches_separate_samples(result: dict) -> None:
    """A packed micro-batch of 2 rows, run as one THD stream (the trainer's model_inputs:
    PackedSeqParams, positions restarting per sample), gives every token the loss the model
    gives it when its sample runs alone (causal, no mask); one segment over the whole stream
    (samples seeing each other) would not."""
    from megatron_deft.data import unpack_batch

    trainer = Trainer(config_for(1, 1, PACKED + ["--attention-backend", "sdpa"]))
    model = trainer.model[0].module
    batch = next(
        mb
        for mb in trainer.train_loader.next_global_batch().microbatches
        if mb["segment_ids"].max() >= 2
    )
    stream = as_stream(batch)
    with torch.no_grad():
        packed = _token_losses(model, stream["labels"], **step.model_inputs(stream))
        whole = torch.tensor([0, stream["tokens"].numel()], dtype=torch.int32)
        one_segment = step.model_inputs(dict(stream, cu_seqlens=whole, max_seqlen=int(whole[1])))
        leaky = _token_losses(model, stream["labels"], **one_segment)
        alone = []
        for row in unpack_batch(batch):
            for sample in row:
                n = len(sample["tokens"])
                inputs = dict(input_ids=sample["tokens"][None], position_ids=torch.arange(n)[None])
                alone.append(
                    _token_losses(model, sample["labels"][None], **inputs, attention_mask=None)
                )
        alone = torch.cat(alone)
    result.update(
        thd=is_thd(batch) and "attention_mask" not in batch,
        segments=int(batch["cu_seqlens"].numel() - 1),
        loss_tokens=int(packed.numel()),
        max_abs_difference=(packed - alone).abs().max().item(),
        one_segment_difference=(leaky - alone).abs().max().item(),
    )
    trainer.close(keep_process_group=True)


def _forward_and_grads(trainer):
    """(logits [b*s, V] of the first micro-batch, that micro-batch, step metrics, main grads)
    of one forward + backward of the trainer's first global batch through the schedule."""
    model, batch = trainer.model, trainer.train_loader.next_global_batch()
    first = batch.microbatches[0]
    on_device = step._to_device(first, next(model[0].parameters()).device)
    with torch.no_grad():
        inputs = step.model_inputs(as_stream(on_device) if is_thd(on_device) else on_device)
        logits = logits_of(model[0].module, **inputs).float()
    for chunk in model:
        chunk.zero_grad_buffer()
    metrics = step.run_microbatches(
        model, batch.microbatches, trainer.config, trainer.objective, trainer.vocab_size, False
    )
    grads = {_local_spec_name(k): g for k, g in _main_grads(model).items()}
    return logits.reshape(-1, logits.shape[-1]).cpu(), first, metrics, grads


# The TE layer spec fuses each norm into the next linear layer: its weight's name in the local
# spec (the unfused run), by suffix. Both start at 1; the matrices share names (and init).
_TE_NORMS = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


def _local_spec_name(name: str) -> str:
    for te, local in _TE_NORMS.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def thd_matches_dense_mask(result: dict, backend: str = "sdpa", extra=()) -> None:
    """The same packed global batch through THD (``backend``) and through megatron-core's
    unfused attention on the dense [b, 1, s, s] mask (same seed: same weights): logits on every
    sample token, the loss and every gradient (``extra``: flags of both runs)."""
    runs, lines = {}, []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("megatron_deft").addHandler(handler)
    logging.getLogger("megatron_deft").setLevel(logging.INFO)
    for name in (backend, "unfused"):
        trainer = Trainer(config_for(1, 1, PACKED + ["--attention-backend", name, *extra]))
        runs[name] = (attention_backend.backend_of(trainer.config), *_forward_and_grads(trainer))
        trainer.close(keep_process_group=True)
    logging.getLogger("megatron_deft").removeHandler(handler)
    result["attention_log"] = [line for line in lines if line.startswith("attention:")]
    (ran, thd_logits, thd_batch, thd_metrics, thd_grads) = runs[backend]
    (_, dense_logits, dense_batch, dense_metrics, dense_grads) = runs["unfused"]
    real = thd_batch["segment_ids"].reshape(-1) >= 0  # padding runs attend differently
    shared = sorted(set(thd_grads) & set(dense_grads))
    pairs = [(thd_grads[k].double().flatten(), dense_grads[k].double().flatten()) for k in shared]
    result.update(
        backend=ran,
        thd_batch=is_thd(thd_batch),
        dense_batch="attention_mask" in dense_batch,
        same_rows=torch.equal(thd_batch["tokens"], dense_batch["tokens"]),
        same_parameters=sorted(thd_grads) == sorted(dense_grads),
        max_logit_difference=(thd_logits[real] - dense_logits[real]).abs().max().item(),
        logit_scale=dense_logits[real].abs().max().item(),
        loss=(thd_metrics["loss"], dense_metrics["loss"]),
        max_grad_relative_error=max(
            ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in pairs
        ),
        min_grad_cosine=min(F.cosine_similarity(a, b, 0).item() for a, b in pairs),
        grads_nonzero=min(b.abs().max().item() for _, b in pairs) > 0,
    )


def main(out_dir):
    results = {"normalisation": {}, "non_finite": {}, "packing": {}, "thd_vs_dense": {}}
    per_token_normalisation(results["normalisation"])
    packing_matches_separate_samples(results["packing"])
    thd_matches_dense_mask(results["thd_vs_dense"])
    non_finite_handling(results["non_finite"], out_dir)
    write_results(out_dir, results)


if __name__ == "__main__":
    main(sys.argv[1])
    dist.destroy_process_group()
