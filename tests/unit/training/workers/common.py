"""Helpers shared by the torchrun worker scripts of the trainer tests.

A worker runs many cases in one process group (megatron-core import costs ~5 s per process):
each case builds a full Trainer for one layout, trains, records per-iteration metrics and the
full (unsharded) weights, then tears megatron's groups down but keeps the process group.
"""

import json
import os
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_deft.training.arguments import parse_config  # noqa: E402

TINY_MODEL = [
    "--device",
    "cpu",
    "--mock-data",
    "--vocab-size",
    "500",
    "--num-layers",
    "4",
    "--hidden-size",
    "64",
    "--ffn-hidden-size",
    "128",
    "--num-attention-heads",
    "4",
    "--num-query-groups",
    "2",
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "8",
    "--lr",
    "3e-3",
    "--lr-warmup-iters",
    "1",
    "--clip-grad",
    "0.5",
    "--weight-decay",
    "0.1",
    "--log-interval",
    "1000",
    "--distributed-timeout-minutes",
    "2",
]


def logits_of(module, *inputs, **keywords) -> torch.Tensor:
    """[b, s, V/tp] logits of one of a trainer's model chunks (``module``: unwrapped from DDP):
    its last stage otherwise hands the fused output-layer loss its hidden states."""
    fused, module.fused_output_loss = module.fused_output_loss, False
    try:
        return module(*inputs, **keywords)
    finally:
        module.fused_output_loss = fused


def config_for(tp=1, pp=1, extra=()):
    """Validated tiny config for a TP x PP layout on the current world (DP = world / TP / PP)."""
    argv = TINY_MODEL + [
        "--tensor-model-parallel-size",
        str(tp),
        "--pipeline-model-parallel-size",
        str(pp),
        *map(str, extra),
    ]
    return parse_config(argv, world_size=int(os.environ["WORLD_SIZE"]))


def full_weights(model, grads: bool = False) -> dict:
    """{layout-independent name: full tensor} of this pipeline stage (TP shards gathered); with
    ``grads`` the gradients of the last backward (megatron DDP's ``main_grad``) instead."""
    from megatron.core import parallel_state

    from megatron_deft.models.init import _global_names

    group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    out = {}
    for chunk in model:
        names = _global_names(chunk.module)
        for name, param in chunk.module.named_parameters():
            tensor = (param.main_grad if grads else param).detach().clone()
            if getattr(param, "tensor_model_parallel", False) and tp > 1:
                shards = [torch.empty_like(tensor) for _ in range(tp)]
                dist.all_gather(shards, tensor.contiguous(), group=group)
                stride, dim = getattr(param, "partition_stride", 1), param.partition_dim
                pieces = [shard.chunk(stride, dim=dim) for shard in shards]
                # rank r holds chunks r, r + tp, ... of the full tensor
                ordered = [pieces[r][s] for s in range(stride) for r in range(tp)]
                tensor = torch.cat(ordered, dim=dim)
            out[names[name]] = tensor
    return out


def save_weights(model, out_dir: str, tag: str, grads: bool = False) -> None:
    """Write this stage's full weights (or ``grads``) once per stage (TP rank 0, DP rank 0)."""
    from megatron.core import parallel_state

    weights = full_weights(model, grads)
    first_replica = parallel_state.get_data_parallel_rank() == 0
    if parallel_state.get_tensor_model_parallel_rank() == 0 and first_replica:
        stage = parallel_state.get_pipeline_model_parallel_rank()
        torch.save(weights, os.path.join(out_dir, f"{tag}.stage{stage}.pt"))


def history_summary(history: list) -> list:
    keys = (
        "loss",
        "nll",
        "grad_norm",
        "tokens",
        "updated",
        "gate",
        "exponent",
        "p_target",
        "renyi2_entropy",
        "confident_conflict",
    )
    return [
        {**{k: h[k] for k in keys}, "token_class_counts": h["token_class_counts"].tolist()}
        for h in history
    ]


def train_recording(trainer, summarize=history_summary) -> list:
    """Trains ``trainer`` for its --train-iters through ``Trainer.train_step`` (the step its loop
    runs) and returns every iteration's metrics at full precision (history_summary's keys): the
    layout tests compare the step's numbers, which TensorBoard's float32 would round. No
    validation, checkpointing or logging. ``summarize`` turns the metrics into the result."""
    history = [trainer.train_step() for _ in range(trainer.config.training.train_iters)]
    return summarize(history)


def write_results(out_dir: str, results: dict) -> None:
    if dist.get_rank() == dist.get_world_size() - 1:
        with open(os.path.join(out_dir, "results.json"), "w") as handle:
            json.dump(results, handle, indent=1)
