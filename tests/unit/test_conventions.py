"""Shared values are defined once (megatron_deft/conventions.py) and imported everywhere else."""

import ast
import os

from megatron_deft import conventions

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SOURCES = ("megatron_deft", "tools", "benchmarks")


def _python_files():
    for top in SOURCES:
        for folder, _, names in os.walk(os.path.join(REPO_ROOT, top)):
            for name in sorted(names):
                if name.endswith(".py"):
                    yield os.path.join(folder, name)


def _spellings(tree: ast.AST):
    """(line, value) of every spelled-out IGNORE_INDEX (-100) or TRACKER (the file name as a
    whole string) in a module's code; prose that mentions them is not a definition."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value == conventions.TRACKER:
            yield node.lineno, repr(node.value)
        negated = isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
        if negated and isinstance(node.operand, ast.Constant):
            if node.operand.value == -conventions.IGNORE_INDEX:
                yield node.lineno, str(conventions.IGNORE_INDEX)


def test_values_are_spelled_out_only_in_conventions():
    found = []
    for path in _python_files():
        if os.path.samefile(path, conventions.__file__):
            continue
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        where = os.path.relpath(path, REPO_ROOT)
        found += [f"{where}:{line}: {value}" for line, value in _spellings(tree)]
    assert not found, found
