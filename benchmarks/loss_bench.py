"""Benchmark: vocab_parallel_loss (every objective) vs megatron-core's vocab_parallel_cross_entropy.

Forward + backward time (median over repeats) and peak extra memory of one call, at the same
shapes and tensor-parallel size, printed as ratios against megatron's cross entropy measured in
the same run.

    python benchmarks/loss_bench.py          # 4096 tokens x 32000 vocab, TP 1 and 2, CPU
    python benchmarks/loss_bench.py --device cuda --tokens 16384 --vocab 128256 --tp 1 2 4 8

Every call gets a fresh copy of the same logits (megatron's CE and `inplace=True` overwrite their
input); the copy is outside the timed region. Candidates are timed round-robin within each repeat.
The gradient is taken with torch.autograd.grad, as for logits inside a model: `.backward()` on a
leaf would add autograd's accumulation copy when a function hands back its input buffer as the
gradient (megatron's CE does), which a model's non-leaf logits never pay. Peak memory is the
high-water mark above what was allocated before the call (CUDA allocator stats on GPU; the
profiler's allocation events on CPU).
"""

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_deft.utils.memory import peak_extra_bytes

OBJECTIVES = ["nll", "p", "dft", "tsallis:q=0.5", "deft", "cayley", "eaft"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per call (s*b)")
    parser.add_argument("--vocab", type=int, default=32000, help="full vocabulary size V")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="logits dtype")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls")
    parser.add_argument("--objectives", nargs="+", default=OBJECTIVES)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    return parser.parse_args(argv)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def _candidates(objectives, group):
    from megatron.core import tensor_parallel

    from megatron_deft.objectives import vocab_parallel_loss

    def ours(objective, inplace):
        return lambda x, y: vocab_parallel_loss(x, y, objective, group=group, inplace=inplace)[0]

    candidates = {
        "megatron vocab_parallel_cross_entropy": tensor_parallel.vocab_parallel_cross_entropy
    }
    for objective in objectives:
        candidates[objective] = ours(objective, inplace=False)
        candidates[f"{objective} (inplace=True)"] = ours(objective, inplace=True)
    return candidates


def _worker(rank, world, args, init_file, out_file):
    from megatron.core import parallel_state

    device = args.device
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=10),
    )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    g = torch.Generator().manual_seed(1000 + rank)
    master = (torch.randn(args.tokens, args.vocab // world, generator=g) * 4).to(
        device=device, dtype=dtype
    )
    target = torch.randint(
        0, args.vocab, (args.tokens,), generator=torch.Generator().manual_seed(7)
    ).to(device)

    candidates = _candidates(args.objectives, group)

    def timed_call(fn):
        x = master.clone().requires_grad_(True)  # fresh input: some candidates overwrite it
        _sync(device)
        start = time.perf_counter()
        torch.autograd.grad(fn(x, target).sum(), x)
        _sync(device)
        return time.perf_counter() - start

    # Round-robin over the candidates within each repeat, so a change in machine load during
    # the run affects every candidate alike instead of whichever happened to be running.
    times = {name: [] for name in candidates}
    for repeat in range(args.warmup + args.repeats):
        for name, fn in candidates.items():
            seconds = timed_call(fn)
            if repeat >= args.warmup:
                times[name].append(seconds)

    rows = []
    for name, fn in candidates.items():
        x = master.clone().requires_grad_(True)  # allocated before the measured region
        peak = peak_extra_bytes(
            lambda fn=fn, x=x: torch.autograd.grad(fn(x, target).sum(), x), device
        )
        del x
        rows.append((name, statistics.median(times[name]), peak))
    if rank == 0:
        torch.save(rows, out_file)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv=None):
    args = parse_args(argv)
    shard_mib = args.tokens * args.vocab * 4 / 2**20
    print(
        f"# loss benchmark: {args.tokens} tokens x {args.vocab} vocab, {args.dtype} logits, "
        f"{args.device} ({_device_name(args.device)}), torch {torch.__version__}, "
        f"median of {args.repeats} (after {args.warmup} warm-up)"
    )
    print(f"# one fp32 full-vocab logits buffer = {shard_mib:.0f} MiB (divide by TP for a shard)\n")
    for tp in args.tp:
        if args.vocab % tp:
            raise SystemExit(f"--vocab {args.vocab} is not divisible by TP={tp}")
        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "rows.pt")
            mp.spawn(
                _worker, args=(tp, args, os.path.join(tmp, "store"), out_file), nprocs=tp, join=True
            )
            rows = torch.load(out_file)
        base_time, base_peak = rows[0][1], rows[0][2]
        print(f"## TP={tp} (per rank: {args.tokens} x {args.vocab // tp})\n")
        print(
            "| loss | fwd+bwd ms | time vs megatron CE | peak extra MiB "
            "| peak minus megatron CE's |"
        )
        print("|---|---:|---:|---:|---:|")
        for name, seconds, peak in rows:
            print(
                f"| {name} | {seconds * 1e3:.1f} | {seconds / base_time:.2f}x | "
                f"{peak / 2**20:.1f} | {(peak - base_peak) / 2**20:+.1f} MiB |"
            )
        print()


if __name__ == "__main__":
    main()
