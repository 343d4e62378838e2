"""JSONL or Parquet -> a preprocessed indexed SFT data set (see ``indexed``), tokenized by worker
processes.

The main process reads the files as units (raw JSONL lines, Parquet rows; see ``sources``) in
chunks of ``chunk_lines`` and hands them to ``workers`` processes, which decode, validate (the
same checks and messages as ``megatron_deft.data.jsonl``) and tokenize
(``tokenize_conversation``) them. Results are consumed strictly in input order with a bounded
number of chunks in flight, so the output is byte-identical for any worker count and memory
stays flat for multi-GB inputs. Bad records fail at their location (``file:line``,
``file:row N``) or, with ``skip_bad_samples``, are counted per reason in the sidecar; the
over-long policy is left to load time (samples are stored whole). All files are written under
temporary names and renamed at the end, the sidecar last, so an interrupted run never leaves a
set that loads."""

import collections
import itertools
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_deft.data.chat_format import ChatTemplateError, tokenize_conversation
from megatron_deft.data.config import RecordFormat, TokenizerConfig
from megatron_deft.data.indexed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    payload_paths,
    tokenizer_description,
)
from megatron_deft.data.jsonl import (
    DataError,
    ReadReport,
    _BadRecord,
    _check_file,
    _fail_or_skip,
    detect_format,
    parse_record,
)
from megatron_deft.data.sources import reader_for
from megatron_deft.data.tokenizer import Tokenizer, build_tokenizer

CHUNK_LINES = 1024
CHUNKS_IN_FLIGHT_PER_WORKER = 4
NEVER = float("inf")


@dataclass
class _Chunk:
    path: str
    first_line: int
    units: List[Any]
    """Consecutive units (lines or rows, ``sources.RecordReader``) numbered from ``first_line``."""
    num_bytes: int
    file_format: Optional[str]
    detected_at: float
    """First unit whose record fixed ``file_format`` (``auto``); earlier units still run format
    detection, which fails for them, exactly as ``jsonl.iter_samples`` reports it."""


@dataclass
class _ChunkResult:
    path: str
    num_bytes: int
    ids: np.ndarray  # int32 [tokens of the chunk's samples, concatenated]
    flags: np.ndarray  # uint8 [same]
    lengths: np.ndarray  # int64 [samples]
    errors: List[Tuple[int, str, str]]  # (line, message, reason), in line order
    num_parsed: int  # lines that passed validation (tokenized or not), for the empty-file check


def preprocess_sft_data(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_config: TokenizerConfig,
    settings: Optional[RecordFormat] = None,
    workers: int = 1,
    chunk_lines: int = CHUNK_LINES,
    progress: bool = False,
) -> Dict:
    """Tokenizes ``inputs`` (in order) into ``output_prefix``'s files, reading records as
    ``settings`` says (default ``RecordFormat()``); returns the sidecar.

    Raises:
        DataError: a missing/empty file, or the first bad record unless ``skip_bad_samples``.
    """
    settings = settings or RecordFormat()
    tokenizer_type, tokenizer_model = (
        tokenizer_config.tokenizer_type,
        tokenizer_config.tokenizer_model,
    )
    if workers < 1 or chunk_lines < 1:
        raise ValueError(f"workers={workers} and chunk_lines={chunk_lines} must be >= 1")
    if not inputs:
        raise ValueError("no input files given")
    for path in inputs:
        _check_file(path)
    # Fork the workers first: before this process loads megatron.core or uses the tokenizer.
    pool = None
    if workers > 1:
        pool = multiprocessing.get_context("fork").Pool(
            workers, initializer=_init_worker, initargs=(tokenizer_type, tokenizer_model)
        )
    try:
        tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)
        chunks = _read_chunks(inputs, settings, chunk_lines)
        results = _ordered_map(pool, chunks, settings, tokenizer, workers)
        writer = _SetWriter(output_prefix, tokenizer.vocab_size)
        try:
            report = _consume(results, writer, settings, _Progress(inputs, progress))
            sidecar = _sidecar(inputs, tokenizer_type, tokenizer_model, tokenizer, settings)
            sidecar.update(writer.totals(), skipped=dict(report.skipped))
            sidecar.update(skipped_examples=list(report.examples))
            writer.commit(sidecar)
        except BaseException:
            writer.discard()
            raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return sidecar


