"""Reading SFT samples from JSONL or Parquet files: format detection, validation, per-record
errors (how each file type is read: ``megatron_deft.data.sources``).

Every accepted record (a JSONL line, or a Parquet row whose columns are the keys) becomes a
:class:`Sample`, a conversation of ``(role, content)`` messages:

- ``prompt_response``: ``{"<prompt_key>": str, "<response_key>": str}`` becomes
  ``[("user", prompt), ("assistant", response)]`` (GSM8K: ``--prompt-key question
  --response-key answer``). A dotted key that is not itself a key reaches into nested objects
  (``--prompt-key extra_info.question``: the DEFT paper's Parquet keeps its fields in the
  ``extra_info`` struct column).
- ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``.

With a ``class_key`` (``--token-class-key``), the record's string under that key labels the
sample's tokens with a class (e.g. ``"noisy"``) for per-class training diagnostics; a record
without the key is unlabeled. The class never changes what is trained.

A bad record raises :class:`DataError` naming ``file:line`` (``file:row N`` in Parquet); with
``skip_bad_samples`` it is counted per reason in a :class:`ReadReport` instead. Blank lines are
not samples and are ignored.
"""

import collections
import hashlib
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from megatron_deft.data.config import RecordFormat
from megatron_deft.data.sources import DataError, reader_for, record_location

ROLES = ("system", "user", "assistant")
MAX_REPORTED_EXAMPLES = 5


class _BadRecord(ValueError):
    """A record-level problem, located by the caller; ``reason`` is the report bucket."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Sample:
    """One conversation and where it came from (for error messages further down the pipeline)."""

    messages: Tuple[Tuple[str, str], ...]
    path: str
    line: int
    """The record's line (JSONL, from 1) or row (Parquet, from 0)."""
    token_class: Optional[str] = None
    """The record's ``class_key`` value (None: unlabeled or no ``class_key``)."""

    @property
    def location(self) -> str:
        """``file:line`` or ``file:row N``, as error messages name the record."""
        return record_location(self.path, self.line)


@dataclass
class ReadReport:
    """What reading kept and what it skipped (only non-empty with ``skip_bad_samples``)."""

    num_samples: int = 0
    skipped: Dict[str, int] = field(default_factory=collections.Counter)
    examples: List[str] = field(default_factory=list)
    """The first few skipped records as ``file:line: message`` (``file:row N: message``)."""
    digests: Dict[str, str] = field(default_factory=dict)
    """SHA-256 hex digest of each file's bytes as read (the tokenized-data cache's key)."""

    def record_skip(self, error: DataError) -> None:
        self.skipped[error.reason] += 1
        if len(self.examples) < MAX_REPORTED_EXAMPLES:
            self.examples.append(str(error))

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


def read_samples(
    paths: Sequence[str],
    records: Optional[RecordFormat] = None,
    class_key: Optional[str] = None,
) -> Tuple[List[Sample], ReadReport]:
    """Reads and validates all files in order as ``records`` says (default: ``RecordFormat()``);
    returns the samples and a report of skips.

    Raises:
        DataError: a missing/empty file (always), or the first bad record unless
            ``records.skip_bad_samples``.
    """
    report = ReadReport()
    samples = list(iter_samples(paths, records or RecordFormat(), report, class_key))
    return samples, report


def iter_samples(
    paths: Sequence[str],
    records: RecordFormat,
    report: ReadReport,
    class_key: Optional[str] = None,
) -> Iterator[Sample]:
    """Streams :func:`read_samples` (so raw text need not be held for the whole data set),
    counting kept and skipped samples in ``report``. All files are checked up front."""
    if not paths:
        raise ValueError("no data files given")
    for path in paths:
        _check_file(path)
    keys, skip = (records.prompt_key, records.response_key), records.skip_bad_samples
    for path in paths:
        file_format = None if records.data_format == "auto" else records.data_format
        kept = 0
        for line, record in _iter_records(path, report, skip):
            try:
                if file_format is None:
                    file_format = detect_format(record, *keys)
                messages = parse_record(record, file_format, *keys)
                token_class = _class_field(record, class_key)
            except _BadRecord as error:
                _fail_or_skip(DataError(path, line, str(error), error.reason), report, skip)
                continue
            kept += 1
            report.num_samples += 1
            yield Sample(messages, path, line, token_class)
        if not kept:
            raise DataError(path, None, "contains no usable samples", reason="empty_file")


MISSING = object()
"""What :func:`record_field` returns for a key the record does not have."""


def record_field(record: dict, key: str):
    """The value under ``key``; a dotted key that is not itself a key walks into nested objects
    (``extra_info.question`` -> ``record["extra_info"]["question"]``). MISSING if absent."""
    if key in record:
        return record[key]
    value = record
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return MISSING
        value = value[part]
    return value


