"""Samples -> tokenized samples (ids + loss flags), with the over-long policy applied and counted.

Storage is flat (numpy) so that millions of samples cost two arrays, not millions of lists:
sample ``k`` is ``ids[offsets[k]:offsets[k+1]]`` and its token class (``--token-class-key``) is
``class_names[classes[k]]`` (-1: unlabeled). A sample of ``n`` tokens occupies ``n``
positions of a row and yields ``n - 1`` next-token targets, so it fits when ``n <= seq_length``.
"""

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from megatron_deft.data.chat_format import ChatTemplateError, tokenize_conversation
from megatron_deft.data.jsonl import DataError, ReadReport, Sample
from megatron_deft.data.tokenizer import Tokenizer


@dataclass
class TokenizedSamples:
    """Flat token storage; ``loss_flags[t]`` is True on response tokens (and their EOS)."""

    ids: np.ndarray
    """int32 (or int64) [total_tokens]"""
    loss_flags: np.ndarray
    """bool [total_tokens]"""
    offsets: np.ndarray
    """int64 [num_samples + 1], starts at 0"""
    classes: Optional[np.ndarray] = None
    """int32 [num_samples]: index into ``class_names``, -1 for unlabeled (None: all unlabeled)"""
    class_names: Tuple[str, ...] = ()
    """Sorted distinct class labels of the split."""

    def __post_init__(self):
        if self.classes is None:
            self.classes = np.full(len(self), -1, dtype=np.int32)
        self.class_names = tuple(self.class_names)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def loss_token_counts(self) -> np.ndarray:
        """int64 [num_samples]: targets carrying loss per sample. A sample's first token is never
        a target (nothing precedes it), so its flag is not counted."""
        if len(self) == 0:
            return np.zeros(0, dtype=np.int64)
        starts = self.offsets[:-1]
        flags = self.loss_flags.astype(np.int64)
        return np.add.reduceat(flags, starts) - flags[starts]

    def sample(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        lo, hi = self.offsets[index], self.offsets[index + 1]
        return self.ids[lo:hi], self.loss_flags[lo:hi]


@dataclass
class TokenizeReport:
    """Counts of what the over-long policy did; nothing leaves the data set uncounted."""

    num_samples: int = 0
    num_truncated: int = 0
    num_dropped_overlong: int = 0
    num_dropped_no_loss: int = 0
    """Samples whose response lies entirely beyond ``seq_length`` (truncation left no target)."""
    num_tokens: int = 0
    num_loss_tokens: int = 0


def tokenize_samples(
    samples: Iterable[Sample],
    tokenizer: Tokenizer,
    seq_length: int,
    overlong: str = "truncate",
    skip_bad_samples: bool = False,
    read_report: Optional[ReadReport] = None,
    prompt_format: Optional[str] = None,
) -> Tuple[TokenizedSamples, TokenizeReport]:
    """Tokenizes every sample and applies ``overlong`` (``truncate`` | ``drop``).

    A conversation the chat template cannot render raises :class:`DataError` at its file:line,
    or is counted in ``read_report.skipped["chat_template"]`` with ``skip_bad_samples``.
    ``prompt_format``: --prompt-format (tokenize_conversation).
    """
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong={overlong!r} is not one of truncate, drop")
    report = TokenizeReport()
    kept_ids: List[np.ndarray] = []
    kept_flags: List[np.ndarray] = []
    kept_classes: List[Optional[str]] = []
    for sample in samples:
        try:
            ids, flags = tokenize_conversation(sample.messages, tokenizer, prompt_format)
        except ChatTemplateError as error:
            bad = DataError(sample.path, sample.line, str(error), reason="chat_template")
            if not skip_bad_samples or read_report is None:
                raise bad from error
            read_report.record_skip(bad)
            continue
        # int32 halves the memory of large data sets; rows are built as int64.
        ids, flags = np.asarray(ids, dtype=np.int32), np.asarray(flags, dtype=bool)
        if len(ids) > seq_length:
            if overlong == "drop":
                report.num_dropped_overlong += 1
                continue
            ids, flags = ids[:seq_length], flags[:seq_length]
            report.num_truncated += 1
        # Token 0 is never a target; a sample whose only flagged token is 0 teaches nothing.
        if not flags[1:].any():
            report.num_dropped_no_loss += 1
            continue
        kept_ids.append(ids)
        kept_flags.append(flags)
        kept_classes.append(sample.token_class)
    tokenized = _concatenate(kept_ids, kept_flags, kept_classes)
    report.num_samples = len(tokenized)
    report.num_tokens = int(tokenized.lengths.sum())
    report.num_loss_tokens = int(tokenized.loss_token_counts.sum())
    return tokenized, report


def _concatenate(
    ids: List[np.ndarray], flags: List[np.ndarray], classes: List[Optional[str]]
) -> TokenizedSamples:
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    names = sorted({name for name in classes if name is not None})
    index: Dict[Optional[str], int] = {name: i for i, name in enumerate(names)}
    index[None] = -1
    class_ids = np.array([index[name] for name in classes], dtype=np.int32)
    if not ids:
        return TokenizedSamples(np.zeros(0, np.int32), np.zeros(0, bool), offsets)
    return TokenizedSamples(
        np.concatenate(ids), np.concatenate(flags), offsets, class_ids, tuple(names)
    )
