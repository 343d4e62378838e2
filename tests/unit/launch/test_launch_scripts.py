"""examples/ launch scripts: the command they resolve from PRESET + env knobs + passthrough flags.

Dry runs (DRY_RUN=1) print the command; the tests parse it back into argv and compare it with
values written here independently: the public models' architectures (from their Hugging Face
config.json files), the env given, and the torchrun/srun option names. Stub `torchrun`, `srun`
and `scontrol` on PATH check the exec path (what actually gets run, per Slurm node) without
launching anything. One test trains the tiny preset for real on CPU through the script.
"""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
SCRIPTS = ("train_single_node.sh", "train_multi_node.sh", "train_slurm.sbatch")
PRESETS = ("llama3-70b", "llama3-8b", "qwen2.5-0.5b", "qwen2.5-7b", "tiny")

# Public config.json facts: layers, hidden, SwiGLU inner, heads, kv heads, vocab (embedding rows),
# RoPE theta, RMSNorm eps, context, tied embeddings, q/k/v bias.
ARCHITECTURES = {
    "llama3-8b": dict(layers=32, hidden=4096, ffn=14336, heads=32, groups=8, vocab=128256,
                      theta=500000, eps=1e-5, context=8192, tied=False, qkv_bias=False),
    "llama3-70b": dict(layers=80, hidden=8192, ffn=28672, heads=64, groups=8, vocab=128256,
                       theta=500000, eps=1e-5, context=8192, tied=False, qkv_bias=False),
    "qwen2.5-7b": dict(layers=28, hidden=3584, ffn=18944, heads=28, groups=4, vocab=152064,
                       theta=1000000, eps=1e-6, context=32768, tied=False, qkv_bias=True),
    "qwen2.5-0.5b": dict(layers=24, hidden=896, ffn=4864, heads=14, groups=2, vocab=151936,
                         theta=1000000, eps=1e-6, context=32768, tied=True, qkv_bias=True),
}


# Run defaults every preset shares (launch_lib.sh, the one place they are set), as trainer flags,
# and what each preset overrides. Values are those the presets carried before they were shared.
SHARED_RUN_DEFAULTS = {
    "--device": "cuda", "--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "1",
    "--seq-length": "4096", "--micro-batch-size": "1", "--global-batch-size": "128",
    "--lr": "1e-5", "--min-lr": "1e-6", "--lr-warmup-iters": "50", "--train-iters": "1000",
    "--tokenizer-type": "HuggingFaceTokenizer", "--mock-data": None,
}
PRESET_RUN_OVERRIDES = {
    "llama3-8b": {"--tensor-model-parallel-size": "2"},
    "llama3-70b": {"--tensor-model-parallel-size": "8", "--pipeline-model-parallel-size": "4"},
    "qwen2.5-7b": {"--tensor-model-parallel-size": "2"},
    "qwen2.5-0.5b": {"--micro-batch-size": "4", "--lr": "2e-5", "--min-lr": "2e-6"},
    "tiny": {"--device": "cpu", "--seq-length": "64", "--micro-batch-size": "2",
             "--global-batch-size": "8", "--lr": "1e-3", "--min-lr": "1e-4",
             "--lr-warmup-iters": "2", "--train-iters": "20",
             "--tokenizer-type": "SentencePieceTokenizer", "--mock-data": True},
}
# The DEFAULT_<knob> variable behind each flag above.
RUN_DEFAULT_VARIABLES = {
    "--device": "DEVICE", "--tensor-model-parallel-size": "TP",
    "--pipeline-model-parallel-size": "PP", "--seq-length": "SEQ_LENGTH",
    "--micro-batch-size": "MICRO_BATCH_SIZE", "--global-batch-size": "GLOBAL_BATCH_SIZE",
    "--lr": "LR", "--min-lr": "MIN_LR", "--lr-warmup-iters": "LR_WARMUP_ITERS",
    "--train-iters": "TRAIN_ITERS", "--tokenizer-type": "TOKENIZER_TYPE", "--mock-data": "MOCK_DATA",
}


