"""torchrun worker (2 ranks): exact resume, interrupted-save safety and resharded loading.

Every run logs each iteration to TensorBoard (the metrics compared are read back from there).
For TP=2 (plain optimizer) and DP=2 (distributed optimizer):
  A: 6 uninterrupted iterations.
  B: the same run killed after iteration 5 with its last checkpoint at 3: it trains 1-3 and saves,
     then a run resumed from that checkpoint without --save trains and logs 4 and 5 (what the
     killed run did after its checkpoint); then a fake interrupted save of iteration 6 is left
     behind (a .partial directory + a temp tracker).
  C: a run resumes from B's checkpoint and trains 4-6, logging to the same TensorBoard directory.
All runs fix the LR schedule's length (--lr-decay-iters 6) so B's shorter runs share A's schedule.
Then the TP=2 checkpoints are loaded as TP=1 x PP=2: iteration 6 weights only (--finetune),
and iteration 3 as a full resume (plain optimizer state resharded) that must continue the
uninterrupted run; a distributed-optimizer checkpoint must refuse another layout clearly.
Last, a full resume with a changed LR schedule: refused, or taken with the override flag.
"""

import os
import shutil
import sys

import torch.distributed as dist
from common import config_for, full_weights, write_results

from megatron_deft.training import checkpointing, setup
from megatron_deft.training.trainer import Trainer
from tools.gate_dynamics_logs import read_scalars

ITERS = ["--train-iters", 6, "--lr-decay-iters", 6, "--sft-objective", "deft", "--log-interval", 1]


def logged(tensorboard_dir: str) -> dict:
    """{steps, loss, grad_norm, lr} as a reader of the TensorBoard directory sees them."""
    dist.barrier()  # the writer (last rank) has written and closed it
    scalars = read_scalars(tensorboard_dir)
    series = {key: scalars[key][1] for key in ("loss", "grad_norm", "lr")}
    return {"steps": scalars["loss"][0], **series}


def run(tp, pp, flags, keep_weights=False):
    """Train one run to its --train-iters; (iteration it started from, its weights or None)."""
    trainer = Trainer(config_for(tp, pp, flags))
    started = trainer.iteration
    trainer.train()
    weights = None
    if keep_weights:
        setup.finish_param_sync(trainer.model, trainer.config)
        weights = full_weights(trainer.model)
    trainer.close(keep_process_group=True)
    return started, weights


def resume_case(out_dir, name, tp, pp, extra):
    ckpt = os.path.join(out_dir, f"ckpt-{name}")
    result = {}
    board = os.path.join(out_dir, f"tensorboard-{name}-uninterrupted")
    _, reference_weights = run(tp, pp, ITERS + extra + ["--tensorboard-dir", board], True)
    result["uninterrupted"] = logged(board)

    board = os.path.join(out_dir, f"tensorboard-{name}")
    result["tensorboard_dir"] = board
    flags = ITERS + extra + ["--tensorboard-dir", board]
    run(tp, pp, flags + ["--train-iters", 3, "--save", ckpt, "--save-interval", 3])
    run(tp, pp, flags + ["--train-iters", 5, "--load", ckpt])  # killed after 5: not saved
    result["before_kill"] = logged(board)
    if dist.get_rank() == 0:  # leave the debris of a save of iteration 6 that died midway
        os.makedirs(os.path.join(ckpt, "iter_0000006.partial"))
        with open(os.path.join(ckpt, "iter_0000006.partial", "junk"), "w") as handle:
            handle.write("truncated")
        with open(os.path.join(ckpt, checkpointing.TRACKER + ".tmp"), "w") as handle:
            handle.write("6")
    dist.barrier()
    result["tracker_before_resume"] = checkpointing.read_tracker(ckpt)

    resumed = Trainer(
        config_for(tp, pp, flags + ["--load", ckpt, "--save", ckpt, "--save-interval", 3])
    )
    result["resumed_from"] = resumed.iteration
    resumed.train()
    result["resumed_valid_loss"] = resumed.evaluate()["loss"]
    setup.finish_param_sync(resumed.model, resumed.config)
    resumed_weights = full_weights(resumed.model)
    resumed.close(keep_process_group=True)
    result["after_resume"] = logged(board)
    result["tracker_after"] = checkpointing.read_tracker(ckpt)
    result["checkpoint_entries"] = sorted(os.listdir(ckpt))
    result["max_weight_difference"] = max(
        (resumed_weights[k] - reference_weights[k]).abs().max().item() for k in reference_weights
    )
    return result, ckpt, resumed_weights


def _copy_of_iteration_3(ckpt: str, out_dir: str) -> str:
    """A checkpoint root holding only iteration 3 of `ckpt` (to resume mid-run elsewhere)."""
    root = os.path.join(out_dir, "ckpt-iter3-only")
    if dist.get_rank() == 0:
        source = checkpointing.checkpoint_dir(ckpt, 3)
        shutil.copytree(source, checkpointing.checkpoint_dir(root, 3))
        with open(os.path.join(root, checkpointing.TRACKER), "w") as handle:
            handle.write("3\n")
    dist.barrier()
    return root


