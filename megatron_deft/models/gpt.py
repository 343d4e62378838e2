"""Llama/Qwen-style GPT on megatron-core: RMSNorm, SwiGLU, RoPE, GQA, no biases but optional q/k/v,
optional per-head q/k RMSNorm (Qwen3) and a head size other than hidden / heads.

The model is megatron-core's ``GPTModel`` with the Transformer Engine layer spec for
``--attention-backend te``, the local (pure PyTorch) spec with our core attention otherwise
(:mod:`megatron_deft.models.attention_backend`). It is always called without labels;
the loss is ours (objectives). The last stage hands back either vocab-parallel logits
[b, s, V/tp] or, with ``fused_output_loss`` (:class:`SFTGPTModel`), the final-norm hidden states
and the output weight, which the loss takes to the logits chunk by chunk itself.

Mixture of experts (``--num-experts``): the MLP of each layer --moe-layer-freq marks is
megatron-core's ``MoELayer`` (``TopKRouter``, the allgather/alltoall token dispatcher,
``SequentialMLP`` experts or grouped GEMM, optional shared expert) from the same layer specs.

Weight init is layout-invariant (see :mod:`megatron_deft.models.init`): the same seed gives the
same full weights for every TP/PP/VP (and EP) layout.
"""

import logging

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_deft.compat import megatron_fixes
from megatron_deft.config import Config, moe_layer_pattern
from megatron_deft.models import attention_backend
from megatron_deft.models.core_attention import PackedCoreAttention
from megatron_deft.models.init import init_weights_layout_invariant
from megatron_deft.models.layout import virtual_pipeline_size
from megatron_deft.models.recompute_and_fp8 import check_fp8_layers, fp8_kwargs, recompute_kwargs
from megatron_deft.objectives.linear_vocab_parallel import OutputLayerInput

logger = logging.getLogger(__name__)


class SFTGPTModel(GPTModel):
    """megatron-core's GPTModel whose last stage, when ``fused_output_loss`` is set, returns
    :class:`OutputLayerInput` instead of running the output layer: no logits are formed (and
    not the extra [b, s, V/tp] copy GPTModel makes when called without labels). Inference (a
    KV-cache context) always gets logits."""

    fused_output_loss: bool = False

    def _postprocess(self, hidden_states, *args, inference_context=None, **kwargs):
        if self.post_process and self.fused_output_loss and inference_context is None:
            tied = self.share_embeddings_and_output_weights
            weight = self.shared_embedding_or_output_weight() if tied else self.output_layer.weight
            return OutputLayerInput(hidden_states, weight)
        return super()._postprocess(
            hidden_states, *args, inference_context=inference_context, **kwargs
        )


def transformer_config(config: Config) -> TransformerConfig:
    """megatron-core TransformerConfig for our architecture and layout."""
    model, parallel, training = config.model.resolved(), config.parallel, config.training
    on_cpu = training.device == "cpu"
    dtype = torch.bfloat16 if training.bf16 else torch.float32
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        qk_layernorm=model.qk_layernorm,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.add_qkv_bias,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(config),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=training.bf16,
        attention_softmax_in_fp32=True,
        # Kept on although our own layout-invariant init overwrites every weight afterwards:
        # megatron-core 0.16.1 sets the tensor-parallel attributes (tensor_model_parallel,
        # partition_dim, partition_stride) of a weight only inside its init routine, and the
        # grad-norm de-duplication and our init need them.
        perform_initialization=True,
        use_cpu_initialization=on_cpu,
        # Global per-token mean: loss_func returns (sum, count); DDP scales grads by 1/count.
        calculate_per_token_loss=True,
        # Fused kernels are CUDA-only (or torch.compile'd, costing seconds on CPU).
        bias_activation_fusion=not on_cpu,
        masked_softmax_fusion=not on_cpu and megatron_fixes.masked_softmax_kernel_importable(),
        bias_dropout_fusion=not on_cpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=True,
        # gloo matches point-to-point messages between two ranks by posting order only. A
        # batched send-to-prev + send-to-next pair (interleaved schedule, PP=2: prev == next)
        # then lands in the wrong receive buffers (same shape: silently wrong activations).
        # The unbatched path sends the two directions over different groups.
        batch_p2p_comm=not on_cpu,
        **moe_kwargs(config),
        **recompute_kwargs(config),
        **fp8_kwargs(config),
    )


