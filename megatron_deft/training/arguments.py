"""Command line and YAML -> :class:`megatron_deft.config.Config`, validated before any work.

Flags are generated from the config dataclasses (one flag per field, Megatron-LM's names) so the
flag list cannot drift from the config. ``--config FILE.yaml`` supplies defaults with the same
keys; explicit flags override it. A run that loads a checkpoint (``--pretrained-checkpoint``,
or ``--load`` holding one) takes the model and MoE architecture fields not given from the
architecture the checkpoint records. Any unknown or inconsistent setting raises
:class:`ConfigError` with one line; :func:`parse_config` turns that into ``error: ...`` and exit 2.
"""

import argparse
import importlib.util
import os
import sys
from typing import Optional

import yaml

from megatron_deft.config import (
    Config,
    ConfigError,
    add_config_flags,
    config_from_flags,
    moe_layer_pattern,
)
from megatron_deft.conventions import TRACKER  # light: checkpointing imports megatron-core
from megatron_deft.models import recompute_and_fp8
from megatron_deft.models.architecture import (
    adopt_architecture,
    adopt_moe_architecture,
    architecture_mismatch,
    architecture_of,
)
from megatron_deft.models.attention_backend import backend_of
from megatron_deft.models.layout import padded_vocab_size

CHOICES = {
    "device": ("cpu", "cuda"),
    "lr_decay_style": ("cosine", "linear", "constant", "inverse-square-root", "WSD"),
    "lr_wsd_decay_style": ("exponential", "linear", "cosine", "minus_sqrt"),
}


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (no usage dump)."""

    def error(self, message):
        raise ConfigError(message)


def build_parser() -> argparse.ArgumentParser:
    """One flag per config field; dest is 'section.field'."""
    parser = _OneLineParser(prog="megatron-deft-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with the same keys.")
    add_config_flags(parser, Config, choices=CHOICES)
    return parser


def accepted_flags() -> list:
    """Every flag the trainer accepts (pinned by a test)."""
    return sorted(
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    )


def _yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    """{dest: value} from a YAML mapping whose keys are flag names (dashes or underscores)."""
    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"--config {path}: {error}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of flag names to values")
    by_flag = {a.option_strings[0]: a for a in parser._actions if a.option_strings}
    values = {}
    for key, value in raw.items():
        action = by_flag.get("--" + str(key).replace("_", "-"))
        if action is None or action.dest == "config":
            raise ConfigError(f"--config {path}: unknown key {key!r}")
        if value is not None and action.nargs == "+":
            value = [str(v) for v in value] if isinstance(value, list) else str(value).split()
        elif value is not None and action.type is not None:
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise ConfigError(f"--config {path}: {key}={value!r} is not {action.type.__name__}")
        values[action.dest] = value
    return values


def _given(argv: Optional[list]) -> dict:
    """{'section.field': value} of the flags and --config YAML keys given (every flag's default
    is SUPPRESS, so what the user did not set is absent)."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_yaml_defaults(known.config, parser))
    given = vars(parser.parse_args(argv))
    given.pop("config", None)
    return given


def _given_fields(given: dict, section: str) -> set:
    """The field names of ``section`` among the given 'section.field' dests."""
    return {dest.split(".", 1)[1] for dest in given if dest.startswith(section + ".")}


def config_from_args(argv: Optional[list] = None, world_size: int = 1) -> Config:
    """Flags (+ YAML) -> validated Config, with the architecture of the checkpoint the run
    starts from filling the model fields not given; raises ConfigError (one line)."""
    given = _given(argv)
    try:
        config = config_from_flags(Config, given)  # each section checks its own fields
    except ValueError as error:
        raise ConfigError(str(error)) from None
    _resolve_pretrained_checkpoint(config)
    _adopt_checkpoint_architecture(
        config, _given_fields(given, "model"), _given_fields(given, "moe")
    )
    validate(config, world_size)
    return config


