"""Trainer configuration: dataclasses with one docstring per field, parsed once at entry.

Every field maps onto one command-line flag: ``--`` + the field name with dashes (Megatron-LM's
names, e.g. ``--tensor-model-parallel-size``), made by :func:`add_config_flags`, which the
evaluator and the tools use too. The data sections (records, tokenizer, data sources) are
declared in ``megatron_deft.data.config`` and embedded here. Boolean fields are
``store_true`` flags. A YAML file given with ``--config`` holds the same keys (dashes or
underscores); flags override it. The help text of each flag is the field's docstring (read from
its class's source), so the docstring is the single place a field is described.
"""

import argparse
import ast
import dataclasses
import inspect
import math
import typing
from dataclasses import dataclass, field
from typing import Optional

from megatron_deft.conventions import ConfigError
from megatron_deft.data.config import DataConfig, RecordFormat, TokenizerConfig


def _at_least(low):
    return lambda value: value >= low, f">= {low}"


def _above(low):
    return lambda value: value > low, f"> {low}"


_FRACTION = (lambda value: 0 <= value < 1, "in [0, 1)")

BOUNDS = {
    "num_layers": _at_least(1),
    "hidden_size": _at_least(1),
    "ffn_hidden_size": _at_least(1),
    "num_attention_heads": _at_least(1),
    "num_query_groups": _at_least(1),
    "kv_channels": _at_least(1),
    "seq_length": _at_least(1),
    "max_position_embeddings": _at_least(1),
    "vocab_size": _at_least(1),
    "make_vocab_size_divisible_by": _at_least(1),
    "rotary_base": _above(0),
    "rope_scaling_factor": _above(0),
    "norm_epsilon": _above(0),
    "init_method_std": _at_least(0),
    "hidden_dropout": _FRACTION,
    "attention_dropout": _FRACTION,
    "tensor_model_parallel_size": _at_least(1),
    "pipeline_model_parallel_size": _at_least(1),
    "num_layers_per_virtual_pipeline_stage": _at_least(1),
    "distributed_timeout_minutes": _above(0),
    "lr": _at_least(0),
    "min_lr": _at_least(0),
    "lr_warmup_iters": _at_least(0),
    "lr_decay_iters": _at_least(1),
    "lr_wsd_decay_iters": _at_least(1),
    "weight_decay": _at_least(0),
    "adam_beta1": _FRACTION,
    "adam_beta2": _FRACTION,
    "adam_eps": _above(0),
    "clip_grad": _at_least(0),
    "micro_batch_size": _at_least(1),
    "global_batch_size": _at_least(1),
    "train_iters": _at_least(1),
    "seed": _at_least(0),
    "log_interval": _at_least(1),
    "eval_interval": _at_least(0),
    "eval_iters": _at_least(1),
    "max_skipped_iters": _at_least(0),
    "save_interval": _at_least(0),
    "num_experts": _at_least(1),
    "moe_router_topk": _at_least(1),
    "moe_ffn_hidden_size": _at_least(1),
    "expert_model_parallel_size": _at_least(1),
    "expert_tensor_parallel_size": _at_least(1),
    "moe_shared_expert_intermediate_size": _at_least(1),
    "moe_router_topk_scaling_factor": _above(0),
    "moe_aux_loss_coeff": _at_least(0),
    "moe_z_loss_coeff": _at_least(0),
    "recompute_num_layers": _at_least(1),
    "num_layers_at_start_in_bf16": _at_least(0),
    "num_layers_at_end_in_bf16": _at_least(0),
}
"""field -> (predicate, what it requires): the range of every numeric setting (None, an unset
optional, always passes). Checks involving several sections are in training/arguments.py."""


def flag_of(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


class _Checked:
    """Each config section checks its own fields when built, so a config built in code (the
    evaluator, the converter, tests) is held to the ranges the command line is."""

    def __post_init__(self):
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):  # inf passes every lower bound; nan fails them all
                raise ConfigError(f"{flag_of(item.name)} must be a finite number, got {value}")
            ok, requirement = BOUNDS.get(item.name, (None, None))
            if ok is not None and not ok(value):
                raise ConfigError(f"{flag_of(item.name)} must be {requirement}, got {value}")


