"""One forward pass through the pipeline stages; the last stage's result on every stage.

megatron-core's forward-only schedule (the one the trainer's evaluation runs, see
:func:`megatron_deft.training.step.run_microbatches`) runs this stage's model chunk on one
micro-batch: the first stage embeds the ids, every stage sends its hidden states [s, b, h] to
the next, and the last stage's output (logits) is reduced there to a small tensor (score sums,
next-token ids). That tensor is broadcast from the last pipeline rank, so every stage goes on
with the same values. Without pipeline parallelism (PP 1, or no model-parallel groups: a plain
module) it is just the forward pass and the reduction.
"""

from typing import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func


def last_stage_result(
    model,
    inputs: dict,
    reduce: Callable[[torch.Tensor], torch.Tensor],
    like: torch.Tensor,
) -> torch.Tensor:
    """``reduce(model(**inputs))`` of the last pipeline stage, on every stage.

    Args:
        model: this stage's model chunk (the schedule sets a later stage's input hidden states;
            the ids in ``inputs`` are read by the first stage only).
        inputs: keyword arguments of the chunk's forward; ``input_ids`` [b, s] gives the shape
            [s, b, h] of the hidden states passed between stages.
        reduce: the last stage's output -> a tensor of ``like``'s shape and dtype.
        like: the shape, dtype and device the other stages receive the result in.
    """
    if not _pipelined():
        return reduce(model(**inputs))
    batch, seq_length = inputs["input_ids"].shape
    outputs = get_forward_backward_func()(
        forward_step_func=lambda _, chunk: (chunk(**inputs), _reducer(reduce)),
        data_iterator=None,
        model=model,
        num_microbatches=1,
        seq_length=seq_length,
        micro_batch_size=batch,
        forward_only=True,
        collect_non_loss_data=True,  # the last stage's reduce(output) is returned as is
    )
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    result = outputs[0].contiguous() if last else torch.empty_like(like)
    dist.broadcast(
        result,
        src=parallel_state.get_pipeline_model_parallel_last_rank(),
        group=parallel_state.get_pipeline_model_parallel_group(),
    )
    return result


def _reducer(reduce):
    """The schedule's loss function under ``collect_non_loss_data``: its result is stored."""
    return lambda output, non_loss_data=True: reduce(output)


def _pipelined() -> bool:
    return (
        parallel_state.model_parallel_is_initialized()
        and parallel_state.get_pipeline_model_parallel_world_size() > 1
    )
