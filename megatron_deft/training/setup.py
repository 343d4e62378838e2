"""Process groups, model (wrapped in megatron-core DDP), optimizer and LR schedule.

Everything here is megatron-core's own machinery: ``parallel_state`` groups, ``GPTModel``,
``DistributedDataParallel`` (grads reduced in fp32 buckets, scaled by 1/global-token-count in
``finalize_model_grads``), ``get_megatron_optimizer`` (plain or distributed AdamW) and
``OptimizerParamScheduler`` (warmup + cosine/linear/WSD/... decay, stepped once per iteration).
"""

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron_deft.compat import megatron_fixes
from megatron_deft.config import Config


def initialize_distributed(config: Config) -> None:
    """torch.distributed (gloo on CPU, nccl on CUDA) + megatron parallel_state + RNG seeds.

    Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); without it
    (no RANK in the environment) the run is a single process with an in-memory store.
    """
    from megatron.core import parallel_state, tensor_parallel

    from megatron_deft.models.layout import virtual_pipeline_size

    par = config.parallel
    on_cpu = config.training.device == "cpu"
    megatron_fixes.apply()
    if on_cpu:
        from megatron_deft.compat import cpu

        cpu.enable()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(minutes=par.distributed_timeout_minutes)
    if not dist.is_initialized():
        backend = "gloo" if on_cpu else "nccl"
        if "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(config),
        expert_model_parallel_size=config.moe.expert_model_parallel_size,
        expert_tensor_parallel_size=config.moe.expert_tensor_parallel_size,  # None: TP
        distributed_timeout_minutes=max(1, int(par.distributed_timeout_minutes)),
    )
    seed = config.training.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed(keep_process_group: bool = False) -> None:
    """Tear down megatron's groups and (unless kept, e.g. for the next run in one process) the
    default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()


def build_model(config: Config, padded_vocab: int) -> list:
    """This rank's model chunks wrapped in megatron-core DDP, hooks registered on the config."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_deft.models.gpt import build_gpt_chunks

    par = config.parallel
    chunks = build_gpt_chunks(config, padded_vocab)
    for chunk in chunks:  # the last stage hands the loss its hidden states, not logits
        chunk.fused_output_loss = not config.training.unfused_output_loss
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=par.use_distributed_optimizer,
        fp8_param_gather=config.fp8.fp8_param_gather,  # all-gather the FP8 weights as FP8
        # Per-token loss: grads are summed over DP, then scaled by 1/global tokens.
        average_in_collective=False,
    )
    model = [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            # Megatron-LM: only the first chunk's buckets overlap with backward.
            disable_bucketing=index > 0,
        )
        for index, chunk in enumerate(chunks)
    ]
    tf_config = chunks[0].config
    no_sync = [chunk.no_sync for chunk in model]
    tf_config.no_sync_func = no_sync[0] if len(model) == 1 else no_sync
    if par.overlap_grad_reduce:
        tf_config.grad_sync_func = [chunk.start_grad_sync for chunk in model]
        if len(model) == 1:
            tf_config.grad_sync_func = tf_config.grad_sync_func[0]
    tf_config.finalize_model_grads_func = finalize_model_grads
    return model


def build_optimizer(config: Config, model: list):
    """megatron-core AdamW (distributed when asked) and its warmup + decay LR schedule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt = config.optimizer
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.min_lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=config.training.bf16,
            params_dtype=torch.bfloat16 if config.training.bf16 else torch.float32,
            use_distributed_optimizer=config.parallel.use_distributed_optimizer,
            overlap_param_gather=config.parallel.overlap_param_gather,
        ),
        model,
    )
    return optimizer, build_scheduler(optimizer, opt, config.training.train_iters)


def build_scheduler(optimizer, opt, train_iters: int):
    """megatron-core's ``OptimizerParamScheduler`` for ``opt`` (an OptimizerConfig): linear warmup
    from 0 over lr_warmup_iters, then lr_decay_style down to min_lr at lr_decay_iters (default
    train_iters). Stepped once per iteration; its state rides in the checkpoint."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay_iters = opt.lr_decay_iters or train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if opt.lr_warmup_iters else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, opt.lr_warmup_iters + 1),
        lr_decay_style=opt.lr_decay_style,
        wsd_decay_steps=opt.lr_wsd_decay_iters,
        lr_wsd_decay_style=opt.lr_wsd_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay_iters,
        wd_incr_style="constant",
    )


def finish_param_sync(model: list, config: Config) -> None:
    """Complete the distributed optimizer's deferred parameter all-gather (with
    --overlap-param-gather updated weights arrive only at the next forward) so every rank holds
    the current full weights, e.g. before a checkpoint is written."""
    if config.parallel.overlap_param_gather:
        for chunk in model:
            chunk.start_param_sync(force_sync=True)