def _choice(default, choices):
    """A field whose allowed values the generated flag enforces (``metadata['choices']``)."""
    return field(default=default, metadata={"choices": choices})


ATTENTION_BACKENDS = ("auto", "te", "flex", "sdpa", "unfused")


@dataclass
class ModelConfig(_Checked):
    """Llama/Qwen-style GPT: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases (except
    the optional q/k/v bias)."""

    num_layers: int = 2
    """Number of transformer layers."""
    hidden_size: int = 64
    """Transformer hidden size h."""
    ffn_hidden_size: Optional[int] = None
    """SwiGLU inner size (default 4h)."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_query_groups: Optional[int] = None
    """Number of key/value heads for grouped-query attention (default: num_attention_heads)."""
    kv_channels: Optional[int] = None
    """Head size d (default: hidden_size / num_attention_heads); the query projection has
    heads x d rows and the output projection heads x d columns (e.g. Qwen3-0.6B: h 1024,
    16 heads of 128)."""
    qk_layernorm: bool = False
    """RMSNorm (weights [d], shared by all heads) on each query and key head before RoPE
    (Qwen3)."""
    seq_length: int = 64
    """Tokens per sequence s (packed rows have exactly this length)."""
    max_position_embeddings: Optional[int] = None
    """Longest position the model supports (default: seq_length)."""
    vocab_size: Optional[int] = None
    """Tokenizer vocabulary size before padding (default: taken from the tokenizer)."""
    make_vocab_size_divisible_by: int = 128
    """The vocabulary is padded to a multiple of this x tensor-model-parallel size (Megatron)."""
    untie_embeddings_and_output_weights: bool = False
    """Use a separate output-layer weight instead of the input embedding."""
    add_qkv_bias: bool = False
    """Bias on the query/key/value projection only (Qwen2/2.5); all other layers have none."""
    rotary_base: int = 10000
    """RoPE base frequency theta."""
    use_rope_scaling: bool = False
    """Llama 3.1's RoPE frequency scaling (Hugging Face rope_type 'llama3'): frequencies whose
    wavelength exceeds 8192 positions are divided by --rope-scaling-factor, those below 2048
    are kept, those in between interpolated smoothly (megatron-core's fixed values: original
    context 8192, low/high frequency factors 1 and 4)."""
    rope_scaling_factor: float = 8.0
    """The frequency divisor of --use-rope-scaling (Llama 3.1/3.3: 8, Llama 3.2: 32)."""
    norm_epsilon: float = 1e-5
    """RMSNorm epsilon."""
    init_method_std: float = 0.02
    """Std of the normal weight init; output projections use std / sqrt(2 * num_layers)."""
    hidden_dropout: float = 0.0
    """Dropout on the residual branches."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    attention_backend: str = _choice("auto", ATTENTION_BACKENDS)
    """Core attention: te (Transformer Engine's fused attention, CUDA), flex (FlexAttention,
    CUDA without TE), sdpa (scaled_dot_product_attention; CPU) or unfused (megatron-core's local
    attention on a dense [b, 1, s, s] mask, for comparison). auto: te, else flex on CUDA, sdpa
    on CPU. Packed rows reach te, flex and sdpa as one THD stream (README, "Sequence
    packing")."""

    @property
    def head_size(self) -> int:
        """d: --kv-channels, or hidden / heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def resolved(self) -> "ModelConfig":
        """A copy with the derived defaults filled in (the one place they are defined): SwiGLU
        inner size 4h, query groups = heads, head size h / heads, positions = seq_length.
        The fields themselves stay None when not given, so a checkpoint's recorded architecture
        can tell what a run set from what it defaulted."""
        return dataclasses.replace(
            self,
            ffn_hidden_size=self.ffn_hidden_size or 4 * self.hidden_size,
            num_query_groups=self.num_query_groups or self.num_attention_heads,
            kv_channels=self.head_size,
            max_position_embeddings=self.max_position_embeddings or self.seq_length,
        )


@dataclass
class ParallelConfig(_Checked):
    """Layout of the ranks: world = TP x PP x DP."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size TP (splits heads, FFN and vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size PP (splits layers)."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """Layers per virtual stage; enables the interleaved 1F1B schedule."""
    sequence_parallel: bool = False
    """With TP > 1, Megatron-LM's sequence parallelism: outside attention and the MLP (norms,
    dropout, residuals) each TP rank holds s / TP of the sequence, dividing that activation
    memory by TP; the all-reduces become all-gather + reduce-scatter. Same results."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with backward."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with forward."""
    distributed_timeout_minutes: float = 10.0
    """Timeout of collective operations; a hang fails after this long."""


