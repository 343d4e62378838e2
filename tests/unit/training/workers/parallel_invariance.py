"""torchrun worker: train the same global batches under every layout this world size allows.

Usage: torchrun --nproc_per_node N parallel_invariance.py OUT_DIR
Writes OUT_DIR/results.json ({case: per-iteration metrics}) and OUT_DIR/<case>.stage<k>.pt
(full weights after training; `<case>-init` before). The pytest side compares layouts.
"""

import os
import sys

from common import config_for, save_weights, train_recording, write_results

from megatron_deft.training.setup import finish_param_sync
from megatron_deft.training.trainer import Trainer

ITERATIONS = 3
LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (1, 2), (1, 1)], 4: [(2, 2)]}
# Activation recomputation against the same run without it, with dropout (whose RNG state the
# recomputation must replay), single process (4 layers) and PP=2 (2 layers per stage, where
# `block` counts its layers per stage).
FULL = ["--recompute-granularity", "full", "--recompute-method"]
RECOMPUTE = {
    "none": [],
    "full-uniform": [*FULL, "uniform", "--recompute-num-layers", 2],
    "full-block": [*FULL, "block", "--recompute-num-layers", 1],
    "selective": ["--recompute-granularity", "selective"],
}
RECOMPUTE_CASES = {
    1: ((1, 1), ("none", "full-uniform", "full-block", "selective")),
    2: ((1, 2), ("none", "full-block")),
}
DROPOUT = ["--hidden-dropout", 0.1, "--attention-dropout", 0.1]
PACKED_LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 4: [(2, 2)]}  # DP 2 adds nothing to THD


def run_case(out_dir, results, name, tp, pp, extra, save_init=False, save_grads=False):
    trainer = Trainer(config_for(tp, pp, extra))
    if save_init:
        save_weights(trainer.model, out_dir, f"{name}-init")
    counts = count_forwards(trainer.model) if save_grads else None
    history = train_recording(trainer)
    if save_grads:  # the last backward's gradients, and which forwards ran how often
        save_weights(trainer.model, out_dir, f"{name}-grads", grads=True)
        results[f"{name}-forwards"] = gathered_counts(counts)
    finish_param_sync(trainer.model, trainer.config)  # overlap-param-gather defers the last one
    save_weights(trainer.model, out_dir, name)
    results[name] = history
    trainer.close(keep_process_group=True)


def count_forwards(model) -> dict:
    """{global layer number: [forwards of the layer, of its core attention]}, counted from now
    on by forward pre-hooks: a recomputed part runs twice per micro-batch."""
    counts = {}
    for chunk in model:
        for layer in chunk.module.decoder.layers:
            number = layer.layer_number
            counts[number] = [0, 0]
            for index, module in enumerate((layer, layer.self_attention.core_attention)):
                module.register_forward_pre_hook(
                    lambda *_, n=number, i=index: counts[n].__setitem__(i, counts[n][i] + 1)
                )
    return counts


def gathered_counts(counts: dict) -> list:
    """The forward counts of every pipeline stage, as [[layer, core attention], ...]."""
    import torch.distributed as dist

    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, counts)
    merged = {number: value for stage in everyone for number, value in stage.items()}
    return [merged[number] for number in sorted(merged)]


def run_recompute_cases(out_dir, results, world):
    (tp, pp), variants = RECOMPUTE_CASES[world]
    for variant in variants:
        extra = ["--sft-objective", "deft", "--train-iters", ITERATIONS, *DROPOUT]
        extra += RECOMPUTE[variant]
        name = f"tp{tp}pp{pp}dp{world // (tp * pp)}-recompute-{variant}"
        run_case(out_dir, results, name, tp, pp, extra, save_grads=True)


def main(out_dir):
    world = int(os.environ["WORLD_SIZE"])
    results = {}
    for tp, pp in LAYOUTS[world]:
        dp = world // (tp * pp)
        for distributed in (False, True):  # the optimizer does not depend on the objective
            name = f"tp{tp}pp{pp}dp{dp}-deft-{'distopt' if distributed else 'plain'}"
            extra = ["--sft-objective", "deft", "--train-iters", ITERATIONS]
            extra += ["--use-distributed-optimizer"] if distributed else []
            run_case(out_dir, results, name, tp, pp, extra, save_init=not distributed)
        # the other exponents' inputs: nll's none, cayley's micro-batch mean p, eaft's gathered
        # top-k; a threshold ablation's token count (p ~ 1/500 at init: th splits the tokens)
        for objective in ("nll", "cayley", "eaft", "nll_top:0.002"):
            extra = ["--sft-objective", objective, "--train-iters", ITERATIONS]
            run_case(out_dir, results, f"tp{tp}pp{pp}dp{dp}-{objective}-plain", tp, pp, extra)
    # Qwen3-style attention: per-head q/k RMSNorm (replicated over TP; megatron-core sums its
    # gradient over the TP ranks' heads) and a head size other than hidden / heads.
    tp, pp = LAYOUTS[world][0]  # the most tensor-parallel layout of this world size
    qk_norm = [
        "--sft-objective",
        "deft",
        "--train-iters",
        ITERATIONS,
        "--qk-layernorm",
        "--kv-channels",
        24,
    ]
    run_case(
        out_dir, results, f"tp{tp}pp{pp}dp{world // (tp * pp)}-deft-plain-qknorm", tp, pp, qk_norm
    )
    # Packed rows as one THD stream per micro-batch (PackedSeqParams, our sdpa attention),
    # with sequence parallelism where TP > 1 (the stream, not the rows, is split over TP).
    packed = ["--sft-objective", "deft", "--train-iters", ITERATIONS, "--pack-sequences"]
    for tp, pp in PACKED_LAYOUTS[world]:
        sp = ["--sequence-parallel"] if tp > 1 else []
        name = f"tp{tp}pp{pp}dp{world // (tp * pp)}-deft-plain-packed" + ("-sp" if sp else "")
        run_case(out_dir, results, name, tp, pp, packed + sp)
    tp, pp = LAYOUTS[world][0]
    if tp > 1:  # sequence parallelism: the same model, its activations split differently
        sequence_parallel = [
            "--sft-objective",
            "deft",
            "--train-iters",
            ITERATIONS,
            "--sequence-parallel",
        ]
        run_case(
            out_dir,
            results,
            f"tp{tp}pp{pp}dp{world // (tp * pp)}-deft-plain-sp",
            tp,
            pp,
            sequence_parallel,
        )
    if world == 2:
        interleaved = [
            "--sft-objective",
            "deft",
            "--train-iters",
            ITERATIONS,
            "--num-layers-per-virtual-pipeline-stage",
            1,
        ]
        run_case(out_dir, results, "tp1pp2dp1-deft-plain-interleaved", 1, 2, interleaved)
        overlap = [
            "--sft-objective",
            "deft",
            "--train-iters",
            ITERATIONS,
            "--use-distributed-optimizer",
            "--overlap-grad-reduce",
            "--overlap-param-gather",
        ]
        run_case(out_dir, results, "tp1pp1dp2-deft-distopt-overlap", 1, 1, overlap)
        # the objective on the full logits, against the (fused output layer) reference
        unfused = ["--sft-objective", "deft", "--train-iters", ITERATIONS, "--unfused-output-loss"]
        run_case(out_dir, results, "tp2pp1dp1-deft-plain-unfused", 2, 1, unfused)
    if world in RECOMPUTE_CASES:
        run_recompute_cases(out_dir, results, world)
    write_results(out_dir, results)


if __name__ == "__main__":
    import torch.distributed as dist

    main(sys.argv[1])
    dist.destroy_process_group()
