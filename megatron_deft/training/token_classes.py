"""Histograms of the objective's per-token statistics, overall and per token class.

Every valid token's gate, p_target and (q-log objectives) exponent a is binned into ``NUM_BINS``
equal bins over ``[0, upper]`` (``upper`` = 1 except a Tsallis exponent q > 1): once into the row
of all tokens and once into the row of its token class (``token_class`` of the micro-batch, set
by ``--token-class-key``; -1 = unlabeled). One micro-batch gives

    counts [K + 1, Q, NUM_BINS + 2]  float64
        row 0: all valid tokens; row 1 + c: tokens of class c (c < K)
        Q statistics in ``histogram_stats(objective)`` order
        columns [0, NUM_BINS): bin counts; NUM_BINS: sum of the values; NUM_BINS + 1: sum of squares

Everything is a sum over tokens, so micro-batches, iterations and data-parallel ranks combine by
adding: the trainer all-reduces it together with the loss report, and the result does not depend
on the TP/PP/DP layout. Binning uses ``index_add_`` only (no host synchronisation on GPUs).
"""

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch

from megatron_deft.objectives.token_stats import BY_NAME, stats_of

NUM_BINS = 50


def histogram_stats(objective) -> Tuple[str, ...]:
    """Statistics histogrammed for ``objective``: its ``histogram`` token statistics."""
    return tuple(stat.name for stat in stats_of(objective) if stat.histogram)


def histogram_shape(objective, num_classes: int) -> Tuple[int, int, int]:
    """Shape of ``counts`` (module docstring): [num_classes + 1, Q, NUM_BINS + 2]."""
    return (num_classes + 1, len(histogram_stats(objective)), NUM_BINS + 2)


def histogram_upper(objective, stat: str) -> float:
    """Upper edge of the binned range (gate and p_target lie in [0, 1]; so does every exponent
    except Tsallis' constant a = q), as the statistic declares it."""
    return BY_NAME[stat].upper(objective.spec, dict(objective.params))


def bin_token_stats(
    stats: Dict[str, torch.Tensor], token_class: torch.Tensor, num_classes: int, objective
) -> torch.Tensor:
    """One micro-batch's ``counts`` (module docstring).

    Args:
        stats: the objective's per-token stats ([b, s] each, ``valid`` bool among them).
        token_class: [b, s] int class ids; ids outside [0, num_classes) count as unlabeled.
        num_classes: K, the number of class labels of the training data.
    """
    names = histogram_stats(objective)
    valid = stats["valid"].reshape(-1)
    classes = token_class.reshape(-1).to(valid.device)
    labeled = valid & (classes >= 0) & (classes < num_classes)
    rows = num_classes + 1
    # Rows of every token: 0 (all) if valid and 1 + class if labeled; invalid ones go to a
    # scratch row ``rows`` that is dropped at the end.
    all_row = torch.where(valid, 0, rows)
    class_row = torch.where(labeled, classes + 1, rows)
    width = NUM_BINS + 2
    out = torch.zeros(len(names), rows + 1, width, dtype=torch.float64, device=valid.device)
    for q, name in enumerate(names):
        values = stats[name].reshape(-1).double()
        upper = histogram_upper(objective, name)
        bins = (values * (NUM_BINS / upper)).long().clamp_(0, NUM_BINS - 1)
        flat = out[q].view(-1)  # [(rows + 1) * width]
        for row in (all_row, class_row):
            flat.index_add_(0, row * width + bins, torch.ones_like(values))
            flat.index_add_(0, row * width + NUM_BINS, values)
            flat.index_add_(0, row * width + NUM_BINS + 1, values * values)
    return out[:, :rows].transpose(0, 1).contiguous()


@dataclass
class Histogram:
    """One statistic's histogram for one class, ready for TensorBoard's ``add_histogram_raw``."""

    counts: torch.Tensor
    """float64 [NUM_BINS]"""
    edges: torch.Tensor
    """float64 [NUM_BINS + 1]"""
    sum: float
    sum_squares: float

    @property
    def num(self) -> int:
        return int(self.counts.sum())

    @property
    def mean(self) -> float:
        return self.sum / max(self.num, 1)

    def tensorboard_raw(self) -> dict:
        """Keyword arguments of ``SummaryWriter.add_histogram_raw`` (min/max: the outer edges of
        the non-empty bins)."""
        filled = torch.nonzero(self.counts).reshape(-1)
        return dict(
            min=float(self.edges[filled[0]]),
            max=float(self.edges[filled[-1] + 1]),
            num=self.num,
            sum=self.sum,
            sum_squares=self.sum_squares,
            bucket_limits=self.edges[1:].tolist(),
            bucket_counts=self.counts.tolist(),
        )


def split_histograms(
    counts: torch.Tensor, class_names: Sequence[str], objective
) -> Dict[str, Dict[str, Histogram]]:
    """``counts`` (summed over any number of micro-batches) -> {class: {stat: Histogram}} with
    class ``None`` for all tokens; classes without tokens are left out."""
    counts = counts.double().cpu()
    out = {}
    for row, name in enumerate((None, *class_names)):
        if counts[row, 0, :NUM_BINS].sum() == 0:
            continue
        out[name] = {
            stat: Histogram(
                counts=counts[row, q, :NUM_BINS],
                edges=torch.linspace(
                    0.0, histogram_upper(objective, stat), NUM_BINS + 1, dtype=torch.float64
                ),
                sum=float(counts[row, q, NUM_BINS]),
                sum_squares=float(counts[row, q, NUM_BINS + 1]),
            )
            for q, stat in enumerate(histogram_stats(objective))
        }
    return out
