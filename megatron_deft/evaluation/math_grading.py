"""Math answer grading: final-answer extraction, equivalence, avg@k and pass@k, the report.

A reply's answer is the content of its last complete ``\\boxed{...}`` (or ``\\fbox{...}``;
nested braces and escaped ``\\{ \\}`` allowed). A reply without one is read for an explicit
final-answer statement, the paper's other prompt formats ("The final answer is $3$. I hope it
is correct." as in Minerva, "Answer: 3", "the answer is 3"), with math-verify's anchored
patterns; a reply with neither has no answer and is wrong. A reference answer is the content of
its last box if it has one (a worked solution), else the whole text. Both are parsed by
math-verify (LaTeX or plain expressions -> SymPy, plus the string) and compared with
``math_verify.verify``: numbers at 6 decimals (0.5 = \\frac{1}{2}), symbolic equality
(2\\sqrt{2} = \\sqrt{8}), sets, intervals, tuples, equations, text.

With k samples per problem, c of them correct:

- accuracy (avg@k) = mean over problems of c / k;
- pass@k = mean over problems of 1 - C(n - c, k) / C(n, k), the unbiased estimator of the
  chance that k of the n samples contain a correct one (Chen et al. 2021); with n = k it is
  1 if any sample is correct.

Predictions file (:func:`score_predictions`; JSONL, or Parquet by the ``.parquet`` suffix): one
record per problem with ``prediction`` (the generated text, or a list of the k sampled texts),
``answer`` (the reference: a final answer or a solution with a box), optionally ``dataset``
(the data set's name; default: the file's name without its extension) and optionally
``greedy`` (the greedy answer's text: the report then adds the greedy accuracy). Other keys are
ignored, so ``megatron-deft-eval --task math --output`` files are graded as they are.
"""

import json
import math
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from megatron_deft.data.sources import DataError, reader_for

BOX_OPENING = re.compile(r"\\(?:boxed|fbox)\s*\{")
BOXED_ANSWER = [LatexExtractionConfig(boxed_match_priority=0)]
"""How a final answer, wrapped in a box, is parsed (the whole box: LaTeX or plain)."""
ANCHORED_ANSWER = [
    LatexExtractionConfig(try_extract_without_anchor=False, boxed_match_priority=-1),
    ExprExtractionConfig(try_extract_without_anchor=False),
]
"""math-verify's final-answer patterns only: no bare number or formula anywhere in the text."""


def last_boxed(text: str) -> Optional[str]:
    """The content of the last complete ``\\boxed{...}``/``\\fbox{...}`` in ``text`` (a box cut
    off by the end of the text is skipped), stripped, without a sentence's final period
    (``\\boxed{104.}``, which math-verify would leave unparsed); None if there is none."""
    for opening in reversed(list(BOX_OPENING.finditer(text))):
        end = _closing_brace(text, opening.end())
        if end is not None:
            return text[opening.end() : end].strip().removesuffix(".").strip()
    return None


def _closing_brace(text: str, position: int) -> Optional[int]:
    """Index of the '}' closing the group opened just before ``position``; escaped braces
    (``\\{``) do not count. None if the text ends first."""
    depth, index = 1, position
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return index
        index += 1
    return None


def parse_answer(answer: str) -> List:
    """A final answer's math-verify parse (SymPy and/or string); [] if it is empty."""
    return parse(f"\\boxed{{{answer}}}", BOXED_ANSWER) if answer.strip() else []


def parse_reply(text: str) -> List:
    """The parse of a generated reply's final answer (see the module docstring); [] if the
    reply states none."""
    boxed = last_boxed(text)
    return parse_answer(boxed) if boxed is not None else parse(text, ANCHORED_ANSWER)


def parse_reference(reference: str) -> List:
    """A reference's parse: its last box if it has one (a worked solution), else all of it."""
    boxed = last_boxed(reference)
    return parse_answer(reference if boxed is None else boxed)


def is_equivalent(reference: List, reply: List) -> bool:
    """``math_verify.verify(reference, reply)``; a reply without an answer is never right."""
    return bool(reply) and bool(reference) and verify(reference, reply)


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k): the chance that k of n samples (c correct), drawn without
    replacement, include a correct one. Exact rational arithmetic, then float."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


@dataclass
class GradedProblem:
    """One problem's samples as graded."""

    dataset: str
    correct: List[bool]
    """Per sample: its answer is equivalent to the reference."""
    answered: List[bool]
    """Per sample: an answer was found in it."""
    greedy: Optional[bool] = None
    """The greedy answer is equivalent to the reference (None: no greedy answer given)."""


def grade_problem(
    dataset: str, reference: str, replies: Sequence[str], greedy: Optional[str] = None
) -> GradedProblem:
    gold = parse_reference(reference)
    parsed = [parse_reply(reply) for reply in replies]
    correct = [is_equivalent(gold, reply) for reply in parsed]
    right = None if greedy is None else is_equivalent(gold, parse_reply(greedy))
    return GradedProblem(dataset, correct, [bool(reply) for reply in parsed], right)


