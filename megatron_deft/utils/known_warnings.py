"""Warnings of megatron-core and torch that every run gives and no user can act on, silenced by
their exact messages where they arise; every other warning still shows.

``ignore_import_notices()`` is called by the entry points before megatron-core is imported;
``checkpoint_load_deprecations_ignored()`` wraps each ``dist_checkpointing.load``.
"""

import contextlib
import warnings

IMPORT_NOTICES = (
    # Apex / Transformer Engine are absent by design on CPU: the local fallbacks are intended.
    r".*(Apex|Transformer Engine).*not installed.*",
    # a CUDA-only tuning knob megatron-core asks about when building the model
    r".*CUDA_DEVICE_MAX_CONNECTIONS.*",
    # megatron-core's own default of TransformerConfig.cuda_graph_scope
    r"full scope is deprecated.*",
)
"""Messages (regular expressions) megatron-core warns with while being imported or building
the model."""

CHECKPOINT_LOAD_DEPRECATIONS = (
    # megatron-core 0.16's torch_dist loader calls torch.distributed.checkpoint.load_state_dict
    r"`load_state_dict` is deprecated and will be removed in future versions\. "
    r"Please use `load` instead\.",
    # ... with ShardedTensor metadata, which torch's planners warn about twice
    r"Please use DTensor instead and we are deprecating ShardedTensor\.",
)
"""FutureWarnings torch gives on every dist_checkpointing load (3 per rank)."""


def ignore_import_notices() -> None:
    """Silence :data:`IMPORT_NOTICES` in this process."""
    for message in IMPORT_NOTICES:
        warnings.filterwarnings("ignore", message=message)


@contextlib.contextmanager
def checkpoint_load_deprecations_ignored():
    """Silence :data:`CHECKPOINT_LOAD_DEPRECATIONS` inside the block (the warning filters are
    restored after it)."""
    with warnings.catch_warnings():
        for message in CHECKPOINT_LOAD_DEPRECATIONS:
            warnings.filterwarnings("ignore", message=message, category=FutureWarning)
        yield