def run_script(script, env=None, args=(), stub_dir=None, cwd=ROOT, timeout=30):
    """Run examples/<script> with bash and a clean environment holding only `env`."""
    path = [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]
    if stub_dir is not None:
        path.insert(0, str(stub_dir))
    full_env = {"PATH": os.pathsep.join(path), "HOME": os.environ.get("HOME", "/tmp"),
                "LC_ALL": "C"}
    full_env.update(env or {})
    return subprocess.run(["bash", str(EXAMPLES / script), *args], env=full_env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def dry_run(script, env, args=(), stub_dir=None):
    """argv of the command a dry run prints (its only stdout line)."""
    result = run_script(script, {"DRY_RUN": "1", **env}, args, stub_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return shlex.split(lines[0])


def split_torchrun(argv):
    """torchrun argv -> ({launcher option: value or True}, trainer flags after -m module)."""
    module_at = argv.index("-m")
    assert argv[module_at + 1] == "megatron_deft.train"
    options, tokens = {}, argv[1:module_at]
    while tokens:
        name = tokens.pop(0)
        has_value = tokens and not tokens[0].startswith("--")
        options[name] = tokens.pop(0) if has_value else True
    return options, argv[module_at + 2:]


def last_values(flags):
    """Trainer flags -> {flag: last value, or True for a flag without a value} (argparse's rule)."""
    values, index = {}, 0
    while index < len(flags):
        name = flags[index]
        assert name.startswith("--"), f"stray token {name!r} in {flags}"
        if index + 1 < len(flags) and not flags[index + 1].startswith("--"):
            values[name], index = flags[index + 1], index + 2
        else:
            values[name], index = True, index + 1
    return values


def write_stub(directory, name, body):
    stub = directory / name
    stub.write_text(body)
    stub.chmod(0o755)
    return stub


def torchrun_stub(directory):
    """A `torchrun` printing one JSON line: argv, SLURM_NODEID, CUDA_DEVICE_MAX_CONNECTIONS."""
    return write_stub(directory, "torchrun", f"""#!{sys.executable}
import json, os, sys
print(json.dumps({{"argv": sys.argv[1:], "node": os.environ.get("SLURM_NODEID"),
                  "cuda_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")}}))
""")


def slurm_stubs(directory, hosts):
    """`scontrol show hostnames LIST` printing `hosts`; `srun` running its command once per node
    (SLURM_NODEID 0..nodes-1) after recording its own options in srun_options.txt."""
    write_stub(directory, "scontrol", f"""#!/usr/bin/env bash
[[ $1 == show && $2 == hostnames && -n $3 ]] || {{ echo "scontrol stub: bad args $*" >&2; exit 1; }}
printf '%s\\n' {' '.join(hosts)}
""")
    write_stub(directory, "srun", f"""#!/usr/bin/env bash
options=()
while [[ $1 == --* ]]; do options+=("$1"); shift; done
printf '%s\\n' "${{options[@]}}" > {directory}/srun_options.txt
nodes=$(printf '%s\\n' "${{options[@]}}" | sed -n 's/^--nodes=//p')
for ((node = 0; node < nodes; node++)); do SLURM_NODEID=$node "$@" || exit; done
""")


def slurm_env(nodes, nodelist="gpu[07-09]"):
    return {"SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": str(nodes),
            "SLURM_CPUS_ON_NODE": "96", "SLURM_GPUS_PER_NODE": "8", "SLURM_SUBMIT_DIR": str(ROOT)}


def architecture_flags(spec):
    return {
        "--num-layers": str(spec["layers"]), "--hidden-size": str(spec["hidden"]),
        "--ffn-hidden-size": str(spec["ffn"]), "--num-attention-heads": str(spec["heads"]),
        "--num-query-groups": str(spec["groups"]), "--vocab-size": str(spec["vocab"]),
        "--max-position-embeddings": str(spec["context"]),
    }


# ---------------------------------------------------------------------------- presets


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
    # Real presets run on GPUs in bf16 with the distributed optimizer.
    assert values["--device"] == "cuda" and values["--bf16"] is True
    assert values["--use-distributed-optimizer"] is True
    tp = int(values["--tensor-model-parallel-size"])
    pp = int(values["--pipeline-model-parallel-size"])
    assert spec["groups"] % tp == 0 and spec["heads"] % tp == 0 and spec["layers"] % pp == 0


def run_defaults(values):
    """The run-default flags among resolved trainer flags; None for an absent --mock-data."""
    return {flag: values.get(flag) for flag in SHARED_RUN_DEFAULTS}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_resolve_to_the_shared_run_defaults_unless_they_override(preset):
    # TOKENIZER_MODEL makes --tokenizer-type appear; it changes nothing else.
    _, flags = split_torchrun(dry_run("train_single_node.sh",
                                      {"PRESET": preset, "TOKENIZER_MODEL": "/tok"}))
    expected = {**SHARED_RUN_DEFAULTS, **PRESET_RUN_OVERRIDES[preset]}
    assert run_defaults(last_values(flags)) == expected


def test_no_preset_file_repeats_a_shared_run_default():
    shared = {RUN_DEFAULT_VARIABLES[flag]: value for flag, value in SHARED_RUN_DEFAULTS.items()}
    shared["MOCK_DATA"] = "0"
    for preset in PRESETS:
        text = (EXAMPLES / "presets" / f"{preset}.sh").read_text()
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
    presets = {"arch-only": "MODEL_ARGS=(--num-layers 3 --hidden-size 96)\nDEFAULT_QKV_BIAS=0\n",
               "no-model": "DEFAULT_QKV_BIAS=0\n",
               "no-bias": "MODEL_ARGS=(--num-layers 3)\n"}
    for name, text in presets.items():
        (examples / "presets" / f"{name}.sh").write_text(text)

    def launch(preset):
        env = {"PATH": os.environ["PATH"], "DRY_RUN": "1", "PRESET": preset,
               "TOKENIZER_MODEL": "/tok", "MODEL_ARGS": "--num-layers 99", "DEFAULT_QKV_BIAS": "1"}
        return subprocess.run(["bash", str(examples / "train_single_node.sh")], env=env,
                              capture_output=True, text=True, timeout=30)

    result = launch("arch-only")
    assert result.returncode == 0, result.stderr
    _, flags = split_torchrun(shlex.split(result.stdout))
    values = last_values(flags)
    assert run_defaults(values) == SHARED_RUN_DEFAULTS
    # The architecture is the preset's, never a same-named variable from the environment.
    assert flags.count("--num-layers") == 1 and values["--num-layers"] == "3"
    assert "--add-qkv-bias" not in values
    for preset, message in (("no-model", "sets no MODEL_ARGS"),
                            ("no-bias", "must set DEFAULT_QKV_BIAS to 0 or 1")):
        result = launch(preset)
        assert result.returncode == 2 and result.stdout == ""
        line, = result.stderr.strip().splitlines()
        assert f"{preset}.sh" in line and message in line, line


def test_qkv_bias_knob_drops_the_flag():
    _, flags = split_torchrun(dry_run("train_single_node.sh",
                                      {"PRESET": "qwen2.5-7b", "QKV_BIAS": "0"}))
    assert "--add-qkv-bias" not in flags


def test_tiny_preset_defaults_to_one_cpu_process_on_mock_data():
    argv = dry_run("train_single_node.sh", {})
    options, flags = split_torchrun(argv)
    assert argv[0] == "torchrun"
    assert options == {"--standalone": True, "--nnodes": "1", "--nproc_per_node": "1"}
    values = last_values(flags)
    expected = {"--num-layers": "2", "--hidden-size": "64", "--ffn-hidden-size": "128",
                "--num-attention-heads": "4", "--num-query-groups": "2", "--seq-length": "64",
                "--device": "cpu", "--mock-data": True, "--sft-objective": "nll",
                "--tensor-model-parallel-size": "1", "--pipeline-model-parallel-size": "1"}
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


@pytest.mark.parametrize("env, message", [
    ({"DEVICE": "tpu"}, "DEVICE must be cpu or cuda"),
    ({"TP": "0"}, "TP must be a positive integer"),
    ({"PP": "two"}, "PP must be a positive integer"),
])
def test_bad_knob_fails_with_one_line(env, message):
    result = run_script("train_single_node.sh", env)
    assert result.returncode == 2 and result.stdout == ""
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"train_single_node.sh: error: {message}"), line


# ------------------------------------------------------------------------ single node


def test_single_node_resolves_knobs_and_appends_passthrough_last():
    env = {"PRESET": "llama3-8b", "OBJECTIVE": "deft", "NPROC_PER_NODE": "8", "TP": "4",
           "SEQ_LENGTH": "8192", "DATA": "/data/sft a.jsonl", "VALID_DATA": "/data/val.jsonl",
           "TOKENIZER_MODEL": "/models/llama3", "SAVE": "/ckpt/run1", "SAVE_INTERVAL": "100",
           "LOAD": "/ckpt/run0", "TENSORBOARD_DIR": "/tb", "PRETRAINED_CHECKPOINT": "/ckpt/hf"}
    passthrough = ["--num-layers", "4", "--seed", "7", "--train-data", "it's.jsonl"]
    argv = dry_run("train_single_node.sh", env, passthrough)
    options, flags = split_torchrun(argv)
    assert options == {"--standalone": True, "--nnodes": "1", "--nproc_per_node": "8"}
    assert flags[-len(passthrough):] == passthrough
    values = last_values(flags)
    expected = {
        "--num-layers": "4",  # the user's flag, after the preset's 32, wins
        "--tensor-model-parallel-size": "4", "--seq-length": "8192",
        "--sft-objective": "deft", "--train-data": "it's.jsonl",
        "--valid-data": "/data/val.jsonl", "--tokenizer-type": "HuggingFaceTokenizer",
        "--tokenizer-model": "/models/llama3", "--save": "/ckpt/run1", "--save-interval": "100",
        "--load": "/ckpt/run0", "--tensorboard-dir": "/tb", "--seed": "7",
        "--pretrained-checkpoint": "/ckpt/hf",
    }
    assert {k: values.get(k) for k in expected} == expected
    assert flags[flags.index("--num-layers") + 1] == "32"  # the preset's value is still there
    assert flags[flags.index("--train-data") + 1] == "/data/sft a.jsonl"
    assert "--mock-data" not in values  # real data given: no synthetic rows


def test_lr_schedule_knobs_reach_the_trainer_and_parse():
    from megatron_deft.training.arguments import parse_config

    env = {"LR_DECAY_STYLE": "WSD", "LR_WSD_DECAY_ITERS": "30", "TRAIN_ITERS": "200"}
    _, flags = split_torchrun(dry_run("train_single_node.sh", env))
    config = parse_config(flags[2:], world_size=1)  # after "-m megatron_deft.train"
    assert config.optimizer.lr_decay_style == "WSD"
    assert config.optimizer.lr_wsd_decay_iters == 30 and config.training.train_iters == 200
    _, flags = split_torchrun(dry_run("train_single_node.sh", {}))
    assert last_values(flags)["--lr-decay-style"] == "cosine"
    assert "--lr-wsd-decay-iters" not in flags


def test_cpu_process_count_defaults_to_the_model_parallel_size():
    options, _ = split_torchrun(dry_run("train_single_node.sh", {"TP": "2", "PP": "2"}))
    assert options["--nproc_per_node"] == "4"


def test_single_node_exec_runs_the_printed_command(tmp_path):
    torchrun_stub(tmp_path)
    result = run_script("train_single_node.sh", {"PRESET": "qwen2.5-0.5b"}, ["--seed", "1"],
                        stub_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    printed, ran = result.stdout.splitlines()
    assert shlex.split(printed)[1:] == json.loads(ran)["argv"]
    assert json.loads(ran)["cuda_max_connections"] == "1"


# ------------------------------------------------------------------------- multi node


def test_multi_node_passes_rendezvous_from_env():
    env = {"NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6001",
           "NPROC_PER_NODE": "8", "PRESET": "llama3-70b", "OBJECTIVE": "cayley"}
    argv = dry_run("train_multi_node.sh", env, ["--lr", "3e-6"])
    options, flags = split_torchrun(argv)
    assert argv[0] == "torchrun"
    assert options == {"--nnodes": "4", "--node_rank": "3", "--nproc_per_node": "8",
                       "--master_addr": "10.0.0.1", "--master_port": "6001"}
    values = last_values(flags)
    assert values["--sft-objective"] == "cayley" and values["--lr"] == "3e-6"
    assert values["--num-layers"] == "80" and values["--hidden-size"] == "8192"
    assert flags[-2:] == ["--lr", "3e-6"]


def test_multi_node_default_port():
    options, _ = split_torchrun(dry_run(
        "train_multi_node.sh", {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "node0"}))
    assert options["--master_port"] == "29500"


@pytest.mark.parametrize("env, named", [
    ({"NNODES": "2"}, ("NODE_RANK", "MASTER_ADDR")),
    ({"NODE_RANK": "1", "MASTER_ADDR": "n0"}, ("NNODES",)),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "n0"}, ("NODE_RANK", "0..1")),
])
def test_multi_node_refuses_missing_or_bad_rendezvous(env, named):
    result = run_script("train_multi_node.sh", {"DRY_RUN": "1", **env})
    assert result.returncode == 2 and result.stdout == ""
    line, = result.stderr.strip().splitlines()
    assert all(name in line for name in named), line


