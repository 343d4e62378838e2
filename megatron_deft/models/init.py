"""Layout-invariant weight initialisation.

megatron-core's own init draws from one RNG stream in construction order, so a pipeline stage
that builds layers 2-3 draws different numbers than a PP=1 rank that built layers 0-1 first:
the same seed gives different models for different layouts. We instead initialise every
parameter from its own generator keyed by (seed, global parameter name), draw the *full*
(unsharded) tensor, and keep this rank's tensor-parallel shard. The result is identical for any
TP/PP/VP layout, which is what makes the parallel-invariance tests meaningful.

Experts (MoE layers' ``SequentialMLP``): a local expert i on expert-parallel rank r is global
expert r x (E / EP) + i, named so, and its weights are split over the *expert* tensor-parallel
group (ETP), so the same seed gives the same full expert weights for every TP/EP/ETP/PP layout.
Grouped-GEMM experts (``TEGroupedMLP``: Transformer Engine's GroupedLinear holds local expert i's
matrix as ``linear_fc1.weight<i>``) are named as SequentialMLP's same matrix, so both expert
implementations start from the same weights.
The router weight [E, h] and the shared expert are initialised like any other matrix.

Rules (Megatron's defaults): matrices ~ N(0, std); the attention output projection and the
MLP down projection ~ N(0, std / sqrt(2 * num_layers)); norm weights 1; biases 0.
With tied embeddings the last pipeline stage's output-layer copy gets the embedding's values.

Cost: each rank draws, per parameter, the full tensor (TP x its shard) on CPU, one at a time.
"""

import math
import re
import zlib

import torch

_SCALED_OUTPUT_LAYERS = ("linear_proj.weight", "linear_fc2.weight")
_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"\.mlp\.experts\.(linear_fc[12])\.weight(\d+)$")


def _sequential_expert_name(name: str) -> str:
    """TEGroupedMLP's ``...experts.linear_fc1.weight<i>`` -> SequentialMLP's
    ``...experts.local_experts.<i>.linear_fc1.weight`` (the same [out/etp, in] matrix)."""
    return _GROUPED_EXPERT.sub(r".mlp.experts.local_experts.\2.\1.weight", name)


def _global_expert_name(name: str, experts_per_rank: int) -> str:
    """``...local_experts.<i>.`` -> ``...local_experts.<EP rank x experts_per_rank + i>.``"""
    match = _LOCAL_EXPERT.search(name)
    if match is None:
        return name
    from megatron.core import parallel_state

    first = parallel_state.get_expert_model_parallel_rank() * experts_per_rank
    return f"{name[: match.start(1)]}{first + int(match.group(1))}{name[match.end(1) :]}"


def is_expert(name: str) -> bool:
    """A routed expert's parameter (split over the expert tensor-parallel group)."""
    return ".mlp.experts." in name


def _global_names(model) -> dict:
    """{local parameter name: layout-independent name} (global layer numbers, tied weights)."""
    layer_offset = {}
    for index, layer in enumerate(model.decoder.layers):
        layer_offset[index] = layer.layer_number - 1  # layer_number is global and 1-based
    names, experts_per_rank = {}, _experts_per_rank(model)
    for name, _ in model.named_parameters():
        match = _LOCAL_LAYER.match(name)
        if match:
            global_index = layer_offset[int(match.group(1))]
            name_global = f"decoder.layers.{global_index}." + name[match.end() :]
        elif name == "output_layer.weight" and model.share_embeddings_and_output_weights:
            name_global = "embedding.word_embeddings.weight"
        else:
            name_global = name
        names[name] = _global_expert_name(_sequential_expert_name(name_global), experts_per_rank)
    return names


def _experts_per_rank(model) -> int:
    """E / EP: the local experts of one MoE layer of this chunk (0 for a dense chunk)."""
    for module in model.modules():
        if hasattr(module, "num_local_experts"):  # MoELayer and its experts module
            return module.num_local_experts
    return 0


def _tp_shard(full: torch.Tensor, param, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This rank's slice of ``full`` the way megatron's tensor-parallel layers split it.

    With partition stride k the split dimension is cut into k * tp chunks and rank r keeps
    chunks r, r + tp, ... (e.g. SwiGLU fc1: [gate_r; up_r]).
    """
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunks = full.chunk(stride * tp_size, dim=dim)
    return torch.cat(chunks[tp_rank::tp_size], dim=dim)


def _full_shape(param, tp_size: int) -> list:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= tp_size
    return shape


@torch.no_grad()
def init_weights_layout_invariant(model, tf_config, seed: int) -> None:
    """Fill every parameter of one GPTModel chunk; see the module docstring for the rules."""
    from megatron.core import parallel_state

    tensor_parallel = {
        False: (
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size(),
        ),
        True: (  # the expert tensor-parallel group (ETP, default TP)
            parallel_state.get_expert_tensor_parallel_rank(),
            parallel_state.get_expert_tensor_parallel_world_size(),
        ),
    }
    scaled_std = tf_config.init_method_std / math.sqrt(2.0 * tf_config.num_layers)
    global_names = _global_names(model)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            param.fill_(1.0 if "norm" in name else 0.0)
            continue
        scaled = global_names[name].endswith(_SCALED_OUTPUT_LAYERS)
        std = scaled_std if scaled else tf_config.init_method_std
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed * 1_000_003 + zlib.crc32(global_names[name].encode()))
        tp_rank, tp_size = tensor_parallel[is_expert(name)]
        full = torch.randn(_full_shape(param, tp_size), generator=generator) * std
        param.copy_(_tp_shard(full, param, tp_rank, tp_size).to(param.dtype))
