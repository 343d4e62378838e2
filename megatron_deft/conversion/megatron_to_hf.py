"""megatron-core dist checkpoint (converted, or saved by the trainer at any TP/PP) -> Hugging
Face safetensors, config.json, tokenizer files and generation_config.json: those of the model it
was converted from (the record every checkpoint carries), else Llama/Qwen2/Qwen3 by the model's
q/k/v bias and q/k norm (Qwen3-MoE / Qwen2-MoE / Mixtral with experts: the first whose routing,
shared expert and MoE layers express the model's), with no tokenizer unless --tokenizer-dir
gives one.

The checkpoint is loaded, resharded by dist_checkpointing, into one full TP=1 / PP=1 model in
place (experts of any EP into all E local experts); HF tensors are then cut out of its weights
(fused qkv and [gate; up] split, vocabulary padding dropped) and written in shards of
``max_shard_bytes``. The output directory is built as ``OUT.partial`` and renamed when complete.

Memory (measured, 300 MB bf16 model): anonymous RSS peaks at 1.4x the model while
dist_checkpointing loads it, then the model plus at most one output shard (``max_shard_bytes``,
default 5 GB) while writing.
"""

import json
import logging
import os

from megatron_deft.config import ModelConfig, MoEConfig
from megatron_deft.conversion.hf_config import ConversionError, hf_architecture, hf_config_dict
from megatron_deft.conversion.hf_moe import MOE_FAMILIES, hf_moe_fields
from megatron_deft.conversion.megatron_model import (
    DTYPES,
    atomic_output_dir,
    build_full_model,
    full_sharded_state_dict,
    init_single_process,
    publish_dir,
)
from megatron_deft.conversion.safetensors_io import ShardWriter
from megatron_deft.conversion.source import RECORDED_FILES, read_files, record_of, write_files
from megatron_deft.conversion.weights import hf_parts, weight_maps
from megatron_deft.models.layout import padded_vocab_size
from megatron_deft.utils.known_warnings import checkpoint_load_deprecations_ignored

logger = logging.getLogger(__name__)
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_HF_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32"}


def _checkpoint_directory(megatron_dir: str, iteration):
    from megatron_deft.conventions import TRACKER
    from megatron_deft.training.checkpointing import (
        CheckpointError,
        existing_checkpoint_dir,
        read_tracker,
    )

    if iteration is None:
        iteration = read_tracker(megatron_dir)
        if iteration is None:
            raise ConversionError(f"{megatron_dir}: no {TRACKER}; pass --iteration")
    try:
        return existing_checkpoint_dir(megatron_dir, iteration)
    except CheckpointError as error:
        raise ConversionError(str(error)) from None


def _model_of(common: dict, directory: str, vocab_size):
    """(ModelConfig with resolved defaults, MoEConfig, padded vocabulary) the checkpoint was
    saved with (checkpoints written before MoE existed are dense)."""
    saved = common.get("config", {}).get("model")
    if saved is None:
        raise ConversionError(f"{directory}: not a megatron-deft checkpoint (no config recorded)")
    model = ModelConfig(**saved).resolved()
    moe = MoEConfig(**(common["config"].get("moe") or {}))
    model.vocab_size = vocab_size or model.vocab_size
    if model.vocab_size is None:
        raise ConversionError(
            f"{directory}: the checkpoint does not record the unpadded "
            "vocabulary size (the run took it from its tokenizer); pass "
            "--vocab-size"
        )
    architecture = common.get("architecture")
    if architecture is not None:
        padded = architecture["padded_vocab_size"]
    else:  # checkpoints written before the architecture record: the trainer's padding rule
        padded = padded_vocab_size(
            model.vocab_size, model.make_vocab_size_divisible_by, common["layout"]["tp"]
        )
    if model.vocab_size > padded:
        raise ConversionError(
            f"--vocab-size {model.vocab_size} exceeds the checkpoint's {padded} embedding rows"
        )
    return model, moe, padded


def _load_full_model(directory: str, model: ModelConfig, moe: MoEConfig, padded: int, dtype):
    from megatron.core import dist_checkpointing

    chunk = build_full_model(model, padded, dtype, moe)
    state = full_sharded_state_dict(chunk)
    logger.info(f"loading {directory}")
    with checkpoint_load_deprecations_ignored():
        dist_checkpointing.load({"model": state}, directory)  # writes the weights in place
    return chunk


def _write_weights(chunk, maps: list, model: ModelConfig, out_dir: str, max_shard_bytes, dtype):
    """All HF tensors in ``dtype`` (the Megatron checkpoint's may be of another, or of several:
    HF checkpoints have one); returns the files written."""
    params = dict(chunk.named_parameters())
    writer = ShardWriter(out_dir, max_shard_bytes)
    for weight in maps:
        views = hf_parts(params[weight.megatron].detach(), weight, model)
        for view, name, shape in zip(views, weight.hf, weight.shapes):
            # a copy: a view would keep the whole fused weight alive in the shard buffer
            writer.add(name, view.reshape(shape).to(dtype, copy=True))
    return writer.close()


def _tokenizer_dir_files(tokenizer_dir) -> dict:
    """{name: bytes} of the tokenizer files (and generation_config.json) in --tokenizer-dir."""
    if tokenizer_dir is None:
        return {}
    if not os.path.isdir(tokenizer_dir):
        raise ConversionError(f"--tokenizer-dir {tokenizer_dir}: no such directory")
    files = read_files(tokenizer_dir)
    if not files:
        raise ConversionError(
            f"--tokenizer-dir {tokenizer_dir}: none of {', '.join(RECORDED_FILES)} there"
        )
    return files


def convert_megatron_to_hf(
    megatron_dir: str,
    output_dir: str,
    iteration: int = None,
    tokenizer_dir: str = None,
    vocab_size: int = None,
    max_shard_bytes: int = 5 * 10**9,
) -> str:
    """Export; returns the HF architecture name written to config.json.

    The checkpoint's record of its Hugging Face source (:mod:`megatron_deft.conversion.source`)
    gives the class, the config.json fields we do not own, the tokenizer files and
    generation_config.json; files in ``tokenizer_dir`` replace the recorded ones."""
    from megatron.core import dist_checkpointing

    directory = _checkpoint_directory(megatron_dir, iteration)
    replacements = _tokenizer_dir_files(tokenizer_dir)
    init_single_process()
    common = dist_checkpointing.load_common_state_dict(directory)
    model, moe, padded = _model_of(common, directory, vocab_size)
    metadata = dist_checkpointing.load_tensors_metadata(directory)
    dtype = metadata["embedding.word_embeddings.weight"].dtype
    if dtype not in _DTYPE_NAMES:
        raise ConversionError(f"{directory}: weights of dtype {dtype} are not supported")
    record = record_of(common, megatron_dir) or {}
    arch = hf_architecture(model, record.get("config"), moe)
    partial = atomic_output_dir(output_dir)
    chunk = _load_full_model(directory, model, moe, padded, dtype)
    maps = weight_maps(model, moe, MOE_FAMILIES.get(arch))
    files = _write_weights(chunk, maps, model, partial, max_shard_bytes, dtype)
    logger.info(f"wrote {len(files)} safetensors file(s)")
    config = hf_config_dict(
        model, arch, _HF_DTYPE_NAMES[_DTYPE_NAMES[dtype]], base=record.get("config")
    )
    config.update(hf_moe_fields(arch, model, moe, record.get("config") or {}))
    with open(os.path.join(partial, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    write_files({**record.get("files", {}), **replacements}, partial, RECORDED_FILES)
    publish_dir(partial, output_dir)
    return arch