MOE_SCORE_FUNCTIONS = ("softmax", "sigmoid")
MOE_LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "none")
MOE_DISPATCHERS = ("alltoall", "allgather")
MOE_ROUTER_DTYPES = ("fp32", "fp64")


def _layer_freq(freq: str):
    """--moe-layer-freq parsed: an int >= 1 or a non-empty list of 0/1 (ValueError otherwise)."""
    try:
        value = _list_expression(ast.parse(freq.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError):
        value = None
    is_int = isinstance(value, int) and value >= 1
    if is_int or (isinstance(value, list) and value and all(v in (0, 1) for v in value)):
        return value
    raise ConfigError(
        f"--moe-layer-freq {freq!r}: expected an int >= 1 or a list of 0/1 such as [1,0,1,0]"
    )


def moe_layer_pattern(freq: str, num_layers: int) -> list:
    """--moe-layer-freq as Megatron-LM reads it -> [1 (MoE) / 0 (dense)] per layer: an int N puts
    experts in every N-th layer from layer 0; a list expression such as ``[1,0,1,0]`` or
    ``([0]+[1]*3)*2`` (lists, ints, + and *: evaluated without ``eval``) gives one entry per
    layer."""
    value = _layer_freq(freq)
    if isinstance(value, int):
        return [int(i % value == 0) for i in range(num_layers)]
    if len(value) != num_layers:
        raise ConfigError(
            f"--moe-layer-freq {freq} has {len(value)} entries, --num-layers is {num_layers}"
        )
    return value


def layer_freq_text(pattern: list) -> str:
    """--moe-layer-freq for a 0/1 pattern: "1" when every layer has experts, else the list."""
    return "1" if all(pattern) else "[" + ",".join(map(str, pattern)) + "]"


def _list_expression(node):
    """The value of an expression made of int constants, lists, + and * (nothing else)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.List):
        return [_list_expression(item) for item in node.elts]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _list_expression(node.left), _list_expression(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise ValueError("not a list expression")


@dataclass
class MoEConfig(_Checked):
    """Mixture of experts (megatron-core's MoELayer, TopKRouter, token dispatchers and
    SequentialMLP / grouped-GEMM experts), Megatron-LM's flags. Routing is dropless: every
    token reaches all of its top-k experts (no capacity factor)."""

    num_experts: Optional[int] = None
    """Routed experts E per MoE layer (default: a dense model, no experts)."""
    moe_router_topk: int = 2
    """Experts k each token is routed to."""
    moe_ffn_hidden_size: Optional[int] = None
    """SwiGLU inner size of each routed expert (default --ffn-hidden-size)."""
    expert_model_parallel_size: int = 1
    """Expert-parallel size EP: the experts of a layer are split over EP ranks (E / EP each);
    EP ranks are data-parallel ranks of the dense layers."""
    expert_tensor_parallel_size: Optional[int] = None
    """Tensor-parallel size ETP inside each expert (default: --tensor-model-parallel-size);
    ETP x EP x PP must divide the world size."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """SwiGLU inner size of the shared expert that every token passes through (Qwen2-MoE,
    DeepSeek; the total over all shared experts); default none."""
    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(w . x), a learned per-token gate
    (Qwen2-MoE)."""
    moe_router_score_function: str = _choice("softmax", MOE_SCORE_FUNCTIONS)
    """Router scores from the logits: softmax (Mixtral, Qwen) or sigmoid (DeepSeek-V3)."""
    moe_router_pre_softmax: bool = False
    """Softmax over all E logits before the top-k (probabilities not renormalised over the k
    chosen: Qwen2-MoE/Qwen3-MoE without norm_topk_prob); default softmax over the k chosen."""
    moe_router_topk_scaling_factor: Optional[float] = None
    """Multiply the top-k routing weights by this factor (DeepSeek's routed_scaling_factor)."""
    moe_router_load_balancing_type: str = _choice("aux_loss", MOE_LOAD_BALANCING_TYPES)
    """Load-balancing loss: aux_loss (Switch Transformer's, over each micro-batch),
    seq_aux_loss (per sequence, DeepSeek-V2/V3) or none."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss (0: off; e.g. 1e-3 for Qwen3-MoE, 2e-2 for
    Mixtral)."""
    moe_z_loss_coeff: Optional[float] = None
    """Weight of the router z-loss, mean over tokens of logsumexp(router logits)^2 (ST-MoE;
    default off)."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for the
    top-k choice only, moved after every step towards balanced load (needs sigmoid scores)."""
    moe_layer_freq: str = "1"
    """Which layers are MoE: an int N (every N-th layer from layer 0; 1: all) or a list of 0/1,
    one per layer, e.g. [0,1,1,1] or ([0]+[1]*3)."""
    moe_token_dispatcher_type: str = _choice("allgather", MOE_DISPATCHERS)
    """How tokens reach their experts' EP ranks: allgather (every rank gathers all tokens of
    its TP x EP group) or alltoall (each token is sent only to its experts' ranks)."""
    moe_grouped_gemm: bool = False
    """Run a rank's local experts as one grouped GEMM (Transformer Engine, CUDA) instead of one
    SwiGLU MLP after another (SequentialMLP)."""
    moe_router_dtype: Optional[str] = _choice(None, MOE_ROUTER_DTYPES)
    """Precision of the router's logits, scores and aux losses: fp32 or fp64 (default: the
    model's dtype; fp32 is recommended with --bf16)."""

    def __post_init__(self):
        super().__post_init__()  # the ranges in BOUNDS
        _layer_freq(self.moe_layer_freq)
        choices = {
            "--moe-router-score-function": (self.moe_router_score_function, MOE_SCORE_FUNCTIONS),
            "--moe-router-load-balancing-type": (
                self.moe_router_load_balancing_type,
                MOE_LOAD_BALANCING_TYPES,
            ),
            "--moe-token-dispatcher-type": (self.moe_token_dispatcher_type, MOE_DISPATCHERS),
            "--moe-router-dtype": (self.moe_router_dtype or "fp32", MOE_ROUTER_DTYPES),
        }
        for flag, (value, allowed) in choices.items():  # YAML values bypass argparse's choices
            if value not in allowed:
                raise ConfigError(f"{flag} {value!r} is not one of {', '.join(allowed)}")


RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass
class RecomputeConfig(_Checked):
    """Activation recomputation (megatron-core's, Megatron-LM's flags): the forward of the chosen
    part of each layer is run again in the backward instead of keeping its activations. Losses
    and gradients are those of a run without it (dropout included: the RNG state is replayed)."""

    recompute_granularity: Optional[str] = _choice(None, RECOMPUTE_GRANULARITIES)
    """full: keep only the input of each recomputed transformer layer (or group of layers);
    selective: keep everything but the core attention (softmax(q k^T) v and its [s, s] scores),
    recomputed in every layer, which is where most activation memory goes for unfused
    attention at long sequences, for a small cost in FLOPs (default: no recompute)."""
    recompute_method: Optional[str] = _choice(None, RECOMPUTE_METHODS)
    """full only: uniform: the layers of each pipeline stage (model chunk, with virtual stages)
    in groups of --recompute-num-layers, each group's input kept and the group recomputed;
    block: only the first --recompute-num-layers layers of each stage are recomputed, the others
    keep their activations (use the memory left after the weights)."""
    recompute_num_layers: Optional[int] = None
    """full only: layers per recomputed group (uniform) or recomputed layers per pipeline stage
    (block); at most the layers of one stage."""

    def __post_init__(self):
        super().__post_init__()
        granularity, method = self.recompute_granularity, self.recompute_method
        for flag, value, allowed in (
            ("--recompute-granularity", granularity, RECOMPUTE_GRANULARITIES),
            ("--recompute-method", method, RECOMPUTE_METHODS),
        ):
            if value is not None and value not in allowed:  # YAML bypasses argparse's choices
                raise ConfigError(f"{flag} {value!r} is not one of {', '.join(allowed)}")
        if granularity == "full":
            if method is None:
                raise ConfigError("--recompute-granularity full needs --recompute-method")
            if self.recompute_num_layers is None:
                raise ConfigError("--recompute-granularity full needs --recompute-num-layers")
            return
        given = [
            flag
            for flag, value in (
                ("--recompute-method", method),
                ("--recompute-num-layers", self.recompute_num_layers),
            )
            if value is not None
        ]
        if given and granularity == "selective":
            raise ConfigError(
                f"--recompute-granularity selective takes no {' or '.join(given)} (it "
                "recomputes the core attention of every layer)"
            )
        if given:
            raise ConfigError(f"{' and '.join(given)} needs --recompute-granularity full")


FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


@dataclass
class FP8Config(_Checked):
    """FP8 GEMMs in the transformer layers through Transformer Engine (CUDA only; megatron-core's
    TransformerConfig fields fp8, fp8_recipe, fp8_param, first_last_layers_bf16). The embedding,
    the output layer and the objective are never in FP8: megatron-core enters FP8 autocast
    around the transformer layers only, the output layer is its plain ColumnParallelLinear (or
    our fused output layer + loss), in bf16 with the loss computed in fp32."""

    fp8_format: Optional[str] = _choice(None, FP8_FORMATS)
    """FP8 GEMMs in the linear layers of every transformer layer: e4m3 for all tensors, or hybrid
    (e4m3 forward, e5m2 for the gradients of the outputs). Needs --device cuda and Transformer
    Engine (default: no FP8)."""
    fp8_recipe: str = _choice("delayed", FP8_RECIPES)
    """How FP8 scales are chosen: delayed (per tensor, from the amax history of earlier
    steps), tensorwise (per tensor, current amax), blockwise (per 128-element block; Hopper) or
    mxfp8 (per 32 elements, MX format; Blackwell)."""
    fp8_param_gather: bool = False
    """Keep the layers' weights in FP8 (Transformer Engine's fp8_model_init, megatron-core's
    fp8_param) and all-gather them in FP8 in the distributed optimizer: half the weight
    memory and gather traffic of bf16. Needs --fp8-format and --use-distributed-optimizer."""
    first_last_layers_bf16: bool = False
    """Keep the first --num-layers-at-start-in-bf16 and last --num-layers-at-end-in-bf16
    transformer layers out of FP8 (not with --fp8-recipe delayed: megatron-core refuses it)."""
    num_layers_at_start_in_bf16: int = 1
    """--first-last-layers-bf16: transformer layers at the start kept in bf16."""
    num_layers_at_end_in_bf16: int = 1
    """--first-last-layers-bf16: transformer layers at the end kept in bf16."""

    def __post_init__(self):
        super().__post_init__()
        for flag, value, allowed in (
            ("--fp8-format", self.fp8_format or "e4m3", FP8_FORMATS),
            ("--fp8-recipe", self.fp8_recipe, FP8_RECIPES),
        ):
            if value not in allowed:  # YAML bypasses argparse's choices
                raise ConfigError(f"{flag} {value!r} is not one of {', '.join(allowed)}")
        if self.fp8_format is None:
            for flag, given in (
                ("--fp8-param-gather", self.fp8_param_gather),
                ("--first-last-layers-bf16", self.first_last_layers_bf16),
            ):
                if given:
                    raise ConfigError(f"{flag} needs --fp8-format")
        if self.first_last_layers_bf16 and self.fp8_recipe == "delayed":
            raise ConfigError(
                "--first-last-layers-bf16 does not work with --fp8-recipe delayed (one amax "
                "history for all layers); use tensorwise, blockwise or mxfp8"
            )


@dataclass
class OptimizerConfig(_Checked):
    """AdamW with warmup + decay of the learning rate."""

    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    lr_warmup_iters: int = 0
    """Linear warmup iterations."""
    lr_decay_style: str = "cosine"
    """Decay after warmup: cosine, linear, constant, inverse-square-root or WSD
    (warmup-stable-decay: flat at --lr, then the last --lr-wsd-decay-iters anneal to --min-lr)."""
    lr_decay_iters: Optional[int] = None
    """Iterations over which the rate decays (default: train_iters)."""
    lr_wsd_decay_iters: Optional[int] = None
    """WSD: length of the final anneal (ends at --lr-decay-iters); required with WSD."""
    lr_wsd_decay_style: str = "exponential"
    """WSD: shape of the final anneal: exponential, linear, cosine or minus_sqrt."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to norms)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0: no clipping)."""

    def __post_init__(self):
        super().__post_init__()
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} exceeds --lr {self.lr}")


