"""Hugging Face Llama / Qwen2 / Qwen3 / Mistral and Qwen3-MoE / Qwen2-MoE / Mixtral safetensors ->
megatron-core dist checkpoint (torch_dist).

Output (Megatron-LM layout, loadable by the trainer at any TP/PP)::

    OUT/iter_0000000/                         model weights only (no optimizer state; any TP/EP/PP)
    OUT/latest_checkpointed_iteration.txt     "0"
    OUT/megatron_deft_args.json               architecture + the trainer flags that match it
    OUT/tokenizer/                            tokenizer files of the HF dir (only when it
                                              has some): the trainer's --tokenizer-model

The checkpoint's common state marks it ``weights_only`` (``--load`` starts at iteration 0 with a
fresh optimizer), records its ``architecture``, which the trainer checks against its flags, and
the Hugging Face source (config.json, tokenizer files, generation_config.json; see
:mod:`megatron_deft.conversion.source`), which every trainer checkpoint carries on to export.

Memory (measured on 300 MB and 640 MB bf16 Llamas, RSS above the ~360 MB of the imported
libraries): anonymous memory 1.0x the model after filling (weights are filled in place, tensor
by tensor, from memory-mapped safetensors; one HF tensor is materialised at a time), 1.4x at
peak while dist_checkpointing's writer runs. The safetensors files are memory-mapped: pages
read show up as file-backed RSS (page cache, reclaimable), up to the file size. With
``--dtype fp32`` a bf16 source becomes a model of 2x its file size.
"""

import dataclasses
import json
import logging
import os

import torch

from megatron_deft.conversion.hf_config import ConversionError, read_hf_config
from megatron_deft.conversion.hf_moe import MOE_FAMILIES, read_hf_moe
from megatron_deft.conversion.megatron_model import (
    DTYPES,
    atomic_output_dir,
    build_full_model,
    init_single_process,
    publish_dir,
)
from megatron_deft.conversion.safetensors_io import HFTensorReader
from megatron_deft.conversion.source import KEY, TOKENIZER_FILES, source_record, write_files
from megatron_deft.conversion.weights import hf_parts, weight_maps
from megatron_deft.models.architecture import architecture_of, trainer_flags
from megatron_deft.models.layout import padded_vocab_size

logger = logging.getLogger(__name__)


def _check_targets(model, moe, target_tp: int, target_ep: int, path: str) -> None:
    """The target layout divides what it splits: heads and groups by TP, experts by EP."""
    tp, ep = (
        ("--target-tensor-parallel-size", target_tp),
        ("--target-expert-parallel-size", target_ep),
    )
    for flag, target in (tp, ep):
        if target < 1:
            raise ConversionError(f"{flag} {target} must be >= 1")
    splits = [
        ("num_attention_heads", model.num_attention_heads, tp),
        ("num_key_value_heads", model.num_query_groups, tp),
        ("the number of experts", moe.num_experts or 1, ep),
    ]
    for field, value, (flag, target) in splits:
        if value % target:
            raise ConversionError(f"{path}: {field} {value} is not divisible by {flag} {target}")


def _check_tensors(reader: HFTensorReader, model, maps: list) -> None:
    """Every tensor present with the shape config.json implies, and none left over (before the
    slow part, so a bad checkpoint fails in seconds)."""
    shapes = {name: shape for weight in maps for name, shape in zip(weight.hf, weight.shapes)}
    used = set(shapes)
    for name in sorted(used):
        reader.check(name, shapes[name])
    if not model.untie_embeddings_and_output_weights:
        used.add("lm_head.weight")  # tied checkpoints may still carry a copy of the embedding
    extra = reader.unused(used)
    if extra:
        more = " ..." if len(extra) > 5 else ""
        raise ConversionError(
            f"{reader.hf_dir}: tensors this architecture does not have (not "
            f"supported): {', '.join(extra[:5])}{more}"
        )


