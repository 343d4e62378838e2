"""Experiment configurations: ``smoke`` (CI, minutes on 2 CPU cores), the CPU evidence runs
(docs/evidence*.md) and ``full`` (the benchmark).

Every objective, seed and variant gets the same data, steps, learning rate and schedule: nothing
is tuned per objective.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Tuple

OBJECTIVES = ("nll", "deft", "cayley", "eaft", "dft", "p")
# Phase-2 variants: (label, starts from the prior, has task-A samples, A corruption rate used)
VARIANTS = ("mix", "clean", "forget", "scratch")


@dataclass
class ExperimentConfig:
    """One experiment; every run uses these settings (see README.md for the design)."""

    name: str
    """Preset name, recorded in the report."""
    objectives: Tuple[str, ...] = OBJECTIVES
    """Phase-2 objectives compared (same data, steps, LR, seeds)."""
    variants: Tuple[str, ...] = VARIANTS
    """mix: B + A with corrupted answers (rate noise_rate); clean: B + A, no corruption;
    forget: B only (A retention); scratch: B only from random init (no prior)."""
    seeds: Tuple[int, ...] = (1, 2, 3)
    """Phase-2 seeds (weight init of scratch runs, data order); data sets are fixed."""
    noise_rate: float = 0.3
    """Probability r that a task-A answer in the mix variant is replaced by a wrong number."""
    addition_digits: int = 2
    """Task A: addition of two numbers with up to this many digits (the prior)."""
    sort_length: int = 5
    """Task B: sort the digits of a string of 3..sort_length digits (unknown to the prior)."""
    prior_samples: int = 8000
    """Phase-1 training samples of task A."""
    phase2_b_samples: int = 2000
    """Phase-2 training samples of task B."""
    phase2_a_samples: int = 2000
    """Phase-2 training samples of task A (mix and clean variants)."""
    eval_samples: int = 200
    """Samples per evaluation file (held-out A, held-out B, corrupted training A)."""
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    seq_length: int = 48
    micro_batch_size: int = 32
    global_batch_size: int = 32
    prior_iters: int = 3000
    """Phase-1 steps (NLL)."""
    prior_lr: float = 3e-3
    phase2_iters: int = 600
    """Phase-2 steps per run."""
    phase2_lr: float = 1e-3
    phase2_lr_decay_style: str = "cosine"
    """Phase-2 LR schedule after the warmup (the trainer's --lr-decay-style). "constant" keeps
    the LR flat, so a plateau in a curve comes from the objective, not from the LR reaching 0."""
    save_interval: int = 100
    """Phase-2 checkpoints (each evaluated) every this many steps."""
    tensor_model_parallel_size: int = 1
    nproc: int = 1
    """Processes per run (TP x DP)."""
    device: str = "cpu"
    max_new_tokens: int = 8
    data_seed: int = 1234
    extra_train_args: Tuple[str, ...] = field(default_factory=tuple)
    """Appended to every megatron-deft-train command (e.g. --bf16 on GPUs)."""


# The CPU evidence presets and ``full`` share this data and prior (the same phase-1 run), a
# 64-wide model and phase-2 LR 3e-3; they differ in phase-2 length, schedule and coverage.
_CPU_EVIDENCE = ExperimentConfig(
    name="cpu-evidence",
    prior_samples=20000,
    phase2_b_samples=2000,
    phase2_a_samples=2000,
    eval_samples=100,
    hidden_size=64,
    prior_iters=6000,
    phase2_lr=3e-3,
)
_CPU_PLATEAU = dataclasses.replace(
    _CPU_EVIDENCE, phase2_iters=24000, phase2_lr_decay_style="constant", save_interval=800
)

PRESETS = {
    "smoke": ExperimentConfig(
        name="smoke",
        # One objective of each kind the tests tell apart (gate 1; gate p; a Tsallis exponent;
        # an entropy gate without one): the pipeline is the same for the others.
        objectives=("nll", "p", "deft", "eaft"),
        variants=("mix",),
        seeds=(1,),
        prior_samples=1000,
        phase2_b_samples=256,
        phase2_a_samples=256,
        eval_samples=24,
        num_layers=1,
        hidden_size=64,
        prior_iters=40,
        phase2_iters=8,
        save_interval=4,
        micro_batch_size=16,
        global_batch_size=16,
        max_new_tokens=6,
    ),
    # A quick CPU look: 3 seeds of the mix variant, a few minutes on 2 cores; more variants with
    # --variants (finished runs are reused).
    "medium": ExperimentConfig(
        name="medium",
        variants=("mix",),
        prior_samples=8000,
        phase2_b_samples=1000,
        phase2_a_samples=1000,
        eval_samples=100,
        hidden_size=64,
        prior_iters=1500,
        phase2_iters=100,
        save_interval=20,
    ),
    # The CPU evidence run (docs/evidence.md): all variants, 3 seeds, ~75 min on 2 cores. Phase-2 LR
    # 3e-3 (the prior's): at 1e-3, NLL reached only 12% held-out-B exact-match from this prior in
    # 1200 steps (one probe seed), too little to compare objectives on new learning.
    "cpu-long": dataclasses.replace(
        _CPU_EVIDENCE, name="cpu-long", phase2_iters=1200, save_interval=100
    ),
    # cpu-long's mix variant run 3x longer (docs/evidence-horizon.md), for the horizon check:
    # from this prior, NLL's held-out-B exact-match is still rising after 1200 steps.
    "cpu-horizon": dataclasses.replace(
        _CPU_EVIDENCE, name="cpu-horizon", variants=("mix",), phase2_iters=3600, save_interval=300
    ),
    # cpu-horizon with a constant phase-2 LR, run long (docs/evidence-plateau.md): under cosine
    # decay NLL's best step sits at the end of every run length, so the 3x-the-best-step horizon
    # needs a schedule that does not decay. A one-seed NLL probe at this LR came within 0.02 of
    # its best held-out-B exact-match (0.95) at step ~7200 of 12000. dft and p are left out:
    # they learned nothing at this LR in cpu-long and cpu-horizon (~110 min with --jobs 2).
    "cpu-plateau": dataclasses.replace(
        _CPU_PLATEAU,
        name="cpu-plateau",
        variants=("mix",),
        objectives=("nll", "deft", "cayley", "eaft"),
    ),
    # The benchmark: cpu-plateau's settings (validated on CPU: the prior reaches >= 95% on A, NLL
    # learns B and plateaus well before the end) for every variant and all six objectives:
    # 72 runs of 24000 steps, ~11 h on 2 CPU cores with --jobs 2; meant for a GPU node
    # (--device cuda --jobs N). Not run yet.
    "full": dataclasses.replace(_CPU_PLATEAU, name="full"),
}


def preset(name: str, **overrides) -> ExperimentConfig:
    if name not in PRESETS:
        raise SystemExit(f"unknown --config {name!r}; choose from {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
