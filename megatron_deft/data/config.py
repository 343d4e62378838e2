"""The data side's settings, declared once: how a record is read, which tokenizer, where the data
comes from.

Three sections, each a dataclass with a docstring under every field (the CLI help) and its own
checks in ``__post_init__``:

- :class:`RecordFormat`: how a record (JSONL line, Parquet row) becomes a conversation; read by
  the trainer, the evaluator, ``tools/preprocess_sft_data.py`` and ``tools/train_tokenizer.py``.
- :class:`TokenizerConfig`: the tokenizer (Megatron-LM's ``--tokenizer-type/--tokenizer-model``);
  same users.
- :class:`DataConfig`: the trainer's data sources and row settings.

The trainer's config tree (``megatron_deft.config.Config``), the evaluator's and the tools'
embed these classes and generate their flags from them (``megatron_deft.config.add_config_flags``),
so a field's name, default, choices and help are written only here. Errors name the flags.
"""

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_deft.data.prompt_formats import PROMPT_FORMAT_NAMES

DATA_FORMATS = ("auto", "prompt_response", "messages")
OVERLONG_POLICIES = ("truncate", "drop")
TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")


def _choices(default: str, choices):
    """A str field whose allowed values the generated flag enforces (``metadata['choices']``)."""
    return field(default=default, metadata={"choices": choices})


@dataclass
class RecordFormat:
    """How a JSONL line or Parquet row is read (megatron_deft.data.jsonl)."""

    data_format: str = _choices("auto", DATA_FORMATS)
    """Record format: prompt_response (one pair per line under --prompt-key/--response-key),
    messages ({"messages": [{"role", "content"}, ...]}), or auto (detected per file from its
    first record)."""
    prompt_key: str = "prompt"
    """JSON key of the prompt in prompt_response records (e.g. question for GSM8K)."""
    response_key: str = "response"
    """JSON key of the response in prompt_response records (e.g. answer for GSM8K)."""
    prompt_format: Optional[str] = field(default=None, metadata={"choices": PROMPT_FORMAT_NAMES})
    """Write each prompt_response pair in this fixed prompt template instead of the tokenizer's
    chat template or the built-in one (megatron_deft.data.prompt_formats: the DEFT paper's
    qwen-boxed, deepseek-math, llama-base-boxed-with-bos, and raw for pre-formatted prompts)."""
    skip_bad_samples: bool = False
    """Skip (count and report) malformed or invalid records (JSONL lines, Parquet rows) instead of
    stopping at the first."""

    def __post_init__(self):
        _check_choice("--data-format", self.data_format, DATA_FORMATS)
        if self.prompt_format is not None:
            _check_choice("--prompt-format", self.prompt_format, PROMPT_FORMAT_NAMES)
        if not self.prompt_key or not self.response_key:
            raise ValueError("--prompt-key and --response-key must be non-empty")
        if self.prompt_key == self.response_key:
            raise ValueError(
                f"--prompt-key and --response-key are both {self.prompt_key!r}: the prompt "
                "would be trained as its own response"
            )


@dataclass
class TokenizerConfig:
    """The tokenizer (nothing is downloaded)."""

    tokenizer_type: str = _choices("SentencePieceTokenizer", TOKENIZER_TYPES)
    """SentencePieceTokenizer (a .model file, e.g. from tools/train_tokenizer.py) or
    HuggingFaceTokenizer (a local directory written by save_pretrained)."""
    tokenizer_model: Optional[str] = None
    """Path of the SentencePiece model file or of the Hugging Face tokenizer directory."""

    def __post_init__(self):
        _check_choice("--tokenizer-type", self.tokenizer_type, TOKENIZER_TYPES)
        if self.tokenizer_model == "":
            raise ValueError("--tokenizer-model is empty")


@dataclass
class DataConfig:
    """Where the trainer's samples come from and how they become rows."""

    train_data: Optional[str] = None
    """Training data file(s) (JSONL, or Parquet by the .parquet suffix), comma separated, read in
    the order given."""
    valid_data: Optional[str] = None
    """Validation data file(s) (JSONL or .parquet), comma separated."""
    data_path: Optional[list] = None
    """Preprocessed training data (tools/preprocess_sft_data.py --output-prefix), instead of
    --train-data: one prefix, several prefixes, or weight/prefix pairs (--data-path 0.7 a 0.3 b).
    Memory-mapped."""
    valid_data_prefix: Optional[list] = None
    """Preprocessed validation data in the --data-path syntax, instead of --valid-data."""
    mock_data: bool = False
    """Train on the built-in deterministic synthetic rows (needs --vocab-size)."""
    token_class_key: Optional[str] = None
    """JSON key whose string value names the class of a sample's tokens (e.g. "noisy"): the
    gate and exponent are then also logged per class (TensorBoard histograms). --train-data only."""
    pack_sequences: bool = False
    """Pack several samples into one row of seq_length tokens."""
    overlong: str = _choices("truncate", OVERLONG_POLICIES)
    """Samples longer than --seq-length: truncate (keep the first seq_length tokens) or drop."""
    data_cache_dir: Optional[str] = None
    """Cache tokenized --train-data/--valid-data here so restarts skip tokenization (keyed by the
    files' contents)."""

    def __post_init__(self):
        # Imported here: blend's modules import jsonl, which imports this module.
        from megatron_deft.data.blend import data_path_items, parse_data_path

        _check_choice("--overlong", self.overlong, OVERLONG_POLICIES)
        for flag, name in (
            ("--data-path", "data_path"),
            ("--valid-data-prefix", "valid_data_prefix"),
        ):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, data_path_items(value))
                try:
                    parse_data_path(value)  # syntax errors surface at startup
                except ValueError as error:
                    raise ValueError(f"{flag}: {error}") from None
        if self.train_data is not None and self.data_path:
            raise ValueError(
                "give --train-data (JSONL/Parquet) or --data-path (preprocessed), not both"
            )
        if self.valid_data is not None and self.valid_data_prefix:
            raise ValueError("give --valid-data or --valid-data-prefix, not both")
        if self.token_class_key and self.train_data is None:
            raise ValueError(
                "--token-class-key needs JSONL data (or Parquet, --train-data): preprocessed "
                "--data-path sets carry no per-sample fields (--mock-data samples have built-in "
                "classes)"
            )

    def train_paths(self) -> List[str]:
        """--train-data as a list of files."""
        return _path_list(self.train_data)

    def valid_paths(self) -> List[str]:
        """--valid-data as a list of files."""
        return _path_list(self.valid_data)


def _path_list(paths: Optional[str]) -> List[str]:
    return [path for path in (paths or "").split(",") if path]


def _check_choice(flag: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{flag} {value!r} is not one of {', '.join(choices)}")
