"""The LR schedule the trainer builds from its flags, step by step against closed forms."""

import math

import pytest

from megatron_deft.training.arguments import parse_config
from megatron_deft.training.setup import build_scheduler

BASE = [
    "--mock-data",
    "--vocab-size",
    "500",
    "--device",
    "cpu",
    "--train-iters",
    "100",
    "--lr",
    "1.0",
    "--min-lr",
    "0.1",
    "--lr-warmup-iters",
    "10",
]


def _reference(step: int, style: str, anneal: int = 0, anneal_style: str = "") -> float:
    """Warmup 0 -> 1.0 over 10 steps, then ``style`` from 1.0 down to 0.1 at step 100."""
    if step <= 10:
        return step / 10
    if style == "constant":
        return 1.0
    progress = (step - 10) / 90
    if style == "linear":
        return 0.1 + 0.9 * (1 - progress)
    if style == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    if style == "inverse-square-root":
        return max(0.1, (10 / step) ** 0.5)
    assert style == "WSD"
    if step <= 100 - anneal:
        return 1.0
    fraction = (step - (100 - anneal)) / anneal
    coefficient = {
        "linear": 1 - fraction,
        "cosine": 0.5 * (1 + math.cos(math.pi * fraction)),
        "exponential": 2 * 0.5**fraction - 1,
        "minus_sqrt": 1 - fraction**0.5,
    }[anneal_style]
    return 0.1 + 0.9 * coefficient


class _Optimizer:
    """The one thing the scheduler touches: param_groups."""

    def __init__(self):
        self.param_groups = [{"lr": None, "weight_decay": None}]


@pytest.mark.parametrize(
    "style, extra, anneal, anneal_style",
    [
        ("constant", [], 0, ""),
        ("linear", [], 0, ""),
        ("cosine", [], 0, ""),
        ("inverse-square-root", [], 0, ""),
        ("WSD", ["--lr-wsd-decay-iters", "30", "--lr-wsd-decay-style", "linear"], 30, "linear"),
        ("WSD", ["--lr-wsd-decay-iters", "20", "--lr-wsd-decay-style", "cosine"], 20, "cosine"),
        ("WSD", ["--lr-wsd-decay-iters", "40"], 40, "exponential"),  # Megatron-LM's default shape
        (
            "WSD",
            ["--lr-wsd-decay-iters", "25", "--lr-wsd-decay-style", "minus_sqrt"],
            25,
            "minus_sqrt",
        ),
    ],
)
def test_schedule_follows_its_closed_form(style, extra, anneal, anneal_style):
    config = parse_config(BASE + ["--lr-decay-style", style] + extra, world_size=1)
    optimizer = _Optimizer()
    scheduler = build_scheduler(optimizer, config.optimizer, config.training.train_iters)
    for step in range(1, 101):
        scheduler.step(increment=1)
        expected = _reference(step, style, anneal, anneal_style)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, abs=1e-12), step
