"""HF ``config.json`` (Llama 2/3/3.1+, Qwen2/2.5, Qwen3, Mistral; the attention and embeddings of
Qwen3-MoE, Qwen2-MoE and Mixtral, whose experts :mod:`.hf_moe` reads) <-> our :class:`ModelConfig`.

Read as plain JSON (no transformers import). Both config generations are understood: RoPE theta
and scaling at the top level (``rope_theta``, ``rope_scaling``: transformers 4.x) or in
``rope_parameters`` (5.x); an exported config carries both. Llama 3.1's RoPE scaling (rope_type
'llama3') converts when its constants are megatron-core's (original context 8192, frequency
factors 1 and 4; any factor). ``head_dim`` other than hidden / heads becomes --kv-channels.
Anything else our GPT cannot represent exactly (other RoPE scaling, sliding windows, biases
other than Qwen2's q/k/v, another activation) is refused with one line naming the field, never
converted approximately. Architectures users ask for that we cannot express (DeepSeek-V2/V3's
MLA and MTP, ...) are refused naming what is missing (REFUSED_ARCHITECTURES).
"""

import json
import os
from dataclasses import dataclass

from megatron_deft.config import ModelConfig, MoEConfig
from megatron_deft.conversion.errors import ConversionError, require
from megatron_deft.conversion.hf_moe import moe_misfit


@dataclass(frozen=True)
class Family:
    """What an HF architecture class implies beyond config.json."""

    model_type: str
    add_qkv_bias: bool  # q/k/v projections carry a bias
    qk_layernorm: bool  # per-head RMSNorm of queries and keys (q_norm / k_norm)
    bias_fields: tuple  # its config's bias switches (all false in what we export)
    window_unless_switched_off: bool = False  # sliding_window applies without use_sliding_window


SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": Family("llama", False, False, ("attention_bias", "mlp_bias")),
    "Qwen2ForCausalLM": Family("qwen2", True, False, ()),
    "Qwen3ForCausalLM": Family("qwen3", False, True, ("attention_bias",)),
    # Mistral 7B v0.2+ (no sliding window): Llama's tensors and math.
    "MistralForCausalLM": Family("mistral", False, False, (), window_unless_switched_off=True),
    # Mixtures of experts: their attention as above; experts in hf_moe.MOE_FAMILIES.
    "Qwen3MoeForCausalLM": Family("qwen3_moe", False, True, ("attention_bias",)),
    "Qwen2MoeForCausalLM": Family("qwen2_moe", True, False, ()),
    "MixtralForCausalLM": Family("mixtral", False, False, (), window_unless_switched_off=True),
}
REFUSED_ARCHITECTURES = {
    "DeepseekV3ForCausalLM": "multi-head latent attention (MLA), multi-token prediction (MTP) "
    "and grouped sigmoid routing",
    "DeepseekV2ForCausalLM": "multi-head latent attention (MLA) and grouped routing",
    "Qwen3NextForCausalLM": "gated DeltaNet linear-attention layers",
    "GptOssForCausalLM": "attention sinks, biased experts and a clamped SwiGLU",
    "Llama4ForCausalLM": "chunked attention and interleaved MoE with a shared expert",
    "OlmoeForCausalLM": "its q/k RMSNorm over all heads",
}
"""Architectures users ask for that we refuse, with what our GPT cannot express."""


def hf_architecture(model: ModelConfig, source: dict = None, moe: MoEConfig = None) -> str:
    """The HF class that represents ``model`` (with ``moe``'s experts): the ``source`` config's
    (the model converted from) when it does, e.g. Mistral, else the first that does."""
    moe = moe or MoEConfig()
    names = list((source or {}).get("architectures") or []) + list(SUPPORTED_ARCHITECTURES)
    misfits = []
    for name in names:
        family = SUPPORTED_ARCHITECTURES.get(name)
        if not family or (family.add_qkv_bias, family.qk_layernorm) != (
            model.add_qkv_bias,
            model.qk_layernorm,
        ):
            continue
        misfit = moe_misfit(name, model, moe)
        if not misfit:
            return name
        misfits.append(f"{name} cannot express {misfit}")
    raise ConversionError(
        "no supported Hugging Face architecture expresses this model (q/k/v bias "
        f"{model.add_qkv_bias}, q/k RMSNorm {model.qk_layernorm}"
        + (f"; {'; '.join(dict.fromkeys(misfits))}" if misfits else "")
        + ")"
    )


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: {error}") from None


LLAMA3_ROPE_CONSTANTS = {
    "original_max_position_embeddings": 8192,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
}
"""The constants of rope_type 'llama3' that megatron-core's RoPE scaling fixes."""


