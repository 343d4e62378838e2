"""torchrun worker (2 ranks): a MoE run at EP=2 (distributed optimizer, router losses on)
killed after iteration 3 and resumed from its iteration-2 checkpoint reproduces the
uninterrupted run; loading that checkpoint with other MoE flags stops with one line.
"""

import contextlib
import io
import os
import sys

import torch.distributed as dist
from common import config_for, write_results
from moe_parallel_invariance import moe_args, summary

from megatron_deft.training.trainer import Trainer

MOE = moe_args(ep=2, tp=1) + ["--sft-objective", "deft", "--train-iters", 4]


def local_weights(trainer) -> dict:
    return {n: p.detach().clone() for n, p in trainer.model[0].module.named_parameters()}


def mismatch(argv) -> str:
    """The one-line error of a run loading the checkpoint with these flags ('' if it starts):
    the flags are checked against the recorded architecture when parsed (exit 2)."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            Trainer(config_for(1, 1, argv)).close(keep_process_group=True)
    except SystemExit:
        return stderr.getvalue()
    return ""


def main(out_dir):
    ckpt = os.path.join(out_dir, "ckpt")
    uninterrupted = Trainer(config_for(1, 1, MOE))
    uninterrupted.train()
    reference = local_weights(uninterrupted)
    result = {"uninterrupted": uninterrupted.history}
    uninterrupted.close(keep_process_group=True)

    killed = Trainer(config_for(1, 1, MOE + ["--save", ckpt, "--save-interval", 2]))
    killed.train(stop_after=3)
    killed.close(keep_process_group=True)
    resumed = Trainer(config_for(1, 1, MOE + ["--load", ckpt]))
    result["resumed_from"] = resumed.iteration
    resumed.train()
    result["after_resume"] = resumed.history
    weights = local_weights(resumed)
    result["max_weight_difference"] = max(
        (weights[k] - reference[k]).abs().max().item() for k in reference
    )
    result["num_expert_weights"] = sum(".local_experts." in k for k in weights)
    resumed.close(keep_process_group=True)

    load = ["--load", ckpt, "--finetune"]
    result["topk_mismatch"] = mismatch(MOE + ["--moe-router-topk", 1] + load)
    dense = ["--num-layers", 2, "--hidden-size", 32, "--ffn-hidden-size", 64]
    result["dense_mismatch"] = mismatch(dense + load)
    result = {
        key: summary(value) if key in ("uninterrupted", "after_resume") else value
        for key, value in result.items()
    }
    write_results(out_dir, result)


if __name__ == "__main__":
    main(sys.argv[1])
    dist.destroy_process_group()
