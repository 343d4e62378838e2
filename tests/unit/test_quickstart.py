"""The README's main job, examples/quickstart.sh, runs end to end on CPU: data, tokenizer, TP=2 SFT
with deft, validation, checkpoint, reload + resume, TensorBoard logs."""

import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_quickstart_trains_evaluates_saves_and_resumes(tmp_path):
    run_dir = tmp_path / "qs"
    env = dict(
        os.environ,
        RUN_DIR=str(run_dir),
        PYTHON=sys.executable,
        TORCHRUN=os.path.join(os.path.dirname(sys.executable), "torchrun"),
        PYTHONPATH=str(ROOT),
    )
    done = subprocess.run(
        ["bash", str(ROOT / "examples" / "quickstart.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]

    nll = {
        int(m.group(1)): float(m.group(2))
        for m in re.finditer(r"iteration +(\d+)/300 \| loss \S+ \| nll (\S+)", log)
    }
    assert set(nll) >= {25, 300}
    assert nll[300] < 0.8 * nll[25]  # it learns
    valid = re.search(r"validation at iteration 300 \| loss \S+ \| nll (\S+)", log)
    assert valid and float(valid.group(1)) < 0.75 * math.log(512)
    assert "--sft-objective deft" in log and "--tensor-model-parallel-size 2" in log
    assert f"loaded {run_dir}/checkpoints at iteration 300" in log
    assert (
        run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    ).read_text().strip() == "320"
    assert any(
        name.startswith("events.out.tfevents") for name in os.listdir(run_dir / "tensorboard")
    )
    assert f"TensorBoard logs: {run_dir}/tensorboard" in log
