"""``megatron-deft-eval`` command line -> :class:`EvalConfig`, validated before any work.

The model architecture is not on the command line: it is read from the checkpoint's saved run
config. Only the layout (TP, PP) and the device are chosen here; the weights are resharded to
it.
"""

import argparse
import re
import sys
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_deft.config import ConfigError, add_config_flags, config_from_flags
from megatron_deft.data.config import RecordFormat, TokenizerConfig
from megatron_deft.data.tokenizer import check_tokenizer_model

EVAL_TASKS = ("exact_match", "math")


@dataclass
class EvalConfig:
    """Settings of one evaluation (every field is one ``--flag``; the records and tokenizer
    sections are the trainer's)."""

    load: str = ""
    """Checkpoint directory written by megatron-deft-train (its --save); comma separated for
    several runs evaluated in one launch. Required unless --score-only."""
    iteration: str = "latest"
    """Which checkpoint(s) under --load: latest (the tracker's), all, or comma-separated numbers."""
    no_verify_checkpoint: bool = False
    """Load without checking each checkpoint's files against the sizes and CRC-32 checksums
    recorded when it was saved (as for training; verifying reads every file once)."""
    eval_data: str = ""
    """JSONL or Parquet (.parquet) file(s), comma separated; each is scored and reported
    separately. Required unless --score-only."""
    records: RecordFormat = field(default_factory=RecordFormat)
    """How the files' records are read, as for training (the last assistant turn is the
    reference); lines skipped with --skip-bad-samples are counted in the summary's "skipped"."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer, as for training."""
    tensor_model_parallel_size: int = 1
    """TP of this evaluation (any TP dividing the checkpoint's padded vocabulary and heads)."""
    pipeline_model_parallel_size: int = 1
    """PP of this evaluation (any PP dividing the checkpoint's number of layers): each rank
    holds its stage's layers, for scoring and for KV-cache generation."""
    device: str = "cuda"
    """cpu (gloo) or cuda (nccl)."""
    unfused_output_loss: bool = False
    """Score on the full vocab-parallel logits (the unfused path, for comparison) instead of
    the output layer fused with the objective, which never forms the logits."""
    max_new_tokens: int = 64
    """Greedy decoding stops at EOS or after this many tokens."""
    answer_pattern: Optional[str] = None
    """Regular expression: exact-match compares what it finds (its first group, or the whole
    match) in the generated and in the expected reply instead of the whole replies, e.g.
    '####\\s*(-?[0-9.,]+)' for GSM8K's final answers. A reference it finds nothing in is an
    error."""
    limit: int = 0
    """Evaluate only the first this many records of each file (0: all). (Formerly
    --num-samples, which now counts sampled answers per problem.)"""
    micro_batch_size: int = 32
    """Samples per forward pass on one data-parallel rank."""
    sft_objective: Optional[str] = None
    """Objective whose gate/exponent statistics are reported (default: the checkpoint's)."""
    output: Optional[str] = None
    """Write one JSON line per sample here: exact_match: index, reference, generated, expected,
    exact (answer with --answer-pattern); math: dataset, question, answer, prediction (the
    generated text, or the list of --num-samples sampled texts) and greedy, the records
    --score-only grades. With --score-only: the JSON report."""
    summary_output: Optional[str] = None
    """Also write the summary JSON lines (one per checkpoint and file; math: one report per
    checkpoint) to this file."""
    distributed_timeout_minutes: float = 10.0
    """Timeout of collective operations."""
    task: str = field(default="exact_match", metadata={"choices": EVAL_TASKS})
    """exact_match: held-out loss and greedy exact match (above); math: each problem's greedy
    answer and --num-samples sampled answers graded by equivalence
    (megatron_deft.evaluation.math_grading): greedy accuracy, accuracy (avg@k) and pass@k per
    data set and overall, as Markdown (last line: overall: accuracy=A n=N) and with
    --summary-output as JSON. A math record holds the question (--prompt-key, else problem or
    question) and the reference (--response-key, else answer, final_answer or solution)."""
    num_samples: int = 0
    """--task math: sampled answers per problem (k of avg@k and pass@k), drawn with
    --temperature and --top-p besides the greedy one; 0: the greedy answer only."""
    temperature: float = 1.0
    """--task math: sampling temperature (> 0; the DEFT paper's runs use 1)."""
    top_p: float = 1.0
    """--task math: nucleus sampling, in (0, 1] (1: the whole vocabulary)."""
    seed: int = 0
    """--task math: sampling seed; each (problem, sample) draws from its own generator seeded
    from this, the problem's index and the sample's number, so results do not depend on the
    batch size or the number of ranks."""
    score_only: Optional[str] = None
    """With --task math: grade this predictions file, without loading a model. JSONL (or
    .parquet), one problem per record: the generated text in "prediction" (or a list of the k
    sampled texts), the reference answer or solution in "answer", optionally "dataset"."""

    def data_paths(self) -> List[str]:
        return [path for path in self.eval_data.split(",") if path]

    def load_paths(self) -> List[str]:
        return [path for path in self.load.split(",") if path]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-deft-eval",
        description=(
            "Held-out loss and greedy exact-match of a megatron-deft checkpoint; --task math: "
            "math answers (greedy and sampled) graded by equivalence; --task math --score-only "
            "grades a predictions file without a model."
        ),
    )
    add_config_flags(parser, EvalConfig)
    return parser


