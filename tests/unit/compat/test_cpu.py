"""megatron_deft.compat.cpu: idempotent, scoped, and TP=2 logits equal TP=1 logits on CPU."""

import os

import pytest


@pytest.fixture(scope="module")
def results(torchrun, tmp_path_factory):
    worker = os.path.join(os.path.dirname(__file__), "cpu_worker.py")
    return torchrun(worker, 2, tmp_path_factory.mktemp("compat"))


def test_enable_is_idempotent_and_scoped(results):
    assert results["stand_in_unchanged"] is True
    assert results["stand_in_maps_cuda"] == "cpu"
    # The real torch module and Tensor methods are untouched outside the patched call sites.
    assert results["real_torch_cuda_available"] is False
    assert results["real_type_name"] == "torch.FloatTensor"
    assert results["tensor_methods_restored"] is True


def test_tensor_parallel_logits_match_single_rank_logits(results):
    assert results["logits_shape"] == [2, 32, 512]  # vocab 500 padded to 128 x TP multiple
    assert results["logits_scale"] > 0.01
    assert results["logits_max_abs_difference"] <= 1e-5 * results["logits_scale"]
