"""Benchmark: the trainer's training step per variant (objective, activation recomputation, or
megatron-core's own cross entropy): time, tokens/s, MFU and peak memory, as ratios against the
first variant measured in the same run.

    python benchmarks/train_bench.py        # CPU: recomputation's peak memory, small model
    python benchmarks/train_bench.py --device cuda --model 1b --seq-length 4096 \\
        --variants deft deft+selective deft+full nll megatron-ce   # tools/gpu_selfcheck.py
    python benchmarks/train_bench.py --seq-length 256 --variants dense-active:deft moe-small:deft
        # mixture of experts vs the dense model of the same active parameters

A variant is ``[MODEL:]OBJECTIVE[+RECOMPUTE]``: a MODELS entry (default --model), an
--sft-objective (or ``megatron-ce``: the trainer's
forward with --unfused-output-loss, its logits given to megatron-core's
``vocab_parallel_cross_entropy``, as GPTModel does when called with labels; the trainer has no
such objective) and a RECOMPUTE entry
(selective; full: uniform, 1 layer per group; full-block: the first half of the layers). Every
variant builds a fresh single-process trainer on --mock-data (SFT-shaped random samples of 2 to
seq-length tokens, packed with --pack-sequences) with the same seed and batches.

Tokens/s counts every position of the rows (micro-batches x rows x seq-length per step).
MFU = model FLOPs per token (:func:`model_flops_per_token`: a token's active experts,
recomputation not counted) x
tokens/s / the device's peak dense bf16 FLOP/s (PEAK_BF16_FLOPS; GPU only). Peak memory: on CUDA
the allocator's high-water mark over the timed steps (weights, grads and optimizer state
included); on CPU the peak allocated above the level before one step (activations and
temporaries: what recomputation changes), from the profiler's allocation events
(megatron_deft.utils.memory).
"""

import argparse
import functools
import gc
import json
import os
import platform
import sys
import time

import torch

from megatron_deft.config import moe_layer_pattern
from megatron_deft.utils.memory import peak_extra_bytes