# ------------------------------------------------------------------------------ slurm


def test_slurm_dry_run_prints_srun_with_per_node_torchrun(tmp_path):
    slurm_stubs(tmp_path, ["gpu07", "gpu08", "gpu09"])
    env = {**slurm_env(3), "PRESET": "qwen2.5-7b", "OBJECTIVE": "tsallis:q=0.5",
           "CONTAINER_IMAGE": "/images/deft.sqsh", "CONTAINER_MOUNTS": "/data:/data"}
    argv = dry_run("train_slurm.sbatch", env, ["--seed", "5"], stub_dir=tmp_path)
    bash_at = argv.index("bash")
    assert argv[0] == "srun"
    assert argv[1:bash_at] == ["--nodes=3", "--ntasks=3", "--ntasks-per-node=1",
                               "--kill-on-bad-exit=1", "--cpus-per-task=96", "--gpus-per-node=8",
                               "--container-image=/images/deft.sqsh",
                               "--container-mounts=/data:/data"]
    assert argv[bash_at + 1] == "-c"
    # Run what each node's bash runs, as node 2, against the torchrun stub.
    torchrun_stub(tmp_path)
    per_node = subprocess.run(argv[bash_at:], capture_output=True, text=True, timeout=30, env={
        "SLURM_NODEID": "2", "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"})
    assert per_node.returncode == 0, per_node.stderr
    options, flags = split_torchrun(["torchrun", *json.loads(per_node.stdout)["argv"]])
    assert options == {"--node_rank": "2", "--nnodes": "3", "--nproc_per_node": "gpu",
                       "--master_addr": "gpu07", "--master_port": "29500"}
    values = last_values(flags)
    assert values["--sft-objective"] == "tsallis:q=0.5" and values["--num-layers"] == "28"
    assert flags[-2:] == ["--seed", "5"]


