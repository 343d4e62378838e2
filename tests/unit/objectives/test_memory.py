"""Allocation accounting (not timing): forward + backward allocates at most one logits-sized buffer.

Peak bytes above the starting point are read from the CPU profiler's allocation events, so the
result is a deterministic property of the code, not of the machine's load.
"""

import pytest
import torch

from megatron_deft.objectives import vocab_parallel_loss
from megatron_deft.utils.memory import peak_extra_bytes

TOKENS, VOCAB = 256, 4096
SHARD_FP32_BYTES = TOKENS * VOCAB * 4


@pytest.mark.parametrize("objective", ["nll", "deft", "cayley", "eaft"])
@pytest.mark.parametrize(
    "dtype, inplace, budget",
    [
        (torch.float32, False, 1.0),  # the fp32 work buffer, reused as the gradient
        (torch.float32, True, 0.0),  # the caller's buffer is reused
        (torch.bfloat16, False, 1.5),  # fp32 work buffer + the bf16 gradient handed back
    ],
)
def test_fwd_bwd_allocates_at_most_one_logits_buffer(objective, dtype, inplace, budget):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(TOKENS, VOCAB, generator=g).to(dtype).requires_grad_(True)
    target = torch.randint(0, VOCAB, (TOKENS,), generator=g)

    def step():
        loss, _ = vocab_parallel_loss(logits, target, objective, inplace=inplace)
        loss.sum().backward()

    peak = peak_extra_bytes(step)
    allowed = budget * SHARD_FP32_BYTES + 64 * TOKENS * 8  # + per-token vectors ([N] fp32/int64)
    assert peak <= allowed, f"peak {peak / 2**20:.2f} MiB > {allowed / 2**20:.2f} MiB"
