"""Every ``--flag`` that the package's messages and docstrings name exists: a user who follows
an error message or a docstring never meets "unrecognized arguments"."""

import argparse
import ast
import importlib.util
import pathlib
import re

import pytest

from megatron_deft.evaluation.arguments import build_parser as eval_parser
from megatron_deft.training.arguments import build_parser as train_parser

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOOLS = ("convert_checkpoint", "make_recipe", "make_synthetic_sft", "plot_gate_dynamics")
TOOLS += ("preprocess_sft_data", "train_tokenizer", "gpu_selfcheck")
# Scripts outside tools/ whose flags the tools name (the GPU self-check runs the benchmarks).
SCRIPTS = ("benchmarks/train_bench.py", "benchmarks/loss_bench.py")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*")
# Flags of other programs that the docstrings show, and the placeholder "--flag": torchrun's,
# pip's, pytest's and nvidia-smi's (the GPU self-check runs them).
NOT_OURS = {"--flag", "--nproc_per_node", "--standalone"}
NOT_OURS |= {"--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--target"}
NOT_OURS |= {"--continue-on-collection-errors", "--query-gpu", "--format"}


class _Parsed(Exception):
    """Raised instead of parsing: carries the tool's finished parser."""


def _options(parser: argparse.ArgumentParser) -> set:
    """Every option string of the parser and its sub-commands."""
    options = set()
    for action in parser._actions:
        options |= set(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                options |= _options(sub)
    return options


def _tool_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser a tool's main() builds (``name``: in tools/, or a path from the repository
    root), caught at its parse_args call (nothing runs)."""
    path = ROOT / name if name.endswith(".py") else ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{path.stem}_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def caught(parser, *args, **kwargs):
        raise _Parsed(parser)

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", caught)
        with pytest.raises(_Parsed) as parsed:
            module.main([])
    return parsed.value.args[0]


def _quoted_flags() -> dict:
    """{flag: first 'file:line' naming it} over every string constant (messages, help texts,
    docstrings) of the package and the tools."""
    quoted = {}
    files = sorted((ROOT / "megatron_deft").rglob("*.py")) + sorted((ROOT / "tools").glob("*.py"))
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for flag in FLAG.findall(node.value):
                    quoted.setdefault(flag, f"{path.relative_to(ROOT)}:{node.lineno}")
    return quoted


def test_every_quoted_flag_exists_in_some_parser(monkeypatch):
    known = _options(train_parser()) | _options(eval_parser()) | NOT_OURS
    for name in TOOLS + SCRIPTS:
        known |= _options(_tool_parser(name, monkeypatch))
    quoted = _quoted_flags()
    assert len(quoted) > 50  # the scan sees the messages (it would pass vacuously otherwise)
    unknown = {flag: where for flag, where in quoted.items() if flag not in known}
    assert not unknown, f"flags named in messages/docs that no parser accepts: {unknown}"


SHARED = ("--data-format", "--prompt-key", "--response-key", "--prompt-format")
SHARED += ("--skip-bad-samples",)
SHARED += ("--tokenizer-type", "--tokenizer-model")


def _definition(parser: argparse.ArgumentParser, flag: str):
    """What a user sees of a flag: help, choices, type, values taken, and the parser's default
    (argparse.SUPPRESS: the dataclass field's default applies, declared once)."""
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    kind = type(action).__name__
    return action.help, action.choices, action.type, action.nargs, kind, action.default


def test_record_and_tokenizer_flags_are_defined_once(monkeypatch):
    """The trainer, the evaluator and the data tools accept the same record/tokenizer flags
    with the same help, choices and defaults (all generated from megatron_deft.data.config)."""
    parsers = {
        "train": train_parser(),
        "eval": eval_parser(),
        "preprocess_sft_data": _tool_parser("preprocess_sft_data", monkeypatch),
    }
    train_tokenizer = _tool_parser("train_tokenizer", monkeypatch)
    for flag in SHARED:
        reference = _definition(parsers["train"], flag)
        assert reference[0], f"{flag} has no help"
        for name, parser in parsers.items():
            assert _definition(parser, flag) == reference, (name, flag)
        if "tokenizer" not in flag:  # train_tokenizer makes a tokenizer: it reads one from no one
            assert _definition(train_tokenizer, flag) == reference, ("train_tokenizer", flag)
