"""Deterministic, resumable order of rows -> global batches -> this rank's micro-batches.

The row stream is the concatenation of per-epoch permutations: epoch ``e`` visits all ``N``
rows in the order ``default_rng([seed, e]).permutation(N)`` (a blend's rows are the rows of
its epoch ``e``: :class:`megatron_deft.data.blend.BlendedRows`). Global batch ``i`` is stream
positions ``[i*G, (i+1)*G)`` (it may straddle an epoch boundary); data-parallel rank ``d``
takes the contiguous slice ``[d*G/DP, (d+1)*G/DP)`` of it and cuts it into micro-batches of
``b`` rows, in order. The order therefore depends only on (data, seed, G), never on DP, and
``rows_consumed`` in :meth:`SFTDataLoader.state_dict` is all a checkpoint needs to resume it.
"""

import hashlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import numpy as np

from megatron_deft.data.batch import collate_rows
from megatron_deft.data.blend import BlendedRows
from megatron_deft.data.packing import Row, build_row, empty_row
from megatron_deft.data.sft_dataset import TokenizedSamples


@dataclass
class GlobalBatch:
    """This rank's share of one global batch."""

    microbatches: List[Dict]
    """``G / (DP * b)`` micro-batch dicts (see ``megatron_deft.data.batch``)."""
    num_loss_tokens: int
    """Loss-carrying tokens in the whole global batch, over all DP ranks (for normalising)."""


