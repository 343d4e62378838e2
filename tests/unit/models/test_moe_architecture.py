"""A checkpoint records the MoE architecture; a run whose MoE flags differ is named in one line,
and the flags trainer_flags prints for a recorded MoE architecture rebuild it."""

import pytest

from megatron_deft.models.architecture import (
    architecture_mismatch,
    architecture_of,
    trainer_flags,
)
from megatron_deft.training.arguments import parse_config

BASE = ["--mock-data", "--vocab-size", "500", "--device", "cpu", "--num-layers", "4"]
MOE = ["--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "48"]


def _arch(argv, world_size=1):
    config = parse_config(BASE + argv, world_size=world_size)
    return architecture_of(config.model, 512, config.moe)


@pytest.mark.parametrize(
    "saved, run, message",
    [
        (MOE, [], "--num-experts: the checkpoint has 8, this run has None"),
        ([], MOE, "--num-experts: the checkpoint has None, this run has 8"),
        (
            MOE,
            MOE[:2] + ["--moe-router-topk", "1"] + MOE[4:],
            "--moe-router-topk: the checkpoint has 2, this run has 1",
        ),
        (MOE, MOE[:4], "--moe-ffn-hidden-size: the checkpoint has 48, this run has 256"),
        (
            MOE,
            MOE + ["--moe-layer-freq", "2"],
            "--moe-layer-freq: the checkpoint has [1, 1, 1, 1], this run has [1, 0, 1, 0]",
        ),
        (
            MOE,
            MOE + ["--moe-shared-expert-intermediate-size", "64"],
            "--moe-shared-expert-intermediate-size: the checkpoint has None, this run has 64",
        ),
        (
            MOE,
            MOE + ["--moe-router-pre-softmax"],
            "--moe-router-pre-softmax: the checkpoint has False, this run has True",
        ),
    ],
)
def test_moe_architecture_mismatch_names_the_flag(saved, run, message):
    assert architecture_mismatch(_arch(saved), _arch(run), 1) == message


def test_same_moe_architecture_in_any_layout_and_dense_legacy_checkpoints_match():
    layout = ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]
    assert architecture_mismatch(_arch(MOE), _arch(MOE + layout, 2), 1) == ""
    # the default --moe-layer-freq 1 and the explicit all-MoE list are the same model
    assert architecture_mismatch(_arch(MOE), _arch(MOE + ["--moe-layer-freq", "[1]*4"]), 1) == ""
    dense = _arch([])
    legacy = {k: v for k, v in dense.items() if k != "num_experts"}  # before MoE was recorded
    assert architecture_mismatch(legacy, dense, 1) == ""
    assert architecture_mismatch(legacy, _arch(MOE), 1).startswith("--num-experts")


def test_trainer_flags_rebuild_the_moe_architecture():
    argv = MOE + [
        "--moe-layer-freq",
        "[0,1,1,1]",
        "--moe-shared-expert-intermediate-size",
        "64",
        "--moe-shared-expert-gate",
        "--moe-router-pre-softmax",
    ]
    arch = _arch(argv)
    flags = trainer_flags(arch, None, 128, False)
    rebuilt = parse_config(["--mock-data", "--device", "cpu", *flags])
    assert architecture_of(rebuilt.model, 512, rebuilt.moe) == arch
