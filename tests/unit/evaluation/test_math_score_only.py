"""megatron-deft-eval --task math --score-only: grades a predictions file without a model or a
tokenizer; Markdown per data set, the JSON report with --output, and the last line
``overall: accuracy=<A> n=<N>``; bad flags and bad records fail in one line."""

import json

import pytest

from megatron_deft import eval as eval_cli
from megatron_deft.evaluation import evaluator, math_grading

PREDICTIONS = [
    {"dataset": "aime", "answer": "204", "prediction": "... so \\boxed{204}"},
    {"dataset": "aime", "answer": "25", "prediction": "... so \\boxed{24}"},
    {"dataset": "math", "answer": "\\frac{1}{2}", "prediction": ["\\boxed{0.5}", "\\boxed{2}"]},
    {"dataset": "math", "answer": "2\\sqrt{2}", "prediction": ["\\boxed{\\sqrt{8}}", "no box"]},
]


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")


@pytest.fixture
def predictions(tmp_path):
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in PREDICTIONS))
    return str(path)


def test_score_only_reports_without_a_model(predictions, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was evaluated")

    monkeypatch.setattr(evaluator, "evaluate", no_model)
    output = tmp_path / "out" / "report.json"
    argv = ["--task", "math", "--score-only", predictions, "--output", str(output)]
    assert eval_cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # aime: 1 of 2 problems right; math: 1 of 2 samples right in each problem.
    assert lines[-1] == "overall: accuracy=0.5000 n=4"
    assert "| aime | 2 | 1 | 0.5000 | 0.5000 | 1.0000 |" in lines
    assert "| math | 2 | 2 | 0.5000 | 1.0000 | 0.7500 |" in lines
    report = json.loads(output.read_text())
    assert report == math_grading.score_predictions(predictions)
    assert report["overall"]["n"] == 4 and report["overall"]["accuracy"] == 0.5


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "math"], "--eval-data is required"),  # a model run, or --score-only
        (
            ["--num-samples", "4", "--eval-data", "x.jsonl", "--load", "c"],
            "--num-samples is the number of sampled answers per problem (--task math); to "
            "evaluate only the first N records use --limit N",
        ),
        (["--task", "math", "--temperature", "0"], "--temperature must be > 0"),
        (["--task", "math", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--score-only", "p.jsonl"], "--score-only grades math answers: add --task math"),
        (["--eval-data", "x.jsonl", "--tokenizer-model", "t"], "--load is required"),
        (["--load", "ckpt", "--tokenizer-model", "t"], "--eval-data is required"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        eval_cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err


def test_bad_record_exits_1_naming_the_line(tmp_path, capsys):
    path = tmp_path / "preds.jsonl"
    path.write_text(json.dumps(PREDICTIONS[0]) + "\n" + json.dumps({"prediction": "x"}) + "\n")
    assert eval_cli.main(["--task", "math", "--score-only", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err == f"megatron-deft-eval: error: {path}:2: 'answer' must be a non-empty string, got None"
    )