def summarize(problems: Sequence[GradedProblem]) -> Dict:
    """Per-problem means, as a report: k is the fewest samples of any of the set's problems.

    Returns ``{"datasets": {name: stats}, "overall": stats}`` where stats are ``n`` (problems),
    ``k``, ``accuracy`` (avg@k), ``pass_at_k``, ``answered`` (share of samples with an answer)
    and, when every problem has a greedy answer, ``greedy_accuracy``; ``overall`` adds
    ``macro_accuracy``, the mean of the data sets' accuracies."""
    names = sorted({problem.dataset for problem in problems})
    datasets = {name: _stats([p for p in problems if p.dataset == name]) for name in names}
    overall = _stats(problems)
    overall["macro_accuracy"] = sum(s["accuracy"] for s in datasets.values()) / len(datasets)
    return {"datasets": datasets, "overall": overall}


def _stats(problems: Sequence[GradedProblem]) -> Dict:
    k = min(len(problem.correct) for problem in problems)
    samples = [answered for problem in problems for answered in problem.answered]
    stats = {
        "n": len(problems),
        "k": k,
        "accuracy": _mean([_mean(problem.correct) for problem in problems]),
        "pass_at_k": _mean([pass_at_k(len(p.correct), sum(p.correct), k) for p in problems]),
        "answered": _mean(samples),
    }
    if all(problem.greedy is not None for problem in problems):
        stats["greedy_accuracy"] = _mean([problem.greedy for problem in problems])
    return stats


def _mean(values: Sequence) -> float:
    return sum(values) / len(values)


def report_markdown(report: Dict) -> str:
    """The report as a Markdown table: one row per data set, then the overall row (a greedy
    accuracy column when the report has one)."""
    greedy = "greedy_accuracy" in report["overall"]
    lines = [
        "| data set | problems | k | accuracy (avg@k) | pass@k | answered |"
        + (" greedy accuracy |" if greedy else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if greedy else ""),
    ]
    rows = [*report["datasets"].items(), ("overall", report["overall"])]
    for name, stats in rows:
        lines.append(
            f"| {name} | {stats['n']} | {stats['k']} | {stats['accuracy']:.4f} | "
            f"{stats['pass_at_k']:.4f} | {stats['answered']:.4f} |"
            + (f" {stats['greedy_accuracy']:.4f} |" if greedy else "")
        )
    macro = report["overall"]["macro_accuracy"]
    lines.append(f"\nmean accuracy over the data sets: {macro:.4f}")
    return "\n".join(lines)


def report_text(report: Dict) -> str:
    """What the command prints: the Markdown table, then ``overall: accuracy=<A> n=<N>`` (A,
    the overall avg@k, as a fraction) as the last line."""
    overall = report["overall"]
    tail = f"overall: accuracy={overall['accuracy']:.4f} n={overall['n']}"
    return f"{report_markdown(report)}\n{tail}"


def save_report(report: Dict, path: str) -> None:
    """Writes the report as JSON, atomically (temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temp = f"{path}.tmp.{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    os.replace(temp, path)


def score_predictions(path: str) -> Dict:
    """Grades a predictions file (see the module docstring) into :func:`summarize`'s report.

    Raises:
        DataError: a missing or empty file, or a record without a usable ``prediction`` or
            ``answer`` (named ``file:line``).
    """
    if not os.path.isfile(path):
        raise DataError(path, None, "file does not exist", reason="missing_file")
    return grade_records(_records(path), path)


def grade_records(records: Iterable[Tuple[int, Dict]], path: str) -> Dict:
    """:func:`summarize`'s report of ``(number, record)`` predictions records read from
    ``path`` (which names the bad ones, and the data set of records without one)."""
    default_name = os.path.splitext(os.path.basename(path))[0]
    problems = [
        grade_problem(*_prediction_fields(record, path, number, default_name))
        for number, record in records
    ]
    if not problems:
        raise DataError(path, None, "contains no predictions", reason="empty_file")
    return summarize(problems)


def _records(path: str) -> Iterable:
    reader = reader_for(path)
    for number, unit, _ in reader.units(path):
        record = reader.decode(unit, path, number)
        if record is not None:
            yield number, record


def _prediction_fields(
    record: Dict, path: str, number: int, default_name: str
) -> Tuple[str, str, List[str], Optional[str]]:
    """``(dataset, reference, replies, greedy)`` of one record, checked."""
    replies, answer = record.get("prediction"), record.get("answer")
    if isinstance(replies, str):
        replies = [replies]
    if not replies or not all(isinstance(reply, str) for reply in replies):
        message = "'prediction' must be a string or a non-empty list of strings"
        raise DataError(path, number, f"{message}, got {record.get('prediction')!r}")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)  # other engines write numeric references as JSON numbers
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(path, number, f"'answer' must be a non-empty string, got {answer!r}")
    dataset = record.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise DataError(path, number, f"'dataset' must be a string, got {dataset!r}")
    greedy = record.get("greedy")
    if greedy is not None and not isinstance(greedy, str):
        raise DataError(path, number, f"'greedy' must be a string, got {greedy!r}")
    return dataset or default_name, answer, replies, greedy
