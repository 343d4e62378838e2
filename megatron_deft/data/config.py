"""Configuration of the SFT data pipeline (one dataclass, parsed once at entry)."""

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_deft.data.blend import data_path_items, parse_data_path

DATA_FORMATS = ("auto", "prompt_response", "messages")
OVERLONG_POLICIES = ("truncate", "drop")
TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")


@dataclass
class DataConfig:
    """Where the SFT data lives, how it is read, tokenized, packed and ordered."""

    train_data_path: List[str] = field(default_factory=list)
    """JSONL files of training samples, read in the order given (``--train-data-path``); a
    comma-separated string is accepted too."""

    valid_data_path: List[str] = field(default_factory=list)
    """JSONL files of validation samples; empty means no validation set (``--valid-data-path``)."""

    data_path: List[str] = field(default_factory=list)
    """Preprocessed training data (``--data-path``, Megatron syntax) used instead of
    ``train_data_path``: the ``--output-prefix`` of ``tools/preprocess_sft_data.py``; several
    prefixes (their union, like several JSONL files); or weight/prefix pairs
    ``0.7 set_a 0.3 set_b`` (a blend: that share of rows from each set, see
    ``megatron_deft.data.blend``). Memory-mapped. A string is split on whitespace and commas."""

    valid_data_prefix: List[str] = field(default_factory=list)
    """Preprocessed validation data in the ``data_path`` syntax, used instead of
    ``valid_data_path`` (``--valid-data-prefix``)."""

    data_format: str = "auto"
    """Sample shape (``--data-format``): ``prompt_response`` (one pair per line under
    ``prompt_key``/``response_key``), ``messages`` (``{"messages": [{"role", "content"}, ...]}``),
    or ``auto`` (detected per file from its first sample)."""

    prompt_key: str = "prompt"
    """JSON key of the prompt in ``prompt_response`` lines, e.g. ``question`` for GSM8K."""

    response_key: str = "response"
    """JSON key of the response in ``prompt_response`` lines, e.g. ``answer`` for GSM8K."""

    token_class_key: Optional[str] = None
    """JSON key whose string value names the class of a sample's tokens (e.g. ``"noisy"``), for
    per-class training histograms of the objective's gate and exponent (``--token-class-key``).
    Records without the key are unlabeled. JSONL input only; training is unchanged."""

    seq_length: int = 2048
    """Tokens per row ``s``: every micro-batch is ``[b, s]``; a sample must fit in one row."""

    pack_sequences: bool = False
    """Pack several samples into one row (block-diagonal attention, per-sample position ids)
    instead of one padded sample per row (``--pack-sequences``)."""

    overlong: str = "truncate"
    """What to do with a sample longer than ``seq_length`` tokens: ``truncate`` keeps its first
    ``seq_length`` tokens, ``drop`` leaves it out. Either way the count is reported."""

    skip_bad_samples: bool = False
    """Count and report malformed lines instead of stopping at the first one with an error."""

    seed: int = 1234
    """Seed of the row shuffle; epoch ``e`` uses the permutation drawn from ``(seed, e)``."""

    tokenizer_type: str = "SentencePieceTokenizer"
    """``SentencePieceTokenizer`` (a ``.model`` file) or ``HuggingFaceTokenizer`` (a local
    directory saved by ``save_pretrained``; never fetched from a hub)."""

    tokenizer_model: Optional[str] = None
    """Path of the SentencePiece model file or of the Hugging Face tokenizer directory."""

    data_cache_dir: Optional[str] = None
    """Directory for tokenized-data caches (None: tokenize on every start). Entries are keyed by
    a hash of the data and tokenizer files' contents plus the settings above, so changed inputs
    are re-tokenized, never served stale."""

    def __post_init__(self):
        self.train_data_path = _path_list(self.train_data_path)
        self.valid_data_path = _path_list(self.valid_data_path)
        for name, jsonl_name in (
            ("data_path", "train_data_path"),
            ("valid_data_prefix", "valid_data_path"),
        ):
            setattr(self, name, data_path_items(getattr(self, name)))
            if getattr(self, name):
                parse_data_path(getattr(self, name))  # syntax errors surface at startup
                if getattr(self, jsonl_name):
                    raise ValueError(f"set {name} (preprocessed) or {jsonl_name} (JSONL), not both")
                if self.token_class_key:
                    raise ValueError(
                        f"token_class_key needs JSONL data: the preprocessed sets of {name} "
                        "carry no per-sample fields besides the tokens"
                    )
        _check_choice("data_format", self.data_format, DATA_FORMATS)
        _check_choice("overlong", self.overlong, OVERLONG_POLICIES)
        _check_choice("tokenizer_type", self.tokenizer_type, TOKENIZER_TYPES)
        if self.seq_length < 2:
            raise ValueError(
                f"seq_length must be >= 2 (one input and one target), got {self.seq_length}"
            )
        if not self.prompt_key or not self.response_key:
            raise ValueError("prompt_key and response_key must be non-empty strings")


def _path_list(paths) -> List[str]:
    """Accepts a list of paths or one comma-separated string (as launch scripts pass them)."""
    if isinstance(paths, str):
        return [path for path in paths.split(",") if path]
    return list(paths)


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def add_jsonl_input_arguments(parser, input_help: str) -> None:
    """The JSONL-reading flags shared by the data tools (same names as the trainer's)."""
    parser.add_argument("--input", nargs="+", required=True, help=input_help)
    parser.add_argument("--data-format", default="auto", choices=DATA_FORMATS)
    parser.add_argument("--prompt-key", default="prompt")
    parser.add_argument("--response-key", default="response")
    parser.add_argument(
        "--skip-bad-samples", action="store_true", help="count bad lines instead of failing"
    )