def test_slurm_runs_one_torchrun_per_node_with_its_rank(tmp_path):
    slurm_stubs(tmp_path, ["node-a", "node-b"])
    torchrun_stub(tmp_path)
    env = {**slurm_env(2, "node-[a-b]"), "PRESET": "tiny", "TP": "2", "MASTER_PORT": "7000"}
    result = run_script("train_slurm.sbatch", env, ["--train-iters", "3"], stub_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = [json.loads(line) for line in result.stdout.splitlines()[1:]]
    assert [run["node"] for run in runs] == ["0", "1"]
    for node, run in enumerate(runs):
        options, flags = split_torchrun(["torchrun", *run["argv"]])
        assert options == {"--node_rank": str(node), "--nnodes": "2", "--nproc_per_node": "2",
                           "--master_addr": "node-a", "--master_port": "7000"}
        assert flags[-2:] == ["--train-iters", "3"]
    assert runs[0]["argv"][2:] == runs[1]["argv"][2:]  # identical apart from the rank
    srun_options = (tmp_path / "srun_options.txt").read_text().split()
    assert srun_options[:2] == ["--nodes=2", "--ntasks=2"]


def test_slurm_outside_an_allocation_fails_with_one_line():
    result = run_script("train_slurm.sbatch", {"DRY_RUN": "1"})
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert "not inside a Slurm allocation" in line


def test_slurm_finds_the_helper_from_the_submit_dir_when_run_from_a_spool_copy(tmp_path):
    """sbatch executes a copy of the script elsewhere; the helper is found via SLURM_SUBMIT_DIR."""
    slurm_stubs(tmp_path, ["gpu07", "gpu08"])
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"
    copy.write_text((EXAMPLES / "train_slurm.sbatch").read_text())
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "DRY_RUN": "1",
           **slurm_env(2)}
    result = subprocess.run(["bash", str(copy)], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout)[0] == "srun"