def _rope(hf: dict, path: str) -> dict:
    """{rotary_base, use_rope_scaling, rope_scaling_factor} of the ModelConfig."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ConversionError(f"{path}: rope_theta {theta} is not an integer (--rotary-base is)")
    rope = {"rotary_base": int(theta)}
    if rope_type == "default":
        return rope
    if rope_type != "llama3":
        raise ConversionError(
            f"{path}: rope type {rope_type!r} (RoPE scaling) is not supported; "
            "plain RoPE ('default') and Llama 3.1's 'llama3' convert exactly"
        )
    for key, value in LLAMA3_ROPE_CONSTANTS.items():
        require(
            params.get(key) == value,
            path,
            f"rope {key} {params.get(key)} is not supported (megatron-core's llama3 RoPE "
            f"scaling fixes it to {value})",
        )
    require(
        isinstance(params.get("factor"), (int, float)) and params["factor"] > 0,
        path,
        f"rope factor {params.get('factor')!r} is not a positive number",
    )
    return {**rope, "use_rope_scaling": True, "rope_scaling_factor": float(params["factor"])}


def read_hf_config(hf_dir: str):
    """(ModelConfig, HF architecture name, HF config dict) of a Llama / Qwen2 checkpoint dir."""
    path = os.path.join(hf_dir, "config.json")
    hf = _load_json(path)
    names = hf.get("architectures") or []
    refused = [f" ({REFUSED_ARCHITECTURES[n]})" for n in names if n in REFUSED_ARCHITECTURES]
    require(
        len(names) == 1 and names[0] in SUPPORTED_ARCHITECTURES,
        path,
        f"architectures {names} is not supported{''.join(refused)}; supported: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}",
    )
    arch = names[0]
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
    ):
        require(key in hf, path, f"missing field {key!r}")
    heads = hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    require(
        hf["hidden_size"] % heads == 0,
        path,
        f"hidden_size {hf['hidden_size']} is not divisible by num_attention_heads {heads}",
    )
    require(
        heads % groups == 0,
        path,
        f"num_attention_heads {heads} is not divisible by num_key_value_heads {groups}",
    )
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    require(
        hf.get("hidden_act", "silu") == "silu",
        path,
        f"hidden_act {hf.get('hidden_act')!r} is not supported (SwiGLU needs 'silu')",
    )
    require(not hf.get("mlp_bias", False), path, "mlp_bias true is not supported")
    require(
        not hf.get("attention_bias", False),
        path,
        "attention_bias true is not supported (Qwen2's q/k/v bias is implied by the class)",
    )
    family = SUPPORTED_ARCHITECTURES[arch]
    if hf.get("use_sliding_window", family.window_unless_switched_off):
        require(
            hf.get("sliding_window") is None,
            path,
            f"sliding_window {hf.get('sliding_window')} is not supported (attention over "
            "the whole sequence only)",
        )
    model = ModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=None if head_dim * heads == hf["hidden_size"] else head_dim,
        qk_layernorm=family.qk_layernorm,
        max_position_embeddings=hf.get("max_position_embeddings"),
        vocab_size=hf["vocab_size"],
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        add_qkv_bias=family.add_qkv_bias,
        **_rope(hf, path),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6),
    )
    return model, arch, hf


def _rope_fields(model: ModelConfig) -> dict:
    """rope_parameters (transformers 5.x) and rope_scaling (4.x) of a scaled RoPE."""
    theta = float(model.rotary_base)
    if not model.use_rope_scaling:
        return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}
    scaling = {
        "rope_type": "llama3",
        "factor": float(model.rope_scaling_factor),
        **LLAMA3_ROPE_CONSTANTS,
    }
    return {"rope_parameters": {**scaling, "rope_theta": theta}, "rope_scaling": scaling}


def hf_config_dict(model: ModelConfig, arch: str, dtype: str, base: dict = None) -> dict:
    """config.json for ``model`` as HF ``arch``; ``base`` (e.g. the source model's config)
    supplies the fields we do not own (token ids, ...); ours always win."""
    config = dict(base or {})
    for replaced in ("rope_scaling", "dtype"):  # ours: _rope_fields / torch_dtype
        config.pop(replaced, None)
    config.update(
        architectures=[arch],
        model_type=SUPPORTED_ARCHITECTURES[arch].model_type,
        hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups,
        head_dim=model.head_size,
        hidden_act="silu",
        rms_norm_eps=model.norm_epsilon,
        rope_theta=float(model.rotary_base),
        **_rope_fields(model),
        vocab_size=model.vocab_size,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        max_position_embeddings=model.max_position_embeddings,
        torch_dtype=dtype,
    )
    config.update({field: False for field in SUPPORTED_ARCHITECTURES[arch].bias_fields})
    return config
