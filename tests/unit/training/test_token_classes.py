"""Token-class histograms of gate / p_target / a: binning against a numpy float64 reference, and
what the metrics logger writes to TensorBoard from them."""

import numpy as np
import pytest
import torch

from megatron_deft.objectives import parse_objective
from megatron_deft.training.metrics import MetricsLogger
from megatron_deft.training.token_classes import (
    NUM_BINS,
    bin_token_stats,
    histogram_stats,
    split_histograms,
)


def _stats(rng, shape, upper_exponent=1.0):
    valid = torch.from_numpy(rng.random(shape) < 0.8)
    stats = {
        "gate": torch.from_numpy(rng.random(shape)),
        "p_target": torch.from_numpy(rng.random(shape)),
        "exponent": torch.from_numpy(rng.random(shape) * upper_exponent),
        "valid": valid,
    }
    stats["gate"][0, :3] = torch.tensor([0.0, 1.0, 0.5])  # both ends and an interior edge
    for name in ("gate", "p_target", "exponent"):
        stats[name][~valid] = 0.0  # the objective's convention at invalid tokens
    return stats


def _reference(stats, token_class, num_classes, names, uppers):
    """[K + 1, Q, NUM_BINS + 2] with numpy: row 0 all valid tokens, row 1 + c class c."""
    valid = stats["valid"].numpy().reshape(-1)
    classes = token_class.numpy().reshape(-1)
    out = np.zeros((num_classes + 1, len(names), NUM_BINS + 2))
    selections = [valid] + [valid & (classes == c) for c in range(num_classes)]
    for row, selected in enumerate(selections):
        for q, name in enumerate(names):
            values = stats[name].numpy().reshape(-1)[selected].astype(np.float64)
            out[row, q, :NUM_BINS] = np.histogram(values, bins=NUM_BINS, range=(0, uppers[q]))[0]
            out[row, q, NUM_BINS] = values.sum()
            out[row, q, NUM_BINS + 1] = (values**2).sum()
    return out


@pytest.mark.parametrize(
    "objective_name, upper_exponent",
    [
        ("deft", 1.0),
        ("dft", 1.0),
        ("tsallis:q=2.5", 2.5),
    ],
)
def test_binning_matches_numpy_per_class(objective_name, upper_exponent):
    rng = np.random.default_rng(0)
    objective = parse_objective(objective_name)
    stats = _stats(rng, (4, 37), upper_exponent)
    # classes 0..2, -1 unlabeled, and 5 (beyond num_classes: counted as unlabeled)
    token_class = torch.from_numpy(rng.choice([-1, 0, 1, 2, 5], size=(4, 37)))
    names = histogram_stats(objective)
    assert ("exponent" in names) == (objective.family == "qlog")
    uppers = [upper_exponent if name == "exponent" else 1.0 for name in names]
    counts = bin_token_stats(stats, token_class, 3, objective)
    expected = _reference(stats, token_class, 3, names, uppers)
    assert counts.shape == (4, len(names), NUM_BINS + 2) and counts.dtype == torch.float64
    np.testing.assert_array_equal(counts[:, :, :NUM_BINS].numpy(), expected[:, :, :NUM_BINS])
    np.testing.assert_allclose(counts.numpy(), expected, rtol=1e-12)
    assert counts[0, 0, :NUM_BINS].sum() == stats["valid"].sum()


def test_split_histograms_drops_empty_classes_and_gives_tensorboard_arguments():
    objective = parse_objective("deft")
    stats = {
        name: torch.tensor([[0.05, 0.31, 0.99]], dtype=torch.float64)
        for name in ("gate", "p_target", "exponent")
    }
    stats["valid"] = torch.tensor([[True, True, True]])
    counts = bin_token_stats(stats, torch.tensor([[0, 0, -1]]), 2, objective)
    histograms = split_histograms(counts, ("a", "b"), objective)
    assert sorted(histograms, key=str) == [None, "a"]  # class "b" has no tokens
    gate = histograms["a"]["gate"]
    assert gate.num == 2 and gate.mean == pytest.approx((0.05 + 0.31) / 2)
    raw = gate.tensorboard_raw()
    assert raw["min"] == pytest.approx(0.04) and raw["max"] == pytest.approx(0.32)
    assert len(raw["bucket_limits"]) == len(raw["bucket_counts"]) == NUM_BINS
    assert raw["bucket_counts"][2] == 1 and raw["bucket_counts"][15] == 1
    assert raw["sum_squares"] == pytest.approx(0.05**2 + 0.31**2)


def _read_tensorboard(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_logger_sums_the_window_of_updated_iterations_and_writes_per_class(tmp_path):
    objective = parse_objective("cayley")
    rng = np.random.default_rng(1)
    per_iteration = []
    for _ in range(3):
        stats = _stats(rng, (2, 16))
        token_class = torch.from_numpy(rng.choice([-1, 0, 1], size=(2, 16)))
        per_iteration.append(
            (stats, token_class, bin_token_stats(stats, token_class, 2, objective))
        )
    logger = MetricsLogger(
        is_writer=True,
        tensorboard_dir=str(tmp_path),
        objective=objective,
        train_iters=3,
        class_names=("clean", "noisy"),
    )
    base = dict(
        loss=1.0,
        nll=1.0,
        grad_norm=1.0,
        gate=0.5,
        exponent=0.5,
        p_target=0.5,
        renyi2_entropy=1.0,
        confident_conflict=0.0,
    )
    for iteration, (_, _, counts) in enumerate(per_iteration, start=1):
        updated = iteration != 2  # iteration 2 was skipped: not part of the window's statistics
        logger.record(
            iteration,
            dict(base, updated=updated, token_class_counts=counts, tokens=32),
            lr=1e-3,
            consumed={"samples": 2 * iteration, "rows": iteration},
            log_now=iteration == 3,
        )
    logger.close()
    events = _read_tensorboard(tmp_path)
    kept = [per_iteration[0], per_iteration[2]]
    for row, name in ((1, "clean"), (2, "noisy")):
        values = np.concatenate(
            [s["gate"].numpy()[s["valid"].numpy() & (c.numpy() == row - 1)] for s, c, _ in kept]
        )
        (mean,) = events.Scalars(f"train_class/{name}/gate")
        assert mean.step == 3 and mean.value == pytest.approx(values.mean(), rel=1e-6)
        (histogram,) = events.Histograms(f"train_class/{name}/gate_histogram")
        assert histogram.histogram_value.num == len(values)
        expected_counts = np.histogram(values, bins=NUM_BINS, range=(0, 1))[0]
        assert list(histogram.histogram_value.bucket) == expected_counts.tolist()
    all_valid = sum(int(s["valid"].sum()) for s, _, _ in kept)
    (everything,) = events.Histograms("train/exponent_histogram")
    assert everything.histogram_value.num == all_valid
    fractions = [
        events.Scalars(f"train_class/{n}/token_fraction")[0].value for n in ("clean", "noisy")
    ]
    labeled = sum(int((s["valid"] & (c >= 0)).sum()) for s, c, _ in kept)
    assert sum(fractions) == pytest.approx(labeled / all_valid, rel=1e-6)