class SFTDataLoader:
    """Yields :class:`GlobalBatch` es for one data-parallel rank; checkpointable."""

    def __init__(
        self,
        samples: TokenizedSamples,
        rows: Union[Sequence[Row], BlendedRows],
        seq_length: int,
        pad_id: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
        packed: bool = False,
        with_attention_mask: bool = True,
    ):
        _check_layout(global_batch_size, micro_batch_size, dp_rank, dp_size)
        if not rows:
            raise ValueError("the data set has no rows (every sample was skipped or dropped)")
        self.samples = samples
        # The same rows every epoch, or a blend's, whose sets move on to further rows each epoch.
        self._blended = isinstance(rows, BlendedRows)
        self.rows = rows if self._blended else list(rows)
        self.seq_length, self.pad_id, self.seed = seq_length, pad_id, seed
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.packed, self.with_attention_mask = packed, with_attention_mask
        self.num_microbatches = global_batch_size // (micro_batch_size * dp_size)
        self.rows_consumed = 0
        self.samples_consumed = 0  # samples in those rows (a packed row holds several)
        self._num_tokens = int(samples.lengths.sum())
        # Which samples form which row, in order: a resumed run must see the same rows (blend
        # weights, sample order or packing can change them at equal row and token counts); a
        # blend's later epochs come from its sets' own rows, so they are in the digest too.
        row_starts, flat_samples = _flatten(self.rows)
        digest = hashlib.blake2b(row_starts.tobytes() + flat_samples.tobytes(), digest_size=8)
        for set_rows in self.rows.rows_per_set if self._blended else []:
            digest.update(b"".join(part.tobytes() for part in _flatten(set_rows)))
        self._rows_digest = digest.hexdigest()
        self._cached_epoch, self._cached_permutation = -1, None
        # Epoch 0's rows are the plan itself (a blend's too): its counts come from the same pass.
        self._cached_rows_epoch = 0
        self._cached_rows = self.rows, self._row_loss_tokens(row_starts, flat_samples)

    @property
    def class_names(self):
        """Token class labels; micro-batch ``token_class`` ids index this tuple."""
        return self.samples.class_names

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def epoch(self) -> int:
        """Epoch of the next row to be read (0-based)."""
        return self.rows_consumed // self.num_rows

    def stream_rows(self, start: int, count: int) -> np.ndarray:
        """Row indices at stream positions ``[start, start + count)``, each into its epoch's
        rows."""
        positions = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(positions // self.num_rows):
            in_epoch = positions // self.num_rows == epoch
            out[in_epoch] = self._permutation(int(epoch))[positions[in_epoch] % self.num_rows]
        return out

    def next_global_batch(self) -> GlobalBatch:
        """This rank's micro-batches of the next global batch; advances ``rows_consumed`` by G."""
        rows, loss_tokens = self.rows_at(self.rows_consumed, self.global_batch_size)
        self.rows_consumed += self.global_batch_size
        self.samples_consumed += sum(map(len, rows))
        return self._share(rows, loss_tokens)

    def rows_at(self, start: int, count: int) -> Tuple[List[Row], int]:
        """(the rows at stream positions ``[start, start + count)``, their loss-carrying
        targets)."""
        indices = self.stream_rows(start, count)
        epochs = np.arange(start, start + count) // self.num_rows
        rows, loss_tokens = [], 0
        for epoch in np.unique(epochs):  # a global batch may straddle an epoch boundary
            epoch_rows, row_loss_tokens = self._rows_of_epoch(int(epoch))
            in_epoch = indices[epochs == epoch]
            rows += [epoch_rows[r] for r in in_epoch]
            loss_tokens += int(row_loss_tokens[in_epoch].sum())
        return rows, loss_tokens

    def __iter__(self) -> Iterator[GlobalBatch]:
        while True:
            yield self.next_global_batch()

    def eval_batches(self) -> Iterator[GlobalBatch]:
        """One pass over all rows in plan order (no shuffle; ``rows_consumed`` untouched). The
        last global batch is filled with all-padding rows so every rank runs the same steps."""
        plan, row_loss_tokens = self._rows_of_epoch(0)
        for start in range(0, self.num_rows, self.global_batch_size):
            indices = np.arange(start, min(start + self.global_batch_size, self.num_rows))
            rows = [plan[r] for r in indices] + [()] * (self.global_batch_size - len(indices))
            yield self._share(rows, int(row_loss_tokens[indices].sum()))

    def state_dict(self) -> Dict[str, Union[int, str]]:
        return {
            "rows_consumed": self.rows_consumed,
            "seed": self.seed,
            "num_rows": self.num_rows,
            "num_tokens": self._num_tokens,
            "rows_digest": self._rows_digest,
        }

    def load_state_dict(self, state: Dict[str, Union[int, str]]) -> None:
        """Resumes at ``state["rows_consumed"]``; refuses a different seed or data set (checkpoints
        from before ``rows_digest`` was recorded are checked on the counts only)."""
        mine = self.state_dict()
        for key in ("seed", "num_rows", "num_tokens", "rows_digest"):
            if key in state and str(state[key]) != str(mine[key]):
                raise ValueError(
                    f"data loader checkpoint has {key}={state[key]} but this run has {mine[key]}: "
                    "the data (or its blend weights or order), tokenizer, seq_length, packing "
                    "or seed changed, so the saved "
                    "position does not identify the same rows"
                )
        self.rows_consumed = int(state["rows_consumed"])
        self.samples_consumed = self._samples_before(self.rows_consumed)

    def _samples_before(self, position: int) -> int:
        """Samples in the rows at stream positions ``[0, position)``: the rows fix the count, so
        checkpoints need not hold it. Read one epoch at a time."""
        total = 0
        for start in range(0, position, self.num_rows):
            rows, _ = self.rows_at(start, min(self.num_rows, position - start))
            total += sum(map(len, rows))
        return total

    def _share(self, global_rows: List[Row], num_loss_tokens: int) -> GlobalBatch:
        per_rank = self.global_batch_size // self.dp_size
        mine = global_rows[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        microbatches = []
        for start in range(0, per_rank, self.micro_batch_size):
            layouts = [self._layout(row) for row in mine[start : start + self.micro_batch_size]]
            microbatches.append(collate_rows(layouts, self.packed, self.with_attention_mask))
        return GlobalBatch(microbatches, num_loss_tokens)

    def _layout(self, row: Row):
        if not row:
            return empty_row(self.seq_length, self.pad_id)
        return build_row(self.samples, row, self.seq_length, self.pad_id)

    def _rows_of_epoch(self, epoch: int) -> Tuple[Sequence[Row], np.ndarray]:
        """(the rows of ``epoch``, int64 [num_rows] loss-carrying targets of each row)."""
        epoch = epoch if self._blended else 0
        if epoch != self._cached_rows_epoch:
            rows = self.rows.epoch(epoch) if epoch else self.rows
            self._cached_rows_epoch = epoch
            self._cached_rows = rows, self._row_loss_tokens(*_flatten(rows))
        return self._cached_rows

    def _row_loss_tokens(self, row_starts: np.ndarray, flat_samples: np.ndarray) -> np.ndarray:
        """int64 [num_rows] loss-carrying targets per row (rows are never empty)."""
        return np.add.reduceat(self.samples.loss_token_counts[flat_samples], row_starts)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._cached_epoch, self._cached_permutation = epoch, rng.permutation(self.num_rows)
        return self._cached_permutation


def _flatten(rows: Sequence[Row]) -> Tuple[np.ndarray, np.ndarray]:
    """(int64 start of each row in the flat list, int64 sample indices of all rows in order)."""
    row_starts = np.cumsum([0] + [len(row) for row in rows[:-1]]).astype(np.int64)
    return row_starts, np.fromiter((k for row in rows for k in row), dtype=np.int64)


def _check_layout(
    global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int
) -> None:
    if min(global_batch_size, micro_batch_size, dp_size) < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(
            f"invalid batch layout: global_batch_size={global_batch_size}, "
            f"micro_batch_size={micro_batch_size}, dp_rank={dp_rank}, dp_size={dp_size}"
        )
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global_batch_size={global_batch_size} must be divisible by "
            f"micro_batch_size * data_parallel_size = {micro_batch_size} * {dp_size}"
        )
