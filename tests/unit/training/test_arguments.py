"""Command line / YAML parsing and validation: every bad setting stops with one clear line."""

import importlib.util
import os
import subprocess
import sys

import pytest

from megatron_deft.training.arguments import accepted_flags, build_parser, parse_config

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
BASE = ["--mock-data", "--vocab-size", "500", "--device", "cpu"]

# Adding or renaming a flag is a user-visible change: update this list deliberately.
EXPECTED_FLAGS = [
    "--adam-beta1",
    "--adam-beta2",
    "--adam-eps",
    "--add-qkv-bias",
    "--attention-backend",
    "--attention-dropout",
    "--bf16",
    "--clip-grad",
    "--config",
    "--data-cache-dir",
    "--data-format",
    "--data-path",
    "--device",
    "--distributed-timeout-minutes",
    "--eaft-alpha",
    "--eaft-k",
    "--eval-interval",
    "--eval-iters",
    "--expert-model-parallel-size",
    "--expert-tensor-parallel-size",
    "--ffn-hidden-size",
    "--finetune",
    "--first-last-layers-bf16",
    "--fp8-format",
    "--fp8-param-gather",
    "--fp8-recipe",
    "--global-batch-size",
    "--hidden-dropout",
    "--hidden-size",
    "--init-method-std",
    "--kv-channels",
    "--load",
    "--log-interval",
    "--lr",
    "--lr-decay-iters",
    "--lr-decay-style",
    "--lr-warmup-iters",
    "--lr-wsd-decay-iters",
    "--lr-wsd-decay-style",
    "--make-vocab-size-divisible-by",
    "--max-position-embeddings",
    "--max-skipped-iters",
    "--micro-batch-size",
    "--min-lr",
    "--mock-data",
    "--moe-aux-loss-coeff",
    "--moe-ffn-hidden-size",
    "--moe-grouped-gemm",
    "--moe-layer-freq",
    "--moe-router-dtype",
    "--moe-router-enable-expert-bias",
    "--moe-router-load-balancing-type",
    "--moe-router-pre-softmax",
    "--moe-router-score-function",
    "--moe-router-topk",
    "--moe-router-topk-scaling-factor",
    "--moe-shared-expert-gate",
    "--moe-shared-expert-intermediate-size",
    "--moe-token-dispatcher-type",
    "--moe-z-loss-coeff",
    "--no-verify-checkpoint",
    "--norm-epsilon",
    "--num-attention-heads",
    "--num-experts",
    "--num-layers",
    "--num-layers-at-end-in-bf16",
    "--num-layers-at-start-in-bf16",
    "--num-layers-per-virtual-pipeline-stage",
    "--num-query-groups",
    "--overlap-grad-reduce",
    "--overlap-param-gather",
    "--overlong",
    "--override-opt-param-scheduler",
    "--pack-sequences",
    "--pipeline-model-parallel-size",
    "--pretrained-checkpoint",
    "--prompt-format",
    "--prompt-key",
    "--qk-layernorm",
    "--recompute-granularity",
    "--recompute-method",
    "--recompute-num-layers",
    "--response-key",
    "--rope-scaling-factor",
    "--rotary-base",
    "--save",
    "--save-interval",
    "--seed",
    "--seq-length",
    "--sequence-parallel",
    "--sft-objective",
    "--skip-bad-samples",
    "--tensor-model-parallel-size",
    "--tensorboard-dir",
    "--token-class-key",
    "--tokenizer-model",
    "--tokenizer-type",
    "--train-data",
    "--train-iters",
    "--tsallis-q",
    "--unfused-output-loss",
    "--untie-embeddings-and-output-weights",
    "--use-distributed-optimizer",
    "--use-rope-scaling",
    "--valid-data",
    "--valid-data-prefix",
    "--vocab-size",
    "--weight-decay",
]


def test_accepted_flags_are_pinned():
    assert accepted_flags() == EXPECTED_FLAGS


def test_flags_map_onto_config_fields():
    config = parse_config(
        BASE
        + [
            "--tensor-model-parallel-size",
            "2",
            "--pipeline-model-parallel-size",
            "2",
            "--num-layers",
            "4",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "8",
            "--lr",
            "2e-5",
            "--use-distributed-optimizer",
            "--sft-objective",
            "tsallis",
            "--tsallis-q",
            "0.5",
            "--lr-decay-style",
            "linear",
        ],
        world_size=8,
    )
    assert config.parallel.tensor_model_parallel_size == 2
    assert config.parallel.pipeline_model_parallel_size == 2
    assert config.parallel.use_distributed_optimizer is True
    assert config.optimizer.lr == 2e-5 and config.optimizer.lr_decay_style == "linear"
    assert config.training.global_batch_size == 8 and config.training.tsallis_q == 0.5
    assert config.data.mock_data is True and config.model.vocab_size == 500


