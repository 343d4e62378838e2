"""torchrun worker (2 ranks): exact resume, interrupted-save safety and resharded loading.

For TP=2 (plain optimizer) and DP=2 (distributed optimizer):
  A: 6 uninterrupted iterations.
  B: the same run killed after iteration 5 (checkpoint saved at 3, nothing after; iterations 4
     and 5 logged to TensorBoard); then a fake interrupted save of iteration 6 is left behind
     (a .partial directory + a temp tracker).
  C: a fresh Trainer resumes from B's checkpoint and runs iterations 4-6, logging to the same
     TensorBoard directory.
Then the TP=2 checkpoints are loaded as TP=1 x PP=2: iteration 6 weights only (--finetune),
and iteration 3 as a full resume (plain optimizer state resharded) that must continue the
uninterrupted run; a distributed-optimizer checkpoint must refuse another layout clearly.
Last, a full resume with a changed LR schedule: refused, or taken with the override flag.
"""

import os
import shutil
import sys

import torch.distributed as dist
from common import config_for, full_weights, history_summary, write_results

from megatron_deft.training import checkpointing, setup
from megatron_deft.training.trainer import Trainer

ITERS = ["--train-iters", 6, "--sft-objective", "deft"]


def resume_case(out_dir, name, tp, pp, extra):
    ckpt = os.path.join(out_dir, f"ckpt-{name}")
    result = {}
    uninterrupted = Trainer(config_for(tp, pp, ITERS + extra))
    uninterrupted.train()
    result["uninterrupted"] = history_summary(uninterrupted.history)
    setup.finish_param_sync(uninterrupted.model, uninterrupted.config)
    reference_weights = full_weights(uninterrupted.model)
    uninterrupted.close(keep_process_group=True)

    logged = [
        "--tensorboard-dir",
        os.path.join(out_dir, f"tensorboard-{name}"),
        "--log-interval",
        1,
    ]
    result["tensorboard_dir"] = logged[1]
    killed = Trainer(
        config_for(tp, pp, ITERS + extra + logged + ["--save", ckpt, "--save-interval", 3])
    )
    killed.train(stop_after=5)
    result["before_kill"] = history_summary(killed.history)
    killed.close(keep_process_group=True)
    if dist.get_rank() == 0:  # leave the debris of a save of iteration 6 that died midway
        os.makedirs(os.path.join(ckpt, "iter_0000006.partial"))
        with open(os.path.join(ckpt, "iter_0000006.partial", "junk"), "w") as handle:
            handle.write("truncated")
        with open(os.path.join(ckpt, checkpointing.TRACKER + ".tmp"), "w") as handle:
            handle.write("6")
    dist.barrier()
    result["tracker_before_resume"] = checkpointing.read_tracker(ckpt)

    resumed = Trainer(
        config_for(
            tp, pp, ITERS + extra + logged + ["--load", ckpt, "--save", ckpt, "--save-interval", 3]
        )
    )
    result["resumed_from"] = resumed.iteration
    resumed.train()
    result["after_resume"] = history_summary(resumed.history)
    result["resumed_valid_loss"] = resumed.evaluate()["loss"]
    setup.finish_param_sync(resumed.model, resumed.config)
    resumed_weights = full_weights(resumed.model)
    resumed.close(keep_process_group=True)
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
    resumed = Trainer(config_for(1, 2, ITERS + ["--load", _copy_of_iteration_3(ckpt, out_dir)]))
    result["resharded_resume_from"] = resumed.iteration
    resumed.train()
    result["resharded_resume"] = history_summary(resumed.history)
    weights = full_weights(resumed.model)
    result[f"resharded_resume_weight_error_stage{dist.get_rank()}"] = max(
        ((weights[k] - saved_weights[k]).abs().max() / saved_weights[k].abs().max()).item()
        for k in weights
    )
    resumed.close(keep_process_group=True)

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
    changed = ITERS + ["--load", ckpt, "--lr", 1e-3, "--train-iters", 8]
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
