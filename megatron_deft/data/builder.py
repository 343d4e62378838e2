"""The one entry point the trainer calls: config -> tokenizer + train/valid loaders + report."""

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_deft.data.blend import build_indexed_split
from megatron_deft.data.cache import cache_key, file_digest, load_cached, save_cached
from megatron_deft.data.config import DataConfig, RecordFormat, TokenizerConfig
from megatron_deft.data.jsonl import ReadReport, iter_samples
from megatron_deft.data.loader import SFTDataLoader
from megatron_deft.data.packing import packing_efficiency, plan_rows
from megatron_deft.data.sft_dataset import tokenize_samples
from megatron_deft.data.tokenizer import Tokenizer, build_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class SplitReport:
    """What happened to one split's samples between the files and the rows."""

    name: str
    skipped: dict
    """Bad samples skipped with ``skip_bad_samples``, per reason (malformed_json, ...)."""
    skipped_examples: List[str]
    num_truncated: int
    num_dropped_overlong: int
    num_dropped_no_loss: int
    num_samples: int
    num_rows: int
    num_tokens: int
    num_loss_tokens: int
    packing_efficiency: float

    def summary(self) -> str:
        lines = [
            f"{self.name}: {self.num_samples} samples in {self.num_rows} rows "
            f"({self.num_tokens} tokens, {self.num_loss_tokens} with loss, "
            f"{100 * self.packing_efficiency:.1f}% of row positions used)",
            f"{self.name}: truncated {self.num_truncated}, dropped as over-long "
            f"{self.num_dropped_overlong}, dropped with no response left after truncation "
            f"{self.num_dropped_no_loss}, "
            f"skipped as bad {sum(self.skipped.values())} {dict(self.skipped)}",
        ]
        lines += [f"{self.name}: skipped {example}" for example in self.skipped_examples]
        return "\n".join(lines)


@dataclass
class SFTData:
    """Everything the trainer needs from the data side."""

    tokenizer: Tokenizer
    train: SFTDataLoader
    valid: Optional[SFTDataLoader]
    reports: List[SplitReport] = field(default_factory=list)


def build_sft_data(
    data: DataConfig,
    records: RecordFormat,
    tokenizer: TokenizerConfig,
    *,
    seq_length: int,
    seed: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    with_attention_mask: bool = True,
) -> SFTData:
    """Builds tokenizer and loaders; every rank builds the same rows (deterministic), then reads
    only its slice. Counts of skipped/truncated/dropped samples are logged and returned.

    A split comes from JSONL/Parquet files (``data.train_data`` / ``valid_data``) or from sets
    preprocessed by ``tools/preprocess_sft_data.py`` (``data.data_path`` / ``valid_data_prefix``,
    Megatron ``--data-path`` syntax, memory-mapped; see ``megatron_deft.data.blend``). Both
    give the same rows for the same samples.

    Args:
        seq_length: tokens per row ``s``; every micro-batch is ``[b, s]``.
        seed: seed of the row shuffle; epoch ``e`` uses the permutation drawn from ``(seed, e)``.
        global_batch_size: rows per optimizer step over all DP ranks (``G``).
        micro_batch_size: rows per forward pass (``b``); ``G % (b * dp_size) == 0``.
        with_attention_mask: False skips the ``[b, 1, s, s]`` mask (every attention backend
            but ``unfused``: THD/cu_seqlens for packed rows, causal otherwise).
    """
    if seq_length < 2:
        raise ValueError(f"--seq-length must be >= 2 (one input and one target), got {seq_length}")
    built = build_tokenizer(tokenizer.tokenizer_type, tokenizer.tokenizer_model)
    loader_args = dict(
        seq_length=seq_length,
        pad_id=built.pad_id,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        packed=data.pack_sequences,
        with_attention_mask=with_attention_mask,
    )
    reading = _Reading(data, records, tokenizer, built, seq_length)
    reports = []
    loaders = []
    splits = (
        ("train", data.train_paths(), data.data_path),
        ("valid", data.valid_paths(), data.valid_data_prefix),
    )
    for name, paths, prefixes in splits:
        if prefixes:
            samples, rows, counts = build_indexed_split(
                prefixes, tokenizer.tokenizer_type, built, seq_length, data, seed
            )
            report = SplitReport(name=name, **counts)
        elif paths:
            samples, rows, report = _build_split(name, paths, reading)
        else:
            loaders.append(None)
            continue
        logger.info("%s", report.summary())
        reports.append(report)
        loaders.append(SFTDataLoader(samples, rows, **loader_args))
    if loaders[0] is None:
        raise ValueError("no training data: set --train-data or --data-path")
    return SFTData(built, loaders[0], loaders[1], reports)


@dataclass(frozen=True)
class _Reading:
    """What reading and tokenizing a JSONL/Parquet split depends on."""

    data: DataConfig
    records: RecordFormat
    tokenizer_config: TokenizerConfig
    tokenizer: Tokenizer
    seq_length: int

    def cache_settings(self) -> dict:
        """The settings that change tokenization output (part of the cache key)."""
        return dict(
            dataclasses.asdict(self.records),
            token_class_key=self.data.token_class_key,
            seq_length=self.seq_length,
            overlong=self.data.overlong,
            tokenizer_type=self.tokenizer_config.tokenizer_type,
        )


def _build_split(name: str, paths: List[str], reading: _Reading):
    samples, counts = _cached_tokenize_split(paths, reading)
    seq_length, packed = reading.seq_length, reading.data.pack_sequences
    rows = plan_rows(samples.lengths, seq_length, packed)
    efficiency = packing_efficiency(samples.lengths, len(rows), seq_length)
    report = SplitReport(name=name, num_rows=len(rows), packing_efficiency=efficiency, **counts)
    return samples, rows, report


def _cached_tokenize_split(paths: List[str], reading: _Reading):
    cache_dir = reading.data.data_cache_dir
    if not cache_dir:
        return _tokenize_split(paths, reading)[:2]
    settings, model = reading.cache_settings(), reading.tokenizer_config.tokenizer_model
    key = cache_key([file_digest(path) for path in paths], model, settings)
    cached = load_cached(cache_dir, key)
    if cached is not None:
        logger.info("tokenized %s from cache entry %s", paths, key)
        return cached
    samples, counts, digests = _tokenize_split(paths, reading)
    # Keyed by the bytes tokenized (hashed while read): equal to `key` unless a file changed.
    read_key = cache_key([digests[path] for path in paths], model, settings)
    save_cached(cache_dir, read_key, samples, counts)
    return samples, counts


def _tokenize_split(paths: List[str], reading: _Reading):
    """Returns the tokenized samples, the SplitReport counts of reading and tokenizing, and
    ``{path: SHA-256 of its bytes as read}``."""
    read_report = ReadReport()
    skip = reading.records.skip_bad_samples
    conversations = iter_samples(paths, reading.records, read_report, reading.data.token_class_key)
    samples, token_report = tokenize_samples(
        conversations,
        reading.tokenizer,
        reading.seq_length,
        reading.data.overlong,
        skip,
        read_report,
        reading.records.prompt_format,
    )
    counts = dict(
        skipped=dict(read_report.skipped),
        skipped_examples=list(read_report.examples),
        num_truncated=token_report.num_truncated,
        num_dropped_overlong=token_report.num_dropped_overlong,
        num_dropped_no_loss=token_report.num_dropped_no_loss,
        num_samples=token_report.num_samples,
        num_tokens=token_report.num_tokens,
        num_loss_tokens=token_report.num_loss_tokens,
    )
    return samples, counts, read_report.digests
