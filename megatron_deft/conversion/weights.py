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

from megatron_deft.config import ModelConfig


@dataclass(frozen=True)
class WeightMap:
    """One megatron weight and the HF tensors (in fusion order) it is made of."""

    megatron: str
    hf: tuple
    layout: str  # copy | qkv | gate_up | vocab


def weight_maps(model: ModelConfig) -> list:
    """Every weight of the model, in HF order (embedding, layers, final norm, head)."""
    maps = [WeightMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for i in range(model.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = tuple(f"{h}self_attn.{x}_proj." for x in "qkv")
        maps += [
            WeightMap(m + "input_layernorm.weight", (h + "input_layernorm.weight",), "copy"),
            WeightMap(
                m + "self_attention.linear_qkv.weight", tuple(p + "weight" for p in qkv), "qkv"
            ),
        ]
        if model.add_qkv_bias:
            maps.append(
                WeightMap(
                    m + "self_attention.linear_qkv.bias", tuple(p + "bias" for p in qkv), "qkv"
                )
            )
        if model.qk_layernorm:
            maps += [
                WeightMap(
                    f"{m}self_attention.{x}_layernorm.weight",
                    (f"{h}self_attn.{x}_norm.weight",),
                    "copy",
                )
                for x in "qk"
            ]
        maps += [
            WeightMap(
                m + "self_attention.linear_proj.weight", (h + "self_attn.o_proj.weight",), "copy"
            ),
            WeightMap(
                m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",), "copy"
            ),
            WeightMap(
                m + "mlp.linear_fc1.weight",
                (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight"),
                "gate_up",
            ),
            WeightMap(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "copy"),
        ]
    maps.append(WeightMap("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"))
    if model.untie_embeddings_and_output_weights:
        maps.append(WeightMap("output_layer.weight", ("lm_head.weight",), "vocab"))
    return maps


def hf_shape(name: str, model: ModelConfig) -> tuple:
    """Shape of the HF tensor ``name`` that config.json implies."""
    h, ffn, vocab = model.hidden_size, model.ffn_hidden_size, model.vocab_size
    head_dim = model.head_size
    q_rows, kv_rows = model.num_attention_heads * head_dim, model.num_query_groups * head_dim
    leaf = name.rsplit(".", 2)[-2]  # q_proj, embed_tokens, input_layernorm, q_norm, norm, ...
    rows = {
        "embed_tokens": vocab,
        "lm_head": vocab,
        "q_proj": q_rows,
        "k_proj": kv_rows,
        "v_proj": kv_rows,
        "o_proj": h,
        "gate_proj": ffn,
        "up_proj": ffn,
        "down_proj": h,
    }
    if leaf in ("q_norm", "k_norm"):
        return (head_dim,)
    if name.endswith("norm.weight"):
        return (h,)
    if name.endswith(".bias"):
        return (rows[leaf],)
    return (rows[leaf], {"down_proj": ffn, "o_proj": q_rows}.get(leaf, h))


def hf_parts(param: torch.Tensor, weight: WeightMap, model: ModelConfig) -> list:
    """Views into ``param`` (the full TP=1 tensor), one per HF tensor of ``weight`` in
    ``weight.hf`` order: an HF tensor reshaped to its view's shape is imported by copying it
    into the view; a view reshaped to the HF shape exports it."""
    rest = tuple(param.shape[1:])  # (h,) for weights, () for the qkv bias
    if weight.layout == "copy":
        return [param]
    if weight.layout == "vocab":  # rows past the vocabulary are Megatron's padding
        return [param[: model.vocab_size]]
    if weight.layout == "gate_up":
        ffn = model.ffn_hidden_size
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
