"""Checkpoint -> model -> per-file summaries (held-out NLL, objective statistics, exact-match).

The run's architecture comes from the config saved in the checkpoint; the model is built with
the trainer's own code (:func:`megatron_deft.training.setup.initialize_distributed`,
:func:`megatron_deft.models.gpt.build_gpt_chunks`) and its weights loaded with
:func:`megatron_deft.training.checkpointing.load_model_weights` (resharded to this TP/PP).
Layout: world = TP x PP x DP; every pipeline stage runs the same batches (the last stage's
results are broadcast to the others, :mod:`megatron_deft.evaluation.pipeline`); DP ranks take
interleaved shares of the samples and their results are reduced / gathered at the end. With
``--task math`` each checkpoint answers the problems instead
(:mod:`megatron_deft.evaluation.math_answers`) and its report is graded and printed.
"""

import dataclasses
import json
import os
import re
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state

from megatron_deft.config import (
    Config,
    ConfigError,
    FP8Config,
    RecomputeConfig,
    config_from_dict,
)
from megatron_deft.data import build_tokenizer, read_samples
from megatron_deft.data.chat_format import (
    ChatTemplateError,
    last_reply_span,
    tokenize_conversation,
)
from megatron_deft.evaluation import math_answers, math_grading
from megatron_deft.evaluation.arguments import EvalConfig
from megatron_deft.evaluation.generation import generate
from megatron_deft.evaluation.scoring import all_reduce_sums, empty_sums, score_batch, summarize
from megatron_deft.models.attention_backend import backend_of
from megatron_deft.models.layout import padded_vocab_size
from megatron_deft.objectives import parse_objective
from megatron_deft.training import checkpointing, setup


def checkpoint_iterations(root: str, spec: str) -> List[int]:
    """The iterations named by --iteration (latest / all / 100,200) that exist under ``root``."""
    if spec == "latest":
        latest = checkpointing.read_tracker(root)
        if latest is None:
            raise ConfigError(f"--load {root}: no {checkpointing.TRACKER} (no complete checkpoint)")
        return [latest]
    if spec == "all":
        names = os.listdir(root) if os.path.isdir(root) else []
        found = sorted(int(n[5:]) for n in names if n.startswith("iter_") and n[5:].isdigit())
        if not found:
            raise ConfigError(f"--load {root}: no iter_N checkpoint directories")
        return found
    wanted = [int(part) for part in spec.split(",")]
    for iteration in wanted:
        if not os.path.isdir(checkpointing.checkpoint_dir(root, iteration)):
            raise ConfigError(f"--load {root}: no checkpoint for iteration {iteration}")
    return wanted


def run_config(saved: dict, evaluation: EvalConfig, root: str) -> Config:
    """The training Config the checkpoint was saved with, re-laid out for this evaluation."""
    config = config_from_dict(saved)
    par = config.parallel
    par.tensor_model_parallel_size = evaluation.tensor_model_parallel_size
    par.pipeline_model_parallel_size = evaluation.pipeline_model_parallel_size
    par.num_layers_per_virtual_pipeline_stage = None
    par.sequence_parallel = False  # generation grows the sequence a token at a time
    par.distributed_timeout_minutes = evaluation.distributed_timeout_minutes
    # Experts: all E on every rank (EP 1, expert TP = TP), whatever EP the run trained with.
    config.moe.expert_model_parallel_size = 1
    config.moe.expert_tensor_parallel_size = None
    config.training.device = evaluation.device
    config.training.bf16 = config.training.bf16 and evaluation.device == "cuda"
    # The attention kernel is not part of the weights: this machine's own (a run trained with
    # --attention-backend te is scored on a CPU too). Nor is the expert GEMM: grouped (TE's
    # TEGroupedMLP) only where the TE layer spec runs, SequentialMLP elsewhere.
    config.model.attention_backend = "auto"
    config.moe.moe_grouped_gemm = config.moe.moe_grouped_gemm and backend_of(config) == "te"
    config.checkpoint.load = root  # skips the random init: the weights get loaded
    # Training-time trade-offs: evaluation needs no backward to recompute for, and runs its
    # GEMMs in the checkpoint's bf16/fp32 on any device (FP8 would need TE on CUDA).
    config.recompute, config.fp8 = RecomputeConfig(), FP8Config()
    return config


