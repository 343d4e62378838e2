"""MoE conversion pieces (no model built): the router flags read from an HF config route as
transformers' own routers do, the MoE layers follow decoder_sparse_step / mlp_only_layers, and
what we cannot express is refused with one line naming it (import and export)."""

import json
import os

import pytest
import torch

from megatron_deft.config import ModelConfig, MoEConfig, moe_layer_pattern
from megatron_deft.conversion import ConversionError, convert_hf_to_megatron
from megatron_deft.conversion.hf_config import hf_architecture
from megatron_deft.conversion.hf_moe import read_hf_moe

HIDDEN, EXPERTS, TOKENS = 16, 6, 64
BASE = dict(
    hidden_size=HIDDEN,
    intermediate_size=24,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=32,
)


def _hf_router(arch, norm_topk_prob):
    """transformers' router of ``arch`` (random weight) and its config as config.json holds it."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    if arch == "MixtralForCausalLM":
        config = MixtralConfig(**BASE, num_local_experts=EXPERTS, num_experts_per_tok=2)
        router = MixtralTopKRouter
    else:
        config_class, router = {
            "Qwen3MoeForCausalLM": (Qwen3MoeConfig, Qwen3MoeTopKRouter),
            "Qwen2MoeForCausalLM": (Qwen2MoeConfig, Qwen2MoeTopKRouter),
        }[arch]
        config = config_class(
            **BASE,
            num_experts=EXPERTS,
            num_experts_per_tok=2,
            moe_intermediate_size=8,
            norm_topk_prob=norm_topk_prob,
        )
    module = router(config)
    with torch.no_grad():
        module.weight.normal_(generator=torch.Generator().manual_seed(0))
    return module, {**config.to_dict(), "architectures": [arch]}


def _megatron_routing(moe: MoEConfig, logits):
    """megatron-core's TopKRouter routing with our flags: [T, E] probabilities."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    probs, _ = topk_routing_with_score_function(
        logits,
        moe.moe_router_topk,
        use_pre_softmax=moe.moe_router_pre_softmax,
        scaling_factor=moe.moe_router_topk_scaling_factor,
        score_function=moe.moe_router_score_function,
    )
    return probs


@pytest.mark.parametrize(
    "arch, norm",
    [
        ("Qwen3MoeForCausalLM", True),
        ("Qwen3MoeForCausalLM", False),
        ("Qwen2MoeForCausalLM", False),
        ("Qwen2MoeForCausalLM", True),
        ("MixtralForCausalLM", None),
    ],
)
def test_router_flags_route_as_transformers(arch, norm):
    router, config = _hf_router(arch, norm)
    moe = read_hf_moe(config, arch, BASE["num_hidden_layers"], "config.json")
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, scores, indices = router(x)
    reference = torch.zeros(TOKENS, EXPERTS).scatter(1, indices, scores.float())
    got = _megatron_routing(moe, logits.float())
    assert torch.allclose(got, reference, atol=1e-6, rtol=0)
    # The other choice of --moe-router-pre-softmax routes differently (the test can fail).
    flipped = MoEConfig(
        **{**moe.__dict__, "moe_router_pre_softmax": not moe.moe_router_pre_softmax}
    )
    assert (_megatron_routing(flipped, logits.float()) - reference).abs().max() > 1e-2


@pytest.mark.parametrize(
    "fields, pattern",
    [
        ({}, [1, 1, 1, 1]),
        ({"decoder_sparse_step": 2}, [0, 1, 0, 1]),
        ({"mlp_only_layers": [0, 3]}, [0, 1, 1, 0]),
        ({"decoder_sparse_step": 2, "mlp_only_layers": [1]}, [0, 0, 0, 1]),
    ],
)
def test_moe_layers_follow_the_sparse_step_and_mlp_only_layers(fields, pattern):
    """HF: layer i has experts iff i not in mlp_only_layers and (i + 1) % step == 0."""
    config = {**BASE, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 8}
    moe = read_hf_moe({**config, **fields}, "Qwen3MoeForCausalLM", 4, "config.json")
    assert moe_layer_pattern(moe.moe_layer_freq, 4) == pattern


QWEN2_MOE = {
    **BASE,
    "architectures": ["Qwen2MoeForCausalLM"],
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 8,
    "shared_expert_intermediate_size": 12,
}


@pytest.mark.parametrize(
    "config, target_ep, message",
    [
        (
            {**BASE, "architectures": ["DeepseekV3ForCausalLM"]},
            1,
            "architectures ['DeepseekV3ForCausalLM'] is not supported (multi-head latent "
            "attention (MLA), multi-token prediction (MTP)",
        ),
        ({**QWEN2_MOE, "qkv_bias": False}, 1, "qkv_bias False is not supported (only True)"),
        (
            {**QWEN2_MOE, "architectures": ["MixtralForCausalLM"], "router_jitter_noise": 0.1},
            1,
            "router_jitter_noise 0.1 is not supported (only 0.0)",
        ),
        ({**QWEN2_MOE, "decoder_sparse_step": 5}, 1, "no layer has experts"),
        ({**QWEN2_MOE, "mlp_only_layers": [7]}, 1, "mlp_only_layers [7] names layers outside 0..3"),
        ({**QWEN2_MOE, "num_experts_per_tok": 5}, 1, "num_experts_per_tok 5"),
        (
            {**QWEN2_MOE, "shared_expert_intermediate_size": 0},
            1,
            "shared_expert_intermediate_size 0 is not a positive size",
        ),
        (
            QWEN2_MOE,
            3,
            "the number of experts 4 is not divisible by --target-expert-parallel-size 3",
        ),
    ],
)
def test_unsupported_moe_input_fails_with_one_line(tmp_path, config, target_ep, message):
    """Refused from config.json alone, before any tensor is read or anything written."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError) as error:
        convert_hf_to_megatron(
            str(hf), str(tmp_path / "out"), target_expert_parallel_size=target_ep
        )
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    "moe, misfit",
    [
        (dict(moe_router_score_function="sigmoid"), "sigmoid router scores"),
        (dict(moe_router_topk_scaling_factor=2.5), "a top-k scaling factor"),
        (dict(moe_shared_expert_intermediate_size=8), "a shared expert"),
    ],
)
def test_export_refuses_experts_no_hf_class_expresses(moe, misfit):
    model = ModelConfig(num_layers=2, hidden_size=16, ffn_hidden_size=24, num_attention_heads=4)
    experts = MoEConfig(num_experts=4, moe_ffn_hidden_size=8, **moe)
    with pytest.raises(ConversionError) as error:
        hf_architecture(model, None, experts)
    assert "no supported Hugging Face architecture expresses this model" in str(error.value)
    assert f"MixtralForCausalLM cannot express {misfit}" in str(error.value)
    assert "\n" not in str(error.value)
    # the same experts without the misfit: Mixtral (no q/k/v bias, no q/k norm)
    assert hf_architecture(model, None, MoEConfig(num_experts=4)) == "MixtralForCausalLM"
