"""Packed rows as THD on a GPU (TE's fused attention, or FlexAttention without TE) give the
dense-mask path's logits, loss and gradients, to bf16 rounding. One torchrun launch (1 rank)
of workers/thd_cuda.py; the CPU counterpart (sdpa, fp32) is in test_single_process.py."""

import os

import pytest

WORKER_DIR = os.path.join(os.path.dirname(__file__), "workers")


@pytest.mark.cuda
def test_packed_thd_on_gpu_matches_the_dense_mask(torchrun, tmp_path):
    thd = torchrun(os.path.join(WORKER_DIR, "thd_cuda.py"), 1, tmp_path)["thd_vs_dense"]
    assert thd["backend"] in ("te", "flex") and thd["same_parameters"]
    assert thd["thd_batch"] and thd["dense_batch"] and thd["same_rows"]
    assert thd["max_logit_difference"] <= 3e-2 * thd["logit_scale"]  # bf16 kernels differ
    thd_loss, dense_loss = thd["loss"]
    assert abs(thd_loss - dense_loss) <= 1e-2 * dense_loss
    assert thd["grads_nonzero"] and thd["min_grad_cosine"] > 0.99
