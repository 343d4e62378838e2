"""``--task math`` with a model: each problem's greedy and sampled answers, as predictions records.

A math file holds one problem per record (JSONL line or Parquet row): the question under
--prompt-key, else the first of :data:`QUESTION_KEYS` it has, and the reference under
--response-key, else the first of :data:`ANSWER_KEYS` (the layouts of the Qwen2.5-Math
evaluation harness's sets: MATH-500, Minerva, OlympiadBench, AIME, AMC). The prompt is what
training put before a reply: the --prompt-format template, else the chat template (or the
built-in one) up to the assistant's turn; generation stops at EOS or at the token that closes a
trained reply.

Per problem there are 1 + k rows: the greedy one and k sampled ones (--num-samples,
--temperature, --top-p), row j seeded from (--seed, file, problem index, j). Data-parallel ranks
take interleaved shares of the problems; every rank ends with all records, in file order, as
``{dataset, question, answer, prediction, greedy}``: the records --score-only grades
(``prediction`` is the list of sampled texts, or the greedy text when k = 0).
"""

import os
from typing import Dict, List, NamedTuple, Sequence, Tuple

import numpy as np
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_deft.data.chat_format import last_reply_span, tokenize_conversation
from megatron_deft.data.config import RecordFormat
from megatron_deft.data.jsonl import MISSING, record_field
from megatron_deft.data.sources import DataError, reader_for
from megatron_deft.evaluation.generation import Sampler, generate

QUESTION_KEYS = ("problem", "question")
"""Where a math record's question is looked for when --prompt-key is not in it."""
ANSWER_KEYS = ("answer", "final_answer", "solution")
"""Where its reference is looked for when --response-key is not in it (a final answer first,
then a worked solution whose last box is the answer)."""
SPLIT_NAMES = ("test", "train", "val", "valid", "validation")
"""File names that say which split, not which data set: such a file is named by its folder."""
PLACEHOLDER_REPLY = "0"
"""A reply written after the question to find where the assistant's turn starts and ends."""


class Problem(NamedTuple):
    file: int  # position of its file in --eval-data
    index: int  # position in its file
    dataset: str
    question: str
    answer: str


def dataset_name(path: str) -> str:
    """The data set a file holds: its name without the extension, or its folder's name for a
    split file (``aime24/test.jsonl`` -> ``aime24``)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem.lower() in SPLIT_NAMES:
        return os.path.basename(os.path.dirname(os.path.abspath(path))) or stem
    return stem


def read_problems(path: str, file: int, records: RecordFormat, limit: int = 0) -> List[Problem]:
    """The problems of one file (the first ``limit``, 0: all); a record without a question or
    a reference is a DataError at its location."""
    if not os.path.isfile(path):
        raise DataError(path, None, "file does not exist", reason="missing_file")
    reader, name, problems = reader_for(path), dataset_name(path), []
    for number, unit, _ in reader.units(path):
        record = reader.decode(unit, path, number)
        if record is None:
            continue
        question = _text(record, (records.prompt_key, *QUESTION_KEYS), path, number)
        answer = _text(record, (records.response_key, *ANSWER_KEYS), path, number)
        problems.append(Problem(file, len(problems), name, question, answer))
        if len(problems) == limit:
            break
    if not problems:
        raise DataError(path, None, "contains no problems", reason="empty_file")
    return problems


def _text(record: Dict, keys: Sequence[str], path: str, number: int) -> str:
    """The first of ``keys`` the record has, as text: numbers written out, a one-item list
    (OlympiadBench's final_answer) as its item, a longer one joined with commas."""
    values = {key: record_field(record, key) for key in keys}
    key = next((key for key in keys if values[key] not in (MISSING, None, "", [])), None)
    if key is None:
        raise DataError(path, number, f"none of the keys {', '.join(keys)} holds a value")
    value = values[key]
    if isinstance(value, list):
        value = ", ".join(str(item) for item in value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(path, number, f"'{key}' must be text or a number, got {value!r}")
    return str(value)


def prompt_and_stop(question: str, tokenizer, prompt_format) -> Tuple[List[int], int]:
    """(the prompt ids, the id closing a trained reply) for ``question``."""
    messages = (("user", question), ("assistant", PLACEHOLDER_REPLY))
    ids, flags = tokenize_conversation(messages, tokenizer, prompt_format)
    start, end = last_reply_span(flags)
    return ids[:start], ids[end - 1]


def row_seed(seed: int, problem: Problem, sample: int) -> int:
    """The generator seed of one sampled row: independent streams per (file, problem, sample)."""
    sequence = np.random.SeedSequence([seed, problem.file, problem.index, sample])
    return int(sequence.generate_state(1)[0])


def answer_problems(model, tokenizer, problems: List[Problem], config, vocab_size: int) -> list:
    """The predictions records of ``problems`` (module docstring), on every rank."""
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = problems[dp_rank::dp_size]
    k = config.num_samples
    rows = [(problem, sample) for problem in mine for sample in range(1 + k)]  # 0: greedy
    form = config.records.prompt_format
    prepared = {(p.file, p.index): prompt_and_stop(p.question, tokenizer, form) for p in mine}
    texts: Dict[Tuple[int, int], List[str]] = {}
    for start in range(0, len(rows), config.micro_batch_size):
        batch = rows[start : start + config.micro_batch_size]
        prompts = [prepared[(p.file, p.index)] for p, _ in batch]
        seeds = [None if j == 0 else row_seed(config.seed, p, j) for p, j in batch]
        device = next(model.parameters()).device
        sampler = Sampler(seeds, config.temperature, config.top_p, device)
        stop_ids = {tokenizer.eos_id} | {stop for _, stop in prompts}
        generated = generate(
            model,
            [prompt for prompt, _ in prompts],
            stop_ids,
            tokenizer.pad_id,
            config.max_new_tokens,
            vocab_size,
            sampler,
        )
        for (problem, _), ids in zip(batch, generated):
            reply = ids[:-1] if ids and ids[-1] in stop_ids else ids
            texts.setdefault((problem.file, problem.index), []).append(tokenizer.decode(reply))
    records = [_record(problem, texts[(problem.file, problem.index)], k) for problem in mine]
    gathered = [None] * dp_size
    dist.all_gather_object(gathered, records, group=parallel_state.get_data_parallel_group())
    return sorted((r for part in gathered for r in part), key=lambda r: (r["file"], r["index"]))


def _record(problem: Problem, texts: List[str], k: int) -> Dict:
    greedy, sampled = texts[0], texts[1:]
    return {
        "file": problem.file,
        "index": problem.index,
        "dataset": problem.dataset,
        "question": problem.question,
        "answer": problem.answer,
        "prediction": sampled if k else greedy,
        "greedy": greedy,
    }
