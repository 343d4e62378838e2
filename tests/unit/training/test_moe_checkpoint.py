"""MoE checkpoints (EP=2, distributed optimizer, experts sharded over EP): exact resume, and the
recorded MoE architecture refuses other MoE flags in one line (and fills those not given). One
torchrun launch (2 ranks) of workers/moe_checkpoint.py."""

import os

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "workers", "moe_checkpoint.py")


@pytest.fixture(scope="module")
def results(torchrun, tmp_path_factory):
    return torchrun(WORKER, 2, tmp_path_factory.mktemp("moe_checkpoint"), timeout=900)


def test_resumed_moe_run_reproduces_the_uninterrupted_run(results):
    """Saved at iteration 2, resumed to 4: its TensorBoard log (steps 3-4 replacing nothing,
    1-2 from the first run) equals the uninterrupted run's, router losses and load included."""
    uninterrupted, resumed = results["uninterrupted"], results["resumed"]
    assert results["resumed_from"] == 2
    assert uninterrupted["steps"] == resumed["steps"] == [1, 2, 3, 4]
    # same layout, same data, same restored state (experts, router, Adam moments): bitwise
    for key in ("loss", "grad_norm", "moe_load_balancing_loss", "moe_z_loss", "moe_load_imbalance"):
        assert resumed[key] == uninterrupted[key], key
    assert results["max_weight_difference"] == 0.0
    assert results["num_expert_weights"] == 2 * 2 * 2  # layers x local experts x (fc1, fc2)
    assert len(set(uninterrupted["loss"])) == 4  # training changes the loss
    assert all(0.5 < value < 4 for value in uninterrupted["moe_load_balancing_loss"])


def test_other_moe_flags_stop_with_one_line_naming_the_flag(results):
    for key, message in (
        ("topk_mismatch", "--moe-router-topk: the checkpoint has 2, this run has 1"),
        ("experts_mismatch", "--num-experts: the checkpoint has 4, this run has 8"),
    ):
        assert message in results[key] and results[key].count("\n") == 1, results[key]
    assert results["experts_adopted"] == ""  # no MoE flag given: the checkpoint's are adopted