def _padded_vocab(common: dict, vocab_size: int, tp: int, root: str) -> int:
    """The checkpoint's padded vocabulary: its recorded architecture (trained and converted
    checkpoints), else the padding of the TP it was trained with (checkpoints from before the
    architecture was recorded)."""
    if "architecture" in common:
        padded = common["architecture"]["padded_vocab_size"]
    else:
        saved = common["config"]
        padded = padded_vocab_size(
            vocab_size,
            saved["model"]["make_vocab_size_divisible_by"],
            saved["parallel"]["tensor_model_parallel_size"],
        )
    if vocab_size > padded:
        raise ConfigError(
            f"--load {root}: the tokenizer has {vocab_size} ids but the checkpoint's "
            f"output layer only {padded}; use the tokenizer it was trained with"
        )
    if padded % tp:
        raise ConfigError(
            f"--tensor-model-parallel-size {tp} does not divide the checkpoint's "
            f"padded vocabulary {padded}"
        )
    return padded


class EvalItem(NamedTuple):
    """One sample as evaluated: ``prompt`` is exactly the prefix its reply was trained after and
    ``expected`` what the model was trained to produce from it (chat_format.last_reply_span)."""

    index: int  # position in the evaluation file
    prompt: List[int]
    reference: str  # the reply's text in the file
    expected: List[int]
    conversation: Tuple[List[int], List[bool]]  # (ids, loss flags) of the whole sample


def eval_item(
    index: int,
    sample,
    tokenizer,
    answer_pattern: Optional[re.Pattern] = None,
    prompt_format: Optional[str] = None,
) -> EvalItem:
    """The :class:`EvalItem` of one sample (written in ``prompt_format``, --prompt-format, if
    given); with ``answer_pattern``, its expected reply must hold an answer
    (:func:`extract_answer`)."""
    if sample.messages[-1][0] != "assistant":
        raise ConfigError(
            f"{sample.location}: the last message must be the assistant's reference answer"
        )
    try:
        ids, flags = tokenize_conversation(sample.messages, tokenizer, prompt_format)
        start, end = last_reply_span(flags)
    except ChatTemplateError as error:
        raise ConfigError(f"{sample.location}: {error}") from None
    expected = ids[start:end]
    if answer_pattern and extract_answer(answer_pattern, tokenizer.decode(expected)) is None:
        raise ConfigError(
            f"{sample.location}: --answer-pattern "
            f"{answer_pattern.pattern!r} finds no answer in the reference reply"
        )
    return EvalItem(index, ids[:start], sample.messages[-1][1], expected, (ids, flags))


def _split(samples: list, config: EvalConfig, tokenizer, answer_pattern) -> list:
    """:func:`eval_item` of this DP rank's samples."""
    if config.limit:
        samples = samples[: config.limit]
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    return [
        eval_item(index, samples[index], tokenizer, answer_pattern, config.records.prompt_format)
        for index in range(dp_rank, len(samples), dp_size)
    ]


def extract_answer(answer_pattern: re.Pattern, text: str) -> Optional[str]:
    """The first match of ``answer_pattern`` in ``text``: its first group (the whole match if it
    has none), stripped; None without a match."""
    found = answer_pattern.search(text)
    if found is None:
        return None
    return (found.group(1) if answer_pattern.groups else found.group(0)).strip()


