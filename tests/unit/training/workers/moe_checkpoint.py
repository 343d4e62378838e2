"""torchrun worker (2 ranks): a MoE run at EP=2 (distributed optimizer, router losses on) saved
at iteration 2 and resumed from there reproduces the uninterrupted 4-iteration run (as its
TensorBoard log shows: loss, grad norm and the router losses, which also checks they are
logged); loading that checkpoint with other MoE flags stops with one line, without any it
adopts the checkpoint's.
"""

import contextlib
import io
import os
import sys

import torch.distributed as dist
from common import config_for, write_results
from moe_parallel_invariance import moe_args

from megatron_deft.training.trainer import Trainer
from tools.gate_dynamics_logs import read_scalars

MOE = moe_args(ep=2, tp=1) + ["--sft-objective", "deft", "--train-iters", 4, "--log-interval", 1]
MOE += ["--lr-decay-iters", 4]  # the schedule of the full run, also in the one saved at 2
LOGGED = ("loss", "grad_norm", "moe_load_balancing_loss", "moe_z_loss", "moe_load_imbalance")


def run(flags) -> dict:
    """Train to --train-iters; this rank's local weights and the iteration it started from."""
    trainer = Trainer(config_for(1, 1, MOE + flags))
    started = trainer.iteration
    trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.model[0].module.named_parameters()}
    trainer.close(keep_process_group=True)
    return {"started": started, "weights": weights}


def logged(tensorboard_dir: str) -> dict:
    dist.barrier()  # the writer (last rank) has written and closed it
    scalars = read_scalars(tensorboard_dir)
    return {"steps": scalars["loss"][0], **{key: scalars[key][1] for key in LOGGED}}


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
    ckpt, boards = os.path.join(out_dir, "ckpt"), [os.path.join(out_dir, f"tb{i}") for i in (0, 1)]
    reference = run(["--tensorboard-dir", boards[0]])
    result = {"uninterrupted": logged(boards[0])}
    run(["--tensorboard-dir", boards[1], "--train-iters", 2, "--save", ckpt, "--save-interval", 2])
    resumed = run(["--tensorboard-dir", boards[1], "--load", ckpt])
    result.update(resumed_from=resumed["started"], resumed=logged(boards[1]))
    result["max_weight_difference"] = max(
        (resumed["weights"][k] - v).abs().max().item() for k, v in reference["weights"].items()
    )
    result["num_expert_weights"] = sum(".local_experts." in k for k in reference["weights"])

    load = ["--load", ckpt, "--finetune"]
    result["topk_mismatch"] = mismatch(MOE + ["--moe-router-topk", 1] + load)
    dense = ["--num-layers", 2, "--hidden-size", 32, "--ffn-hidden-size", 64]
    result["experts_mismatch"] = mismatch(dense + ["--num-experts", 8] + load)
    result["experts_adopted"] = mismatch(dense + load)  # no MoE flag: the checkpoint's experts
    write_results(out_dir, result)


if __name__ == "__main__":
    main(sys.argv[1])
    dist.destroy_process_group()