@torch.no_grad()
def _fill(chunk, reader: HFTensorReader, model, maps: list) -> None:
    """Copy every HF tensor into its place in the model's weights, one tensor at a time."""
    params = dict(chunk.named_parameters())
    missing = set(params) - {weight.megatron for weight in maps}
    if missing:  # the builder and the map drifted apart: a bug, not bad input
        raise RuntimeError(f"no HF source for megatron weights {sorted(missing)}")
    total = sum(p.numel() * p.element_size() for p in params.values())
    done, layer = 0, None
    for weight in maps:
        param = params[weight.megatron]
        for view, name, shape in zip(hf_parts(param, weight, model), weight.hf, weight.shapes):
            view.copy_(reader.read(name, shape).view(view.shape))
        if weight.layout == "vocab":
            param[model.vocab_size :].zero_()
        done += param.numel() * param.element_size()
        this_layer = weight.megatron.split(".")[2] if ".layers." in weight.megatron else None
        if this_layer != layer and layer is not None:
            logger.info(
                f"layer {int(layer) + 1}/{model.num_layers} "
                f"({done / 2**30:.2f} of {total / 2**30:.2f} GiB)"
            )
        layer = this_layer


def _save(chunk, partial: str, common: dict) -> None:
    from megatron.core import dist_checkpointing

    from megatron_deft.training.checkpointing import TRACKER, checkpoint_dir

    directory = checkpoint_dir(partial, 0)
    os.makedirs(directory)
    dist_checkpointing.save({"model": chunk.sharded_state_dict(), **common}, directory)
    with open(os.path.join(partial, TRACKER), "w", encoding="utf-8") as handle:
        handle.write("0\n")


def convert_hf_to_megatron(
    hf_dir: str,
    output_dir: str,
    dtype: str = "bf16",
    make_vocab_size_divisible_by: int = 128,
    target_tensor_parallel_size: int = 1,
    target_expert_parallel_size: int = 1,
) -> list:
    """Convert; returns the trainer flags that match the converted architecture.

    The vocabulary is padded as the trainer pads it at ``target_tensor_parallel_size``
    (--vocab-size rounded up to --make-vocab-size-divisible-by x TP), so that TP loads it as is.
    Experts are stored on a global expert axis (any EP loads them); the target EP is checked to
    divide them.
    """
    if make_vocab_size_divisible_by < 1:
        raise ConversionError(
            f"--make-vocab-size-divisible-by {make_vocab_size_divisible_by} must be >= 1"
        )
    model, hf_arch, hf_config = read_hf_config(hf_dir)
    path = os.path.join(hf_dir, "config.json")
    moe = read_hf_moe(hf_config, hf_arch, model.num_layers, path)
    _check_targets(model, moe, target_tensor_parallel_size, target_expert_parallel_size, path)
    reader = HFTensorReader(hf_dir)
    maps = weight_maps(model, moe, MOE_FAMILIES.get(hf_arch))
    _check_tensors(reader, model, maps)
    padded = padded_vocab_size(
        model.vocab_size, make_vocab_size_divisible_by, target_tensor_parallel_size
    )
    partial = atomic_output_dir(output_dir)
    init_single_process()
    chunk = build_full_model(model, padded, DTYPES[dtype], moe)
    _fill(chunk, reader, model, maps)
    architecture = architecture_of(model, padded, moe)
    flags = trainer_flags(
        architecture,
        model.max_position_embeddings,
        make_vocab_size_divisible_by,
        bf16=dtype == "bf16",
    )
    common = {
        "iteration": 0,
        "layout": {"tp": 1, "pp": 1},
        "weights_only": True,
        "architecture": architecture,
        "config": {"model": dataclasses.asdict(model), "moe": dataclasses.asdict(moe)},
        KEY: source_record(hf_dir, hf_config),
    }
    logger.info("writing the dist checkpoint")
    _save(chunk, partial, common)
    tokenizer = write_files(
        common[KEY]["files"], os.path.join(partial, "tokenizer"), TOKENIZER_FILES
    )
    with open(os.path.join(partial, "megatron_deft_args.json"), "w", encoding="utf-8") as handle:
        json.dump(
            {
                "source": os.path.abspath(hf_dir),
                "architecture": hf_arch,
                "dtype": dtype,
                "padded_for_tensor_parallel_size": target_tensor_parallel_size,
                "target_expert_parallel_size": target_expert_parallel_size,
                "tokenizer_files": tokenizer,
                "trainer_flags": flags,
                **architecture,
            },
            handle,
            indent=1,
        )
    publish_dir(partial, output_dir)
    return flags