def _objective_usage() -> str:
    """The objectives' forms, read from their specs (imported only when the help is built)."""
    from megatron_deft.objectives.registry import usage_text

    return usage_text()


@dataclass
class TrainingConfig(_Checked):
    """Iterations, batch shape, precision, device, logging and evaluation cadence."""

    micro_batch_size: int = 1
    """Rows per micro-batch b on one data-parallel rank."""
    global_batch_size: int = 8
    """Rows per optimizer step over all data-parallel ranks G."""
    train_iters: int = 10
    """Optimizer steps to train."""
    seed: int = 1234
    """Seed of weight init, data order and dropout."""
    bf16: bool = False
    """bf16 parameters and compute with fp32 master weights (GPU)."""
    device: str = "cuda"
    """cpu (gloo, fp32, for tests and smoke runs) or cuda (nccl)."""
    sft_objective: str = field(default="nll", metadata={"help_suffix": _objective_usage})
    """Token-level objective, optionally with its parameters as ``name:key=value,...`` (e.g.
    ``tsallis:q=0.5``, ``eaft:k=20,alpha=1.0``)."""
    tsallis_q: Optional[float] = None
    """tsallis: the exponent q > 0 (overrides a q given in --sft-objective)."""
    eaft_k: Optional[int] = None
    """eaft: number of top logits whose entropy gates the loss (default 20)."""
    eaft_alpha: Optional[float] = None
    """eaft: power of the normalised top-k entropy weight (default 1.0)."""
    unfused_output_loss: bool = False
    """Form the full vocab-parallel logits [b, s, V/tp] and run the objective on them (the
    unfused path, kept for comparison) instead of the output layer fused with the objective,
    which takes the final hidden states to the loss chunk by chunk and never holds the logits."""
    log_interval: int = 1
    """Log every this many iterations."""
    eval_interval: int = 0
    """Validate every this many iterations (0: never)."""
    eval_iters: int = 1
    """Global batches per validation."""
    max_skipped_iters: int = 5
    """Stop after this many consecutive iterations with a non-finite loss or grad norm."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard scalars here (last rank only)."""


