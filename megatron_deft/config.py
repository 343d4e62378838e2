"""Trainer configuration: dataclasses with one docstring per field, parsed once at entry.

Every field maps onto one command-line flag: ``--`` + the field name with dashes (Megatron-LM's
names, e.g. ``--tensor-model-parallel-size``). Boolean fields are ``store_true`` flags. A YAML
file given with ``--config`` holds the same keys (dashes or underscores); flags override it.
The help text of each flag is the field's docstring (read from this file's source), so the
docstring is the single place a field is described.
"""

import ast
import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Optional


class ConfigError(ValueError):
    """A bad or inconsistent setting; the message is one line naming the flag(s)."""


@dataclass
class ModelConfig:
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

    @property
    def head_size(self) -> int:
        """d: --kv-channels, or hidden / heads."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads


@dataclass
class ParallelConfig:
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


@dataclass
class OptimizerConfig:
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


@dataclass
class TrainingConfig:
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
    sft_objective: str = "nll"
    """Token-level objective: nll, p, dft, tsallis, deft, cayley, eaft, optionally with its
    parameters as ``name:key=value,...`` (e.g. ``tsallis:q=0.5``, ``eaft:k=20,alpha=1.0``)."""
    tsallis_q: Optional[float] = None
    """tsallis: the exponent q > 0 (overrides a q given in --sft-objective)."""
    eaft_k: Optional[int] = None
    """eaft: number of top logits whose entropy gates the loss (default 20)."""
    eaft_alpha: Optional[float] = None
    """eaft: power of the normalised top-k entropy weight (default 1.0)."""
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
class DataConfig:
    """Where micro-batches come from; the data pipeline reads these fields."""

    train_data: Optional[str] = None
    """Training data file(s), comma separated."""
    valid_data: Optional[str] = None
    """Validation data file(s), comma separated."""
    data_format: str = "auto"
    """Record format of the data files: auto, prompt_response or messages."""
    prompt_key: str = "prompt"
    """JSON key of the prompt in prompt_response records (e.g. question for GSM8K)."""
    response_key: str = "response"
    """JSON key of the response in prompt_response records (e.g. answer for GSM8K)."""
    token_class_key: Optional[str] = None
    """JSON key whose string value names the class of a sample's tokens (e.g. "noisy"): the
    gate and exponent are then also logged per class (TensorBoard histograms). JSONL only."""
    pack_sequences: bool = False
    """Pack several samples into one row of seq_length tokens."""
    tokenizer_type: Optional[str] = None
    """Tokenizer family (see the data pipeline)."""
    tokenizer_model: Optional[str] = None
    """Tokenizer model file or directory."""
    mock_data: bool = False
    """Train on the built-in deterministic synthetic rows (needs --vocab-size)."""
    data_path: Optional[list] = None
    """Preprocessed training data (tools/preprocess_sft_data.py --output-prefix), instead of
    --train-data: one prefix, several prefixes, or weight/prefix pairs (--data-path 0.7 a 0.3 b)."""
    valid_data_prefix: Optional[list] = None
    """Preprocessed validation data in the --data-path syntax, instead of --valid-data."""
    overlong: str = "truncate"
    """Samples longer than --seq-length: truncate (keep the first seq_length tokens) or drop."""
    skip_bad_samples: bool = False
    """Skip (count and report) malformed or invalid JSONL lines instead of stopping at the first."""
    data_cache_dir: Optional[str] = None
    """Cache tokenized JSONL here so restarts skip tokenization."""


@dataclass
class CheckpointConfig:
    """megatron-core dist_checkpointing (torch_dist) checkpoints."""

    save: Optional[str] = None
    """Directory to save checkpoints to."""
    load: Optional[str] = None
    """Directory to resume from (its `latest` tracker picks the iteration)."""
    save_interval: int = 0
    """Save every this many iterations (0: only at the end)."""
    finetune: bool = False
    """Load only the model weights from --load (fresh optimizer, iteration 0)."""
    pretrained_checkpoint: Optional[str] = None
    """Start from the model weights of this checkpoint (e.g. a Hugging Face model converted by
    tools/convert_checkpoint.py) with a fresh optimizer at iteration 0, unless --load already
    holds a checkpoint: then the run resumes from --load (so a restarted job continues)."""
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
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and learning-rate schedule."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """Loop settings."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def field_docs(cls) -> dict:
    """{field name: its docstring} read from the class source (the string after each field)."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for previous, node in zip(body, body[1:]):
        is_doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if isinstance(previous, ast.AnnAssign) and is_doc:
            docs[previous.target.id] = " ".join(node.value.value.split())
    return docs
