"""MoE checkpoints (EP=2, distributed optimizer, experts sharded over EP): exact resume, and the
recorded MoE architecture refuses other MoE flags in one line. One torchrun launch (2 ranks) of
workers/moe_checkpoint.py."""

import os

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "workers", "moe_checkpoint.py")


@pytest.fixture(scope="module")
def results(torchrun, tmp_path_factory):
    return torchrun(WORKER, 2, tmp_path_factory.mktemp("moe_checkpoint"), timeout=900)


def test_killed_and_resumed_moe_run_reproduces_the_uninterrupted_run(results):
    uninterrupted = results["uninterrupted"]
    assert results["resumed_from"] == 2
    # same layout, same data, same restored state (experts, router, Adam moments): bitwise
    for key in ("loss", "grad_norm", "moe_load_balancing_loss", "moe_z_loss"):
        got = [h[key] for h in results["after_resume"]]
        assert got == [h[key] for h in uninterrupted[2:]], key
    assert results["max_weight_difference"] == 0.0
    assert results["num_expert_weights"] == 2 * 2 * 2  # layers x local experts x (fc1, fc2)
    assert len({h["loss"] for h in uninterrupted}) == 4  # training changes the loss


def test_other_moe_flags_stop_with_one_line_naming_the_flag(results):
    for key, message in (
        ("topk_mismatch", "--moe-router-topk: the checkpoint has 2, this run has 1"),
        ("dense_mismatch", "--num-experts: the checkpoint has 4, this run has None"),
    ):
        assert message in results[key] and results[key].count("\n") == 1, results[key]
