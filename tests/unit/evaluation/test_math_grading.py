"""Math grading: final-answer extraction, equivalence on hand-made pairs that must and must not
match, the unbiased pass@k estimator against all k-subsets, and the report of a predictions
file (per data set and overall) checked against hand-computed values."""

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_deft.data import DataError
from megatron_deft.evaluation.math_grading import (
    is_equivalent,
    last_boxed,
    parse_reference,
    parse_reply,
    pass_at_k,
    report_markdown,
    score_predictions,
)

MUST_MATCH = [
    # (reference, reply)
    ("\\frac{1}{2}", "So the probability is \\boxed{0.5}."),
    ("0.5", "$\\boxed{\\frac12}$"),
    ("2\\sqrt{2}", "The side is $\\boxed{\\sqrt{8}}$."),
    ("\\frac{1}{\\sqrt{2}}", "\\boxed{\\frac{\\sqrt{2}}{2}}"),
    ("27.0", "They meet \\boxed{27} miles from A."),
    ("104", "\\boxed{104.}"),
    ("x^2+2x+1", "\\boxed{(x+1)^2}"),
    ("\\{1, 2\\}", "\\boxed{\\{2, 1\\}}"),  # sets: order does not matter
    ("[1, 2)", "\\boxed{[1,2)}"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}"),
    ("\\text{Evelyn}", "\\boxed{\\text{Evelyn}}"),
    ("4", "First \\boxed{3}, but that was wrong: \\boxed{4}"),  # the last box counts
    ("3", "\\boxed{3} and then it was cut off \\boxed{4"),  # an unclosed box does not count
    ("3", "Final Answer: The final answer is $3$. I hope it is correct."),  # Minerva's format
    ("3", "Answer: 3"),
    ("The solution ... so $x = \\boxed{5}$.", "\\boxed{5}"),  # a worked reference: its box
]
MUST_NOT_MATCH = [
    ("3", "\\boxed{4}"),
    ("\\frac{1}{2}", "\\boxed{0.51}"),
    ("[1, 2)", "\\boxed{(1,2)}"),  # interval ends differ
    ("\\{1, 2\\}", "\\boxed{\\{1, 2, 3\\}}"),
    ("3", "\\boxed{3}, no wait: \\boxed{4}"),  # only the last box counts
    ("\\frac{1}{2}", "so the probability is 1/2"),  # a missing box (and no final answer)
    ("3", "\\boxed{}"),
    ("3", ""),
]


@pytest.mark.parametrize("reference, reply", MUST_MATCH)
def test_equivalent_answers_match(reference, reply):
    assert is_equivalent(parse_reference(reference), parse_reply(reply))


@pytest.mark.parametrize("reference, reply", MUST_NOT_MATCH)
def test_different_or_missing_answers_do_not_match(reference, reply):
    assert not is_equivalent(parse_reference(reference), parse_reply(reply))


