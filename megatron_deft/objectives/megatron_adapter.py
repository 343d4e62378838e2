"""Drop-in for `megatron.core.tensor_parallel.vocab_parallel_cross_entropy` that applies an
objective.

megatron-core's `LanguageModule.compute_language_model_loss` (used by `GPTModel` when it is given
labels) calls `tensor_parallel.vocab_parallel_cross_entropy(logits [s, b, V/tp], labels [s, b])` and
expects the per-token loss [s, b]. `megatron_loss_function(objective)` returns a function with
exactly that signature; `use_objective_in_megatron(objective)` installs it (and replaces the fused
cross entropy kernels) for the duration of a `with` block.
The trainer does not need this (it computes the loss from the logits itself, to log the per-token
statistics); it is for users who drive `GPTModel(..., labels=...)` from their own Megatron loop.
"""

import contextlib
from typing import Callable, Optional, Union

import torch

from megatron_deft.objectives.registry import Objective, parse_objective
from megatron_deft.objectives.vocab_parallel import vocab_parallel_loss


def _tensor_parallel_group():
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_tensor_model_parallel_group()


def megatron_loss_function(
    objective: Union[str, Objective], inplace: bool = False, vocab_size: Optional[int] = None
) -> Callable[..., torch.Tensor]:
    """A function `(vocab_parallel_logits, target, label_smoothing=0.0) -> loss [s, b]` for
    `objective`.

    It uses megatron-core's tensor-parallel group (None before `initialize_model_parallel`). With
    `inplace=True` it overwrites fp32 logits like megatron's own cross entropy does (saving one
    logits-sized buffer); leave it False when the caller reads the logits afterwards. `vocab_size`:
    the tokenizer's vocabulary, so the padding ids above it are left out of the softmax (None:
    every column counts, as in megatron's own cross entropy). megatron applies its loss mask
    after this call, so cayley's mean p here is over every label that is not -100 (the trainer's
    is over the loss tokens only): give prompt positions label -100 to leave them out.
    """
    objective = parse_objective(objective)

    def vocab_parallel_objective(vocab_parallel_logits, target, label_smoothing=0.0):
        if label_smoothing:
            raise ValueError(
                f"label_smoothing={label_smoothing} is not supported with SFT objective {objective}"
            )
        loss, _ = vocab_parallel_loss(
            vocab_parallel_logits,
            target,
            objective,
            group=_tensor_parallel_group(),
            vocab_size=vocab_size,
            inplace=inplace,
        )
        return loss

    vocab_parallel_objective.__name__ = f"vocab_parallel_{objective.name}"
    return vocab_parallel_objective


@contextlib.contextmanager
def use_objective_in_megatron(objective: Union[str, Objective], vocab_size: Optional[int] = None):
    """Within the block, megatron-core language models compute their loss with `objective`.

    Covers the three paths of `LanguageModule.compute_language_model_loss`: the plain
    `vocab_parallel_cross_entropy` and, with `cross_entropy_loss_fusion`, the native fused and
    Transformer Engine kernels (otherwise a fused run would silently train plain NLL). GPTModel
    discards its logits after computing the loss, so the installed functions work in place.
    """
    from megatron.core import tensor_parallel
    from megatron.core.models.common.language_module import language_module

    objective = parse_objective(objective)

    def fused(
        logits, labels, tp_group, *unused
    ):  # (logits [s, b, V/tp], labels [s, b], group, ...)
        return vocab_parallel_loss(
            logits, labels, objective, group=tp_group, vocab_size=vocab_size, inplace=True
        )[0]

    patches = [
        (
            tensor_parallel,
            "vocab_parallel_cross_entropy",
            megatron_loss_function(objective, inplace=True, vocab_size=vocab_size),
        ),
        (language_module, "fused_vocab_parallel_cross_entropy", fused),
        (language_module, "te_parallel_cross_entropy", fused),
    ]
    originals = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, function in patches:
        setattr(module, name, function)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
