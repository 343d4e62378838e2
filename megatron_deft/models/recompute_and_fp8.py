"""The recomputation and FP8 flags onto megatron-core's TransformerConfig, and their checks.

Both trade something for memory or speed without changing the model: recomputation re-runs
forwards in the backward (same losses and gradients), FP8 runs the transformer layers' GEMMs in
8-bit floats through Transformer Engine (TE). The mapping is Megatron-LM's:

    --recompute-granularity G, --recompute-method M, --recompute-num-layers N -> the same names
    --fp8-format F                  -> fp8 = F
    --fp8-recipe R                  -> fp8_recipe = R
    --fp8-param-gather              -> fp8_param (and the DDP's fp8_param_gather)
    --first-last-layers-bf16, --num-layers-at-start-in-bf16, --num-layers-at-end-in-bf16
                                    -> the same names

What stays out of FP8: megatron-core enters TE's fp8_autocast inside the transformer block only
(around all its layers, or per layer when --first-last-layers-bf16 skips some). The embedding,
the final norm, the output layer (megatron-core's ColumnParallelLinear, not a TE module, or our
fused output layer + loss) and the objective run after it, in bf16 with the loss in fp32.
"""

import importlib.util

import torch

from megatron_deft.config import Config
from megatron_deft.conventions import ConfigError

# Lowest CUDA compute capability of TE's FP8 kernels: Ada/Hopper for FP8 GEMMs, Blackwell for
# the MX formats (TE refuses later, deep in the first forward, otherwise).
FP8_MIN_CAPABILITY = {"mxfp8": (10, 0)}
FP8_MIN_CAPABILITY_DEFAULT = (8, 9)


def recompute_kwargs(config: Config) -> dict:
    """TransformerConfig's recompute fields (empty without --recompute-granularity)."""
    recompute = config.recompute
    if recompute.recompute_granularity is None:
        return {}
    return dict(
        recompute_granularity=recompute.recompute_granularity,
        recompute_method=recompute.recompute_method,
        recompute_num_layers=recompute.recompute_num_layers,
    )


def fp8_kwargs(config: Config) -> dict:
    """TransformerConfig's FP8 fields (empty without --fp8-format)."""
    fp8 = config.fp8
    if fp8.fp8_format is None:
        return {}
    return dict(
        fp8=fp8.fp8_format,
        fp8_recipe=fp8.fp8_recipe,
        fp8_param=fp8.fp8_param_gather,
        first_last_layers_bf16=fp8.first_last_layers_bf16,
        num_layers_at_start_in_bf16=fp8.num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=fp8.num_layers_at_end_in_bf16,
    )


def layers_per_chunk(config: Config) -> int:
    """Transformer layers of one model chunk: a pipeline stage, or a virtual stage."""
    per_stage = config.model.num_layers // config.parallel.pipeline_model_parallel_size
    return config.parallel.num_layers_per_virtual_pipeline_stage or per_stage


def validate(config: Config) -> None:
    """The checks against other sections (each section checked its own fields): one line."""
    recompute, per_chunk = config.recompute, layers_per_chunk(config)
    count = recompute.recompute_num_layers
    if count is not None and count > per_chunk:
        raise ConfigError(
            f"--recompute-num-layers {count} exceeds the {per_chunk} layers of a pipeline stage"
        )
    if config.fp8.fp8_format is not None:
        _validate_fp8(config, per_chunk)


def _validate_fp8(config: Config, per_chunk: int) -> None:
    fp8 = config.fp8
    if config.training.device != "cuda":
        raise ConfigError(
            "--fp8-format needs --device cuda: FP8 GEMMs are Transformer Engine's CUDA kernels"
        )
    if importlib.util.find_spec("transformer_engine") is None:
        raise ConfigError(
            "--fp8-format needs Transformer Engine, which is not importable here "
            "(pip install transformer-engine[pytorch], or the NGC PyTorch container)"
        )
    if fp8.fp8_param_gather and not config.parallel.use_distributed_optimizer:
        raise ConfigError("--fp8-param-gather needs --use-distributed-optimizer")
    if fp8.first_last_layers_bf16:
        for flag, value in (
            ("--num-layers-at-start-in-bf16", fp8.num_layers_at_start_in_bf16),
            ("--num-layers-at-end-in-bf16", fp8.num_layers_at_end_in_bf16),
        ):
            if value > per_chunk:
                raise ConfigError(f"{flag} {value} exceeds the {per_chunk} layers of a stage")
    if torch.cuda.is_available():
        need = FP8_MIN_CAPABILITY.get(fp8.fp8_recipe, FP8_MIN_CAPABILITY_DEFAULT)
        have = torch.cuda.get_device_capability()
        if have < need:
            raise ConfigError(
                f"--fp8-recipe {fp8.fp8_recipe} needs a GPU of compute capability "
                f"{need[0]}.{need[1]} or newer; {torch.cuda.get_device_name()} is "
                f"{have[0]}.{have[1]}"
            )


def check_fp8_layers(tf_config, chunk) -> None:
    """FP8 happens only inside Transformer Engine's modules: a chunk built from the local
    (plain PyTorch) layer spec would train in bf16 while the run asked for FP8."""
    if not tf_config.fp8 or chunk.decoder is None or not len(chunk.decoder.layers):
        return
    te_modules = (
        module
        for module in chunk.decoder.modules()
        if type(module).__module__.startswith("megatron.core.extensions.transformer_engine")
    )
    if next(te_modules, None) is None:
        raise ConfigError(
            "--fp8-format needs the Transformer Engine layer spec, but this run builds the "
            "local spec (packed rows, or an attention backend other than Transformer Engine's)"
        )
