"""The one entry point the trainer calls: config -> tokenizer + train/valid loaders + report."""

import logging
from dataclasses import dataclass, field
from typing import List, Optional

from megatron_deft.data.blend import build_indexed_split
from megatron_deft.data.cache import cache_key, file_digest, load_cached, save_cached
from megatron_deft.data.config import DataConfig
from megatron_deft.data.jsonl import ReadReport, iter_samples
from megatron_deft.data.loader import SFTDataLoader
from megatron_deft.data.packing import packing_efficiency, plan_rows
from megatron_deft.data.sft_dataset import tokenize_samples
from megatron_deft.data.tokenizer import Tokenizer, build_tokenizer

logger = logging.getLogger(__name__)

# DataConfig fields that change tokenization output (part of the cache key).
_TOKENIZATION_SETTINGS = (
    "data_format",
    "prompt_key",
    "response_key",
    "token_class_key",
    "seq_length",
    "overlong",
    "skip_bad_samples",
    "tokenizer_type",
)


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
    config: DataConfig,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    with_attention_mask: bool = True,
) -> SFTData:
    """Builds tokenizer and loaders; every rank builds the same rows (deterministic), then reads
    only its slice. Counts of skipped/truncated/dropped samples are logged and returned.

    A split comes from JSONL files (``train_data_path`` / ``valid_data_path``) or from sets
    preprocessed by ``tools/preprocess_sft_data.py`` (``data_path`` / ``valid_data_prefix``,
    Megatron ``--data-path`` syntax, memory-mapped; see ``megatron_deft.data.blend``). Both
    give the same rows for the same samples.

    Args:
        global_batch_size: rows per optimizer step over all DP ranks (``G``).
        micro_batch_size: rows per forward pass (``b``); ``G % (b * dp_size) == 0``.
        with_attention_mask: False skips the ``[b, 1, s, s]`` mask (THD/cu_seqlens GPU runs).
    """
    tokenizer = build_tokenizer(config.tokenizer_type, config.tokenizer_model)
    loader_args = dict(
        seq_length=config.seq_length,
        pad_id=tokenizer.pad_id,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=config.seed,
        packed=config.pack_sequences,
        with_attention_mask=with_attention_mask,
    )
    reports = []
    loaders = []
    splits = (
        ("train", config.train_data_path, config.data_path),
        ("valid", config.valid_data_path, config.valid_data_prefix),
    )
    for name, paths, prefixes in splits:
        if prefixes:
            samples, rows, counts = build_indexed_split(prefixes, config, tokenizer)
            report = SplitReport(name=name, **counts)
        elif paths:
            samples, rows, report = _build_split(name, paths, config, tokenizer)
        else:
            loaders.append(None)
            continue
        logger.info("%s", report.summary())
        reports.append(report)
        loaders.append(SFTDataLoader(samples, rows, **loader_args))
    if loaders[0] is None:
        raise ValueError("no training data: set --train-data-path or --data-path")
    return SFTData(tokenizer, loaders[0], loaders[1], reports)


def _build_split(name: str, paths: List[str], config: DataConfig, tokenizer: Tokenizer):
    samples, counts = _cached_tokenize_split(paths, config, tokenizer)
    rows = plan_rows(samples.lengths, config.seq_length, config.pack_sequences)
    efficiency = packing_efficiency(samples.lengths, len(rows), config.seq_length)
    report = SplitReport(name=name, num_rows=len(rows), packing_efficiency=efficiency, **counts)
    return samples, rows, report


def _cached_tokenize_split(paths: List[str], config: DataConfig, tokenizer: Tokenizer):
    if not config.data_cache_dir:
        return _tokenize_split(paths, config, tokenizer)[:2]
    settings = {name: getattr(config, name) for name in _TOKENIZATION_SETTINGS}
    key = cache_key([file_digest(path) for path in paths], config.tokenizer_model, settings)
    cached = load_cached(config.data_cache_dir, key)
    if cached is not None:
        logger.info("tokenized %s from cache entry %s", paths, key)
        return cached
    samples, counts, digests = _tokenize_split(paths, config, tokenizer)
    # Keyed by the bytes tokenized (hashed while read): equal to `key` unless a file changed.
    read_key = cache_key([digests[path] for path in paths], config.tokenizer_model, settings)
    save_cached(config.data_cache_dir, read_key, samples, counts)
    return samples, counts


def _tokenize_split(paths: List[str], config: DataConfig, tokenizer: Tokenizer):
    """Returns the tokenized samples, the SplitReport counts of reading and tokenizing, and
    ``{path: SHA-256 of its bytes as read}``."""
    read_report = ReadReport()
    conversations = iter_samples(
        paths,
        config.data_format,
        config.prompt_key,
        config.response_key,
        config.skip_bad_samples,
        read_report,
        config.token_class_key,
    )
    samples, token_report = tokenize_samples(
        conversations,
        tokenizer,
        config.seq_length,
        config.overlong,
        config.skip_bad_samples,
        read_report,
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