def parse_config(argv: Optional[list] = None, world_size: int = 1) -> Config:
    """:func:`config_from_args`; on a bad setting print one line and exit 2."""
    try:
        config = config_from_args(argv, world_size)
    except ConfigError as error:
        print(f"megatron-deft-train: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def data_parallel_size(config: Config, world_size: int) -> int:
    """DP = world / (TP x PP)."""
    return world_size // (
        config.parallel.tensor_model_parallel_size * config.parallel.pipeline_model_parallel_size
    )


def _validate_layout(config: Config, world_size: int) -> None:
    model, par, train = config.model, config.parallel, config.training
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    _require(
        world_size % (tp * pp) == 0,
        f"world size {world_size} is not divisible by TP x PP = {tp} x {pp}",
    )
    dp = data_parallel_size(config, world_size)
    per_step = train.micro_batch_size * dp
    _require(
        train.global_batch_size % per_step == 0,
        f"--global-batch-size {train.global_batch_size} is not divisible by "
        f"--micro-batch-size x DP = {train.micro_batch_size} x {dp}",
    )
    heads, groups = model.num_attention_heads, model.resolved().num_query_groups
    _require(heads % tp == 0, f"--num-attention-heads {heads} is not divisible by TP {tp}")
    _require(groups % tp == 0, f"--num-query-groups {groups} is not divisible by TP {tp}")
    _require(
        heads % groups == 0,
        f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}",
    )
    _require(
        model.kv_channels is not None or model.hidden_size % heads == 0,
        f"--hidden-size {model.hidden_size} is not divisible by --num-attention-heads "
        f"{heads}; give the head size with --kv-channels",
    )
    _require(
        model.num_layers % pp == 0, f"--num-layers {model.num_layers} is not divisible by PP {pp}"
    )
    if par.sequence_parallel:
        _require(tp > 1, "--sequence-parallel needs TP > 1")
        _require(
            model.seq_length % tp == 0,
            f"--sequence-parallel needs --seq-length {model.seq_length} divisible by TP {tp}",
        )
    if model.vocab_size is not None:
        padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
        _require(padded % tp == 0, f"TP {tp} does not divide the padded vocabulary {padded}")
    per_vstage = par.num_layers_per_virtual_pipeline_stage
    if per_vstage is not None:
        _require(pp > 1, "--num-layers-per-virtual-pipeline-stage needs PP > 1")
        _require(
            (model.num_layers // pp) % per_vstage == 0,
            f"layers per pipeline stage {model.num_layers // pp} is not divisible by "
            f"--num-layers-per-virtual-pipeline-stage {per_vstage}",
        )
        microbatches = train.global_batch_size // per_step
        _require(
            microbatches % pp == 0,
            f"the interleaved schedule needs micro-batches per step ({microbatches}) "
            f"divisible by PP {pp}",
        )


def _validate_schedule(opt, train_iters: int) -> None:
    decay_iters = opt.lr_decay_iters or train_iters
    if opt.lr_decay_style != "WSD":
        _require(opt.lr_wsd_decay_iters is None, "--lr-wsd-decay-iters needs --lr-decay-style WSD")
        return
    _require(opt.lr_wsd_decay_iters is not None, "--lr-decay-style WSD needs --lr-wsd-decay-iters")
    stable = decay_iters - opt.lr_warmup_iters
    _require(
        1 <= opt.lr_wsd_decay_iters <= stable,
        f"--lr-wsd-decay-iters {opt.lr_wsd_decay_iters} must be in [1, {stable}] (the "
        f"--lr-decay-iters {decay_iters} after --lr-warmup-iters {opt.lr_warmup_iters})",
    )


def _validate_run(config: Config) -> None:
    model, par, train, data, ckpt = (
        config.model,
        config.parallel,
        config.training,
        config.data,
        config.checkpoint,
    )
    _require(not (train.bf16 and train.device == "cpu"), "--bf16 needs --device cuda")
    backend_of(config)  # ConfigError: an --attention-backend this machine cannot run
    _require(
        not par.overlap_param_gather or par.use_distributed_optimizer,
        "--overlap-param-gather needs --use-distributed-optimizer",
    )
    _validate_schedule(config.optimizer, train.train_iters)
    max_pos = model.resolved().max_position_embeddings
    _require(
        model.seq_length <= max_pos,
        f"--seq-length {model.seq_length} exceeds --max-position-embeddings {max_pos}",
    )
    sources = [
        name
        for name, given in [
            ("--train-data", data.train_data is not None),
            ("--data-path", bool(data.data_path)),
            ("--mock-data", data.mock_data),
        ]
        if given
    ]
    _require(
        len(sources) == 1,
        "give exactly one of --train-data, --data-path, --mock-data"
        + (f" (got {' and '.join(sources)})" if sources else ""),
    )
    _require(not data.mock_data or model.vocab_size is not None, "--mock-data needs --vocab-size")
    has_valid = data.mock_data or data.valid_data is not None or bool(data.valid_data_prefix)
    _require(
        train.eval_interval == 0 or has_valid,
        "--eval-interval needs --valid-data or --valid-data-prefix (or --mock-data)",
    )
    _validate_data_sources(data, config.tokenizer)
    _require(ckpt.save_interval == 0 or ckpt.save is not None, "--save-interval needs --save")
    _require(
        not ckpt.finetune or ckpt.load is not None or ckpt.pretrained_checkpoint,
        "--finetune needs --load or --pretrained-checkpoint",
    )
    try:
        objective_of(config)
    except ValueError as error:
        raise ConfigError(f"--sft-objective: {error}") from None


def _validate_data_sources(data, tokenizer) -> None:
    """File data needs a tokenizer whose files are there (the sections check their own fields
    when they are built)."""
    from megatron_deft.data.tokenizer import check_tokenizer_model

    _require(
        data.mock_data or tokenizer.tokenizer_model is not None,
        "--train-data/--data-path need --tokenizer-model",
    )
    if not data.mock_data:
        check_tokenizer_model(tokenizer.tokenizer_type, tokenizer.tokenizer_model)


def objective_of(config: Config):
    """The parsed Objective of --sft-objective with --tsallis-q/--eaft-k/--eaft-alpha applied."""
    from megatron_deft.objectives import parse_objective

    train = config.training
    params = {"q": train.tsallis_q, "k": train.eaft_k, "alpha": train.eaft_alpha}
    given = {key: value for key, value in params.items() if value is not None}
    return parse_objective(train.sft_objective, **given)


def _validate_moe(config: Config, world_size: int) -> None:
    """Experts against the layout (megatron-core would fail later, deep in a rank)."""
    moe, par, model = config.moe, config.parallel, config.model
    ep, etp = moe.expert_model_parallel_size, moe.expert_tensor_parallel_size
    if moe.num_experts is None:
        _require(
            ep == 1 and etp is None,
            "--expert-model-parallel-size/--expert-tensor-parallel-size need --num-experts",
        )
        return
    experts, topk = moe.num_experts, moe.moe_router_topk
    _require(
        experts % ep == 0,
        f"--num-experts {experts} is not divisible by --expert-model-parallel-size {ep}",
    )
    _require(topk <= experts, f"--moe-router-topk {topk} exceeds --num-experts {experts}")
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    etp = etp or tp
    _require(
        world_size % (etp * ep * pp) == 0,
        f"world size {world_size} is not divisible by "
        f"expert TP x EP x PP = {etp} x {ep} x {pp} (--expert-tensor-parallel-size, "
        "--expert-model-parallel-size)",
    )
    _require(
        not moe.moe_grouped_gemm
        or (config.training.device == "cuda" and importlib.util.find_spec("transformer_engine")),
        "--moe-grouped-gemm needs --device cuda with Transformer Engine installed (its grouped "
        "GEMM experts, TEGroupedMLP)",
    )
    _require(
        tp == 1 or par.sequence_parallel,
        "experts with TP > 1 need --sequence-parallel "
        "(megatron-core's MoE layer refuses to train without it)",
    )
    ffn = moe.moe_ffn_hidden_size or model.ffn_hidden_size or 4 * model.hidden_size
    _require(ffn % etp == 0, f"--moe-ffn-hidden-size {ffn} is not divisible by expert TP {etp}")
    _require(
        not moe.moe_router_enable_expert_bias or moe.moe_router_score_function == "sigmoid",
        "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid",
    )
    moe_layer_pattern(moe.moe_layer_freq, model.num_layers)  # ConfigError: the length


def validate(config: Config, world_size: int) -> None:
    """Raise ConfigError (one line) on the first inconsistent setting."""
    _validate_layout(config, world_size)
    _validate_moe(config, world_size)
    recompute_and_fp8.validate(config)
    _validate_run(config)
    _validate_te_only(config)


def _validate_te_only(config: Config) -> None:
    """Features only the TE layer spec builds: the local spec (any other --attention-backend)
    would run without them (FP8) or build megatron-core's legacy GroupedMLP."""
    if backend_of(config) == "te":
        return
    for flag, given in (
        ("--fp8-format", config.fp8.fp8_format is not None),
        ("--moe-grouped-gemm", config.moe.moe_grouped_gemm),
    ):
        _require(
            not given,
            f"{flag} needs --attention-backend te (or auto with Transformer Engine on CUDA): only "
            f"the TE layer spec has it, not --attention-backend {config.model.attention_backend}",
        )


def _resolve_pretrained_checkpoint(config: Config) -> None:
    """--pretrained-checkpoint P: load P's weights only (as --load P --finetune) unless --load
    holds a checkpoint already (a restarted run), which then resumes in full."""
    ckpt = config.checkpoint
    if ckpt.pretrained_checkpoint is None:
        return
    if ckpt.load is not None and os.path.isfile(os.path.join(ckpt.load, TRACKER)):
        ckpt.finetune = False  # --finetune referred to the pretrained weights
        return
    _require(
        os.path.isfile(os.path.join(ckpt.pretrained_checkpoint, TRACKER)),
        f"--pretrained-checkpoint {ckpt.pretrained_checkpoint}: no {TRACKER} there",
    )
    ckpt.load, ckpt.finetune = ckpt.pretrained_checkpoint, True


def _common_state(root: str, source: str, verify: bool) -> dict:
    """The common (non-sharded) state of the checkpoint ``root``'s tracker names, its common.pt
    verified against the checkpoint's checksums unless ``verify`` is False. A missing or damaged
    checkpoint is a CheckpointError naming ``source`` (the flag that named ``root``): the run
    stops with exit 1 as for any damaged checkpoint, not as for a bad flag."""
    from megatron_deft.training.checkpointing import (
        CheckpointError,
        existing_checkpoint_dir,
        read_common_state,
        read_tracker,
    )

    try:
        directory = existing_checkpoint_dir(root, read_tracker(root))
    except CheckpointError as error:
        raise CheckpointError(f"{source} {error}") from None
    return read_common_state(directory, verify)


def _adopt_checkpoint_architecture(config: Config, given: set, moe_given: set) -> None:
    """A run that loads a checkpoint takes the architecture it records for every model and MoE
    field not in ``given`` / ``moe_given`` (so --pretrained-checkpoint alone is enough); a
    given flag that contradicts it stops the run here, all such flags in one line, before any
    data or model is built."""
    ckpt, tp = config.checkpoint, config.parallel.tensor_model_parallel_size
    if ckpt.load is None or not os.path.isfile(os.path.join(ckpt.load, TRACKER)):
        return
    source = "--pretrained-checkpoint" if ckpt.load == ckpt.pretrained_checkpoint else "--load"
    common = _common_state(ckpt.load, source, verify=not ckpt.no_verify_checkpoint)
    if common.get("architecture") is None:  # written before architectures were recorded
        return
    model = config.model = adopt_architecture(config.model, common, given, tp)
    config.moe = adopt_moe_architecture(config.moe, common, moe_given)
    padded = None
    if model.vocab_size is not None:
        padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
    mismatch = architecture_mismatch(
        common["architecture"], architecture_of(model, padded, config.moe), tp
    )
    _require(
        not mismatch,
        f"{source} {ckpt.load} records another architecture than the flags given (drop them: "
        f"the checkpoint supplies its architecture): {mismatch}",
    )
