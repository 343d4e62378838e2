"""HF mixture-of-experts config.json fields (Qwen3-MoE, Qwen2-MoE, Mixtral) <-> our MoEConfig.

One table row per HF MoE family says where its config keeps each MoE field and how its
checkpoint names the expert tensors; reading and writing are the same code for all of them.

Routing, as transformers computes it (``*TopKRouter``): p = softmax(router logits) over all E
experts, the k largest kept and, with renormalisation (Mixtral always; Qwen's
``norm_topk_prob``), divided by their sum. Renormalised top-k of the softmax is the softmax of
the k largest logits, megatron-core's default (softmax after top-k); without renormalisation it
is ``--moe-router-pre-softmax`` (softmax over all E, then top-k). Scores are softmax, without a
scaling factor or expert bias.

MoE layers: HF layer i has experts iff i is not in ``mlp_only_layers`` and
(i + 1) % ``decoder_sparse_step`` == 0 (Qwen; Mixtral: every layer); the others are dense SwiGLU
MLPs of ``intermediate_size``. That is ``--moe-layer-freq`` as a 0/1 list per layer ("1" when
every layer has experts). Qwen2-MoE's shared expert (``shared_expert_intermediate_size``) is
scaled by sigmoid(w . x): ``--moe-shared-expert-gate``.
"""

from dataclasses import dataclass
from typing import Optional

from megatron_deft.config import ModelConfig, MoEConfig, layer_freq_text, moe_layer_pattern
from megatron_deft.conversion.errors import require


@dataclass(frozen=True)
class MoEFamily:
    """Where an HF MoE architecture keeps its MoE fields and expert tensors."""

    experts_fields: tuple  # config.json names of E (aliases; the first is written if none is)
    ffn_field: str  # the routed experts' SwiGLU inner size
    block: str  # module of the MoE block in each layer: model.layers.i.<block>.
    projections: tuple  # an expert's (gate, up, down) tensor names
    renormalise_field: Optional[str] = None  # top-k renormalised iff true; None: always
    shared_expert: bool = False  # a shared expert with its sigmoid gate (Qwen2-MoE)
    sparse_layers: bool = False  # decoder_sparse_step / mlp_only_layers choose the MoE layers
    fixed: tuple = ()  # (field, the only value we convert; also its default when absent)


_QWEN = dict(
    experts_fields=("num_experts", "num_local_experts"),  # transformers 5.x writes the second
    ffn_field="moe_intermediate_size",
    block="mlp",
    projections=("gate_proj", "up_proj", "down_proj"),
    renormalise_field="norm_topk_prob",
    sparse_layers=True,
)
MOE_FAMILIES = {
    "Qwen3MoeForCausalLM": MoEFamily(**_QWEN),
    "Qwen2MoeForCausalLM": MoEFamily(**_QWEN, shared_expert=True, fixed=(("qkv_bias", True),)),
    "MixtralForCausalLM": MoEFamily(
        experts_fields=("num_local_experts",),
        ffn_field="intermediate_size",
        block="block_sparse_moe",
        projections=("w1", "w3", "w2"),
        # training-time input jitter (megatron-core's --moe-input-jitter-eps is not exposed)
        fixed=(("router_jitter_noise", 0.0),),
    ),
}
SHARED_EXPERT = ("shared_expert", "shared_expert_gate")
"""Qwen2-MoE's shared expert module and its gate (a [1, h] linear) under the MoE block."""


def _hf_layer_pattern(hf: dict, num_layers: int, path: str) -> list:
    step, dense = hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
    require(isinstance(step, int) and step >= 1, path, f"decoder_sparse_step {step!r} is not >= 1")
    require(
        all(isinstance(i, int) and 0 <= i < num_layers for i in dense),
        path,
        f"mlp_only_layers {dense} names layers outside 0..{num_layers - 1}",
    )
    return [int(i not in dense and (i + 1) % step == 0) for i in range(num_layers)]


def _experts(hf: dict, family: MoEFamily, path: str) -> int:
    found = [hf[name] for name in family.experts_fields if hf.get(name) is not None]
    require(found, path, f"missing field {family.experts_fields[0]!r}")
    require(
        isinstance(found[0], int) and found[0] >= 1, path, f"{family.experts_fields[0]} {found[0]}"
    )
    return found[0]


