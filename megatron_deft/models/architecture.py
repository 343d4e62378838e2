"""The architecture a checkpoint's weights imply, and the trainer flags that reproduce it.

A checkpoint records ``architecture_of(config.model, padded_vocab)``; loading it into a run whose
flags give another architecture would fail deep inside dist_checkpointing (or, for RoPE theta and
the norm epsilon, load silently and compute something else). :func:`architecture_mismatch`
turns that into one line naming the flags, and :func:`adopt_architecture` (with
:func:`adopt_moe_architecture` for the experts) lets a run started from a checkpoint take its
architecture instead of repeating it in flags. No megatron import
(used by the CLI validation and the checkpoint converter).
"""

import dataclasses

from megatron_deft.config import ModelConfig, MoEConfig, layer_freq_text, moe_layer_pattern

# architecture field -> the trainer flag that sets it (bool fields are store_true flags)
ARCHITECTURE_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups",
    "kv_channels": "--kv-channels",
    "qk_layernorm": "--qk-layernorm",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "add_qkv_bias": "--add-qkv-bias",
    "rotary_base": "--rotary-base",
    "use_rope_scaling": "--use-rope-scaling",
    "rope_scaling_factor": "--rope-scaling-factor",
    "norm_epsilon": "--norm-epsilon",
}
# the MoE fields that change the weights or what they compute (recorded for MoE models only;
# a dense model records num_experts None, as do checkpoints written before MoE existed)
MOE_ARCHITECTURE_FLAGS = {
    "num_experts": "--num-experts",
    "moe_router_topk": "--moe-router-topk",
    "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
    "moe_shared_expert_intermediate_size": "--moe-shared-expert-intermediate-size",
    "moe_shared_expert_gate": "--moe-shared-expert-gate",
    "moe_layer_freq": "--moe-layer-freq",
    "moe_router_score_function": "--moe-router-score-function",
    "moe_router_pre_softmax": "--moe-router-pre-softmax",
    "moe_router_topk_scaling_factor": "--moe-router-topk-scaling-factor",
    "moe_router_enable_expert_bias": "--moe-router-enable-expert-bias",
}
UNRECORDED = {"use_rope_scaling": False, "rope_scaling_factor": 8.0, "qk_layernorm": False}
"""Values of the fields checkpoints written before they existed lack (what those runs used;
their head size was hidden / heads)."""