def _consume(results, writer, settings: RecordFormat, progress) -> ReadReport:
    """Writes results in order; records (or raises) bad lines; enforces non-empty files."""
    report = ReadReport()
    parsed: Dict[str, int] = collections.Counter()
    current = None
    try:
        for result in results:
            if result.path != current:
                _check_not_empty(current, parsed)
                current = result.path
            for line, message, reason in result.errors:
                error = DataError(result.path, line, message, reason)
                _fail_or_skip(error, report, settings.skip_bad_samples)
            parsed[result.path] += result.num_parsed
            writer.add(result)
            progress.update(result.num_bytes, len(result.lengths))
        _check_not_empty(current, parsed)
    finally:
        progress.close()
    return report


def _check_not_empty(path: Optional[str], parsed: Dict[str, int]) -> None:
    if path is not None and not parsed[path]:
        raise DataError(path, None, "contains no usable samples", reason="empty_file")


def _read_chunks(paths: Sequence[str], settings: RecordFormat, chunk_lines: int):
    """Yields every file's units in chunks (at least one chunk per file, maybe empty)."""
    for path in paths:
        detected = _file_format(path, settings)
        units = reader_for(path).units(path)
        while True:
            group = list(itertools.islice(units, chunk_lines))
            first = group[0][0] if group else 0
            num_bytes = sum(size for _, _, size in group)
            yield _Chunk(path, first, [unit for _, unit, _ in group], num_bytes, *detected)
            if len(group) < chunk_lines:
                break


def _file_format(path: str, settings: RecordFormat) -> Tuple[Optional[str], float]:
    """``(format, unit it was detected at)``: the configured one, or with ``auto`` the format of
    the first record a format can be detected from (``iter_samples`` detects the same)."""
    if settings.data_format != "auto":
        return settings.data_format, 0
    reader = reader_for(path)
    for number, unit, _ in reader.units(path):
        try:
            record = reader.decode(unit, path, number)
            if record is not None:
                return detect_format(record, settings.prompt_key, settings.response_key), number
        except (DataError, _BadRecord):
            continue
    return None, NEVER


def _ordered_map(pool, chunks, settings, tokenizer, workers) -> Iterator[_ChunkResult]:
    """``_tokenize_chunk`` over ``chunks`` in order; at most a few chunks per worker in flight
    (``Pool.imap`` would read the whole input ahead into memory)."""
    if pool is None:
        for chunk in chunks:
            yield _tokenize_chunk(chunk, settings, tokenizer)
        return
    pending = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_tokenize_chunk, (chunk, settings)))
        if len(pending) >= CHUNKS_IN_FLIGHT_PER_WORKER * workers:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(tokenizer_type: str, tokenizer_model: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = build_tokenizer(tokenizer_type, tokenizer_model)


def _tokenize_chunk(chunk: _Chunk, settings: RecordFormat, tokenizer=None) -> _ChunkResult:
    """Validates and tokenizes one chunk; without ``skip_bad_samples`` stops at its first error
    (the main process raises it: earlier chunks had none)."""
    tokenizer = tokenizer or _WORKER_TOKENIZER
    ids, flags, errors, num_parsed = [], [], [], 0
    for number, unit in enumerate(chunk.units, start=chunk.first_line):
        try:
            messages = _parse_unit(unit, number, chunk, settings)
            if messages is None:
                continue
            num_parsed += 1
            try:
                sample_ids, sample_flags = tokenize_conversation(
                    messages, tokenizer, settings.prompt_format
                )
            except ChatTemplateError as error:
                raise DataError(chunk.path, number, str(error), reason="chat_template") from error
        except DataError as error:
            errors.append((number, error.message, error.reason))
            if not settings.skip_bad_samples:
                break
            continue
        ids.append(np.asarray(sample_ids, dtype=np.int32))
        flags.append(np.asarray(sample_flags, dtype=np.uint8))
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    joined_ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
    joined_flags = np.concatenate(flags) if flags else np.zeros(0, np.uint8)
    return _ChunkResult(
        chunk.path, chunk.num_bytes, joined_ids, joined_flags, lengths, errors, num_parsed
    )


def _parse_unit(unit, number: int, chunk: _Chunk, settings: RecordFormat):
    """The conversation of one unit, None for a blank line; DataError as ``jsonl`` words it."""
    path = chunk.path
    record = reader_for(path).decode(unit, path, number)
    if record is None:
        return None
    file_format = chunk.file_format if number >= chunk.detected_at else None
    try:
        if file_format is None:
            file_format = detect_format(record, settings.prompt_key, settings.response_key)
        return parse_record(record, file_format, settings.prompt_key, settings.response_key)
    except _BadRecord as error:
        raise DataError(path, number, str(error), error.reason) from error


def _sidecar(inputs, tokenizer_type, tokenizer_model, tokenizer, settings: RecordFormat) -> Dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tool": "tools/preprocess_sft_data.py",
        "tokenizer": tokenizer_description(tokenizer_type, tokenizer_model, tokenizer),
        "data": {"inputs": [os.path.abspath(path) for path in inputs], **asdict(settings)},
    }


