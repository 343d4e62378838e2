"""Token-level SFT objectives on vocab-parallel logits (see vocab_parallel.py for the math)."""

from megatron_deft.objectives.linear_vocab_parallel import linear_vocab_parallel_loss
from megatron_deft.objectives.megatron_adapter import (
    megatron_loss_function,
    use_objective_in_megatron,
)
from megatron_deft.objectives.registry import OBJECTIVE_NAMES, Objective, parse_objective
from megatron_deft.objectives.vocab_parallel import IGNORE_INDEX, vocab_parallel_loss

__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVE_NAMES",
    "Objective",
    "linear_vocab_parallel_loss",
    "megatron_loss_function",
    "parse_objective",
    "use_objective_in_megatron",
    "vocab_parallel_loss",
]
