"""The README's newcomer commands stay true: CI runs exactly the README's test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]


def readme_command(heading: str) -> str:
    """The single-line bash block that first follows a line starting with `heading` in README.md."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^{heading}.*?\n```bash\n([^\n]+)\n```", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no bash block after {heading!r}"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = readme_command("Tests:")
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines
    assert "pytest" in command and "torch==2.13.0" in command


def test_main_job_command_installs_cpu_torch_first_and_runs_the_quickstart():
    command = readme_command("Main job:")
    assert command.index("pip install torch==2.13.0") < command.index("pip install -e .")
    assert command.endswith("examples/quickstart.sh")  # tests/unit/test_quickstart.py runs it
