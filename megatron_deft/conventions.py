"""Values and types that separate parts of megatron-deft (and files on disk) must agree on,
defined once.

This module imports nothing, so light modules (the argument parser, the benchmark driver) use
it without importing torch or megatron-core.
"""

IGNORE_INDEX = -100
"""Label of a position that carries no loss (PyTorch's cross-entropy default)."""

TRACKER = "latest_checkpointed_iteration.txt"
"""File in a checkpoint root naming its latest complete iteration (Megatron-LM's name)."""

LEGACY_STAT_NAMES = {"alpha": "exponent"}
"""Statistic names in logs and evaluation summaries written before a rename -> today's: the
q-log exponent a was logged as "alpha" (the name of EAFT's parameter)."""


class ConfigError(ValueError):
    """A bad or inconsistent setting; the message is one line naming the flag(s). (Here, not in
    config.py, so the data modules that config.py imports can raise it too.)"""
