"""torchrun worker (1 rank, CUDA with Transformer Engine): a MoE checkpoint written with
SequentialMLP experts loads into grouped-GEMM experts (TEGroupedMLP, --moe-grouped-gemm) and back,
with the same logits. Writes {"max_difference": [seq->grouped, grouped->seq], "scale": ...}.
"""

import os
import sys

import torch
import torch.distributed as dist
from common import config_for, logits_of, write_results

from megatron_deft.evaluation.generation import causal_inputs
from megatron_deft.training.trainer import Trainer

MOE = ["--device", "cuda", "--attention-backend", "te", "--num-experts", 4]
MOE += ["--moe-router-topk", 2, "--init-method-std", 0.2, "--train-iters", 1]
TOKENS = torch.tensor([[5, 17, 230, 9, 88, 412, 3, 71], [42, 7, 301, 455, 120, 64, 11, 2]])


def logits(root_of_load, save, grouped: bool):
    """Logits [b, s, V] of a model loaded from ``root_of_load`` (or a fresh init if None),
    saved to ``save``."""
    extra = MOE + (["--moe-grouped-gemm"] if grouped else []) + ["--save", save]
    extra += ["--load", root_of_load, "--finetune"] if root_of_load else []
    trainer = Trainer(config_for(tp=1, extra=extra))
    trainer.save()
    module = trainer.model[0].module
    module.eval()
    with torch.no_grad():
        out = logits_of(module, **causal_inputs(TOKENS.cuda())).float().cpu()
    trainer.close(keep_process_group=True)
    return out


def main(out_dir):
    sequential = logits(None, os.path.join(out_dir, "sequential"), grouped=False)
    grouped = logits(os.path.join(out_dir, "sequential"), os.path.join(out_dir, "grouped"), True)
    back = logits(os.path.join(out_dir, "grouped"), os.path.join(out_dir, "back"), False)
    write_results(
        out_dir,
        {
            "max_difference": [
                (grouped - sequential).abs().max().item(),
                (back - sequential).abs().max().item(),
            ],
            "scale": sequential.abs().max().item(),
        },
    )


if __name__ == "__main__":
    main(sys.argv[1])
    dist.destroy_process_group()
