"""Drop-in for `megatron.core.tensor_parallel.vocab_parallel_cross_entropy` that applies an objective.

megatron-core's `LanguageModule.compute_language_model_loss` (used by `GPTModel` when it is given
labels) calls `tensor_parallel.vocab_parallel_cross_entropy(logits [s, b, V/tp], labels [s, b])` and
expects the per-token loss [s, b]. `megatron_loss_function(objective)` returns a function with exactly
that signature; `use_objective_in_megatron(objective)` installs it for the duration of a `with` block.
The trainer does not need this (it computes the loss from the logits itself, to log the per-token
statistics); it is for users who drive `GPTModel(..., labels=...)` from their own Megatron loop.
"""

import contextlib
from typing import Callable, Union

import torch

from megatron_deft.objectives.registry import Objective, parse_objective
from megatron_deft.objectives.vocab_parallel import vocab_parallel_loss


def _tensor_parallel_group():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def megatron_loss_function(
    objective: Union[str, Objective], inplace: bool = False
) -> Callable[..., torch.Tensor]:
    """A function `(vocab_parallel_logits, target, label_smoothing=0.0) -> loss [s, b]` for `objective`.

    It uses megatron-core's tensor-parallel group (None before `initialize_model_parallel`). With
    `inplace=True` it overwrites fp32 logits like megatron's own cross entropy does (saving one
    logits-sized buffer); leave it False when the caller reads the logits afterwards.
    """
    objective = parse_objective(objective)

    def vocab_parallel_objective(vocab_parallel_logits, target, label_smoothing=0.0):
        if label_smoothing:
            raise ValueError(
                f"label_smoothing={label_smoothing} is not supported with SFT objective {objective}"
            )
        loss, _ = vocab_parallel_loss(
            vocab_parallel_logits, target, objective, group=_tensor_parallel_group(), inplace=inplace
        )
        return loss

    vocab_parallel_objective.__name__ = f"vocab_parallel_{objective.name}"
    return vocab_parallel_objective


@contextlib.contextmanager
def use_objective_in_megatron(objective: Union[str, Objective]):
    """Within the block, megatron-core language models compute their loss with `objective`.

    GPTModel discards its logits after computing the loss, so the installed function works in place.
    """
    from megatron.core import tensor_parallel

    original = tensor_parallel.vocab_parallel_cross_entropy
    tensor_parallel.vocab_parallel_cross_entropy = megatron_loss_function(objective, inplace=True)
    try:
        yield
    finally:
        tensor_parallel.vocab_parallel_cross_entropy = original