# --------------------------------------------------------------------- real CPU training


@pytest.mark.parametrize("preset", PRESETS)
def test_every_generated_flag_is_one_the_trainer_accepts(preset):
    from megatron_deft.training.arguments import accepted_flags

    env = {"PRESET": preset, "DATA": "d.jsonl", "VALID_DATA": "v.jsonl", "MOCK_DATA": "1",
           "TOKENIZER_MODEL": "tok", "SAVE": "s", "LOAD": "l", "TENSORBOARD_DIR": "tb"}
    _, flags = split_torchrun(dry_run("train_single_node.sh", env))
    unknown = set(last_values(flags)) - set(accepted_flags())
    assert not unknown, f"{preset}: the trainer does not accept {sorted(unknown)}"


def test_tiny_preset_trains_on_cpu_through_the_single_node_script(tmp_path):
    env = {"DEVICE": "cpu", "NPROC_PER_NODE": "2", "TP": "2", "PRESET": "tiny",
           "OMP_NUM_THREADS": "1"}
    result = run_script("train_single_node.sh", env, ["--train-iters", "3", "--log-interval", "1"],
                        cwd=tmp_path, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    losses = [float(x) for x in re.findall(r"iteration\s+\d+/3 \| loss ([0-9.eE+-]+)", output)]
    assert len(losses) == 3, output[-4000:]
    # Random init with std 0.02 gives near-uniform logits: the first loss is about ln(vocab 512).
    assert abs(losses[0] - math.log(512)) < 0.3, losses
    assert all(math.isfinite(loss) for loss in losses)