def moe_kwargs(config: Config) -> dict:
    """TransformerConfig's MoE fields from --num-experts & co. ({} for a dense model). Dropless:
    no capacity factor. The MoE layers' pattern is resolved here from --moe-layer-freq."""
    moe, model = config.moe, config.model
    if moe.num_experts is None:
        return {}
    return dict(
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.moe_router_topk,
        moe_ffn_hidden_size=moe.moe_ffn_hidden_size
        or model.ffn_hidden_size
        or 4 * model.hidden_size,
        expert_model_parallel_size=moe.expert_model_parallel_size,
        expert_tensor_parallel_size=(
            moe.expert_tensor_parallel_size or config.parallel.tensor_model_parallel_size
        ),
        moe_shared_expert_intermediate_size=moe.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=moe.moe_shared_expert_gate,
        moe_router_score_function=moe.moe_router_score_function,
        moe_router_pre_softmax=moe.moe_router_pre_softmax,
        moe_router_topk_scaling_factor=moe.moe_router_topk_scaling_factor,
        moe_router_load_balancing_type=moe.moe_router_load_balancing_type,
        moe_aux_loss_coeff=moe.moe_aux_loss_coeff,
        moe_z_loss_coeff=moe.moe_z_loss_coeff,
        moe_router_enable_expert_bias=moe.moe_router_enable_expert_bias,
        moe_layer_freq=moe_layer_pattern(moe.moe_layer_freq, model.num_layers),
        moe_token_dispatcher_type=moe.moe_token_dispatcher_type,
        moe_grouped_gemm=moe.moe_grouped_gemm,
        moe_router_dtype=moe.moe_router_dtype,
    )


class LocalRMSNorm:
    """torch.nn.RMSNorm for the local spec (megatron-core's WrappedTorchNorm, which refuses
    sequence parallelism). A norm of the hidden states runs, under --sequence-parallel, on
    this rank's s / TP tokens only: its weight is marked ``sequence_parallel`` so megatron-core
    sums the gradient over the TP ranks. The per-head q/k norms (``on_hidden=False``) see the
    full sequence; megatron-core sums their gradients over the TP ranks' heads anyway."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        on_hidden: bool = True,
        **unused,
    ):
        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        norm.weight.sequence_parallel = on_hidden and config.sequence_parallel
        return norm


def _local_layer_spec(qk_layernorm: bool, backend: str, num_experts=None, grouped_gemm=False):
    """megatron-core's local layer spec (dense MLP, or MoELayer with its router, dispatcher
    and experts) with LocalRMSNorm for every norm and our core attention for ``backend``
    (sdpa / flex), or megatron-core's own on the dense mask (unfused)."""
    spec = get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=grouped_gemm,
        normalization="RMSNorm",
        qk_layernorm=qk_layernorm,
    )
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = LocalRMSNorm
    if qk_layernorm:
        head_norm = ModuleSpec(module=LocalRMSNorm, params={"on_hidden": False})
        layer.self_attention.submodules.q_layernorm = head_norm
        layer.self_attention.submodules.k_layernorm = head_norm
    if backend == "unfused":
        # The trainer passes an explicit [b, 1, s, s] mask (block-diagonal when packing);
        # "arbitrary" makes every softmax path honour it instead of assuming plain causal.
        layer.self_attention.params["attn_mask_type"] = AttnMaskType.arbitrary
    else:
        layer.self_attention.submodules.core_attention = ModuleSpec(
            module=PackedCoreAttention, params={"kernel": backend}
        )
    return spec


