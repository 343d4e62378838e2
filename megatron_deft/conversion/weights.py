"""Which Hugging Face tensors make each megatron-core weight, and where inside it they live.

Names are those of our GPTModel at TP=1 / PP=1 with the local layer spec (the converter builds
that model; dist_checkpointing reshards it to any TP/PP on load). Per layer i:

    megatron (decoder.layers.i.)        HF (model.layers.i.)                     layout
    input_layernorm.weight              input_layernorm.weight                   copy
    self_attention.linear_qkv.weight    self_attn.{q,k,v}_proj.weight            fused qkv
    self_attention.linear_qkv.bias      self_attn.{q,k,v}_proj.bias (Qwen2)      fused qkv
    self_attention.{q,k}_layernorm.weight self_attn.{q,k}_norm.weight (Qwen3)    copy
    self_attention.linear_proj.weight   self_attn.o_proj.weight                  copy
    pre_mlp_layernorm.weight            post_attention_layernorm.weight          copy
    mlp.linear_fc1.weight               mlp.{gate,up}_proj.weight                [gate; up]
    mlp.linear_fc2.weight               mlp.down_proj.weight                     copy

A MoE layer (--moe-layer-freq; HF names of :mod:`.hf_moe`'s table: B = mlp, or
block_sparse_moe for Mixtral, whose expert tensors are w1 / w3 / w2 for gate / up / down):

    mlp.router.weight                               B.gate.weight                      copy
    mlp.experts.local_experts.e.linear_fc1.weight   B.experts.e.{gate,up}_proj.weight  [gate; up]
    mlp.experts.local_experts.e.linear_fc2.weight   B.experts.e.down_proj.weight       copy
    mlp.shared_experts.linear_fc1.weight            B.shared_expert.{gate,up}_proj     [gate; up]
    mlp.shared_experts.linear_fc2.weight            B.shared_expert.down_proj.weight   copy
    mlp.shared_experts.gate_weight                  B.shared_expert_gate.weight [1, h] copy

(experts e = 0..E-1 of the full EP=1 model; dist_checkpointing stores them on a global expert
axis, so the checkpoint loads at any EP).

plus embedding.word_embeddings.weight / output_layer.weight (untied only) <-> model.embed_tokens /
lm_head (rows [0, V) of the padded [V_pad, h]; padding rows are zero) and
decoder.final_layernorm.weight <-> model.norm.weight.

Fused qkv (megatron's GQA layout): with ng query groups, q = nh / ng query heads per group and
head size d, the [ng * (q + 2) * d, h] weight is, per group g, the rows
[q heads g*q .. g*q+q-1 of q_proj; head g of k_proj; head g of v_proj]. Megatron's TP split of
this tensor then gives each rank whole groups, and its SwiGLU checkpoint factory stores fc1
as the global [gate; up] whatever the TP, so this full-tensor layout is all the converter needs.
"""

from dataclasses import dataclass

import torch

from megatron_deft.config import ModelConfig, MoEConfig, moe_layer_pattern
from megatron_deft.conversion.hf_moe import SHARED_EXPERT, MoEFamily


@dataclass(frozen=True)
class WeightMap:
    """One megatron weight and the HF tensors (in fusion order) it is made of, with the shapes
    config.json implies for them."""

    megatron: str
    hf: tuple
    layout: str  # copy | qkv | gate_up | vocab
    shapes: tuple  # one HF shape per name in ``hf``


def _swiglu(m: str, h: str, names: tuple, ffn: int, hidden: int) -> list:
    """A SwiGLU MLP: megatron ``m``linear_fc{1,2} <-> HF ``h``{gate, up, down} (``names``)."""
    gate, up, down = (f"{h}{name}.weight" for name in names)
    return [
        WeightMap(m + "linear_fc1.weight", (gate, up), "gate_up", ((ffn, hidden),) * 2),
        WeightMap(m + "linear_fc2.weight", (down,), "copy", ((hidden, ffn),)),
    ]


