"""torchrun worker: train a tiny MoE model on the same global batches under the (TP, EP, PP, DP)
layouts this world size allows, with the distributed optimizer and the router losses on.

Usage: torchrun --nproc_per_node N moe_parallel_invariance.py OUT_DIR
Writes OUT_DIR/results.json ({case: per-iteration metrics incl. router losses and expert load})
and OUT_DIR/<case>.rank<r>.pt (full weights this rank is the first holder of: dense weights on
TP rank 0 / DP rank 0, each expert on its EP rank's expert-TP rank 0 / expert-DP rank 0; `-init`
before training). The pytest side compares layouts.
"""

import os
import sys

import torch
import torch.distributed as dist
from common import config_for, history_summary, train_recording, write_results

from megatron_deft.models.init import _global_names, is_expert
from megatron_deft.training.setup import finish_param_sync
from megatron_deft.training.trainer import Trainer

ITERATIONS = 3
# (TP, EP, PP) per world size; DP = world / (TP x PP)
LAYOUTS = {1: [(1, 1, 1)], 2: [(1, 2, 1)], 4: [(2, 2, 1), (1, 2, 2), (2, 1, 1)]}
AUX, Z = 1e-2, 1e-3  # --moe-aux-loss-coeff, --moe-z-loss-coeff
TINY_MOE = [
    "--num-layers",
    2,
    "--hidden-size",
    32,
    "--ffn-hidden-size",
    64,
    "--num-experts",
    4,
    "--moe-router-topk",
    2,
    "--use-distributed-optimizer",
    "--train-iters",
    ITERATIONS,
]


def moe_args(ep: int, tp: int, aux: float = AUX, z: float = Z) -> list:
    args = TINY_MOE + ["--expert-model-parallel-size", ep]
    args += ["--moe-aux-loss-coeff", aux, "--moe-z-loss-coeff", z]
    return args + (["--sequence-parallel"] if tp > 1 else [])


def _gather(tensor, param, group):
    """The full tensor of a tensor-parallel shard (rank r holds chunks r, r + size, ...)."""
    size = dist.get_world_size(group)
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    stride, dim = getattr(param, "partition_stride", 1), param.partition_dim
    pieces = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([pieces[r][s] for s in range(stride) for r in range(size)], dim=dim)


def save_moe_weights(model, out_dir: str, tag: str) -> None:
    """This rank's share of the full weights (see the module docstring)."""
    from megatron.core import parallel_state as ps

    groups = {
        False: ps.get_tensor_model_parallel_group(),
        True: ps.get_expert_tensor_parallel_group(),
    }
    first = {
        False: ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0,
        True: ps.get_expert_tensor_parallel_rank() == 0 and ps.get_expert_data_parallel_rank() == 0,
    }
    out = {}
    for chunk in model:
        names = _global_names(chunk.module)
        for name, param in chunk.module.named_parameters():
            expert = is_expert(name)
            full = _gather(param.detach().clone(), param, groups[expert])
            if first[expert]:
                out[names[name]] = full
    torch.save(out, os.path.join(out_dir, f"{tag}.rank{dist.get_rank()}.pt"))


def summary(history: list) -> list:
    moe_keys = ("moe_load_balancing_loss", "moe_z_loss")
    return [
        {
            **record,
            **{key: h[key] for key in moe_keys},
            "moe_tokens_per_expert": h["moe_tokens_per_expert"].tolist(),
        }
        for record, h in zip(history_summary(history), history)
    ]


def run_case(out_dir, results, name, tp, pp, extra, save_init=False):
    trainer = Trainer(config_for(tp, pp, extra))
    if save_init:
        save_moe_weights(trainer.model, out_dir, f"{name}-init")
    results[name] = train_recording(trainer, summarize=summary)
    finish_param_sync(trainer.model, trainer.config)
    save_moe_weights(trainer.model, out_dir, name)
    trainer.close(keep_process_group=True)


def main(out_dir):
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for tp, ep, pp in LAYOUTS[world]:
        layout = f"tp{tp}ep{ep}pp{pp}dp{world // (tp * pp)}"
        for objective in ("deft", "eaft"):
            extra = moe_args(ep, tp) + ["--sft-objective", objective]
            run_case(out_dir, results, f"{layout}-{objective}", tp, pp, extra, save_init=True)
    if world == 1:
        # megatron-core scales the router losses by the *per-rank* token count, which sequence
        # parallelism divides by TP: a TP=2 run trains with the coefficients / 2 of TP=1.
        for objective in ("deft", "eaft"):
            extra = moe_args(1, 1, AUX / 2, Z / 2) + ["--sft-objective", objective]
            run_case(out_dir, results, f"tp1ep1pp1dp1-{objective}-half", 1, 1, extra)
    if world == 2:  # the alltoall dispatcher (torch.cuda streams answered by the CPU layer)
        extra = moe_args(2, 1) + ["--sft-objective", "deft", "--moe-token-dispatcher-type"]
        run_case(out_dir, results, "tp1ep2pp1dp2-deft-alltoall", 1, 1, extra + ["alltoall"])
    write_results(out_dir, results)


if __name__ == "__main__":
    main(sys.argv[1])
    dist.destroy_process_group()