def reshard_case(out_dir, ckpt, saved_weights, distopt_ckpt):
    """TP=2 checkpoints loaded as TP=1 x PP=2: weights only, then a full resume."""
    result = {}
    resharded = Trainer(config_for(1, 2, ITERS + ["--load", ckpt, "--finetune"]))
    result["iteration_after_finetune_load"] = resharded.iteration
    result["valid_loss"] = resharded.evaluate()["loss"]
    weights = full_weights(resharded.model)
    # Each pipeline stage compares the weights it holds with the TP=2 run's full weights.
    result[f"max_weight_difference_stage{dist.get_rank()}"] = max(
        (weights[k] - saved_weights[k]).abs().max().item() for k in weights
    )
    result[f"num_weights_stage{dist.get_rank()}"] = len(weights)
    resharded.close(keep_process_group=True)

    # Full resume of iteration 3 in another layout (plain optimizer state is reshardable too).
    board = os.path.join(out_dir, "tensorboard-resharded")
    resumed = Trainer(
        config_for(
            1,
            2,
            ITERS + ["--load", _copy_of_iteration_3(ckpt, out_dir), "--tensorboard-dir", board],
        )
    )
    result["resharded_resume_from"] = resumed.iteration
    resumed.train()
    weights = full_weights(resumed.model)
    result[f"resharded_resume_weight_error_stage{dist.get_rank()}"] = max(
        ((weights[k] - saved_weights[k]).abs().max() / saved_weights[k].abs().max()).item()
        for k in weights
    )
    resumed.close(keep_process_group=True)
    result["resharded_resume"] = logged(board)

    try:  # distributed-optimizer state is dp_reshardable only: refused across TP/PP
        Trainer(config_for(2, 1, ITERS + ["--use-distributed-optimizer", "--load", distopt_ckpt]))
        result["distopt_load_across_layouts"] = "loaded"
    except checkpointing.CheckpointError as error:
        result["distopt_load_across_layouts"] = str(error)
        setup.destroy_distributed(keep_process_group=True)
    return result


def extra_state_case(ckpt) -> dict:
    """A module state the checkpoint lacks: Transformer-Engine-like ``_extra_state`` loads (TE
    restarts it), a missing weight is refused by name."""
    import torch

    trainer = Trainer(config_for(1, 2, ITERS))
    norms = [
        layer.input_layernorm for chunk in trainer.model for layer in chunk.module.decoder.layers
    ]
    calls = []

    class WithExtraState(type(norms[0])):
        def get_extra_state(self):
            return torch.tensor([7.0])

        def set_extra_state(self, state):
            calls.append(state)

    for norm in norms:  # every layer, as in a TE model (a ShardedObject spans all layers)
        norm.__class__ = WithExtraState
    modules = [chunk.module for chunk in trainer.model]
    directory = checkpointing.checkpoint_dir(ckpt, 6)
    rank = dist.get_rank()
    result = {}
    try:
        checkpointing.load_model_weights(directory, modules)
        result[f"extra_state_load_stage{rank}"] = f"loaded, set_extra_state calls {len(calls)}"
    except Exception as error:  # reported, asserted on the pytest side
        result[f"extra_state_load_stage{rank}"] = f"{type(error).__name__}: {error}"
    for norm in norms:
        norm.register_parameter("bogus", torch.nn.Parameter(torch.zeros(3)))
    try:
        checkpointing.load_model_weights(directory, modules)
        result[f"missing_weight_load_stage{rank}"] = "loaded"
    except checkpointing.CheckpointError as error:
        result[f"missing_weight_load_stage{rank}"] = str(error)
    trainer.close(keep_process_group=True)
    return result


def schedule_case(ckpt) -> dict:
    """Full resumes of the TP=2 run's iteration-6 checkpoint with a changed --lr: refused
    without --override-opt-param-scheduler, this run's schedule with it."""
    changed = ITERS + ["--load", ckpt, "--lr", 1e-3, "--train-iters", 8, "--lr-decay-iters", 8]
    result = {}
    try:
        Trainer(config_for(2, 1, changed))
        result["changed_lr"] = "loaded"
    except checkpointing.CheckpointError as error:
        result["changed_lr"] = str(error)
        setup.destroy_distributed(keep_process_group=True)
    overridden = Trainer(config_for(2, 1, changed + ["--override-opt-param-scheduler"]))
    result["overridden_schedule"] = overridden.scheduler.state_dict()
    result["overridden_iteration"] = overridden.iteration
    overridden.close(keep_process_group=True)
    return result


def gather_stage_results(result: dict) -> dict:
    """Per-rank keys (stage0/stage1) collected on every rank."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def main(out_dir):
    results = {}
    results["tp2_plain"], ckpt, weights = resume_case(out_dir, "tp2", 2, 1, [])
    results["dp2_distopt"], distopt_ckpt, _ = resume_case(
        out_dir, "dp2", 1, 1, ["--use-distributed-optimizer"]
    )
    results["reshard"] = gather_stage_results(reshard_case(out_dir, ckpt, weights, distopt_ckpt))
    results["extra_state"] = gather_stage_results(extra_state_case(ckpt))
    results["schedule"] = schedule_case(ckpt)
    write_results(out_dir, results)


if __name__ == "__main__":
    main(sys.argv[1])
    dist.destroy_process_group()
