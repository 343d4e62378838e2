"""examples/presets: each public preset carries its model's published architecture, every preset
resolves to the shared run defaults unless it overrides them, and bad preset names or knobs stop
with one line. Expected values are written here independently (the architectures from the
models' Hugging Face config.json files)."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from tests.unit.launch.helpers import (
    EXAMPLES,
    PRESETS,
    SCRIPTS,
    dry_run,
    last_values,
    run_script,
    slurm_env,
    split_torchrun,
)

# Public config.json facts: layers, hidden, SwiGLU inner, heads, kv heads, vocab (embedding rows),
# RoPE theta, RMSNorm eps, context, tied embeddings, q/k/v bias; where the model has them: RoPE
# scaling factor (llama3 type), head size other than hidden / heads, q/k RMSNorm.
ARCHITECTURES = {
    "llama3-8b": dict(
        layers=32,
        hidden=4096,
        ffn=14336,
        heads=32,
        groups=8,
        vocab=128256,
        theta=500000,
        eps=1e-5,
        context=8192,
        tied=False,
        qkv_bias=False,
    ),
    "llama3.1-8b": dict(
        layers=32,
        hidden=4096,
        ffn=14336,
        heads=32,
        groups=8,
        vocab=128256,
        theta=500000,
        eps=1e-5,
        context=131072,
        tied=False,
        qkv_bias=False,
        rope_scaling=8.0,
    ),
    "llama3-70b": dict(
        layers=80,
        hidden=8192,
        ffn=28672,
        heads=64,
        groups=8,
        vocab=128256,
        theta=500000,
        eps=1e-5,
        context=8192,
        tied=False,
        qkv_bias=False,
    ),
    "qwen2.5-7b": dict(
        layers=28,
        hidden=3584,
        ffn=18944,
        heads=28,
        groups=4,
        vocab=152064,
        theta=1000000,
        eps=1e-6,
        context=32768,
        tied=False,
        qkv_bias=True,
    ),
    "qwen2.5-0.5b": dict(
        layers=24,
        hidden=896,
        ffn=4864,
        heads=14,
        groups=2,
        vocab=151936,
        theta=1000000,
        eps=1e-6,
        context=32768,
        tied=True,
        qkv_bias=True,
    ),
    "qwen3-4b": dict(
        layers=36,
        hidden=2560,
        ffn=9728,
        heads=32,
        groups=8,
        vocab=151936,
        theta=1000000,
        eps=1e-6,
        context=40960,
        tied=True,
        qkv_bias=False,
        head_dim=128,
        qk_norm=True,
    ),
    "qwen3-8b": dict(
        layers=36,
        hidden=4096,
        ffn=12288,
        heads=32,
        groups=8,
        vocab=151936,
        theta=1000000,
        eps=1e-6,
        context=40960,
        tied=False,
        qkv_bias=False,
        qk_norm=True,
    ),
    # Mixtures of experts: experts = (E, top-k, expert SwiGLU inner, load-balancing coefficient)
    "qwen3-30b-a3b": dict(
        layers=48,
        hidden=2048,
        ffn=6144,
        heads=32,
        groups=4,
        vocab=151936,
        theta=1000000,
        eps=1e-6,
        context=40960,
        tied=False,
        qkv_bias=False,
        head_dim=128,
        qk_norm=True,
        experts=(128, 8, 768, 1e-3),
    ),
    "qwen3-235b-a22b": dict(
        layers=94,
        hidden=4096,
        ffn=12288,
        heads=64,
        groups=4,
        vocab=151936,
        theta=1000000,
        eps=1e-6,
        context=40960,
        tied=False,
        qkv_bias=False,
        head_dim=128,
        qk_norm=True,
        experts=(128, 8, 1536, 1e-3),
    ),
    "mixtral-8x7b": dict(
        layers=32,
        hidden=4096,
        ffn=14336,
        heads=32,
        groups=8,
        vocab=32000,
        theta=1000000,
        eps=1e-5,
        context=32768,
        tied=False,
        qkv_bias=False,
        experts=(8, 2, 14336, 2e-2),
    ),
    "qwen2.5-1.5b": dict(
        layers=28,
        hidden=1536,
        ffn=8960,
        heads=12,
        groups=2,
        vocab=151936,
        theta=1000000,
        eps=1e-6,
        context=32768,
        tied=True,
        qkv_bias=True,
    ),
    "qwen2.5-math-1.5b": dict(
        layers=28,
        hidden=1536,
        ffn=8960,
        heads=12,
        groups=2,
        vocab=151936,
        theta=10000,
        eps=1e-6,
        context=4096,
        tied=True,
        qkv_bias=True,
    ),
    "qwen2.5-math-7b": dict(
        layers=28,
        hidden=3584,
        ffn=18944,
        heads=28,
        groups=4,
        vocab=152064,
        theta=10000,
        eps=1e-6,
        context=4096,
        tied=False,
        qkv_bias=True,
    ),
    "llama3.2-3b": dict(
        layers=28,
        hidden=3072,
        ffn=8192,
        heads=24,
        groups=8,
        vocab=128256,
        theta=500000,
        eps=1e-5,
        context=131072,
        tied=True,
        qkv_bias=False,
        rope_scaling=32.0,
    ),
    "deepseek-math-7b": dict(
        layers=30,
        hidden=4096,
        ffn=11008,
        heads=32,
        groups=32,
        vocab=102400,
        theta=10000,
        eps=1e-6,
        context=4096,
        tied=False,
        qkv_bias=False,
    ),
}


# Run defaults every preset shares (launch_lib.sh, the one place they are set), as trainer flags,
# and what each preset overrides. Values are those the presets carried before they were shared.
SHARED_RUN_DEFAULTS = {
    "--device": "cuda",
    "--tensor-model-parallel-size": "1",
    "--pipeline-model-parallel-size": "1",
    "--seq-length": "4096",
    "--micro-batch-size": "1",
    "--global-batch-size": "128",
    "--lr": "1e-5",
    "--min-lr": "1e-6",
    "--lr-warmup-iters": "50",
    "--train-iters": "1000",
    "--tokenizer-type": "HuggingFaceTokenizer",
    "--mock-data": None,
    "--recompute-granularity": None,
}
PRESET_RUN_OVERRIDES = {
    "llama3-8b": {"--tensor-model-parallel-size": "2"},
    "llama3.1-8b": {"--tensor-model-parallel-size": "2"},
    "llama3-70b": {
        "--tensor-model-parallel-size": "8",
        "--pipeline-model-parallel-size": "4",
        "--recompute-granularity": "selective",
    },
    "qwen2.5-7b": {"--tensor-model-parallel-size": "2"},
    "qwen3-8b": {"--tensor-model-parallel-size": "2"},
    "qwen3-4b": {},
    "qwen3-30b-a3b": {"--pipeline-model-parallel-size": "2"},
    "qwen3-235b-a22b": {"--tensor-model-parallel-size": "4", "--pipeline-model-parallel-size": "2"},
    "mixtral-8x7b": {"--pipeline-model-parallel-size": "4"},
    "qwen2.5-1.5b": {},
    "qwen2.5-math-1.5b": {},
    "qwen2.5-math-7b": {"--tensor-model-parallel-size": "2"},
    "llama3.2-3b": {},
    "deepseek-math-7b": {"--tensor-model-parallel-size": "2"},
    "qwen2.5-0.5b": {"--micro-batch-size": "4", "--lr": "2e-5", "--min-lr": "2e-6"},
    "tiny": {
        "--device": "cpu",
        "--seq-length": "64",
        "--micro-batch-size": "2",
        "--global-batch-size": "8",
        "--lr": "1e-3",
        "--min-lr": "1e-4",
        "--lr-warmup-iters": "2",
        "--train-iters": "20",
        "--tokenizer-type": "SentencePieceTokenizer",
        "--mock-data": True,
    },
}
PRESET_RUN_OVERRIDES["tiny-moe"] = PRESET_RUN_OVERRIDES["tiny"]
# The DEFAULT_<knob> variable behind each flag above.
RUN_DEFAULT_VARIABLES = {
    "--device": "DEVICE",
    "--tensor-model-parallel-size": "TP",
    "--pipeline-model-parallel-size": "PP",
    "--seq-length": "SEQ_LENGTH",
    "--micro-batch-size": "MICRO_BATCH_SIZE",
    "--global-batch-size": "GLOBAL_BATCH_SIZE",
    "--lr": "LR",
    "--min-lr": "MIN_LR",
    "--lr-warmup-iters": "LR_WARMUP_ITERS",
    "--train-iters": "TRAIN_ITERS",
    "--tokenizer-type": "TOKENIZER_TYPE",
    "--mock-data": "MOCK_DATA",
    "--recompute-granularity": "RECOMPUTE",
}


def architecture_flags(spec):
    return {
        "--num-layers": str(spec["layers"]),
        "--hidden-size": str(spec["hidden"]),
        "--ffn-hidden-size": str(spec["ffn"]),
        "--num-attention-heads": str(spec["heads"]),
        "--num-query-groups": str(spec["groups"]),
        "--vocab-size": str(spec["vocab"]),
        "--max-position-embeddings": str(spec["context"]),
    }


@pytest.mark.parametrize("preset", sorted(ARCHITECTURES))
def test_public_presets_carry_the_published_architecture(preset):
    spec = ARCHITECTURES[preset]
    _, flags = split_torchrun(dry_run("train_single_node.sh", {"PRESET": preset}))
    values = last_values(flags)
    for flag, expected in architecture_flags(spec).items():
        assert values[flag] == expected, (preset, flag)
    assert float(values["--rotary-base"]) == spec["theta"]
    assert float(values["--norm-epsilon"]) == spec["eps"]
    assert ("--untie-embeddings-and-output-weights" in values) == (not spec["tied"])
    assert ("--add-qkv-bias" in values) == spec["qkv_bias"]
    assert ("--use-rope-scaling" in values) == ("rope_scaling" in spec)
    if "rope_scaling" in spec:
        assert float(values["--rope-scaling-factor"]) == spec["rope_scaling"]
    assert values.get("--kv-channels") == (str(spec["head_dim"]) if "head_dim" in spec else None)
    assert ("--qk-layernorm" in values) == spec.get("qk_norm", False)
    # Real presets run on GPUs in bf16 with the distributed optimizer.
    assert values["--device"] == "cuda" and values["--bf16"] is True
    assert values["--use-distributed-optimizer"] is True
    tp = int(values["--tensor-model-parallel-size"])
    pp = int(values["--pipeline-model-parallel-size"])
    assert spec["groups"] % tp == 0 and spec["heads"] % tp == 0 and spec["layers"] % pp == 0
    experts = spec.get("experts")
    moe_flags = ("--num-experts", "--moe-router-topk", "--moe-ffn-hidden-size")
    assert tuple(values.get(flag) for flag in moe_flags) == (
        tuple(map(str, experts[:3])) if experts else (None, None, None)
    )
    if experts:  # every layer MoE, renormalised top-k softmax, no shared expert (HF configs)
        assert float(values["--moe-aux-loss-coeff"]) == experts[3]
        for absent in ("--moe-layer-freq", "--moe-router-pre-softmax", "--moe-shared-expert-gate"):
            assert absent not in values, (preset, absent)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_parses_through_the_trainers_checks(preset):
    """The launcher's command for each preset passes the trainer's parser and validation at
    the world size its layout needs (TP x PP x EP ranks): e.g. experts divisible by EP, EP x
    expert TP x PP dividing the world, heads by TP, sequence parallelism with experts at TP > 1."""
    from megatron_deft.training.arguments import parse_config

    env = {"PRESET": preset, "MOCK_DATA": "1"}  # a data source (the GPU presets name none)
    _, flags = split_torchrun(dry_run("train_single_node.sh", env))
    values = last_values(flags)
    sizes = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size")
    world = int(values[sizes[0]]) * int(values[sizes[1]])
    world *= int(values.get("--expert-model-parallel-size", 1))
    config = parse_config(flags, world_size=world)
    assert config.model.num_layers == int(values["--num-layers"])
    assert config.moe.num_experts == (
        int(values["--num-experts"]) if "--num-experts" in values else None
    )


def run_defaults(values):
    """The run-default flags among resolved trainer flags; None for an absent --mock-data."""
    return {flag: values.get(flag) for flag in SHARED_RUN_DEFAULTS}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_resolve_to_the_shared_run_defaults_unless_they_override(preset):
    # TOKENIZER_MODEL makes --tokenizer-type appear; it changes nothing else.
    _, flags = split_torchrun(
        dry_run("train_single_node.sh", {"PRESET": preset, "TOKENIZER_MODEL": "/tok"})
    )
    expected = {**SHARED_RUN_DEFAULTS, **PRESET_RUN_OVERRIDES[preset]}
    assert run_defaults(last_values(flags)) == expected


def _preset_text(preset: str) -> str:
    """The preset file with the presets it sources (``source .../other.sh``) inlined."""
    text = (EXAMPLES / "presets" / f"{preset}.sh").read_text()
    return re.sub(
        r'^source "\$\(dirname "\$\{BASH_SOURCE\[0\]\}"\)/([\w.-]+)\.sh"$',
        lambda match: _preset_text(match.group(1)),
        text,
        flags=re.M,
    )


def test_no_preset_file_repeats_a_shared_run_default():
    shared = {RUN_DEFAULT_VARIABLES[flag]: value for flag, value in SHARED_RUN_DEFAULTS.items()}
    shared["MOCK_DATA"] = "0"
    for preset in PRESETS:
        text = _preset_text(preset)
        assigned = dict(re.findall(r"^\s*DEFAULT_(\w+)=([^\s#]*)", text, flags=re.M))
        repeated = {name for name, value in assigned.items() if shared.get(name) == value}
        assert not repeated, f"{preset}.sh repeats launch_lib.sh's shared {sorted(repeated)}"
        overridden = {RUN_DEFAULT_VARIABLES[flag] for flag in PRESET_RUN_OVERRIDES[preset]}
        assert set(assigned) - {"QKV_BIAS"} == overridden, preset


def test_a_preset_holding_only_its_architecture_gets_the_shared_run_defaults(tmp_path):
    """A new preset file in a copy of examples/: what launch_lib.sh alone supplies, and the
    one-line errors for a preset that forgets its architecture."""
    examples = tmp_path / "examples"
    (examples / "presets").mkdir(parents=True)
    for name in ("launch_lib.sh", "train_single_node.sh"):
        (examples / name).write_text((EXAMPLES / name).read_text())
    presets = {
        "arch-only": "MODEL_ARGS=(--num-layers 3 --hidden-size 96)\nDEFAULT_QKV_BIAS=0\n",
        "no-model": "DEFAULT_QKV_BIAS=0\n",
        "no-bias": "MODEL_ARGS=(--num-layers 3)\n",
    }
    for name, text in presets.items():
        (examples / "presets" / f"{name}.sh").write_text(text)

    def launch(preset):
        env = {
            "PATH": os.environ["PATH"],
            "DRY_RUN": "1",
            "PRESET": preset,
            "TOKENIZER_MODEL": "/tok",
            "MODEL_ARGS": "--num-layers 99",
            "DEFAULT_QKV_BIAS": "1",
        }
        return subprocess.run(
            ["bash", str(examples / "train_single_node.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    result = launch("arch-only")
    assert result.returncode == 0, result.stderr
    _, flags = split_torchrun(shlex.split(result.stdout))
    values = last_values(flags)
    assert run_defaults(values) == SHARED_RUN_DEFAULTS
    # The architecture is the preset's, never a same-named variable from the environment.
    assert flags.count("--num-layers") == 1 and values["--num-layers"] == "3"
    assert "--add-qkv-bias" not in values
    for preset, message in (
        ("no-model", "sets no MODEL_ARGS"),
        ("no-bias", "must set DEFAULT_QKV_BIAS to 0 or 1"),
    ):
        result = launch(preset)
        assert result.returncode == 2 and result.stdout == ""
        (line,) = result.stderr.strip().splitlines()
        assert f"{preset}.sh" in line and message in line, line


def test_qkv_bias_knob_drops_the_flag():
    _, flags = split_torchrun(
        dry_run("train_single_node.sh", {"PRESET": "qwen2.5-7b", "QKV_BIAS": "0"})
    )
    assert "--add-qkv-bias" not in flags


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"PRESET": "llama3-8b"}, True),  # cuda, TP 2
        ({"PRESET": "llama3-8b", "SEQUENCE_PARALLEL": "0"}, False),
        ({"PRESET": "qwen3-4b"}, False),  # cuda, TP 1
        ({"PRESET": "tiny", "TP": "2"}, False),  # cpu
        ({"PRESET": "tiny", "TP": "2", "SEQUENCE_PARALLEL": "1"}, True),
    ],
)
def test_sequence_parallel_comes_with_tp_on_gpus(env, expected):
    _, flags = split_torchrun(dry_run("train_single_node.sh", env))
    assert ("--sequence-parallel" in flags) == expected


def test_sequence_parallel_knob_must_be_a_switch():
    result = run_script("train_single_node.sh", {"SEQUENCE_PARALLEL": "yes", "DRY_RUN": "1"})
    assert result.returncode == 2
    assert "SEQUENCE_PARALLEL must be 0 or 1, got 'yes'" in result.stderr


FULL_RECOMPUTE = {
    "--recompute-granularity": "full",
    "--recompute-method": "uniform",
    "--recompute-num-layers": "1",
}


@pytest.mark.parametrize(
    "recompute, expected",
    [
        ("none", {}),
        ("selective", {"--recompute-granularity": "selective"}),
        ("full", FULL_RECOMPUTE),
    ],
)
def test_recompute_knob_gives_megatron_lm_flags(recompute, expected):
    _, flags = split_torchrun(dry_run("train_single_node.sh", {"RECOMPUTE": recompute}))
    values = last_values(flags)
    assert {flag: values[flag] for flag in flags if flag.startswith("--recompute")} == expected


def test_tiny_preset_defaults_to_one_cpu_process_on_mock_data():
    argv = dry_run("train_single_node.sh", {})
    options, flags = split_torchrun(argv)
    assert argv[0] == "torchrun"
    assert options == {"--standalone": True, "--nnodes": "1", "--nproc_per_node": "1"}
    values = last_values(flags)
    expected = {
        "--num-layers": "2",
        "--hidden-size": "64",
        "--ffn-hidden-size": "128",
        "--num-attention-heads": "4",
        "--num-query-groups": "2",
        "--seq-length": "64",
        "--device": "cpu",
        "--mock-data": True,
        "--sft-objective": "nll",
        "--tensor-model-parallel-size": "1",
        "--pipeline-model-parallel-size": "1",
    }
    assert {k: values.get(k) for k in expected} == expected
    assert "--bf16" not in values and "--train-data" not in values


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_preset_fails_with_one_line_listing_the_presets(script):
    result = run_script(script, {"PRESET": "llama9-1t", **slurm_env(2)})
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "llama9-1t" in lines[0]
    listed = re.search(r"valid presets: (.*)$", lines[0]).group(1).split(", ")
    assert sorted(listed) == sorted(PRESETS)


def test_preset_name_cannot_be_a_path():
    result = run_script("train_single_node.sh", {"PRESET": "../presets/tiny"})
    assert result.returncode != 0 and "unknown PRESET" in result.stderr


@pytest.mark.parametrize(
    "env, message",
    [
        ({"DEVICE": "tpu"}, "DEVICE must be cpu or cuda"),
        ({"TP": "0"}, "TP must be a positive integer"),
        ({"PP": "two"}, "PP must be a positive integer"),
        ({"RECOMPUTE": "all"}, "RECOMPUTE must be none, selective or full, got 'all'"),
    ],
)
def test_bad_knob_fails_with_one_line(env, message):
    result = run_script("train_single_node.sh", env)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"train_single_node.sh: error: {message}"), line


@pytest.mark.integration
def test_tiny_moe_preset_trains_experts_on_cpu_with_expert_parallelism(tmp_path):
    """PRESET=tiny-moe with EP=2 on 2 CPU ranks: the launcher's own command, 2 iterations."""
    env = {"PRESET": "tiny-moe", "NPROC_PER_NODE": "2", "TRAIN_ITERS": "2"}
    options, flags = split_torchrun(dry_run("train_single_node.sh", env))
    values = last_values(flags)
    assert (values["--num-experts"], values["--moe-router-topk"]) == ("4", "2")
    assert values["--device"] == "cpu" and values["--mock-data"] is True
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "megatron_deft.train",
        *flags,
        "--expert-model-parallel-size",
        "2",
        "--log-interval",
        "1",
    ]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    log = done.stdout + done.stderr
    assert "iteration      2/2" in log
    assert re.search(r"moe: load balancing loss [0-9.]+ \| z loss [0-9.]+", log), log[-3000:]
    assert re.search(r"moe layer 1: tokens per expert \[(\d+ ){3}\d+\]", log), log[-3000:]