@dataclass
class CheckpointConfig(_Checked):
    """megatron-core dist_checkpointing (torch_dist) checkpoints."""

    save: Optional[str] = None
    """Directory to save checkpoints to."""
    load: Optional[str] = None
    """Directory to resume from (its `latest` tracker picks the iteration); the architecture the
    checkpoint records fills the model flags not given."""
    save_interval: int = 0
    """Save every this many iterations (0: only at the end)."""
    finetune: bool = False
    """Load only the model weights from --load (fresh optimizer, iteration 0)."""
    pretrained_checkpoint: Optional[str] = None
    """Start from the model weights of this checkpoint (e.g. a Hugging Face model converted by
    tools/convert_checkpoint.py) with a fresh optimizer at iteration 0, unless --load already
    holds a checkpoint: then the run resumes from --load (so a restarted job continues). The
    architecture the checkpoint records (sizes, heads, RoPE, experts and routing, --vocab-size
    and its padding) fills the model and MoE flags not given; one given that contradicts it is
    an error."""
    override_opt_param_scheduler: bool = False
    """On a full resume, continue with this run's LR/weight-decay schedule flags where they
    differ from the checkpoint's (without it such a difference is an error)."""
    no_verify_checkpoint: bool = False
    """Load without checking the checkpoint's files against the sizes and CRC-32 checksums
    recorded when it was saved (checksums.json; verifying reads every file once)."""


