"""Benchmark: vocab_parallel_loss (every objective) vs megatron-core's vocab_parallel_cross_entropy,
and (``--output-layer``) the output layer + loss: megatron-core's ColumnParallelLinear + its cross
entropy, the fused path's floor (that plus the logits matmul once more, as the fused path recomputes
them), our unfused path, and the fused linear_vocab_parallel_loss.

Forward + backward time (median over repeats) and peak extra memory of one call, at the same
shapes and tensor-parallel size, printed as ratios against megatron-core measured in the same run.

    python benchmarks/loss_bench.py          # 4096 tokens x 32000 vocab, TP 1 and 2, CPU
    python benchmarks/loss_bench.py --device cuda --tokens 16384 --vocab 128256 --tp 1 2 4 8
    python benchmarks/loss_bench.py --output-layer   # 8192 tokens, h 1024, V 128256 (Llama 3)
    python benchmarks/loss_bench.py --output-layer --device cuda --dtype bf16 --tp 1 \
        --fused-kernels triton torch   # the fused path with its Triton and its PyTorch chunk loop

With ``--output-layer`` at TP 1, cut-cross-entropy (``pip install cut-cross-entropy``, which needs
triton) is added as a peer baseline for NLL when it is importable.

Every call gets fresh copies of the same inputs (megatron's CE and `inplace=True` overwrite their
input); the copies are outside the timed region. Candidates are timed round-robin within each
repeat. The gradient is taken with torch.autograd.grad, as for logits inside a model: `.backward()`
on a leaf would add autograd's accumulation copy when a function hands back its input buffer as the
gradient (megatron's CE does), which a model's non-leaf logits never pay. Peak memory is the
high-water mark above what was allocated before the call (CUDA allocator stats on GPU; the
profiler's allocation events on CPU); in the output-layer mode it includes the gradients the call
returns (d hidden [N, h] and d weight [V/tp, h], the same for every candidate), and the table also
gives the peak without them (the workspace).
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

from megatron_deft.objectives.linear_vocab_parallel import CHUNK_KERNELS
from megatron_deft.utils.memory import peak_extra_bytes

LOSS_DEFAULTS = {
    "tokens": 4096,
    "vocab": 32000,
    "objectives": ["nll", "p", "dft", "tsallis:q=0.5", "deft", "cayley", "eaft"],
}
OUTPUT_LAYER_DEFAULTS = {
    "tokens": 8192,
    "vocab": 128256,
    "objectives": ["nll", "deft", "cayley", "eaft"],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output-layer",
        action="store_true",
        help="benchmark the output layer + loss from hidden states",
    )
    parser.add_argument(
        "--tokens", type=int, help="tokens per call (default 4096; 8192 with --output-layer)"
    )
    parser.add_argument(
        "--vocab",
        type=int,
        help="full vocabulary size V (default 32000; 128256 with --output-layer)",
    )
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size h (--output-layer)")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel sizes")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="input dtype")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls")
    parser.add_argument("--objectives", nargs="+")
    parser.add_argument(
        "--unfused-objectives",
        nargs="*",
        default=["deft"],
        help="--output-layer: objectives also run on the full logits (unfused)",
    )
    parser.add_argument(
        "--fused-kernels",
        nargs="+",
        choices=sorted(CHUNK_KERNELS),
        help="--output-layer: the fused path's chunk kernels, a row each (default: the device's "
        "default, Triton on CUDA)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    defaults = OUTPUT_LAYER_DEFAULTS if args.output_layer else LOSS_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()
    dist.barrier()


def _loss_candidates(objectives, group):
    """Loss on logits [N, V/tp]: {name: fn(logits, target)}."""
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


def _output_layer_candidates(args, group, hidden):
    """Output layer + loss from hidden [N, 1, h] and weight [V/tp, h]: {name: fn(h, w, target)}
    (`hidden`: the inputs' device and dtype, which choose the fused path's default kernels)."""
    from megatron.core import tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig

    from megatron_deft.objectives import linear_vocab_parallel_loss, vocab_parallel_loss
    from megatron_deft.objectives.linear_vocab_parallel import chunk_tokens, default_kernel

    world = dist.get_world_size(group)
    layer = tensor_parallel.ColumnParallelLinear(
        args.hidden,
        args.vocab,
        config=ModelParallelConfig(tensor_model_parallel_size=world),
        init_method=None,
        bias=False,
        gather_output=False,
        skip_weight_param_allocation=True,
        tp_group=group,
    )

    def megatron(h, w, y):
        return tensor_parallel.vocab_parallel_cross_entropy(layer(h, weight=w)[0], y)

    def floor(h, w, y):
        """megatron's path plus the one piece of work the fused path adds (its floor): the
        logits formed once more, in the fused path's default chunks, into one reused buffer."""
        loss = megatron(h, w, y)
        hidden, shard = h.detach().reshape(-1, h.shape[-1]), w.detach()
        chunk = chunk_tokens(hidden.shape[0], shard.shape[0])
        buffer = hidden.new_empty(chunk, shard.shape[0])
        for i in range(0, hidden.shape[0], chunk):
            part = hidden[i : i + chunk]
            torch.mm(part, shard.t(), out=buffer[: part.shape[0]])
        return loss

    def unfused(objective):
        return lambda h, w, y: vocab_parallel_loss(
            layer(h, weight=w)[0], y, objective, group=group, inplace=True
        )[0]

    def fused(objective, kernel):
        return lambda h, w, y: linear_vocab_parallel_loss(
            h, w, y, objective, group=group, kernel=kernel
        )[0]

    candidates = {
        "megatron ColumnParallelLinear + vocab_parallel_cross_entropy": megatron,
        "floor: megatron + the chunked logits matmul once more": floor,
    }
    for objective in args.unfused_objectives:
        candidates[f"{objective} unfused (linear + vocab_parallel_loss)"] = unfused(objective)
    for kernel in args.fused_kernels or [default_kernel(hidden)]:
        for objective in args.objectives:
            candidates[f"{objective} fused ({kernel} kernels)"] = fused(objective, kernel)
    return candidates | _peer_candidates(world)


