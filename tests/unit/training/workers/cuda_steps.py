"""torchrun worker (1 rank, one GPU): the tiny model trained on CUDA through NCCL, in fp32, in
bf16 and (with Transformer Engine) in bf16 + FP8, from the same init and batches.

Usage: torchrun --nproc_per_node 1 cuda_steps.py OUT_DIR
Writes OUT_DIR/results.json: {case: {"history": per-iteration metrics, ...facts}}.
"""

import importlib.util
import sys

import torch
import torch.distributed as dist
from common import config_for, history_summary, train_recording, write_results

from megatron_deft.training.trainer import Trainer

ITERATIONS = 4
CUDA = ["--device", "cuda", "--train-iters", ITERATIONS, "--sft-objective", "deft"]
CASES = {
    "fp32": CUDA,
    "bf16": CUDA + ["--bf16"],
    # Transformer Engine's FP8 GEMMs want dimensions that are multiples of 16: the tiny model's
    # are (h 64, ffn 128, q/k/v 128, 64 tokens per micro-batch).
    "fp8": CUDA + ["--bf16", "--fp8-format", "hybrid"],
}


def facts(trainer) -> dict:
    """Where the run happened: backend, dtypes, and which modules computed in FP8."""
    chunk = trainer.model[0].module
    # the output layer's weight (tied: the embedding's), as the loss receives it
    output = chunk.shared_embedding_or_output_weight() if chunk.post_process else None
    te_linears = [m for m in chunk.decoder.modules() if hasattr(m, "fp8") and hasattr(m, "weight")]
    return {
        "backend": dist.get_backend(),
        "param_device": next(chunk.parameters()).device.type,
        "param_dtype": str(next(chunk.decoder.parameters()).dtype),
        "nccl_sum": _nccl_sum(),
        # TE sets .fp8 in every forward from the autocast it runs under
        "te_linears": len(te_linears),
        "te_linears_in_fp8": sum(bool(m.fp8) for m in te_linears),
        "output_weight": None if output is None else [type(output).__name__, str(output.dtype)],
    }


def _nccl_sum() -> float:
    """An all-reduce through the data-parallel group (NCCL on the GPU)."""
    from megatron.core import parallel_state

    value = torch.ones(1, device="cuda") * 3
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group())
    return value.item()


def fp8_runs_here() -> bool:
    """Transformer Engine is importable and the GPU has FP8 tensor cores (Ada, Hopper, ...)."""
    have_te = importlib.util.find_spec("transformer_engine") is not None
    return have_te and torch.cuda.get_device_capability() >= (8, 9)


def main(out_dir):
    results = {}
    for name, extra in CASES.items():
        if name == "fp8" and not fp8_runs_here():
            results[name] = None
            continue
        trainer = Trainer(config_for(1, 1, extra))
        history = train_recording(trainer, summarize=history_summary)
        results[name] = {"history": history, **facts(trainer)}
        trainer.close(keep_process_group=True)
    write_results(out_dir, results)


if __name__ == "__main__":
    main(sys.argv[1])
    dist.destroy_process_group()