def _with_unrecorded(arch: dict) -> dict:
    return {**UNRECORDED, "kv_channels": arch["hidden_size"] // arch["num_attention_heads"], **arch}


def _matters(arch: dict, name: str) -> bool:
    """The scaling factor is part of the architecture only with scaling on."""
    return name != "rope_scaling_factor" or arch.get("use_rope_scaling", False)


def _default_head_size(arch: dict) -> bool:
    return arch["kv_channels"] * arch["num_attention_heads"] == arch["hidden_size"]


def _moe_architecture(model: ModelConfig, moe: MoEConfig) -> dict:
    """The MoE fields with the defaults resolved (expert ffn, the per-layer 0/1 pattern)."""
    if moe.num_experts is None:
        return {"num_experts": None}
    arch = {name: getattr(moe, name) for name in MOE_ARCHITECTURE_FLAGS}
    arch["moe_ffn_hidden_size"] = (
        moe.moe_ffn_hidden_size or model.ffn_hidden_size or 4 * model.hidden_size
    )
    arch["moe_layer_freq"] = moe_layer_pattern(moe.moe_layer_freq, model.num_layers)
    return arch


def architecture_of(model: ModelConfig, padded_vocab_size: int, moe: MoEConfig = None) -> dict:
    """{field: value} with the defaults resolved (ffn 4h, groups = heads); ``vocab_size`` is
    the unpadded size when known (None when the run took it from the tokenizer). With ``moe``
    the MoE fields too (``num_experts`` None for a dense model)."""
    resolved = model.resolved()
    arch = {name: getattr(resolved, name) for name in ARCHITECTURE_FLAGS}
    if moe is not None:
        arch.update(_moe_architecture(model, moe))
    arch["padded_vocab_size"] = padded_vocab_size
    arch["vocab_size"] = model.vocab_size
    return arch


def _moe_mismatch(saved: dict, run: dict) -> list:
    """The differing MoE flags; only --num-experts when one side is dense (absent: dense)."""
    names = [n for n in MOE_ARCHITECTURE_FLAGS if saved.get(n) != run.get(n)]
    if "num_experts" in names:
        names = ["num_experts"]
    return [
        f"{MOE_ARCHITECTURE_FLAGS[n]}: the checkpoint has {saved.get(n)}, this run has {run.get(n)}"
        for n in names
    ]


def architecture_mismatch(saved: dict, run: dict, tensor_parallel_size: int) -> str:
    """One line naming every differing flag ('' when the architectures agree). The unpadded
    vocabulary and its padding are compared where both sides know them (None: unknown)."""
    saved = _with_unrecorded(saved)
    found = [
        f"{flag}: the checkpoint has {saved[name]}, this run has {run[name]}"
        for name, flag in ARCHITECTURE_FLAGS.items()
        if (_matters(saved, name) or _matters(run, name)) and saved[name] != run[name]
    ]
    found += _moe_mismatch(saved, run)
    vocab, ours = saved.get("vocab_size"), run.get("vocab_size")
    if None not in (vocab, ours) and vocab != ours:  # the softmax spans the unpadded ids
        found.append(f"--vocab-size: the checkpoint has {vocab}, this run has {ours}")
    padded, ours = saved["padded_vocab_size"], run["padded_vocab_size"]
    if None not in (padded, ours) and padded != ours:
        # divisible_by x TP == padded rounds any vocabulary <= padded up to exactly padded
        fix = (
            f"--make-vocab-size-divisible-by {padded // tensor_parallel_size}"
            if padded % tensor_parallel_size == 0
            else "a TP that divides it"
        )
        found.append(
            f"padded vocabulary: the checkpoint has {padded} rows, this run pads to {ours} "
            "(--vocab-size rounded up to a multiple of --make-vocab-size-divisible-by x "
            f"TP); use {fix}"
        )
    return "; ".join(found)


def adopt_architecture(
    model: ModelConfig, common: dict, given: set, tensor_parallel_size: int
) -> ModelConfig:
    """``model`` with every architecture field the user did not give (``given``: field names)
    taken from a checkpoint's common state: its recorded architecture, unpadded vocabulary and
    (converted checkpoints) maximum positions. The vocabulary padding follows the recorded
    padded size: --make-vocab-size-divisible-by defaults to padded / TP, which rounds any
    vocabulary <= padded up to exactly padded. Fields the user gave are kept (compare them with
    :func:`architecture_mismatch`). Checkpoints without a recorded architecture change nothing.
    """
    saved = common.get("architecture")
    if saved is None:
        return model
    saved = _with_unrecorded(saved)
    recorded = {name: saved[name] for name in ARCHITECTURE_FLAGS}
    recorded["vocab_size"] = saved.get("vocab_size")
    recorded["max_position_embeddings"] = (
        common.get("config", {}).get("model", {}).get("max_position_embeddings")
    )
    padded = saved["padded_vocab_size"]
    if padded % tensor_parallel_size == 0:
        recorded["make_vocab_size_divisible_by"] = padded // tensor_parallel_size
    fields = {
        name: value for name, value in recorded.items() if name not in given and value is not None
    }
    return dataclasses.replace(model, **fields)


def adopt_moe_architecture(moe: MoEConfig, common: dict, given: set) -> MoEConfig:
    """``moe`` with every recorded MoE architecture field the user did not give (``given``:
    MoEConfig field names) taken from a checkpoint's common state; a dense checkpoint (or one
    written before MoE existed) changes nothing, so --num-experts given against it is
    reported by :func:`architecture_mismatch`."""
    saved = common.get("architecture") or {}
    if saved.get("num_experts") is None:
        return moe
    fields = {
        name: saved[name]
        for name in MOE_ARCHITECTURE_FLAGS
        if name not in given and saved.get(name) is not None
    }
    if "moe_layer_freq" in fields:  # recorded as the resolved per-layer 0/1 list
        fields["moe_layer_freq"] = layer_freq_text(fields["moe_layer_freq"])
    return dataclasses.replace(moe, **fields)


def trainer_flags(
    arch: dict, max_position_embeddings: int, make_vocab_size_divisible_by: int, bf16: bool
) -> list:
    """The trainer flags that build a model matching ``arch`` (e.g. for a converted model)."""
    flags = []
    for name, flag in ARCHITECTURE_FLAGS.items():
        value = arch[name]
        if not _matters(arch, name) or (name == "kv_channels" and _default_head_size(arch)):
            continue
        if isinstance(value, bool):
            flags += [flag] if value else []
        else:
            flags += [flag, str(value)]
    for name, flag in MOE_ARCHITECTURE_FLAGS.items():  # MoE fields, when recorded
        value = arch.get(name)
        if value is None or value is False:
            continue
        text = layer_freq_text(value) if isinstance(value, list) else str(value)
        flags += [flag] if value is True else [flag, text]
    flags += [
        "--vocab-size",
        str(arch["vocab_size"]),
        "--make-vocab-size-divisible-by",
        str(make_vocab_size_divisible_by),
    ]
    if max_position_embeddings is not None:
        flags += ["--max-position-embeddings", str(max_position_embeddings)]
    return flags + (["--bf16"] if bf16 else [])