MODELS = {
    # A small model whose activations dominate a CPU step (the recomputation benchmark).
    "small": "--num-layers 8 --hidden-size 256 --ffn-hidden-size 704 --num-attention-heads 8 "
    "--num-query-groups 4 --vocab-size 4096",
    # Llama 3.2 1B's shape: 1.24e9 parameters (tied embeddings), GQA 32 / 8 heads of 64.
    "1b": "--num-layers 16 --hidden-size 2048 --ffn-hidden-size 8192 --num-attention-heads 32 "
    "--num-query-groups 8 --vocab-size 128256 --rotary-base 500000",
    # Mixture of experts (CPU): 8 experts of SwiGLU inner 256, top-2 (512 active per token) ...
    "moe-small": "--num-layers 4 --hidden-size 256 --ffn-hidden-size 512 --num-attention-heads 8 "
    "--num-query-groups 4 --vocab-size 4096 --num-experts 8 --moe-router-topk 2 "
    "--moe-ffn-hidden-size 256 --moe-aux-loss-coeff 1e-2",
    # ... and the dense model of the same active parameters (SwiGLU inner 512).
    "dense-active": "--num-layers 4 --hidden-size 256 --ffn-hidden-size 512 "
    "--num-attention-heads 8 --num-query-groups 4 --vocab-size 4096",
    # Qwen3-30B-A3B's layer (128 experts of 768, top-8, q/k norm, head 128) x 6 layers, for one
    # GPU (its 48 layers need a multi-GPU expert-parallel layout).
    "qwen3-moe-6l": "--num-layers 6 --hidden-size 2048 --ffn-hidden-size 6144 "
    "--num-attention-heads 32 --num-query-groups 4 --kv-channels 128 --qk-layernorm "
    "--vocab-size 151936 --rotary-base 1000000 --num-experts 128 --moe-router-topk 8 "
    "--moe-ffn-hidden-size 768 --moe-aux-loss-coeff 1e-3 --moe-token-dispatcher-type alltoall",
}
RECOMPUTE = {
    "": lambda layers: [],
    "selective": lambda layers: ["--recompute-granularity", "selective"],
    "full": lambda layers: (
        "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1".split()
    ),
    "full-block": lambda layers: (
        "--recompute-granularity full --recompute-method block "
        f"--recompute-num-layers {layers // 2}".split()
    ),
}
MEGATRON_CE = "megatron-ce"
# Dense bf16 tensor-core peak (no sparsity), by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument(
        "--variants", nargs="+", default=["deft", "deft+selective", "deft+full", "deft+full-block"]
    )
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=1)
    parser.add_argument(
        "--iters", type=int, default=3, help="steps per variant: warm-up, timed, (CPU) profiled"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--no-pack", action="store_true", help="one sample per row")
    parser.add_argument("--json", help="also write the results to this file (list of dicts)")
    args = parser.parse_args(argv)
    for variant in args.variants:
        model, _, recompute = split_variant(variant, args.model)
        if model not in MODELS:
            parser.error(f"{variant}: model {model!r} is not one of {sorted(MODELS)}")
        if recompute not in RECOMPUTE:
            parser.error(f"{variant}: recompute {recompute!r} is not one of {sorted(RECOMPUTE)}")
    profiled = args.device == "cpu"  # one more step, for the memory only
    if args.iters <= args.warmup + profiled:
        parser.error(f"--iters {args.iters} leaves no timed step after --warmup {args.warmup}")
    return args


def split_variant(variant: str, default_model: str) -> tuple:
    """``[MODEL:]OBJECTIVE[+RECOMPUTE]`` -> (model, objective, recompute)."""
    model, _, rest = variant.rpartition(":")
    objective, _, recompute = rest.partition("+")
    return model or default_model, objective, recompute


def trainer_argv(args, variant: str) -> list:
    """The trainer flags of one variant."""
    model_name, objective, recompute = split_variant(variant, args.model)
    model = MODELS[model_name].split()
    layers = int(model[model.index("--num-layers") + 1])
    argv = model + [
        "--device", args.device, "--mock-data", "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.global_batch_size),
        "--train-iters", str(args.iters), "--lr", "1e-5", "--log-interval", "1000000",
        "--sft-objective", "nll" if objective == MEGATRON_CE else objective,
    ]  # fmt: skip
    argv += ["--bf16", "--use-distributed-optimizer"] if args.device == "cuda" else []
    argv += [] if args.no_pack else ["--pack-sequences"]
    argv += ["--unfused-output-loss"] if objective == MEGATRON_CE else []
    return argv + RECOMPUTE[recompute](layers)


def model_flops_per_token(model, seq_length: int, vocab: int, moe=None) -> float:
    """Training FLOPs per token (3 x forward: the backward is two matmuls per forward one) of a
    Llama-style model: per layer the q/k/v, output and SwiGLU projections, and causal attention
    over the row (scores and values: 2 x 2 x s / 2 x heads x d), plus the output layer. With
    experts (``moe``: a MoEConfig) a MoE layer counts what one token runs: the router [E, h],
    its top-k experts' SwiGLU and the shared expert's."""
    h, d = model.hidden_size, model.head_size
    q, kv = model.num_attention_heads * d, model.resolved().num_query_groups * d
    attention = 2 * h * (q + 2 * kv) + 2 * q * h + 2 * seq_length * q
    mlp = [2 * 3 * h * model.resolved().ffn_hidden_size]  # [dense, MoE]
    if moe is not None and moe.num_experts is not None:
        expert = moe.moe_ffn_hidden_size or model.resolved().ffn_hidden_size
        active = moe.moe_router_topk * expert + (moe.moe_shared_expert_intermediate_size or 0)
        mlp.append(2 * h * moe.num_experts + 2 * 3 * h * active)
        pattern = moe_layer_pattern(moe.moe_layer_freq, model.num_layers)
    else:
        pattern = [0] * model.num_layers
    layers = sum(attention + mlp[is_moe] for is_moe in pattern)
    return 3 * (layers + 2 * h * vocab)


def peak_flops(device: str):
    """The device's peak dense bf16 FLOP/s, or None when not in PEAK_BF16_FLOPS."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    matches = [flops for key, flops in PEAK_BF16_FLOPS.items() if key in name]
    return max(matches) if matches else None


class _Remembering:
    """An iterator that keeps the item it handed out last."""

    def __init__(self, items):
        self.items, self.last = iter(items), None

    def __next__(self):
        self.last = next(self.items)
        return self.last


def megatron_ce_step(trainer) -> None:
    """One step with megatron-core's own loss: the trainer's forward (built unfused, so the last
    stage returns logits [b, s, V/tp]) and megatron-core's vocab_parallel_cross_entropy on them
    (what GPTModel applies when given labels), summed over the loss tokens (the trainer's
    per-token normalisation), then the optimizer."""
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_deft.training import step

    def forward_step(data_iterator, model):
        logits, _ = step.forward_step(
            trainer.config, trainer.objective, 0, trainer.vocab_size, data_iterator, model
        )
        batch = data_iterator.last
        labels, mask = (batch[key].to(logits.device) for key in ("labels", "loss_mask"))

        def loss_func(output):
            loss = tensor_parallel.vocab_parallel_cross_entropy(output, labels.clamp(min=0))
            return (loss * mask).sum(), mask.sum().to(torch.int), {}

        return logits, loss_func

    microbatches = trainer.train_loader.next_global_batch().microbatches
    for chunk in trainer.model:
        chunk.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=_Remembering(microbatches),
        model=trainer.model[0],
        num_microbatches=len(microbatches),
        seq_length=trainer.config.model.seq_length,
        micro_batch_size=trainer.config.training.micro_batch_size,
        forward_only=False,
    )
    trainer.optimizer.step()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_variant(args, variant: str) -> dict:
    """Build the variant's trainer, run --iters steps, measure the timed ones."""
    from megatron_deft.training.arguments import config_from_args
    from megatron_deft.training.trainer import Trainer

    config = config_from_args(trainer_argv(args, variant), world_size=1)
    trainer = Trainer(config)
    megatron_ce = variant.partition("+")[0] == MEGATRON_CE
    one_step = megatron_ce_step if megatron_ce else Trainer.train_step  # the trainer's own step
    padded_vocab = trainer.padded_vocab
    try:
        for _ in range(args.warmup):
            one_step(trainer)
        _sync(args.device)
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        # CPU: the last step is profiled for its memory, outside the timed ones
        timed = args.iters - args.warmup - (args.device == "cpu")
        start = time.perf_counter()
        for _ in range(timed):
            one_step(trainer)
        _sync(args.device)
        seconds = time.perf_counter() - start
        if args.device == "cuda":
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = peak_extra_bytes(functools.partial(one_step, trainer))
    finally:
        trainer.close(keep_process_group=True)
    del trainer  # the next variant's model needs the memory
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    tokens = args.global_batch_size * args.seq_length * timed
    flops = model_flops_per_token(config.model, args.seq_length, padded_vocab, config.moe)
    peak_device = peak_flops(args.device)
    return {
        "variant": variant,
        "step_s": seconds / timed,
        "tokens_per_s": tokens / seconds,
        "mfu": flops * tokens / seconds / peak_device if peak_device else None,
        "peak_bytes": peak,
        "flops_per_token": flops,
    }


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def format_table(rows: list) -> str:
    """Markdown table; ratios against the first row."""
    base = rows[0]
    lines = [
        "| variant | step s | tokens/s | MFU | peak memory GiB | time vs first | peak vs first |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
        lines.append(
            f"| {row['variant']} | {row['step_s']:.3f} | {row['tokens_per_s']:,.0f} | {mfu} | "
            f"{row['peak_bytes'] / 2**30:.2f} | {row['step_s'] / base['step_s']:.2f}x | "
            f"{row['peak_bytes'] / base['peak_bytes']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_deft.utils.known_warnings import ignore_import_notices

    ignore_import_notices()
    print(
        f"# train step benchmark: model {args.model}, seq {args.seq_length}, "
        f"{args.global_batch_size} rows x micro-batch {args.micro_batch_size}, "
        f"{'packed' if not args.no_pack else 'unpacked'}, {args.device} "
        f"({device_name(args.device)}), torch {torch.__version__}, "
        f"{args.iters - args.warmup - (args.device == 'cpu')} timed steps after {args.warmup}",
        flush=True,
    )
    rows = []
    for variant in args.variants:
        rows.append(run_variant(args, variant))
        print(json.dumps(rows[-1]), flush=True)  # partial results survive a timeout
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(rows, handle, indent=1)
    print()
    print(format_table(rows))
    if torch.distributed.is_initialized():  # the trainers kept it for the next variant
        torch.distributed.destroy_process_group()  # else NCCL's teardown at exit can stall
    return 0


if __name__ == "__main__":
    sys.exit(main())
