"""Shared by the launch-script tests: run examples/ scripts in a clean environment, parse a dry
run's printed command back into argv, and stub `torchrun`, `srun` and `scontrol` on PATH."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
SCRIPTS = ("train_single_node.sh", "train_multi_node.sh", "train_slurm.sbatch")
PRESETS = (
    "deepseek-math-7b",
    "llama3-70b",
    "llama3-8b",
    "llama3.1-8b",
    "llama3.2-3b",
    "mixtral-8x7b",
    "qwen2.5-0.5b",
    "qwen2.5-1.5b",
    "qwen2.5-7b",
    "qwen2.5-math-1.5b",
    "qwen2.5-math-7b",
    "qwen3-235b-a22b",
    "qwen3-30b-a3b",
    "qwen3-4b",
    "qwen3-8b",
    "tiny",
    "tiny-moe",
)


def run_script(script, env=None, args=(), stub_dir=None, cwd=ROOT, timeout=30):
    """Run examples/<script> with bash and a clean environment holding only `env`."""
    path = [str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]
    if stub_dir is not None:
        path.insert(0, str(stub_dir))
    full_env = {
        "PATH": os.pathsep.join(path),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LC_ALL": "C",
    }
    full_env.update(env or {})
    return subprocess.run(
        ["bash", str(EXAMPLES / script), *args],
        env=full_env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
    return options, argv[module_at + 2 :]


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
    return write_stub(
        directory,
        "torchrun",
        f"""#!{sys.executable}
import json, os, sys
print(json.dumps({{"argv": sys.argv[1:], "node": os.environ.get("SLURM_NODEID"),
                  "cuda_max_connections": os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")}}))
""",
    )


def slurm_stubs(directory, hosts):
    """`scontrol show hostnames LIST` printing `hosts`; `srun` running its command once per node
    (SLURM_NODEID 0..nodes-1) after recording its own options in srun_options.txt."""
    write_stub(
        directory,
        "scontrol",
        f"""#!/usr/bin/env bash
[[ $1 == show && $2 == hostnames && -n $3 ]] || {{ echo "scontrol stub: bad args $*" >&2; exit 1; }}
printf '%s\\n' {" ".join(hosts)}
""",
    )
    write_stub(
        directory,
        "srun",
        f"""#!/usr/bin/env bash
options=()
while [[ $1 == --* ]]; do options+=("$1"); shift; done
printf '%s\\n' "${{options[@]}}" > {directory}/srun_options.txt
nodes=$(printf '%s\\n' "${{options[@]}}" | sed -n 's/^--nodes=//p')
for ((node = 0; node < nodes; node++)); do SLURM_NODEID=$node "$@" || exit; done
""",
    )


def slurm_env(nodes, nodelist="gpu[07-09]"):
    return {
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_CPUS_ON_NODE": "96",
        "SLURM_GPUS_PER_NODE": "8",
        "SLURM_SUBMIT_DIR": str(ROOT),
    }