@pytest.mark.parametrize(
    "argv, world, message",
    [
        (
            ["--global-batch-size", "6", "--micro-batch-size", "2"],
            2,
            "--global-batch-size 6 is not divisible by --micro-batch-size x DP = 2 x 2",
        ),
        (
            ["--num-attention-heads", "3", "--tensor-model-parallel-size", "2"],
            2,
            "--num-attention-heads 3 is not divisible by TP 2",
        ),
        (
            ["--num-query-groups", "1", "--tensor-model-parallel-size", "2"],
            2,
            "--num-query-groups 1 is not divisible by TP 2",
        ),
        (
            ["--num-layers", "3", "--pipeline-model-parallel-size", "2"],
            2,
            "--num-layers 3 is not divisible by PP 2",
        ),
        (
            ["--tensor-model-parallel-size", "2"],
            3,
            "world size 3 is not divisible by TP x PP = 2 x 1",
        ),
        (
            ["--num-layers-per-virtual-pipeline-stage", "1"],
            1,
            "--num-layers-per-virtual-pipeline-stage needs PP > 1",
        ),
        (
            ["--hidden-size", "66"],
            1,
            "--hidden-size 66 is not divisible by --num-attention-heads 4; give the head size with "
            "--kv-channels",
        ),
        (["--kv-channels", "0"], 1, "--kv-channels must be >= 1, got 0"),
        (["--sequence-parallel"], 1, "--sequence-parallel needs TP > 1"),
        (
            [
                "--sequence-parallel",
                "--tensor-model-parallel-size",
                "2",
                "--seq-length",
                "33",
                "--max-position-embeddings",
                "64",
            ],
            2,
            "--sequence-parallel needs --seq-length 33 divisible by TP 2",
        ),
        (
            ["--use-rope-scaling", "--rope-scaling-factor", "0"],
            1,
            "--rope-scaling-factor must be > 0, got 0.0",
        ),
        (["--sft-objective", "tsallis"], 1, "tsallis needs parameter q"),
        (["--sft-objective", "bogus"], 1, "unknown name 'bogus'"),
        (["--bf16"], 1, "--bf16 needs --device cuda"),
        (["--save-interval", "5"], 1, "--save-interval needs --save"),
        (["--overlap-param-gather"], 1, "--overlap-param-gather needs --use-distributed-optimizer"),
        (["--lr-decay-style", "step"], 1, "argument --lr-decay-style: invalid choice: 'step'"),
        (["--lr", "fast"], 1, "argument --lr: invalid float value: 'fast'"),
        (["--lr-warmup-iters", "-1"], 1, "--lr-warmup-iters must be >= 0, got -1"),
        (["--lr-decay-iters", "-5"], 1, "--lr-decay-iters must be >= 1, got -5"),
        # Ranges and finiteness: checked when the config section is built, before any work.
        (["--lr", "inf"], 1, "--lr must be a finite number, got inf"),
        (["--lr", "nan"], 1, "--lr must be a finite number, got nan"),
        (["--lr=-1e-4"], 1, "--lr must be >= 0, got -0.0001"),
        (["--lr", "1e-4", "--min-lr", "1e-3"], 1, "--min-lr 0.001 exceeds --lr 0.0001"),
        (["--weight-decay", "-0.1"], 1, "--weight-decay must be >= 0, got -0.1"),
        (["--seed", "-3"], 1, "--seed must be >= 0, got -3"),
        (["--seq-length", "0"], 1, "--seq-length must be >= 1, got 0"),
        (["--clip-grad", "-1"], 1, "--clip-grad must be >= 0, got -1.0"),
        (["--save-interval", "-5"], 1, "--save-interval must be >= 0, got -5"),
        (["--adam-beta2", "1"], 1, "--adam-beta2 must be in [0, 1), got 1.0"),
        (["--micro-batch-size", "0"], 1, "--micro-batch-size must be >= 1, got 0"),
        (["--train-iters", "0"], 1, "--train-iters must be >= 1, got 0"),
        (["--lr-decay-style", "WSD"], 1, "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
        (["--lr-wsd-decay-iters", "5"], 1, "--lr-wsd-decay-iters needs --lr-decay-style WSD"),
        (
            [
                "--lr-decay-style",
                "WSD",
                "--lr-wsd-decay-iters",
                "95",
                "--lr-warmup-iters",
                "10",
                "--train-iters",
                "100",
            ],
            1,
            "--lr-wsd-decay-iters 95 must be in [1, 90] (the --lr-decay-iters 100 after "
            "--lr-warmup-iters 10)",
        ),
        (["--no-such-flag"], 1, "unrecognized arguments: --no-such-flag"),
        (
            ["--data-path", "p"],
            1,
            "give exactly one of --train-data, --data-path, --mock-data "
            "(got --data-path and --mock-data)",
        ),
        (["--overlong", "wrap"], 1, "argument --overlong: invalid choice: 'wrap'"),
        (
            ["--tokenizer-type", "GPT2BPETokenizer"],
            1,
            "argument --tokenizer-type: invalid choice: 'GPT2BPETokenizer'",
        ),
        (
            ["--valid-data", "v.jsonl", "--valid-data-prefix", "v"],
            1,
            "give --valid-data or --valid-data-prefix, not both",
        ),
        (
            ["--num-experts", "6", "--expert-model-parallel-size", "4"],
            4,
            "--num-experts 6 is not divisible by --expert-model-parallel-size 4",
        ),
        (
            ["--num-experts", "2", "--moe-router-topk", "3"],
            1,
            "--moe-router-topk 3 exceeds --num-experts 2",
        ),
        (
            [
                "--num-experts",
                "4",
                "--expert-model-parallel-size",
                "2",
                "--tensor-model-parallel-size",
                "2",
                "--sequence-parallel",
            ],
            2,
            "world size 2 is not divisible by expert TP x EP x PP = 2 x 2 x 1",
        ),
        (
            [
                "--num-experts",
                "4",
                "--expert-model-parallel-size",
                "4",
                "--expert-tensor-parallel-size",
                "1",
            ],
            2,
            "world size 2 is not divisible by expert TP x EP x PP = 1 x 4 x 1",
        ),
        (["--num-experts", "4", "--moe-grouped-gemm"], 1, "--moe-grouped-gemm needs --device cuda"),
        pytest.param(
            ["--num-experts", "4", "--moe-grouped-gemm", "--device", "cuda"],
            1,
            "--moe-grouped-gemm needs --device cuda with Transformer Engine installed",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("transformer_engine") is not None, reason="TE installed"
            ),
        ),
        (
            ["--num-experts", "4", "--tensor-model-parallel-size", "2"],
            2,
            "experts with TP > 1 need --sequence-parallel",
        ),
        (
            ["--expert-model-parallel-size", "2"],
            2,
            "--expert-model-parallel-size/--expert-tensor-parallel-size need --num-experts",
        ),
        (["--num-experts", "0"], 1, "--num-experts must be >= 1, got 0"),
        (
            ["--num-experts", "4", "--moe-layer-freq", "[1,0,1]"],
            1,
            "--moe-layer-freq [1,0,1] has 3 entries, --num-layers is 2",
        ),
        (
            ["--num-experts", "4", "--moe-layer-freq", "__import__('os')"],
            1,
            "--moe-layer-freq \"__import__('os')\": expected an int >= 1 or a list of 0/1",
        ),
        (
            ["--num-experts", "4", "--moe-router-enable-expert-bias"],
            1,
            "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid",
        ),
        (
            ["--num-experts", "4", "--moe-token-dispatcher-type", "flex"],
            1,
            "argument --moe-token-dispatcher-type: invalid choice: 'flex'",
        ),
    ],
)
def test_inconsistent_settings_stop_with_one_line(capsys, argv, world, message):
    with pytest.raises(SystemExit) as stop:
        parse_config(BASE + argv, world_size=world)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("megatron-deft-train: error: ")
    assert message in err