def validate(config: EvalConfig) -> None:
    """Raise ConfigError (one line) on the first bad setting."""
    if config.num_samples and config.task != "math":
        raise ConfigError(
            "--num-samples is the number of sampled answers per problem (--task math); to "
            "evaluate only the first N records use --limit N"
        )
    if config.score_only is not None:
        if config.task != "math":
            raise ConfigError("--score-only grades math answers: add --task math")
        return  # no model, data or tokenizer: nothing else applies
    checks = [
        (config.tensor_model_parallel_size >= 1, "--tensor-model-parallel-size must be >= 1"),
        (config.pipeline_model_parallel_size >= 1, "--pipeline-model-parallel-size must be >= 1"),
        (config.device in ("cpu", "cuda"), f"--device {config.device!r}: use cpu or cuda"),
        (config.max_new_tokens >= 1, "--max-new-tokens must be >= 1"),
        (config.limit >= 0, "--limit must be >= 0"),
        (config.num_samples >= 0, "--num-samples must be >= 0"),
        (config.temperature > 0, "--temperature must be > 0"),
        (0 < config.top_p <= 1, "--top-p must be in (0, 1]"),
        (config.micro_batch_size >= 1, "--micro-batch-size must be >= 1"),
        (bool(config.data_paths()), "--eval-data is required (a file or a comma list)"),
        (bool(config.load_paths()), "--load is required (a checkpoint directory or a comma list)"),
        (bool(config.tokenizer.tokenizer_model), "--tokenizer-model is required"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if config.answer_pattern is not None:
        try:
            re.compile(config.answer_pattern)
        except re.error as error:
            raise ConfigError(f"--answer-pattern {config.answer_pattern!r}: {error}") from None
    spec = config.iteration
    if spec not in ("latest", "all") and not all(p.strip().isdigit() for p in spec.split(",")):
        raise ConfigError(f"--iteration {spec!r}: use latest, all or numbers like 100,200")
    check_tokenizer_model(config.tokenizer.tokenizer_type, config.tokenizer.tokenizer_model)


def parse_eval_config(argv=None, world_size: int = 1) -> EvalConfig:
    """Parse and validate; on a bad setting print one line and exit 2."""
    try:
        try:
            config = config_from_flags(EvalConfig, vars(build_parser().parse_args(argv)))
        except ValueError as error:  # a section's own check
            raise ConfigError(str(error)) from None
        validate(config)
        tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
        if world_size % (tp * pp):
            raise ConfigError(
                f"world size {world_size} is not divisible by "
                f"--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size {pp}"
            )
    except ConfigError as error:
        print(f"megatron-deft-eval: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return config
