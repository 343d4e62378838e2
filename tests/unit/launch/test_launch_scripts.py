"""examples/ launch scripts: the command they resolve from env knobs + passthrough flags, on one
node, many nodes and under Slurm (presets: test_presets.py).

Dry runs (DRY_RUN=1) print the command; the tests parse it back into argv and compare it with
the env given and the torchrun/srun option names. Stub `torchrun`, `srun` and `scontrol` on PATH
check the exec path (what actually gets run, per Slurm node) without launching anything. One
test trains the tiny preset for real on CPU through the script.
"""

import json
import math
import os
import re
import shlex
import subprocess

import pytest

from tests.unit.launch.helpers import (
    EXAMPLES,
    PRESETS,
    dry_run,
    last_values,
    run_script,
    slurm_env,
    slurm_stubs,
    split_torchrun,
    torchrun_stub,
)

# ------------------------------------------------------------------------ single node


def test_single_node_resolves_knobs_and_appends_passthrough_last():
    env = {
        "PRESET": "llama3-8b",
        "OBJECTIVE": "deft",
        "NPROC_PER_NODE": "8",
        "TP": "4",
        "SEQ_LENGTH": "8192",
        "DATA": "/data/sft a.jsonl",
        "VALID_DATA": "/data/val.jsonl",
        "TOKENIZER_MODEL": "/models/llama3",
        "SAVE": "/ckpt/run1",
        "SAVE_INTERVAL": "100",
        "LOAD": "/ckpt/run0",
        "TENSORBOARD_DIR": "/tb",
        "PRETRAINED_CHECKPOINT": "/ckpt/hf",
    }
    passthrough = ["--num-layers", "4", "--seed", "7", "--train-data", "it's.jsonl"]
    argv = dry_run("train_single_node.sh", env, passthrough)
    options, flags = split_torchrun(argv)
    assert options == {"--standalone": True, "--nnodes": "1", "--nproc_per_node": "8"}
    assert flags[-len(passthrough) :] == passthrough
    values = last_values(flags)
    expected = {
        "--num-layers": "4",  # the user's flag, after the preset's 32, wins
        "--tensor-model-parallel-size": "4",
        "--seq-length": "8192",
        "--sft-objective": "deft",
        "--train-data": "it's.jsonl",
        "--valid-data": "/data/val.jsonl",
        "--tokenizer-type": "HuggingFaceTokenizer",
        "--tokenizer-model": "/models/llama3",
        "--save": "/ckpt/run1",
        "--save-interval": "100",
        "--load": "/ckpt/run0",
        "--tensorboard-dir": "/tb",
        "--seed": "7",
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
    config = parse_config(flags, world_size=1)
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
    result = run_script(
        "train_single_node.sh", {"PRESET": "qwen2.5-0.5b"}, ["--seed", "1"], stub_dir=tmp_path
    )
    assert result.returncode == 0, result.stderr
    printed, ran = result.stdout.splitlines()
    assert shlex.split(printed)[1:] == json.loads(ran)["argv"]
    assert json.loads(ran)["cuda_max_connections"] == "1"


# ------------------------------------------------------------------------- multi node


def test_multi_node_passes_rendezvous_from_env():
    env = {
        "NNODES": "4",
        "NODE_RANK": "3",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "6001",
        "NPROC_PER_NODE": "8",
        "PRESET": "llama3-70b",
        "OBJECTIVE": "cayley",
    }
    argv = dry_run("train_multi_node.sh", env, ["--lr", "3e-6"])
    options, flags = split_torchrun(argv)
    assert argv[0] == "torchrun"
    assert options == {
        "--nnodes": "4",
        "--node_rank": "3",
        "--nproc_per_node": "8",
        "--master_addr": "10.0.0.1",
        "--master_port": "6001",
    }
    values = last_values(flags)
    assert values["--sft-objective"] == "cayley" and values["--lr"] == "3e-6"
    assert values["--num-layers"] == "80" and values["--hidden-size"] == "8192"
    assert flags[-2:] == ["--lr", "3e-6"]


def test_multi_node_default_port():
    options, _ = split_torchrun(
        dry_run("train_multi_node.sh", {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "node0"})
    )
    assert options["--master_port"] == "29500"


@pytest.mark.parametrize(
    "env, named",
    [
        ({"NNODES": "2"}, ("NODE_RANK", "MASTER_ADDR")),
        ({"NODE_RANK": "1", "MASTER_ADDR": "n0"}, ("NNODES",)),
        ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "n0"}, ("NODE_RANK", "0..1")),
    ],
)
def test_multi_node_refuses_missing_or_bad_rendezvous(env, named):
    result = run_script("train_multi_node.sh", {"DRY_RUN": "1", **env})
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert all(name in line for name in named), line