def _peer_candidates(world):
    """cut-cross-entropy (PyPI), the peer baseline for NLL, when it is importable: TP 1 only (it
    has no vocabulary parallelism). Its Triton kernel (impl ``cce``) needs CUDA; elsewhere it runs
    its ``torch_compile`` implementation, which forms the full logits (a compiled baseline, not a
    cut one)."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        return {}
    if world > 1:
        return {}
    impl = "cce" if torch.cuda.is_available() else "torch_compile"

    def peer(h, w, y):
        return linear_cross_entropy(h, w, y, reduction="none", impl=impl)

    return {f"cut-cross-entropy nll (impl={impl})": peer}


def _inputs(args, rank, world, device, dtype):
    """(master inputs on this rank, target [N] or [N, 1]); every call gets fresh copies."""
    g = torch.Generator().manual_seed(1000 + rank)
    target = torch.randint(
        0, args.vocab, (args.tokens,), generator=torch.Generator().manual_seed(7)
    )
    if not args.output_layer:
        logits = torch.randn(args.tokens, args.vocab // world, generator=g) * 4
        return [logits.to(device=device, dtype=dtype)], target.to(device)
    shared = torch.Generator().manual_seed(1)  # hidden is replicated over the TP ranks
    hidden = torch.randn(args.tokens, 1, args.hidden, generator=shared)
    weight = torch.randn(args.vocab // world, args.hidden, generator=g) * (4 / args.hidden**0.5)
    return [t.to(device=device, dtype=dtype) for t in (hidden, weight)], target[:, None].to(device)


def _worker(rank, world, args, init_file, out_file):
    from megatron.core import parallel_state

    device = args.device
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        if args.output_layer:  # megatron-core's linear layer assumes CUDA in places
            from megatron_deft.compat import cpu

            cpu.enable()
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=30),
    )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    group = parallel_state.get_tensor_model_parallel_group()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    masters, target = _inputs(args, rank, world, device, dtype)
    if args.output_layer:
        candidates = _output_layer_candidates(args, group, masters[0])
    else:
        candidates = _loss_candidates(args.objectives, group)

    def fwd_bwd(fn, inputs):
        return torch.autograd.grad(fn(*inputs, target).sum(), inputs)

    def timed_call(fn):
        inputs = [m.clone().requires_grad_(True) for m in masters]  # some candidates overwrite
        _sync(device)
        start = time.perf_counter()
        fwd_bwd(fn, inputs)
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
    grads_bytes = sum(m.numel() * m.element_size() for m in masters) if args.output_layer else 0
    for name, fn in candidates.items():
        inputs = [m.clone().requires_grad_(True) for m in masters]  # allocated before measuring
        peak = peak_extra_bytes(lambda fn=fn, inputs=inputs: fwd_bwd(fn, inputs), device)
        del inputs
        rows.append((name, statistics.median(times[name]), peak, peak - grads_bytes))
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
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    what = f"output layer (h {args.hidden}) + loss" if args.output_layer else "loss"
    print(
        f"# {what} benchmark: {args.tokens} tokens x {args.vocab} vocab, {args.dtype} inputs, "
        f"{args.device} ({_device_name(args.device)}), torch {torch.__version__}, "
        f"median of {args.repeats} (after {args.warmup} warm-up)"
    )
    print(
        f"# one fp32 full-vocab logits buffer = {logits_mib:.0f} MiB (divide by TP for a shard)\n"
    )
    for tp in args.tp:
        if args.vocab % tp:
            raise SystemExit(f"--vocab {args.vocab} is not divisible by TP={tp}")
        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "rows.pt")
            mp.spawn(
                _worker, args=(tp, args, os.path.join(tmp, "store"), out_file), nprocs=tp, join=True
            )
            rows = torch.load(out_file)
        _print_table(tp, args, rows)


def _print_table(tp, args, rows):
    """Markdown table of one TP size; ratios against the first row (megatron-core)."""
    base_time, base_peak, base_work = rows[0][1:]
    print(f"## TP={tp} (per rank: {args.tokens} x {args.vocab // tp})\n")
    columns = ["loss", "fwd+bwd ms", "time vs megatron", "peak extra MiB", "peak vs megatron"]
    if args.output_layer:
        columns += ["workspace MiB (peak minus the returned grads)", "workspace vs megatron"]
    print("| " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * (len(columns) - 1))
    for name, seconds, peak, work in rows:
        cells = [
            name,
            f"{seconds * 1e3:.1f}",
            f"{seconds / base_time:.2f}x",
            f"{peak / 2**20:.1f}",
            f"{peak / max(base_peak, 1):.3f}x",
        ]
        if args.output_layer:
            cells += [f"{work / 2**20:.1f}", f"{work / max(base_work, 1):.3f}x"]
        print("| " + " | ".join(cells) + " |")
    print()


if __name__ == "__main__":
    main()