def _te_spec(tf_config: TransformerConfig, qk_layernorm: bool, vp_stage):
    """The TE layer spec (its norms handle sequence parallelism; its attention takes THD)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if tf_config.num_moe_experts is not None:
        return get_gpt_decoder_block_spec(
            tf_config, use_transformer_engine=True, normalization="RMSNorm", vp_stage=vp_stage
        )
    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def decoder_spec(config: Config, tf_config: TransformerConfig, vp_stage=None):
    """The decoder of one model chunk for the run's attention backend
    (:mod:`megatron_deft.models.attention_backend`): the TE layer spec for ``te``, otherwise
    megatron-core's local layer spec with LocalRMSNorm everywhere, final norm included. With
    experts, the layers --moe-layer-freq marks get the MoE spec (megatron-core's
    ``get_gpt_decoder_block_spec`` on TE)."""
    qk_layernorm = config.model.qk_layernorm
    backend = attention_backend.backend_of(config)
    if backend == "te":
        return _te_spec(tf_config, qk_layernorm, vp_stage)
    dense = _local_layer_spec(qk_layernorm, backend)
    layers = get_num_layers_to_build(tf_config, vp_stage=vp_stage)
    if tf_config.num_moe_experts is None:
        return TransformerBlockSubmodules(layer_specs=[dense] * layers, layer_norm=LocalRMSNorm)
    moe = _local_layer_spec(
        qk_layernorm, backend, tf_config.num_moe_experts, tf_config.moe_grouped_gemm
    )
    offset = get_transformer_layer_offset(tf_config, vp_stage=vp_stage)
    pattern = tf_config.moe_layer_freq[offset : offset + layers]
    return TransformerBlockSubmodules(
        layer_specs=[moe if is_moe else dense for is_moe in pattern], layer_norm=LocalRMSNorm
    )


def cast_parameters(chunk: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every plain floating parameter in ``dtype`` (bf16 with --bf16), as Megatron-LM's
    Float16Module casts the whole model: megatron-core's own layers take ``params_dtype``, but the
    local spec's norms (torch.nn.RMSNorm / LayerNorm) are built in fp32, and an fp32 norm weight
    on bf16 activations also keeps torch from its fused rms_norm. Tensor subclasses (Transformer
    Engine's FP8 weights) and buffers (rotary frequencies) are left as they are."""
    for param in chunk.parameters():
        if type(param.data) is torch.Tensor and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def build_gpt_chunks(config: Config, vocab_size: int, initialize: bool = True) -> list:
    """This rank's model chunks (one per virtual stage) on the device, weights initialised
    layout-invariantly unless --load will overwrite them.

    Args:
        vocab_size: padded vocabulary size V (divisible by TP).
        initialize: False leaves the weights uninitialised (``torch.empty``: no pages touched
            until written), for callers that fill every weight themselves (the converter, at
            TP=1: megatron-core then also skips setting the tensor-parallel attributes).
    """
    tf_config = transformer_config(config)
    tf_config.perform_initialization = initialize
    _log_backend(config)
    vp_size = tf_config.virtual_pipeline_model_parallel_size or 1
    untied = config.model.untie_embeddings_and_output_weights
    chunks = []
    for vp_stage in range(vp_size):
        stage = None if vp_size == 1 else vp_stage
        first = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        last = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        chunk = SFTGPTModel(
            config=tf_config,
            transformer_layer_spec=decoder_spec(config, tf_config, stage),
            vocab_size=vocab_size,
            max_sequence_length=config.model.resolved().max_position_embeddings,
            pre_process=first,
            post_process=last,
            parallel_output=True,
            share_embeddings_and_output_weights=not untied,
            position_embedding_type="rope",
            rotary_base=config.model.rotary_base,
            rope_scaling=config.model.use_rope_scaling,
            rope_scaling_factor=config.model.rope_scaling_factor,
            vp_stage=stage,
        )
        check_fp8_layers(tf_config, chunk)
        chunk.to(torch.device(config.training.device))
        cast_parameters(chunk, tf_config.params_dtype)
        chunks.append(chunk)
    if initialize and config.checkpoint.load is None:  # a loaded checkpoint overwrites them
        for chunk in chunks:
            init_weights_layout_invariant(chunk, tf_config, seed=config.training.seed)
    return chunks


_logged = set()


def _log_backend(config: Config) -> None:
    """Says once per process (on global rank 0) which attention runs."""
    backend = attention_backend.backend_of(config)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if rank0 and backend not in _logged:
        _logged.add(backend)
        requested = config.model.attention_backend
        chosen = f" (--attention-backend {requested})" if requested != backend else ""
        logger.info(f"attention: {backend}{chosen}: {attention_backend.DESCRIPTIONS[backend]}")