@pytest.mark.parametrize(
    "flags", [["--fp8-format", "hybrid"], ["--num-experts", "4", "--moe-grouped-gemm"]]
)
def test_te_only_features_need_the_te_layer_spec(monkeypatch, capsys, flags):
    """On CUDA with TE importable (pretended here), FP8 and grouped-GEMM experts with another
    attention backend (the local spec, which would drop FP8 or build the legacy GroupedMLP)."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: object() if name == "transformer_engine" else real_find_spec(name, *a),
    )
    argv = BASE + ["--device", "cuda", "--attention-backend", "sdpa", *flags]
    with pytest.raises(SystemExit):
        parse_config(argv, world_size=1)
    err = capsys.readouterr().err
    assert f"{flags[-1 if flags[-1].startswith('--') else 0]} needs --attention-backend te" in err
    assert err.count("\n") == 1


def test_training_data_is_required(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--device", "cpu"], world_size=1)
    assert "give exactly one of --train-data, --data-path, --mock-data" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data-path", "0.7", "a", "0.3"], "--data-path: "),
        (["--data-path", "-1", "a"], "--data-path: "),
        (["--data-path", "a"], "--train-data/--data-path need --tokenizer-model"),
        (["--data-path", "a", "--token-class-key", "tag"], "--token-class-key needs JSONL data"),
    ],
)
def test_preprocessed_data_flags_are_checked_at_startup(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_config(["--device", "cpu"] + argv, world_size=1)
    assert message in capsys.readouterr().err


def test_data_path_takes_megatron_weight_prefix_pairs_from_flags_and_yaml(tmp_path):
    (tmp_path / "tok.model").touch()
    base = ["--device", "cpu", "--tokenizer-model", str(tmp_path / "tok.model")]
    config = parse_config(
        base + ["--data-path", "0.7", "a", "0.3", "b", "--skip-bad-samples", "--overlong", "drop"],
        world_size=1,
    )
    assert config.data.data_path == ["0.7", "a", "0.3", "b"]
    assert config.records.skip_bad_samples is True and config.data.overlong == "drop"
    path = tmp_path / "run.yaml"
    path.write_text("data-path: [0.5, x, 0.5, y]\nvalid_data_prefix: v\n")
    config = parse_config(base + ["--config", str(path)], world_size=1)
    assert config.data.data_path == ["0.5", "x", "0.5", "y"] and config.data.valid_data_prefix == [
        "v"
    ]


def test_yaml_config_with_dashes_or_underscores_and_flag_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "mock-data: true\nvocab_size: 500\ndevice: cpu\nlr: 3.0e-4\n"
        "global-batch-size: 16\nsft_objective: deft\n"
    )
    config = parse_config(["--config", str(path), "--lr", "1e-3"], world_size=1)
    assert config.optimizer.lr == 1e-3  # the flag wins
    assert config.training.global_batch_size == 16 and config.training.sft_objective == "deft"
    assert config.data.mock_data is True and config.model.vocab_size == 500


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("data-format: jsonl", "--data-format 'jsonl' is not one of auto, prompt_response"),
        ("overlong: wrap", "--overlong 'wrap' is not one of truncate, drop"),
        ("tokenizer_type: GPT2BPETokenizer", "--tokenizer-type 'GPT2BPETokenizer' is not one of"),
        ("prompt-key: q\nresponse-key: q", "--prompt-key and --response-key are both 'q'"),
        ("recompute-granularity: some", "--recompute-granularity 'some' is not one of full"),
        ("fp8-recipe: custom", "--fp8-recipe 'custom' is not one of delayed, tensorwise"),
    ],
)
def test_yaml_values_pass_the_sections_own_checks(tmp_path, capsys, yaml_text, message):
    """YAML values bypass argparse's choices: each data section checks itself when built."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text + "\n")
    argv = ["--device", "cpu", "--train-data", "t.jsonl", "--tokenizer-model", "t.model"]
    with pytest.raises(SystemExit):
        parse_config(argv + ["--config", str(path)], world_size=1)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_yaml_unknown_key_names_file_and_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("mock-data: true\nlearning-rate: 0.1\n")
    with pytest.raises(SystemExit):
        parse_config(["--config", str(path)], world_size=1)
    assert f"--config {path}: unknown key 'learning-rate'" in capsys.readouterr().err