# ------------------------------------------------------------------------------ slurm


def test_slurm_dry_run_prints_srun_with_per_node_torchrun(tmp_path):
    slurm_stubs(tmp_path, ["gpu07", "gpu08", "gpu09"])
    env = {
        **slurm_env(3),
        "PRESET": "qwen2.5-7b",
        "OBJECTIVE": "tsallis:q=0.5",
        "CONTAINER_IMAGE": "/images/deft.sqsh",
        "CONTAINER_MOUNTS": "/data:/data",
    }
    argv = dry_run("train_slurm.sbatch", env, ["--seed", "5"], stub_dir=tmp_path)
    bash_at = argv.index("bash")
    assert argv[0] == "srun"
    assert argv[1:bash_at] == [
        "--nodes=3",
        "--ntasks=3",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--cpus-per-task=96",
        "--gpus-per-node=8",
        "--container-image=/images/deft.sqsh",
        "--container-mounts=/data:/data",
    ]
    assert argv[bash_at + 1] == "-c"
    # Run what each node's bash runs, as node 2, against the torchrun stub.
    torchrun_stub(tmp_path)
    per_node = subprocess.run(
        argv[bash_at:],
        capture_output=True,
        text=True,
        timeout=30,
        env={"SLURM_NODEID": "2", "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"},
    )
    assert per_node.returncode == 0, per_node.stderr
    options, flags = split_torchrun(["torchrun", *json.loads(per_node.stdout)["argv"]])
    assert options == {
        "--node_rank": "2",
        "--nnodes": "3",
        "--nproc_per_node": "gpu",
        "--master_addr": "gpu07",
        "--master_port": "29500",
    }
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
        assert options == {
            "--node_rank": str(node),
            "--nnodes": "2",
            "--nproc_per_node": "2",
            "--master_addr": "node-a",
            "--master_port": "7000",
        }
        assert flags[-2:] == ["--train-iters", "3"]
    assert runs[0]["argv"][2:] == runs[1]["argv"][2:]  # identical apart from the rank
    srun_options = (tmp_path / "srun_options.txt").read_text().split()
    assert srun_options[:2] == ["--nodes=2", "--ntasks=2"]


def test_slurm_outside_an_allocation_fails_with_one_line():
    result = run_script("train_slurm.sbatch", {"DRY_RUN": "1"})
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "not inside a Slurm allocation" in line


def test_slurm_finds_the_helper_from_the_submit_dir_when_run_from_a_spool_copy(tmp_path):
    """sbatch executes a copy of the script elsewhere; the helper is found via SLURM_SUBMIT_DIR."""
    slurm_stubs(tmp_path, ["gpu07", "gpu08"])
    spool = tmp_path / "spool"
    spool.mkdir()
    copy = spool / "slurm_script"
    copy.write_text((EXAMPLES / "train_slurm.sbatch").read_text())
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "DRY_RUN": "1", **slurm_env(2)}
    result = subprocess.run(
        ["bash", str(copy)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout)[0] == "srun"


# --------------------------------------------------------------------- real CPU training


@pytest.mark.parametrize("preset", PRESETS)
def test_every_generated_flag_is_one_the_trainer_accepts(preset):
    from megatron_deft.training.arguments import accepted_flags

    env = {
        "PRESET": preset,
        "DATA": "d.jsonl",
        "VALID_DATA": "v.jsonl",
        "MOCK_DATA": "1",
        "TOKENIZER_MODEL": "tok",
        "SAVE": "s",
        "LOAD": "l",
        "TENSORBOARD_DIR": "tb",
    }
    _, flags = split_torchrun(dry_run("train_single_node.sh", env))
    unknown = set(last_values(flags)) - set(accepted_flags())
    assert not unknown, f"{preset}: the trainer does not accept {sorted(unknown)}"


def test_tiny_preset_trains_on_cpu_through_the_single_node_script(tmp_path):
    env = {
        "DEVICE": "cpu",
        "NPROC_PER_NODE": "2",
        "TP": "2",
        "PRESET": "tiny",
        "OMP_NUM_THREADS": "1",
    }
    result = run_script(
        "train_single_node.sh",
        env,
        ["--train-iters", "3", "--log-interval", "1"],
        cwd=tmp_path,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    losses = [float(x) for x in re.findall(r"iteration\s+\d+/3 \| loss ([0-9.eE+-]+)", output)]
    assert len(losses) == 3, output[-4000:]
    # Random init with std 0.02 gives near-uniform logits: the first loss is about ln(vocab 512).
    assert abs(losses[0] - math.log(512)) < 0.3, losses
    assert all(math.isfinite(loss) for loss in losses)
