"""Synthetic SFT tasks: answers are right (recomputed from the prompt text), seeded, errors are
clear."""

import json
import re

import pytest

from megatron_deft.data.synthetic_tasks import generate, write_jsonl


def solve(prompt: str) -> str:
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt):
        return str(int(m.group(1)) + int(m.group(2)))
    if m := re.fullmatch(r"Reverse the letters: ([a-z]+)", prompt):
        return "".join(reversed(m.group(1)))
    if m := re.fullmatch(r"Sort the digits: (\d+)", prompt):
        return "".join(sorted(m.group(1)))
    raise AssertionError(f"unexpected prompt {prompt!r}")


def test_answers_are_correct_and_tasks_interleave():
    samples = generate(["addition", "reverse", "sort"], 300, seed=0)
    assert all(solve(s["prompt"]) == s["response"] for s in samples)
    assert samples[0]["prompt"].startswith("What is") and samples[1]["prompt"].startswith("Reverse")


def test_seeded_and_written_atomically(tmp_path):
    assert generate(["addition"], 50, seed=3) == generate(["addition"], 50, seed=3)
    assert generate(["addition"], 50, seed=3) != generate(["addition"], 50, seed=4)
    path = tmp_path / "sub" / "train.jsonl"
    write_jsonl(str(path), generate(["sort"], 7, seed=1))
    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == generate(["sort"], 7, seed=1)
    assert [p.name for p in path.parent.iterdir()] == ["train.jsonl"]  # no temp file left behind


def test_unknown_task_is_a_clear_error():
    with pytest.raises(
        ValueError, match="unknown synthetic task.*valid: \\['addition', 'reverse', 'sort'\\]"
    ):
        generate(["multiplication"], 3, seed=0)