@dataclass
class Config:
    """All settings of one training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture of experts (off unless --num-experts)."""
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    """Activation recomputation."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """FP8 through Transformer Engine."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and learning-rate schedule."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Loop settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources."""
    records: RecordFormat = field(default_factory=RecordFormat)
    """How JSONL records are read."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def config_from_dict(values: dict) -> Config:
    """A Config from ``{section: {field: value}}`` (e.g. a checkpoint's saved
    ``dataclasses.asdict(config)``), built by :func:`config_from_flags` so every section checks
    itself; fields this version does not know are ignored, missing ones keep their defaults."""
    flat = {
        f"{section}.{name}": value
        for section, fields in values.items()
        if isinstance(fields, dict)
        for name, value in fields.items()
    }
    return config_from_flags(Config, flat)


def field_docs(cls) -> dict:
    """{field name: its docstring} read from the class source (the string after each field)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for previous, node in zip(body, body[1:]):
        is_doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if isinstance(previous, ast.AnnAssign) and is_doc:
            docs[previous.target.id] = " ".join(node.value.value.split())
    return docs


def _flag_type(annotation):
    """The scalar type behind Optional[X]."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_config_flags(parser, cls, dest_prefix: str = "", choices: Optional[dict] = None) -> None:
    """Adds one ``--flag`` per field of the dataclass ``cls`` to ``parser``: the field name with
    dashes, help = its docstring, dest = ``dest_prefix + name``. A field that is itself a
    dataclass (a section) becomes an argument group whose flags get dest ``name.field``.

    Bool fields are ``store_true`` flags, ``list`` fields take one or more values (Megatron-style
    ``--data-path 0.7 a 0.3 b``). Defaults stay out of the namespace (``argparse.SUPPRESS``) so
    the dataclass's own defaults apply; allowed values come from the field's
    ``metadata["choices"]`` or ``choices[name]``; ``metadata["required"]`` makes a flag required;
    ``metadata["help_suffix"]`` (a callable) appends generated text to the help.
    """
    docs = field_docs(cls)
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(item.type):
            group = parser.add_argument_group(item.name, item.type.__doc__)
            add_config_flags(group, item.type, f"{dest_prefix}{item.name}.", choices)
            continue
        flag, kind = "--" + item.name.replace("_", "-"), _flag_type(item.type)
        more = item.metadata.get("help_suffix")  # help text generated from elsewhere
        text = docs[item.name] + (f" {more()}" if more else "")
        common = dict(dest=dest_prefix + item.name, help=text, default=argparse.SUPPRESS)
        common["required"] = item.metadata.get("required", False)
        if kind is bool:
            parser.add_argument(flag, action="store_true", **common)
            continue
        allowed = item.metadata.get("choices") or (choices or {}).get(item.name)
        parser.add_argument(
            flag,
            metavar=item.name.upper(),
            **(dict(nargs="+") if kind is list else dict(type=kind, choices=allowed)),
            **common,
        )


