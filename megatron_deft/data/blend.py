"""Preprocessed data sets as one split, in Megatron ``--data-path`` syntax: one, union, or blend.

``data_path`` is one of

- ``[prefix]``: one preprocessed set; rows exactly as the JSONL it was made from would give.
- ``[prefix_1, prefix_2, ...]``: the union of their samples in that order, packed together,
  exactly like listing the JSONL files in ``--train-data``.
- ``[w_1, prefix_1, w_2, prefix_2, ...]``: a blend. Each set is packed on its own into
  ``R_i`` rows; a blend epoch has ``N = sum_i R_i`` rows of which ``n_i`` (largest-remainder
  rounding of ``N * w_i / sum(w)``) come from set ``i``: the next ``n_i`` entries of its own
  seeded stream of row permutations (``n_i < R_i``: each epoch a further part of the set, all
  of it every ``ceil(R_i / n_i)`` epochs; ``n_i > R_i``: every row ``floor`` or
  ``ceil(n_i / R_i)`` times). The rows are interleaved
  (entry ``j`` of set ``i`` at ``(j + 1/2) / n_i``, so every prefix holds each set within about
  one row of its share: the order of ``eval_batches``), and :class:`SFTDataLoader` shuffles
  them per epoch as for any split, so every epoch holds exactly ``n_i`` rows of set ``i`` and
  a window of ``m`` rows about ``m * w_i``. Weights are shares of *rows* (with packing, about
  shares of tokens). Everything depends only on the data, weights and seed, never on the
  parallel layout.
"""

import logging
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_deft.data.indexed import IndexedSamples, check_tokenizer
from megatron_deft.data.packing import Row, plan_rows

logger = logging.getLogger(__name__)

# Tags the per-set row streams' random numbers apart from the loader's ([seed, epoch]).
BLEND_STREAM = 0x626C656E


def data_path_items(data_path) -> List[str]:
    """``--data-path`` as a list of strings; one string is split on whitespace and commas (as
    launch scripts pass it), list items (weights may be numbers) become strings."""
    if isinstance(data_path, str):
        return [item for item in re.split(r"[\s,]+", data_path) if item]
    return [str(item) for item in data_path]


def parse_data_path(data_path) -> Tuple[List[str], Optional[np.ndarray]]:
    """``(prefixes, weights normalised to sum 1, or None when no weights are given)``."""
    items = data_path_items(data_path)
    if not items:
        raise ValueError("data_path is empty")
    numeric = [_is_number(item) for item in items]
    if not numeric[0]:
        if any(numeric):
            raise ValueError(
                f"data_path {items} mixes weights and prefixes: give either prefixes only or "
                "weight/prefix pairs like '0.7 set_a 0.3 set_b'"
            )
        return items, None
    if len(items) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise ValueError(
            f"data_path {items} must alternate weight and prefix ('0.7 set_a 0.3 set_b'), "
            "one weight per prefix"
        )
    weights = np.array([float(item) for item in items[0::2]], dtype=np.float64)
    if not np.all(np.isfinite(weights)) or np.any(weights <= 0):
        raise ValueError(f"data_path weights must be positive and finite, got {items[0::2]}")
    return items[1::2], weights / weights.sum()


class ConcatenatedSamples:
    """Several sample sources back to back: sample ``k`` of the whole is sample
    ``k - starts[i]`` of part ``i``. Same interface as :class:`TokenizedSamples`."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        self.starts = np.concatenate([[0], np.cumsum([len(part) for part in self.parts])])
        self.lengths = np.concatenate([part.lengths for part in self.parts]).astype(np.int64)
        self.loss_token_counts = np.concatenate(
            [part.loss_token_counts for part in self.parts]
        ).astype(np.int64)
        if any(part.class_names for part in self.parts):
            raise ValueError("ConcatenatedSamples: parts with token classes are not supported")
        self.classes, self.class_names = np.concatenate([p.classes for p in self.parts]), ()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def sample(self, index: int):
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part].sample(index - int(self.starts[part]))


def blend_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """int64 [num_sets]: ``total`` split by ``weights`` (sum 1) with largest remainders, so
    ``|counts_i - total * w_i| < 1`` and the counts sum to ``total``."""
    exact = weights * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    # Ties go to the earlier set (stable sort), so the split is deterministic.
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def interleave(counts: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``(set index, position within the set)``, int64 [sum(counts)] each: entry ``j`` of set
    ``i`` is placed at ``(j + 1/2) / counts_i``, sorted (ties by set index), so every prefix of
    the order is within about one row of each set's share."""
    sets = np.repeat(np.arange(len(counts)), counts)
    positions = np.concatenate([np.arange(n) for n in counts]).astype(np.int64)
    where = (positions + 0.5) / np.maximum(counts, 1)[sets]
    order = np.lexsort((sets, where))
    return sets[order], positions[order]


