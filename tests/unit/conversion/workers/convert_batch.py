"""Run several `tools/convert_checkpoint.py` command lines in one process (megatron-core is
imported once). Usage: python convert_batch.py RESULTS.json '[[argv...], [argv...]]'.
Writes [{"argv", "exit_code", "stdout", "stderr"}] to RESULTS.json."""

import contextlib
import io
import json
import os
import sys

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "..", ".."))
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))

import convert_checkpoint  # noqa: E402


def main(results_path, commands):
    results = []
    for argv in commands:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = convert_checkpoint.main(argv)
        results.append(
            {"argv": argv, "exit_code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
        )
    with open(results_path, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":  # the checkpoint writer's spawn context re-imports __main__
    main(sys.argv[1], json.loads(sys.argv[2]))