def config_from_flags(cls, values: dict, dest_prefix: str = ""):
    """The dataclass ``cls`` built from ``{dest: value}`` named as :func:`add_config_flags` names
    them; a field without a value keeps its default. Every section is constructed (not assigned
    field by field), so its ``__post_init__`` checks run; they raise ValueError."""
    kwargs = {}
    for item in dataclasses.fields(cls):
        dest = dest_prefix + item.name
        if dataclasses.is_dataclass(item.type):
            kwargs[item.name] = config_from_flags(item.type, values, dest + ".")
        elif dest in values:
            kwargs[item.name] = values[dest]
    return cls(**kwargs)


def parse_sections(parser: argparse.ArgumentParser, sections: dict, argv=None):
    """For tools with a few flags of their own plus config sections: adds each section's flags
    as an argument group (dest ``name.field``), parses ``argv`` and returns ``(namespace,
    {name: section built from its flags})``. A section's own check failing is reported like a
    bad flag (one line, exit 2)."""
    for name, cls in sections.items():
        add_config_flags(parser.add_argument_group(name, cls.__doc__), cls, name + ".")
    args = parser.parse_args(argv)
    try:
        built = {
            name: config_from_flags(cls, vars(args), name + ".") for name, cls in sections.items()
        }
    except ValueError as error:
        parser.error(str(error))
    return args, built
