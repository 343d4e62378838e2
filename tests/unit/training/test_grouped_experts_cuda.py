"""Grouped-GEMM experts (TEGroupedMLP) and SequentialMLP share one checkpoint format: a MoE
checkpoint saved by either loads into the other with the same logits. Needs CUDA and Transformer
Engine (the grouped experts are TE's); one torchrun launch (1 rank) of
workers/grouped_experts_cuda.py."""

import importlib.util
import os

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "workers", "grouped_experts_cuda.py")


@pytest.mark.cuda
@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None, reason="needs Transformer Engine"
)
def test_sequential_and_grouped_experts_load_each_others_checkpoints(torchrun, tmp_path):
    result = torchrun(WORKER, 1, tmp_path)
    to_grouped, back = result["max_difference"]
    assert result["scale"] > 0.1  # a random model's logits, not zeros
    assert to_grouped <= 1e-4 * result["scale"] and back <= 1e-4 * result["scale"]