def read_hf_moe(hf: dict, arch: str, num_layers: int, path: str) -> MoEConfig:
    """Our MoEConfig of an HF config.json (``MoEConfig()``, no experts, for a dense class)."""
    family = MOE_FAMILIES.get(arch)
    if family is None:
        return MoEConfig()
    for field, value in family.fixed:
        got = hf.get(field, value)
        require(got == value, path, f"{field} {got!r} is not supported (only {value!r})")
    experts = _experts(hf, family, path)
    topk = hf.get("num_experts_per_tok")
    require(isinstance(topk, int) and 1 <= topk <= experts, path, f"num_experts_per_tok {topk!r}")
    require(family.ffn_field in hf, path, f"missing field {family.ffn_field!r}")
    pattern = [1] * num_layers
    if family.sparse_layers:
        pattern = _hf_layer_pattern(hf, num_layers, path)
    require(any(pattern), path, "no layer has experts (convert it as the dense model it is)")
    renormalise = hf.get(family.renormalise_field, False) if family.renormalise_field else True
    shared = hf.get("shared_expert_intermediate_size") if family.shared_expert else None
    require(
        not family.shared_expert or (isinstance(shared, int) and shared > 0),
        path,
        f"shared_expert_intermediate_size {shared!r} is not a positive size",
    )
    return MoEConfig(
        num_experts=experts,
        moe_router_topk=topk,
        moe_ffn_hidden_size=hf[family.ffn_field],
        moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=family.shared_expert,
        moe_router_pre_softmax=not renormalise,
        moe_layer_freq=layer_freq_text(pattern),
    )


def moe_misfit(arch: str, model: ModelConfig, moe: MoEConfig) -> str:
    """Why HF ``arch`` cannot express this model's experts ('' when it can, or for a dense
    model and a dense class; a dense model never fits a MoE class and vice versa)."""
    family = MOE_FAMILIES.get(arch)
    if (family is None) != (moe.num_experts is None):
        return "experts" if family is None else "no experts"
    if family is None:
        return ""
    pattern = moe_layer_pattern(moe.moe_layer_freq, model.num_layers)
    checks = {
        "sigmoid router scores": moe.moe_router_score_function != "softmax",
        "a top-k scaling factor": moe.moe_router_topk_scaling_factor not in (None, 1.0),
        "an expert bias": moe.moe_router_enable_expert_bias,
        "top-k probabilities not renormalised": (
            moe.moe_router_pre_softmax and family.renormalise_field is None
        ),
        "a shared expert": family.shared_expert
        != (moe.moe_shared_expert_intermediate_size is not None),
        "an ungated shared expert": family.shared_expert and not moe.moe_shared_expert_gate,
        "dense layers": not family.sparse_layers and not all(pattern),
        "an expert SwiGLU size other than the dense one": (
            family.ffn_field == "intermediate_size"
            and (moe.moe_ffn_hidden_size or model.ffn_hidden_size) != model.ffn_hidden_size
        ),
    }
    return ", ".join(name for name, misfit in checks.items() if misfit)


def hf_moe_fields(arch: str, model: ModelConfig, moe: MoEConfig, base: dict) -> dict:
    """config.json's MoE fields of ``moe`` as HF ``arch`` ({} for a dense class). ``base`` (the
    source's config) keeps its spelling of E and of the MoE layers where they still hold."""
    family = MOE_FAMILIES.get(arch)
    if family is None:
        return {}
    experts = [name for name in family.experts_fields if name in base] or family.experts_fields[:1]
    fields = {name: moe.num_experts for name in experts}
    fields.update(dict(family.fixed), num_experts_per_tok=moe.moe_router_topk)
    fields[family.ffn_field] = moe.moe_ffn_hidden_size or model.ffn_hidden_size
    if family.renormalise_field:
        fields[family.renormalise_field] = not moe.moe_router_pre_softmax
    if family.shared_expert:
        fields["shared_expert_intermediate_size"] = moe.moe_shared_expert_intermediate_size
    pattern = moe_layer_pattern(moe.moe_layer_freq, model.num_layers)
    if family.sparse_layers and pattern != _hf_layer_pattern(base, model.num_layers, "base"):
        dense = [i for i, is_moe in enumerate(pattern) if not is_moe]
        fields.update(decoder_sparse_step=1, mlp_only_layers=dense)
    return fields
