"""Self-generated SFT tasks with exactly checkable answers (no downloads): for the quickstart, tests
and the objectives experiments.

Every task maps a seeded `random.Random` to one {"prompt", "response"} sample:
    addition  "What is 4821 + 337?"         -> "5158"
    reverse   "Reverse the letters: kqzt"    -> "tzqk"
    sort      "Sort the digits: 50291"       -> "01259"
"""

import json
import os
import random
import string
from typing import Callable, Iterable

Sample = dict


def addition(rng: random.Random, digits: int = 4) -> Sample:
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return {"prompt": f"What is {a} + {b}?", "response": str(a + b)}


def reverse(rng: random.Random, length: int = 6) -> Sample:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, length)))
    return {"prompt": f"Reverse the letters: {word}", "response": word[::-1]}


def sort_digits(rng: random.Random, length: int = 6) -> Sample:
    digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(3, length)))
    return {"prompt": f"Sort the digits: {digits}", "response": "".join(sorted(digits))}


TASKS: dict[str, Callable[[random.Random], Sample]] = {
    "addition": addition,
    "reverse": reverse,
    "sort": sort_digits,
}


def generate(tasks: Iterable[str], count: int, seed: int) -> list[Sample]:
    """`count` samples drawn round-robin from `tasks`, reproducible from `seed`."""
    tasks = list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown synthetic task(s) {unknown or tasks}; valid: {sorted(TASKS)}")
    rng = random.Random(seed)
    return [TASKS[tasks[i % len(tasks)]](rng) for i in range(count)]


def write_jsonl(path: str, samples: Iterable[Sample]) -> None:
    """Writes one JSON object per line, atomically (temp file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")
    os.replace(tmp, path)
