"""Layout arithmetic that needs no megatron import (used by CLI validation)."""


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron's padding: round up to a multiple of ``divisible_by * tp_size``."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def virtual_pipeline_size(config):
    """Model chunks per pipeline rank for the interleaved schedule (None: plain 1F1B)."""
    per_vstage = config.parallel.num_layers_per_virtual_pipeline_stage
    if per_vstage is None:
        return None
    layers_per_stage = config.model.num_layers // config.parallel.pipeline_model_parallel_size
    return layers_per_stage // per_vstage