class _SetWriter:
    """Streams samples into the two indexed datasets under temporary names; ``commit`` renames."""

    def __init__(self, prefix: str, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.final = payload_paths(prefix)
        self.temp = {role: f"{path}.tmp-{os.getpid()}" for role, path in self.final.items()}
        self.token_dtype = DType.optimal_dtype(vocab_size)
        self.tokens = IndexedDatasetBuilder(self.temp["tokens_bin"], dtype=self.token_dtype)
        self.flags = IndexedDatasetBuilder(self.temp["lossmask_bin"], dtype=np.uint8)
        self.loss_counts: List[np.ndarray] = []
        self.num_tokens = 0

    def add(self, result: _ChunkResult) -> None:
        if not len(result.lengths):
            return
        lengths = result.lengths.tolist()
        for builder, values in ((self.tokens, result.ids), (self.flags, result.flags)):
            first = len(builder.sequence_lengths)
            # One write per chunk (the main process is the serial part). add_document closes
            # one document per call; each sample is its own document, Megatron's SFT layout.
            builder.add_document(values, lengths)
            builder.document_indices[-1:] = range(first + 1, first + len(lengths) + 1)
        starts = np.concatenate([[0], np.cumsum(result.lengths)[:-1]])
        # Targets with loss per sample: the first token is never a target.
        flag_sums = np.add.reduceat(result.flags.astype(np.int64), starts)
        self.loss_counts.append((flag_sums - result.flags[starts]).astype(np.int32))
        self.num_tokens += len(result.ids)

    def totals(self) -> Dict:
        counts = np.concatenate(self.loss_counts) if self.loss_counts else np.zeros(0, np.int32)
        return {
            "token_dtype": np.dtype(self.token_dtype).name,
            "num_samples": len(counts),
            "num_tokens": self.num_tokens,
            "num_loss_tokens": int(counts.sum()),
        }

    def commit(self, sidecar: Dict) -> None:
        self.tokens.finalize(self.temp["tokens_idx"])
        self.flags.finalize(self.temp["lossmask_idx"])
        counts = np.concatenate(self.loss_counts) if self.loss_counts else np.zeros(0, np.int32)
        with open(self.temp["loss_counts"], "wb") as handle:
            np.save(handle, counts)
        with open(self.temp["json"], "w", encoding="utf-8") as handle:
            json.dump(sidecar, handle, indent=2)
        # The old sidecar goes first and the new one comes last: a set whose sidecar exists is
        # complete, even if this process dies between the renames.
        if os.path.exists(self.final["json"]):
            os.unlink(self.final["json"])
        for role in sorted(self.final, key=lambda role: role == "json"):
            os.replace(self.temp[role], self.final[role])

    def discard(self) -> None:
        for builder in (self.tokens, self.flags):
            builder.data_file.close()
        for path in self.temp.values():
            if os.path.exists(path):
                os.unlink(path)


class _Progress:
    """tqdm over input bytes if installed, else a stderr line every ``interval`` seconds."""

    def __init__(self, inputs: Sequence[str], enabled: bool, interval: float = 10.0):
        self.total = sum(os.path.getsize(path) for path in inputs)
        self.done = self.samples = 0
        self.start = self.last = time.monotonic()
        self.enabled, self.interval, self.bar = enabled, interval, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=self.total, unit="B", unit_scale=True, desc="tokenizing")

    def update(self, num_bytes: int, num_samples: int) -> None:
        self.done += num_bytes
        self.samples += num_samples
        if self.bar is not None:
            self.bar.update(num_bytes)
            self.bar.set_postfix(samples=self.samples, refresh=False)
        elif self.enabled and time.monotonic() - self.last >= self.interval:
            self.last = time.monotonic()
            rate = self.samples / max(self.last - self.start, 1e-9)
            share = self.done / max(self.total, 1)
            print(
                f"tokenized {self.samples} samples ({share:.1%} of input, {rate:.0f} samples/s)",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