class BlendedRows:
    """The rows of every blend epoch (see the module docstring): ``N = sum_i R_i`` rows, ``n_i``
    of them from set ``i`` in the same interleaved slots each epoch. Set ``i`` fills its slots of
    blend epoch ``e`` with entries ``[e * n_i, (e + 1) * n_i)`` of its own stream (its seeded row
    permutations back to back), so an under-weighted set (``n_i < R_i``) moves on to rows it has
    not given yet, and all of them are trained on every ``ceil(R_i / n_i)`` epochs (Megatron's
    blend likewise walks each set through its own epochs). Rows index the union's samples.
    Indexing and ``len`` give blend epoch 0 (the plan, and what ``eval_batches`` reads)."""

    def __init__(self, rows_per_set: List[List[Row]], weights: np.ndarray, seed: int):
        self.rows_per_set, self.seed = rows_per_set, seed
        self.counts = blend_counts(weights, sum(len(rows) for rows in rows_per_set))
        self._sets, self._positions = interleave(self.counts)
        self._plan = self.epoch(0)
        for index, (rows, count) in enumerate(zip(rows_per_set, self.counts)):
            logger.info(
                "blend: set %d takes %d of %d rows per blend epoch (weight %.4f, its %d rows "
                "each used %.2fx per epoch)",
                index,
                count,
                len(self),
                weights[index],
                len(rows),
                count / len(rows),
            )

    def __len__(self) -> int:
        return len(self._plan)

    def __getitem__(self, index):
        return self._plan[index]

    def __iter__(self):
        return iter(self._plan)

    def epoch(self, epoch: int) -> List[Row]:
        """The rows of blend epoch ``epoch``, in slot order."""
        streams = [
            self._stream(index, epoch * int(count), int(count))
            for index, count in enumerate(self.counts)
        ]
        return [
            self.rows_per_set[s][streams[s][p]]
            for s, p in zip(self._sets.tolist(), self._positions.tolist())
        ]

    def _stream(self, index: int, start: int, count: int) -> np.ndarray:
        """Entries ``[start, start + count)`` of set ``index``'s stream: its own epoch ``k``
        is ``default_rng([seed, BLEND_STREAM, index, k]).permutation(R_index)``."""
        size = len(self.rows_per_set[index])
        first, last = start // size, (start + count - 1) // size
        permutations = [
            np.random.default_rng([self.seed, BLEND_STREAM, index, k]).permutation(size)
            for k in range(first, last + 1)
        ]
        offset = start - first * size
        return np.concatenate(permutations)[offset : offset + count] if count else np.empty(0, int)


def build_indexed_split(data_path, tokenizer_type, tokenizer, seq_length, data, seed):
    """``(samples, rows, report counts)`` of preprocessed sets named by ``data_path``.

    Args:
        tokenizer: this run's tokenizer (of ``tokenizer_type``); every set must have been made
            with it (checked against each set's sidecar).
        data: the ``DataConfig`` (uses overlong and pack_sequences).
        seed: the run's seed (a blend's row streams).
    Returns:
        counts: the keyword arguments of ``SplitReport`` except ``name``.
    """
    prefixes, weights = parse_data_path(data_path)
    parts = []
    for prefix in prefixes:
        part = IndexedSamples(prefix, seq_length, data.overlong)
        check_tokenizer(prefix, part.sidecar, tokenizer_type, tokenizer)
        parts.append(part)
    samples = parts[0] if len(parts) == 1 else ConcatenatedSamples(parts)
    if weights is None or len(parts) == 1:
        rows = plan_rows(samples.lengths, seq_length, data.pack_sequences)
        row_tokens = int(samples.lengths.sum())
    else:
        rows_per_set = []
        for start, part in zip(samples.starts[:-1].tolist(), parts):
            own_rows = plan_rows(part.lengths, seq_length, data.pack_sequences)
            if not own_rows:
                raise ValueError(f"{part.prefix}: no samples left to blend (all dropped)")
            rows_per_set.append([tuple(start + k for k in row) for row in own_rows])
        rows = BlendedRows(rows_per_set, weights, seed)
        flat = np.fromiter((k for row in rows for k in row), dtype=np.int64)
        row_tokens = int(samples.lengths[flat].sum())
    counts = _merged_counts(parts)
    counts.update(
        num_rows=len(rows),
        packing_efficiency=row_tokens / max(1, len(rows) * seq_length),
    )
    return samples, rows, counts


def _merged_counts(parts: Sequence[IndexedSamples]) -> dict:
    """Per-set counts summed; skipped lines come from each set's preprocessing sidecar."""
    counts = {key: sum(part.counts[key] for part in parts) for key in parts[0].counts}
    skipped = {}
    for part in parts:
        for reason, number in part.sidecar["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + number
    examples = [example for part in parts for example in part.sidecar["skipped_examples"]]
    return dict(counts, skipped=skipped, skipped_examples=examples)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