def detect_format(record: dict, prompt_key: str, response_key: str) -> str:
    """``messages`` if the record has a ``messages`` key, ``prompt_response`` if it has either
    configured pair key; otherwise there is nothing to go on and the record is rejected."""
    if "messages" in record:
        return "messages"
    if any(record_field(record, key) is not MISSING for key in (prompt_key, response_key)):
        return "prompt_response"
    raise _BadRecord(
        "unknown_format",
        f"cannot detect the data format: expected a 'messages' key or the keys "
        f"'{prompt_key}'/'{response_key}' (see --data-format, --prompt-key, --response-key); "
        f"found keys {sorted(record)}",
    )


def parse_record(record: dict, data_format: str, prompt_key: str, response_key: str):
    """Validates one record (a JSON object or a Parquet row) and returns its messages."""
    if data_format == "prompt_response":
        prompt = _string_field(record, prompt_key, allow_empty=True)
        response = _string_field(record, response_key, allow_empty=False)
        return (("user", prompt), ("assistant", response))
    if data_format == "messages":
        return _parse_messages(record)
    raise ValueError(f"unknown data_format {data_format!r}")


def _parse_messages(record: dict):
    if "messages" not in record:
        raise _BadRecord("missing_key", f"missing key 'messages' (found keys {sorted(record)})")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise _BadRecord(
            "invalid", "'messages' must be a non-empty list of {role, content} objects"
        )
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _BadRecord("invalid", f"{where} must be an object, got {type(message).__name__}")
        role = message.get("role")
        if "role" not in message or "content" not in message:
            missing = "role" if "role" not in message else "content"
            raise _BadRecord("missing_key", f"{where} is missing key '{missing}'")
        if role not in ROLES:
            raise _BadRecord(
                "unknown_role",
                f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})",
            )
        content = _string_field(message, "content", allow_empty=role != "assistant", where=where)
        parsed.append((role, content))
    if not any(role == "assistant" for role, _ in parsed):
        raise _BadRecord("empty_response", "no assistant message, so nothing would carry loss")
    return tuple(parsed)


def _class_field(record: dict, class_key: Optional[str]) -> Optional[str]:
    """The sample's class label: a non-empty string, or None when the key is absent."""
    if class_key is None or class_key not in record:
        return None
    value = record[class_key]
    if not isinstance(value, str) or not value:
        raise _BadRecord(
            "invalid", f"token class key '{class_key}' must be a non-empty string, got {value!r}"
        )
    return _check_unicode(value, f"token class key '{class_key}'")


def _string_field(record: dict, key: str, allow_empty: bool, where: str = "record"):
    value = record_field(record, key)
    if value is MISSING:
        raise _BadRecord("missing_key", f"missing key '{key}' (found keys {sorted(record)})")
    if not isinstance(value, str):
        raise _BadRecord(
            "invalid", f"{where} key '{key}' must be a string, got {type(value).__name__}"
        )
    if not allow_empty and not value.strip():
        raise _BadRecord(
            "empty_response", f"{where} key '{key}' is empty (a response must have text)"
        )
    return _check_unicode(value, f"{where} key '{key}'")


def _check_unicode(value: str, what: str) -> str:
    """``value`` if it is valid Unicode text. JSON's ``\\uXXXX`` escapes can encode a lone UTF-16
    surrogate (``"\\ud800"``), which Python keeps in a ``str`` but no tokenizer can encode (the
    C++ tokenizers fail without naming the line), so it is rejected here, at its line."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = value[error.start : error.end].encode("unicode_escape").decode("ascii")
        raise _BadRecord(
            "invalid_unicode",
            f"{what} holds the lone surrogate escape {bad} at character {error.start}, "
            "which is not valid Unicode text",
        ) from None
    return value


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise DataError(path, None, "file does not exist", reason="missing_file")
    if not os.path.isfile(path):
        raise DataError(path, None, "is not a regular file", reason="missing_file")


def _iter_records(path: str, report: ReadReport, skip: bool) -> Iterator[Tuple[int, dict]]:
    """Yields ``(line or row number, record)``; undecodable units fail or are skipped here."""
    reader = reader_for(path)
    digest = hashlib.sha256()
    for number, unit, _ in reader.units(path, digest):
        try:
            record = reader.decode(unit, path, number)
        except DataError as error:
            _fail_or_skip(error, report, skip)
            continue
        if record is not None:
            yield number, record
    report.digests[path] = digest.hexdigest()


def _fail_or_skip(error: DataError, report: ReadReport, skip: bool) -> None:
    if not skip:
        raise error
    report.record_skip(error)
