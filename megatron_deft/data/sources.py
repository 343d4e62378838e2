"""Record files by suffix: how a file becomes numbered records, and how a record is located.

A :class:`RecordReader` turns a file into numbered *units* and decodes each unit into a record
(a dict), so that validation (``megatron_deft.data.jsonl``), the tokenized-data cache and the
parallel preprocessor (``megatron_deft.data.preprocess``) treat every file type alike:

- JSONL (any suffix but ``.parquet``): units are raw lines numbered from 1, decoded as JSON (a
  blank line is no record); a record is located as ``file:LINE``.
- Parquet (``.parquet``, e.g. written by ``datasets``' ``to_parquet``): units are rows, numbered
  from 0 as ``pandas.read_parquet(file).iloc[N]`` counts them; columns become the record's keys
  (a ``list<struct<role, content>>`` column becomes a list of ``{role, content}`` dicts). Rows
  are read a batch at a time from the row groups, never the whole file; located as
  ``file:row N``.

Each unit also carries its share of the file's bytes (for progress), summing to the file size.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Tuple

PARQUET_BATCH_ROWS = 1024
_READ_BYTES = 1 << 20

Unit = Tuple[int, Any, int]
"""``(number, unit, bytes)``: a line or row, its number, and its share of the file's bytes."""


class DataError(ValueError):
    """Bad input data; the message starts with the record's location (``file:line:`` or
    ``file:row N:``), or ``file:`` for whole-file errors."""

    def __init__(self, path: str, line: Optional[int], message: str, reason: str = "invalid"):
        location = record_location(path, line) if line is not None else f"{path}"
        super().__init__(f"{location}: {message}")
        self.path, self.line, self.reason, self.message = path, line, reason, message


@dataclass(frozen=True)
class RecordReader:
    """How one file type is read."""

    units: Callable[[str, Optional["hashlib._Hash"]], Iterator[Unit]]
    """``units(path, digest)`` yields the file's units in order; ``digest`` (if given) is fed the
    file's bytes as read, so it ends as their SHA-256 (the tokenized-data cache's key)."""
    decode: Callable[[Any, str, int], Optional[dict]]
    """``decode(unit, path, number)``: the unit's record, None if it holds none; raises
    :class:`DataError` at its location."""
    location: Callable[[str, int], str]
    """``location(path, number)``: how messages name the record."""


def decode_record(raw: bytes, path: str, line: int) -> Optional[dict]:
    """One JSONL line -> its JSON object; None for a blank line; DataError(path:line) otherwise."""
    try:
        text = raw.decode("utf-8")
        if not text.strip():
            return None
        record = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(path, line, f"malformed JSON: {error}", "malformed_json") from None
    if not isinstance(record, dict):
        kind = type(record).__name__
        raise DataError(path, line, f"expected a JSON object, got {kind}", "invalid")
    return record


def _jsonl_lines(path: str, digest=None) -> Iterator[Unit]:
    # Binary read + per-line decode so that a bad byte is reported at its line, not for the file.
    with open(path, "rb") as handle:
        for line, raw in enumerate(handle, start=1):
            if digest is not None:
                digest.update(raw)
            yield line, raw, len(raw)


def _parquet_rows(path: str, digest=None) -> Iterator[Unit]:
    """Rows as dicts, batch by batch. The digest is of the open file's bytes, taken before the
    rows are read and checked again after: rows come from random reads (footer first), so a file
    rewritten in place while it is read fails here rather than caching mixed rows."""
    # Imported here: only Parquet inputs pay for loading pyarrow.
    import pyarrow
    import pyarrow.parquet

    with open(path, "rb") as handle:
        before = _handle_digest(handle, digest)
        try:
            parquet = pyarrow.parquet.ParquetFile(handle)
        except (pyarrow.ArrowException, OSError) as error:
            message = f"is not a readable Parquet file ({error})"
            raise DataError(path, None, message, "invalid") from None
        size, num_rows = os.fstat(handle.fileno()).st_size, parquet.metadata.num_rows
        row = 0
        for batch in _checked_batches(parquet, path, pyarrow.ArrowException):
            for record in batch.to_pylist():
                # Row r's share of the bytes; the shares sum to the file size exactly.
                yield row, record, (row + 1) * size // num_rows - row * size // num_rows
                row += 1
        if before is not None and _handle_digest(handle, hashlib.sha256()) != before:
            raise DataError(path, None, "changed while it was being read", "invalid")


def _checked_batches(parquet, path: str, arrow_error) -> Iterator:
    """``parquet.iter_batches``; a damaged row group fails as a DataError naming the file."""
    batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (arrow_error, OSError) as error:
            raise DataError(path, None, f"unreadable Parquet rows ({error})", "invalid") from None
        yield batch


def _handle_digest(handle, digest) -> Optional[str]:
    """Feeds all of ``handle``'s bytes to ``digest`` (None: nothing to do); its hex digest."""
    if digest is None:
        return None
    handle.seek(0)
    for block in iter(lambda: handle.read(_READ_BYTES), b""):
        digest.update(block)
    handle.seek(0)
    return digest.hexdigest()


JSONL = RecordReader(_jsonl_lines, decode_record, lambda path, line: f"{path}:{line}")
PARQUET = RecordReader(_parquet_rows, lambda row, *_: row, lambda path, row: f"{path}:row {row}")

READERS = {".parquet": PARQUET}
"""Readers by file suffix (lower case); every other file is JSONL."""


def reader_for(path: str) -> RecordReader:
    return READERS.get(os.path.splitext(path)[1].lower(), JSONL)


def record_location(path: str, number: int) -> str:
    """How messages name record ``number`` of ``path`` (``file:LINE`` or ``file:row N``)."""
    return reader_for(path).location(path, number)
