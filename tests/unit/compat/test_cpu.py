"""megatron_deft.compat.cpu: idempotent, scoped, and TP=2 logits equal TP=1 logits on CPU."""

import os
import re

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


def test_docstring_cites_only_files_of_the_repository():
    """Every file path the module's text names (a token with a '/' and a file suffix) exists in
    the repository: a reader of a checkout can follow it."""
    import megatron_deft.compat.cpu as module

    root = os.path.abspath(os.path.join(os.path.dirname(module.__file__), "..", ".."))
    with open(module.__file__, encoding="utf-8") as handle:
        text = handle.read()
    cited = re.findall(r"[\w./-]*/[\w.-]+\.(?:md|py|txt|json|yaml)\b", text)
    assert cited, "the module names the test that exercises it"
    missing = [
        path
        for path in cited
        if os.path.isabs(path) or not os.path.exists(os.path.join(root, path))
    ]
    assert not missing, f"{module.__file__} cites files outside the repository: {missing}"