def test_entry_point_rejects_bad_flags_before_any_work():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_deft.train",
            "--mock-data",
            "--vocab-size",
            "500",
            "--device",
            "cpu",
            "--num-layers",
            "3",
            "--pipeline-model-parallel-size",
            "2",
        ],
        env=dict(os.environ, PYTHONPATH=REPO_ROOT, WORLD_SIZE="2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "megatron-deft-train: error: --num-layers 3 is not divisible by PP 2"
    )


@pytest.mark.integration
def test_entry_point_runs_as_a_single_process_without_torchrun(tmp_path):
    """No RANK in the environment: one process, in-memory store, no torchrun needed."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_deft.train",
            "--mock-data",
            "--vocab-size",
            "64",
            "--device",
            "cpu",
            "--num-layers",
            "1",
            "--hidden-size",
            "16",
            "--num-attention-heads",
            "2",
            "--seq-length",
            "16",
            "--micro-batch-size",
            "2",
            "--global-batch-size",
            "4",
            "--train-iters",
            "2",
            "--log-interval",
            "1",
            "--save",
            str(tmp_path / "ckpt"),
        ],
        env=dict(env, PYTHONPATH=REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "iteration      2/2 | loss " in done.stderr + done.stdout
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_objective_help_lists_every_spec():
    """The --sft-objective help is generated from the objective specs, not written by hand."""
    from megatron_deft.objectives import OBJECTIVE_NAMES

    help_text = " ".join(build_parser().format_help().split())
    for name in OBJECTIVE_NAMES:
        assert f" {name}" in help_text, name
    assert "OnlyTopLogP-<th>" in help_text


def test_moe_flags_map_onto_the_moe_section():
    config = parse_config(
        BASE
        + "--num-experts 8 --moe-router-topk 2 --expert-model-parallel-size 2 "
        "--moe-router-score-function sigmoid --moe-router-enable-expert-bias "
        "--moe-shared-expert-intermediate-size 96 --moe-shared-expert-gate "
        "--moe-z-loss-coeff 1e-3 --moe-router-dtype fp32 --num-layers 4 "
        "--moe-layer-freq ([0]+[1]*1)*2".split(),
        world_size=2,
    )
    moe = config.moe
    assert (moe.num_experts, moe.moe_router_topk, moe.expert_model_parallel_size) == (8, 2, 2)
    assert moe.moe_router_score_function == "sigmoid" and moe.moe_router_enable_expert_bias
    assert moe.moe_shared_expert_intermediate_size == 96 and moe.moe_shared_expert_gate
    assert moe.moe_z_loss_coeff == 1e-3 and moe.moe_router_dtype == "fp32"
    # Megatron-LM's defaults: allgather dispatcher, aux_loss balancing with coefficient 0
    assert moe.moe_token_dispatcher_type == "allgather" and moe.moe_aux_loss_coeff == 0.0
    assert moe.expert_tensor_parallel_size is None  # megatron-core then uses TP


@pytest.mark.parametrize(
    "freq, layers, pattern",
    [
        ("1", 3, [1, 1, 1]),
        ("2", 5, [1, 0, 1, 0, 1]),
        ("[0,1,1]", 3, [0, 1, 1]),
        ("([0]+[1]*3)*2", 8, [0, 1, 1, 1, 0, 1, 1, 1]),
    ],
)
def test_moe_layer_freq_reads_megatron_lm_patterns(freq, layers, pattern):
    from megatron_deft.config import moe_layer_pattern

    assert moe_layer_pattern(freq, layers) == pattern


def test_config_sections_built_in_code_are_checked_like_the_flags():
    """The evaluator and the converter build configs without the parser: same ranges."""
    from megatron_deft.config import ConfigError, OptimizerConfig, TrainingConfig, config_from_dict

    with pytest.raises(ConfigError, match="^--clip-grad must be >= 0, got -1$"):
        OptimizerConfig(clip_grad=-1)
    with pytest.raises(ConfigError, match="^--lr must be a finite number, got inf$"):
        OptimizerConfig(lr=float("inf"))
    with pytest.raises(ConfigError, match="^--seed must be >= 0, got -1$"):
        TrainingConfig(seed=-1)
    with pytest.raises(ConfigError, match="^--num-layers must be >= 1, got 0$"):
        config_from_dict({"model": {"num_layers": 0}, "unknown_section": {}})
    saved = config_from_dict({"optimizer": {"lr": 3e-4, "no_longer_a_field": 1}})
    assert saved.optimizer.lr == 3e-4 and saved.training == TrainingConfig()


def test_derived_model_defaults_resolve_in_one_place_and_stay_unset():
    from megatron_deft.config import ModelConfig

    model = ModelConfig(hidden_size=96, num_attention_heads=6, seq_length=48)
    resolved = model.resolved()
    assert (resolved.ffn_hidden_size, resolved.num_query_groups) == (4 * 96, 6)
    assert (resolved.kv_channels, resolved.max_position_embeddings) == (96 // 6, 48)
    assert model.ffn_hidden_size is None and model.kv_channels is None  # still "not given"
    given = ModelConfig(ffn_hidden_size=100, num_query_groups=2, kv_channels=8).resolved()
    assert (given.ffn_hidden_size, given.num_query_groups, given.kv_channels) == (100, 2, 8)