def _attention(model: ModelConfig, m: str, h: str) -> list:
    hidden, d = model.hidden_size, model.head_size
    rows = (model.num_attention_heads * d, *(model.num_query_groups * d,) * 2)
    qkv = tuple(f"{h}self_attn.{x}_proj." for x in "qkv")
    maps = [
        WeightMap(
            m + "input_layernorm.weight", (h + "input_layernorm.weight",), "copy", ((hidden,),)
        ),
        WeightMap(
            m + "self_attention.linear_qkv.weight",
            tuple(p + "weight" for p in qkv),
            "qkv",
            tuple((r, hidden) for r in rows),
        ),
    ]
    if model.add_qkv_bias:
        bias = tuple(p + "bias" for p in qkv)
        maps.append(
            WeightMap(m + "self_attention.linear_qkv.bias", bias, "qkv", tuple((r,) for r in rows))
        )
    if model.qk_layernorm:
        maps += [
            WeightMap(
                f"{m}self_attention.{x}_layernorm.weight",
                (f"{h}self_attn.{x}_norm.weight",),
                "copy",
                ((d,),),
            )
            for x in "qk"
        ]
    return maps + [
        WeightMap(
            m + "self_attention.linear_proj.weight",
            (h + "self_attn.o_proj.weight",),
            "copy",
            ((hidden, rows[0]),),
        ),
        WeightMap(
            m + "pre_mlp_layernorm.weight",
            (h + "post_attention_layernorm.weight",),
            "copy",
            ((hidden,),),
        ),
    ]


def _experts(model: ModelConfig, moe: MoEConfig, family: MoEFamily, m: str, h: str) -> list:
    """A MoE layer's router, routed experts (SequentialMLP's local_experts at EP=1) and shared
    expert with its gate."""
    hidden, block = model.hidden_size, f"{h}{family.block}."
    ffn = moe.moe_ffn_hidden_size or model.ffn_hidden_size
    router = (block + "gate.weight",)
    maps = [WeightMap(m + "mlp.router.weight", router, "copy", ((moe.num_experts, hidden),))]
    for e in range(moe.num_experts):
        expert = f"{m}mlp.experts.local_experts.{e}."
        maps += _swiglu(expert, f"{block}experts.{e}.", family.projections, ffn, hidden)
    if family.shared_expert:
        shared, gate = (block + name for name in SHARED_EXPERT)
        size = moe.moe_shared_expert_intermediate_size
        maps += _swiglu(m + "mlp.shared_experts.", shared + ".", family.projections, size, hidden)
        gate_map = WeightMap(
            m + "mlp.shared_experts.gate_weight", (gate + ".weight",), "copy", ((1, hidden),)
        )
        maps.append(gate_map)
    return maps


def weight_maps(model: ModelConfig, moe: MoEConfig = None, family: MoEFamily = None) -> list:
    """Every weight of the model, in HF order (embedding, layers, final norm, head); with
    ``moe`` (and its HF ``family``'s names) the experts of the layers --moe-layer-freq marks."""
    vocab, hidden = model.vocab_size, model.hidden_size
    embedding = ("model.embed_tokens.weight",)
    maps = [WeightMap("embedding.word_embeddings.weight", embedding, "vocab", ((vocab, hidden),))]
    pattern = [0] * model.num_layers
    if moe is not None and moe.num_experts is not None:
        pattern = moe_layer_pattern(moe.moe_layer_freq, model.num_layers)
    for i, is_moe in enumerate(pattern):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        maps += _attention(model, m, h)
        if is_moe:
            maps += _experts(model, moe, family, m, h)
        else:
            dense = ("gate_proj", "up_proj", "down_proj")
            maps += _swiglu(m + "mlp.", h + "mlp.", dense, model.ffn_hidden_size, hidden)
    norm = ("model.norm.weight",)
    maps.append(WeightMap("decoder.final_layernorm.weight", norm, "copy", ((hidden,),)))
    if model.untie_embeddings_and_output_weights:
        maps.append(
            WeightMap("output_layer.weight", ("lm_head.weight",), "vocab", ((vocab, hidden),))
        )
    return maps


def hf_parts(param: torch.Tensor, weight: WeightMap, model: ModelConfig) -> list:
    """Views into ``param`` (the full TP=1 tensor), one per HF tensor of ``weight`` in
    ``weight.hf`` order: an HF tensor reshaped to its view's shape is imported by copying it
    into the view; a view reshaped to the HF shape exports it."""
    rest = tuple(param.shape[1:])  # (h,) for weights, () for the qkv bias
    if weight.layout == "copy":
        return [param]
    if weight.layout == "vocab":  # rows past the vocabulary are Megatron's padding
        return [param[: model.vocab_size]]
    if weight.layout == "gate_up":  # [gate; up]: dense MLP, expert or shared expert
        ffn = param.shape[0] // 2
        return [param[:ffn], param[ffn:]]
    groups, heads = model.num_query_groups, model.num_attention_heads
    head_dim, per_group = model.head_size, heads // groups
    grouped = param.view(groups, (per_group + 2) * head_dim, *rest)
    q_rows = per_group * head_dim
    return [
        grouped[:, :q_rows],
        grouped[:, q_rows : q_rows + head_dim],
        grouped[:, q_rows + head_dim :],
    ]
