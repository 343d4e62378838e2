"""The one full (TP=1 / PP=1) megatron-core model the converter fills or reads, in one process.

It is built by the trainer's own builder (:func:`megatron_deft.models.gpt.build_gpt_chunks`) on
CPU, so parameter names, the fused layouts and ``sharded_state_dict()`` are exactly what the
trainer saves and loads. dist_checkpointing checkpoints are global (ShardedTensors carry their
global shape and offsets), so one written from the full model loads at any TP/PP and a trainer
checkpoint of any TP/PP loads into the full model.

Weights are created uninitialised (``torch.empty``: pages are touched only when written), so the
model costs its size once, when filled.
"""

import dataclasses
import os
import shutil
import socket

import torch
import torch.distributed as dist

from megatron_deft.config import Config, ModelConfig, MoEConfig
from megatron_deft.conversion.errors import ConversionError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def init_single_process() -> None:
    """CPU compat, a 1-process gloo group and TP=1 / PP=1 megatron groups (idempotent)."""
    from megatron.core import parallel_state

    from megatron_deft.compat import cpu

    cpu.enable()
    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def build_full_model(model: ModelConfig, padded_vocab: int, dtype: torch.dtype, moe=None):
    """GPTModel with every layer, uninitialised weights of ``dtype`` on CPU; with ``moe`` (a
    MoEConfig) all E experts of each MoE layer as SequentialMLP's local experts (EP=1, expert
    TP 1: whatever layout a trainer checkpoint was saved in)."""
    from megatron_deft.models.gpt import build_gpt_chunks

    experts = dataclasses.replace(
        moe or MoEConfig(),
        expert_model_parallel_size=1,
        expert_tensor_parallel_size=None,
        moe_grouped_gemm=False,
    )
    config = Config(model=dataclasses.replace(model), moe=experts)  # a copy: seq_length below
    config.training.device = "cpu"
    config.training.bf16 = dtype == torch.bfloat16
    config.model.seq_length = model.resolved().max_position_embeddings
    [chunk] = build_gpt_chunks(config, padded_vocab, initialize=False)
    return chunk


def full_sharded_state_dict(chunk) -> dict:
    """The model's sharded state dict with factories (SwiGLU fc1) expanded into ShardedTensors
    whose data are views of the parameters, so loading writes the parameters in place (no merged
    copy of every fc1 alive at once)."""
    from megatron.core.dist_checkpointing.mapping import apply_factories

    state = chunk.sharded_state_dict()
    apply_factories(state)
    return state


def atomic_output_dir(output_dir: str) -> str:
    """A fresh ``output_dir.partial`` to build into (renamed by :func:`publish_dir`)."""
    if os.path.exists(output_dir) and os.listdir(output_dir):
        raise ConversionError(f"{output_dir}: exists and is not empty; choose a new directory")
    partial = output_dir.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # debris of an interrupted conversion
    os.makedirs(partial)
    return partial


def publish_dir(partial: str, output_dir: str) -> None:
    if os.path.isdir(output_dir):  # empty (checked by atomic_output_dir)
        os.rmdir(output_dir)
    os.rename(partial, output_dir)
