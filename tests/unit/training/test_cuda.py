"""On one GPU (skipped without CUDA; tools/gpu_selfcheck.py runs them with ``-m cuda``): NCCL,
training steps in fp32 and bf16 from the same init and batches, and bf16 + FP8 when Transformer
Engine is importable. One torchrun launch of workers/cuda_steps.py."""

import importlib.util
import math
import os

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "workers", "cuda_steps.py")
HAVE_TE = importlib.util.find_spec("transformer_engine") is not None

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def results(torchrun, tmp_path_factory):
    return torchrun(WORKER, 1, tmp_path_factory.mktemp("cuda"))


def _losses(results, case):
    return [record["loss"] for record in results[case]["history"]]


def test_training_runs_on_the_gpu_through_nccl(results):
    for case in ("fp32", "bf16"):
        run = results[case]
        assert run["backend"] == "nccl" and run["param_device"] == "cuda", case
        assert run["nccl_sum"] == 3.0
        assert all(record["updated"] for record in run["history"]), case
    assert results["fp32"]["param_dtype"] == "torch.float32"
    assert results["bf16"]["param_dtype"] == "torch.bfloat16"


def test_transformer_engine_spec_is_used_where_te_is_importable(results):
    """Unpacked rows on CUDA: the TE layer spec when TE imports, the local spec otherwise."""
    te_modules = results["bf16"]["te_linears"]
    assert te_modules > 0 if HAVE_TE else te_modules == 0


def test_bf16_steps_follow_the_fp32_steps(results):
    """Same init and batches: bf16 rounding (8 bits of mantissa) moves the first loss by far
    less than 1%; training lowers the loss in both."""
    fp32, bf16 = _losses(results, "fp32"), _losses(results, "bf16")
    assert abs(bf16[0] - fp32[0]) <= 1e-2 * fp32[0]
    for losses in (fp32, bf16):
        assert all(math.isfinite(loss) for loss in losses)
    assert results["bf16"]["history"][0]["tokens"] == results["fp32"]["history"][0]["tokens"]


def test_fp8_steps_run_the_layers_in_fp8_and_the_output_layer_in_bf16(results):
    if results["fp8"] is None:
        pytest.skip("needs Transformer Engine and a GPU of compute capability 8.9 or newer")
    fp8, bf16 = results["fp8"], _losses(results, "bf16")
    assert fp8["te_linears"] > 0 and fp8["te_linears_in_fp8"] == fp8["te_linears"]
    assert fp8["output_weight"] == ["Parameter", "torch.bfloat16"]
    losses = _losses(results, "fp8")
    assert all(math.isfinite(loss) for loss in losses)
    assert abs(losses[0] - bf16[0]) <= 5e-2 * bf16[0]  # FP8 GEMMs: a few % at most
    assert results["bf16"]["te_linears_in_fp8"] == 0