@pytest.mark.parametrize(
    "text, boxed",
    [
        ("a \\boxed{\\frac{1}{\\sqrt{2}}} b", "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are not groups
        ("\\boxed{1} \\fbox{2}", "2"),
        ("\\boxed {7}", "7"),
        ("\\boxed{ 104. }", "104"),
        ("\\boxed{1} \\boxed{2", "1"),
        ("\\boxedx{1}", None),
        ("no box", None),
    ],
)
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


def _brute_force_pass_at_k(n, c, k):
    """Share of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return np.mean([any(index < c for index in subset) for subset in subsets], dtype=np.float64)


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(
                    _brute_force_pass_at_k(n, c, k), abs=1e-12
                )
    assert pass_at_k(16, 1, 1) == 1 / 16 and pass_at_k(16, 1, 16) == 1.0
    for bad in ((3, 4, 1), (3, 1, 0), (3, 1, 4)):
        with pytest.raises(ValueError, match="pass@k needs"):
            pass_at_k(*bad)


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return str(path)


RIGHT, WRONG, NONE = "\\boxed{1}", "\\boxed{2}", "I am not sure."
PREDICTIONS = [
    # set a: k = 4; problem 1 has 1 of 4 right, problem 2 none (and two samples unanswered)
    {"dataset": "a", "answer": "1", "prediction": [RIGHT, WRONG, WRONG, WRONG]},
    {"dataset": "a", "answer": "1", "prediction": [WRONG, NONE, NONE, WRONG]},
    # set b: k = 2 (the fewest samples); 4 of 4 right and 1 of 2 right; numeric reference
    {"dataset": "b", "answer": 1, "prediction": [RIGHT, RIGHT, RIGHT, RIGHT]},
    {"dataset": "b", "answer": "1", "prediction": [WRONG, RIGHT]},
]


def test_report_per_data_set_and_overall(tmp_path):
    report = score_predictions(_write_jsonl(tmp_path / "preds.jsonl", PREDICTIONS))
    a, b, overall = report["datasets"]["a"], report["datasets"]["b"], report["overall"]
    assert a == dict(n=2, k=4, accuracy=(1 / 4 + 0) / 2, pass_at_k=(1 + 0) / 2, answered=6 / 8)
    # pass@2 of 1-of-2 is 1; of 4-of-4 is 1.
    assert b == dict(n=2, k=2, accuracy=(1 + 1 / 2) / 2, pass_at_k=1.0, answered=1.0)
    # overall k = 2: pass@2 of 1-of-4 right = 1 - C(3,2)/C(4,2) = 1/2.
    assert overall["n"] == 4 and overall["k"] == 2
    assert overall["accuracy"] == pytest.approx((1 / 4 + 0 + 1 + 1 / 2) / 4)
    assert overall["pass_at_k"] == pytest.approx((1 / 2 + 0 + 1 + 1) / 4)
    assert overall["answered"] == pytest.approx(12 / 14)
    assert overall["macro_accuracy"] == pytest.approx((1 / 8 + 3 / 4) / 2)
    table = report_markdown(report).splitlines()
    assert table[2] == "| a | 2 | 4 | 0.1250 | 0.5000 | 0.7500 |"
    assert table[3] == "| b | 2 | 2 | 0.7500 | 1.0000 | 1.0000 |"
    assert table[4].startswith("| overall | 4 | 2 | 0.4375 | 0.6250 |")


def test_single_predictions_default_dataset_and_parquet(tmp_path):
    records = [
        {"prediction": "\\boxed{\\frac{1}{2}}", "answer": "0.5"},
        {"prediction": "\\boxed{3}", "answer": "4"},
    ]
    jsonl = score_predictions(_write_jsonl(tmp_path / "math500.jsonl", records))
    assert list(jsonl["datasets"]) == ["math500"]
    assert jsonl["overall"]["accuracy"] == 0.5 and jsonl["overall"]["k"] == 1
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "math500.parquet")
    assert score_predictions(str(tmp_path / "math500.parquet")) == jsonl


@pytest.mark.parametrize(
    "record, message",
    [
        ({"answer": "1"}, ":2: 'prediction' must be a string or a non-empty list of strings"),
        ({"prediction": [], "answer": "1"}, ":2: 'prediction' must be"),
        ({"prediction": "x", "answer": " "}, ":2: 'answer' must be a non-empty string"),
        ({"prediction": "x", "answer": "1", "dataset": 3}, ":2: 'dataset' must be a string"),
    ],
)
def test_bad_prediction_records_name_the_line(tmp_path, record, message):
    path = _write_jsonl(tmp_path / "p.jsonl", [{"prediction": "x", "answer": "1"}, record])
    with pytest.raises(DataError) as error:
        score_predictions(path)
    assert str(error.value).startswith(path + message)
    with pytest.raises(DataError, match="contains no predictions"):
        score_predictions(_write_jsonl(tmp_path / "empty.jsonl", []))