def is_exact_match(
    tokenizer,
    generated: List[int],
    expected: List[int],
    answer_pattern: Optional[re.Pattern] = None,
) -> bool:
    """The generation's text equals the expected ids' text (both decoded, stripped): the reply
    and the token closing the turn, which generation stops at (EOS or the template's
    end-of-turn token). With ``answer_pattern``: the answers extracted from both texts are
    equal (a generation without one does not match)."""
    generated_text, expected_text = tokenizer.decode(generated), tokenizer.decode(expected)
    if answer_pattern is None:
        return generated_text.strip() == expected_text.strip()
    answer = extract_answer(answer_pattern, generated_text)
    return answer is not None and answer == extract_answer(answer_pattern, expected_text)


def evaluate_file(
    model, tokenizer, path: str, config: EvalConfig, objective, vocab_size: int
) -> tuple:
    """(summary, predictions) of one JSONL file; predictions only on global rank 0. Generation
    stops at EOS or at the token closing the expected replies; see :func:`is_exact_match`."""
    samples, report = read_samples([path], config.records)
    answer_pattern = re.compile(config.answer_pattern) if config.answer_pattern else None
    mine = _split(samples, config, tokenizer, answer_pattern)
    tp_group = parallel_state.get_tensor_model_parallel_group()
    device = next(model.parameters()).device
    sums = empty_sums(device)
    predictions = []
    for start in range(0, len(mine), config.micro_batch_size):
        batch = mine[start : start + config.micro_batch_size]
        sums += score_batch(
            model,
            [item.conversation for item in batch],
            tokenizer.pad_id,
            objective,
            vocab_size,
            tp_group,
        )
        stop_ids = {tokenizer.eos_id} | {item.expected[-1] for item in batch}
        generated = generate(
            model,
            [item.prompt for item in batch],
            stop_ids,
            tokenizer.pad_id,
            config.max_new_tokens,
            vocab_size,
        )
        for item, ids in zip(batch, generated):
            text = tokenizer.decode(ids)
            prediction = {
                "index": item.index,
                "reference": item.reference,
                "generated": text,
                "expected": tokenizer.decode(item.expected),
                "exact": is_exact_match(tokenizer, ids, item.expected, answer_pattern),
            }
            if answer_pattern:
                prediction["answer"] = extract_answer(answer_pattern, text)
            predictions.append(prediction)
    dp_group = parallel_state.get_data_parallel_group()
    all_reduce_sums(sums, dp_group)
    gathered = [None] * parallel_state.get_data_parallel_world_size()
    dist.all_gather_object(gathered, predictions, group=dp_group)
    predictions = sorted((p for part in gathered for p in part), key=lambda p: p["index"])
    summary = {
        "data": path,
        "num_samples": len(predictions),
        "exact_match": sum(p["exact"] for p in predictions) / max(len(predictions), 1),
        "objective": str(objective),
        **summarize(sums, objective),
    }
    if answer_pattern:
        summary["answer_pattern"] = answer_pattern.pattern
    if config.records.skip_bad_samples:
        summary["skipped"] = dict(report.skipped)
    return summary, predictions


def _write_jsonl(path: str, records: List[Dict]) -> None:
    """Atomic write: temp file, then rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    temp = f"{path}.tmp.{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    os.replace(temp, path)


def _prepare(config: EvalConfig, root: str, iterations: List[int], tokenizer) -> dict:
    """What evaluating the checkpoints under ``root`` needs: iterations, run config, vocab."""
    first = checkpointing.checkpoint_dir(root, iterations[0])
    common = dist_checkpointing.load_common_state_dict(first)
    run = run_config(common["config"], config, root)
    if run.model.num_layers % config.pipeline_model_parallel_size:
        raise ConfigError(
            f"--pipeline-model-parallel-size {config.pipeline_model_parallel_size} does not "
            f"divide the {run.model.num_layers} layers of the checkpoint under {root}"
        )
    vocab_size = run.model.vocab_size or tokenizer.vocab_size
    return dict(
        root=root,
        iterations=iterations,
        run=run,
        vocab_size=vocab_size,
        padded=_padded_vocab(common, vocab_size, config.tensor_model_parallel_size, root),
        objective=parse_objective(config.sft_objective or run.training.sft_objective),
    )


def _evaluate_root(job: dict, model, tokenizer, config: EvalConfig, is_rank0: bool) -> tuple:
    summaries, predictions = [], []
    for iteration in job["iterations"]:
        directory = checkpointing.checkpoint_dir(job["root"], iteration)
        if not config.no_verify_checkpoint:
            checkpointing.verify_checksums(directory)
        checkpointing.load_model_weights(directory, [model])
        where = {"load": job["root"], "iteration": iteration}
        if config.task == "math":
            report, records = _evaluate_math(model, tokenizer, config, job["vocab_size"])
            summaries.append({**where, **report})
            predictions += [{**where, **record} for record in records]
            if is_rank0:
                text = math_grading.report_text(report)
                print(f"{job['root']} iteration {iteration}:\n{text}", flush=True)
            continue
        for path in config.data_paths():
            summary, preds = evaluate_file(
                model, tokenizer, path, config, job["objective"], job["vocab_size"]
            )
            summaries.append({"load": job["root"], "iteration": iteration, **summary})
            predictions += [
                {"load": job["root"], "iteration": iteration, "data": path, **p} for p in preds
            ]
            if is_rank0:
                print(json.dumps(summaries[-1]), flush=True)
    return summaries, predictions


def _evaluate_math(model, tokenizer, config: EvalConfig, vocab_size: int) -> tuple:
    """(report, predictions records) of the math problems of every --eval-data file."""
    problems = [
        problem
        for file, path in enumerate(config.data_paths())
        for problem in math_answers.read_problems(path, file, config.records, config.limit)
    ]
    records = math_answers.answer_problems(model, tokenizer, problems, config, vocab_size)
    report = math_grading.grade_records(enumerate(records), "model answers")
    return report, records


def _tokenizer(config: EvalConfig):
    """The tokenizer of --tokenizer-type / --tokenizer-model; a file it cannot load (missing,
    not a tokenizer, no EOS) is a ConfigError naming the flags."""
    kind, path = config.tokenizer.tokenizer_type, config.tokenizer.tokenizer_model
    try:
        return build_tokenizer(kind, path)
    except (ValueError, RuntimeError, OSError) as error:  # the tokenizer libraries' load errors
        raise ConfigError(f"--tokenizer-type {kind} --tokenizer-model {path}: {error}") from None


def evaluate(config: EvalConfig, keep_process_group: bool = False) -> List[Dict]:
    """Every requested checkpoint of every --load root x every file; returns the summaries (on
    every rank) and writes --output / --summary-output and the summary lines on stdout from
    global rank 0. The model is rebuilt only when the architecture changes between roots."""
    from megatron_deft.models.gpt import build_gpt_chunks

    # Cheap checks first: every checkpoint and file exists before anything is built.
    iterations = {
        root: checkpoint_iterations(root, config.iteration) for root in config.load_paths()
    }
    for path in config.data_paths():
        if not os.path.isfile(path):
            raise ConfigError(f"--eval-data {path}: no such file")
    tokenizer = _tokenizer(config)
    jobs = [_prepare(config, root, its, tokenizer) for root, its in iterations.items()]
    setup.initialize_distributed(jobs[0]["run"])
    is_rank0 = dist.get_rank() == 0
    summaries, predictions, built, model = [], [], None, None
    try:
        for job in jobs:
            run = job["run"]
            architecture = (
                dataclasses.asdict(run.model),
                dataclasses.asdict(run.moe),
                job["padded"],
            )
            if architecture != built:
                model, built = build_gpt_chunks(job["run"], job["padded"])[0], architecture
                model.fused_output_loss = not config.unfused_output_loss  # scoring; decoding
                model.eval()  # (under an inference context) always gets logits
            done = _evaluate_root(job, model, tokenizer, config, is_rank0)
            summaries += done[0]
            predictions += done[1]
    finally:
        setup.destroy_distributed(keep_process_group)
    if is_rank0:
        if config.output:
            _write_jsonl(config.output, predictions)
        if config.summary_output:
            _write_jsonl(config.summary_output, summaries)
    return summaries
