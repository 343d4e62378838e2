"""Tokenizers behind one small protocol: SentencePiece model files and local Hugging Face dirs.

Type names follow Megatron-LM (``--tokenizer-type SentencePieceTokenizer|HuggingFaceTokenizer``,
``--tokenizer-model PATH``) so existing launch scripts keep working. Nothing is ever downloaded:
a Hugging Face tokenizer must be a local directory written by ``save_pretrained``.
"""

import os
from typing import List, Optional, Protocol, Sequence, Tuple, runtime_checkable

from megatron_deft.conventions import ConfigError

Offsets = List[Tuple[int, int]]


@runtime_checkable
class Tokenizer(Protocol):
    """What the SFT pipeline needs from a tokenizer.

    ``chat_template`` is None when the tokenizer has none; the built-in template is used then
    (documented in ``chat_format``). ``render_chat`` and ``encode_with_offsets`` are only
    called when ``chat_template`` is set.
    """

    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: Optional[int]
    chat_template: Optional[str]

    def encode(self, text: str) -> List[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, messages: List[dict], add_generation_prompt: bool) -> str: ...

    def encode_with_offsets(self, text: str) -> Tuple[List[int], Offsets]: ...


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file (e.g. from ``tools/train_tokenizer.py``).

    Has no chat template. ``pad_id`` falls back to ``eos_id`` when the model defines no pad piece;
    padding never carries loss and attends only to itself, so its id does not matter.
    """

    chat_template = None

    def __init__(self, model_path: str):
        import sentencepiece

        self._model = sentencepiece.SentencePieceProcessor(model_file=model_path)
        self.vocab_size = self._model.get_piece_size()
        self.eos_id = _require_id(self._model.eos_id(), "eos", model_path)
        self.bos_id = self._model.bos_id() if self._model.bos_id() >= 0 else None
        self.pad_id = self._model.pad_id() if self._model.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> List[int]:
        return self._model.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._model.decode(list(ids))

    def render_chat(self, messages, add_generation_prompt):
        raise NotImplementedError("SentencePiece models have no chat template")

    def encode_with_offsets(self, text):
        raise NotImplementedError("SentencePiece models have no chat template")


class HuggingFaceTokenizer:
    """A local Hugging Face tokenizer directory (``tokenizer.json`` etc., optional chat template).

    ``encode`` adds no special tokens: templates place BOS/EOS themselves. Requires a *fast*
    tokenizer because chat-template masking maps character spans to tokens via offsets.
    """

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if not self._tok.is_fast:
            raise ValueError(f"{path}: needs a fast tokenizer (tokenizer.json) for offset mapping")
        self.vocab_size = len(self._tok)
        self.eos_id = _require_id(self._tok.eos_token_id, "eos", path)
        self.bos_id = self._tok.bos_token_id
        self.pad_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        self.chat_template = self._tok.chat_template or None

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def render_chat(self, messages: List[dict], add_generation_prompt: bool) -> str:
        return self._tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode_with_offsets(self, text: str) -> Tuple[List[int], Offsets]:
        # The Rust backend directly: the same ids as `encode`, ~10x less per-call overhead than
        # `__call__(..., return_offsets_mapping=True)`, which dominated tokenizing a data set.
        encoding = self._tok.backend_tokenizer.encode(text, add_special_tokens=False)
        return list(encoding.ids), list(encoding.offsets)


HF_VOCABULARIES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))
"""File sets a fast Hugging Face tokenizer is built from (tokenizer.json as is, the others
converted by transformers); a directory needs one of them."""

HF_SPECIAL_TOKENS = ("tokenizer_config.json", "special_tokens_map.json")
"""Files naming the special tokens (EOS, which SFT needs); a directory needs one of them."""


def _sentencepiece_problem(path: str) -> Optional[str]:
    if os.path.isdir(path):
        return (
            "is a directory, SentencePieceTokenizer reads a .model file (a Hugging Face "
            "tokenizer directory needs --tokenizer-type HuggingFaceTokenizer)"
        )
    return None if os.path.isfile(path) else "no such SentencePiece model file"


def _hugging_face_problem(path: str) -> Optional[str]:
    if os.path.isfile(path):
        return (
            "is a file, HuggingFaceTokenizer reads a directory (a SentencePiece .model file "
            "needs --tokenizer-type SentencePieceTokenizer)"
        )
    if not os.path.isdir(path):
        return "no such Hugging Face tokenizer directory"
    present = set(os.listdir(path))
    if not any(present.issuperset(files) for files in HF_VOCABULARIES):
        named = ", nor ".join(" + ".join(files) for files in HF_VOCABULARIES)
        return f"not a Hugging Face tokenizer directory: it has no {named}"
    if present.isdisjoint(HF_SPECIAL_TOKENS):
        return f"has no {' nor '.join(HF_SPECIAL_TOKENS)}: its special tokens (EOS) are undefined"
    return None


_TOKENIZERS = {
    "SentencePieceTokenizer": (SentencePieceTokenizer, _sentencepiece_problem),
    "HuggingFaceTokenizer": (HuggingFaceTokenizer, _hugging_face_problem),
}


def _family(tokenizer_type: Optional[str]):
    """(class, problem finder) of ``tokenizer_type`` (default SentencePieceTokenizer)."""
    name = tokenizer_type or "SentencePieceTokenizer"
    if name not in _TOKENIZERS:
        raise ConfigError(f"--tokenizer-type {name!r} is not one of {', '.join(_TOKENIZERS)}")
    return _TOKENIZERS[name]


def check_tokenizer_model(tokenizer_type: Optional[str], tokenizer_model: Optional[str]) -> None:
    """Raise :class:`ConfigError`, one line naming the path and what it lacks, unless
    ``tokenizer_model`` holds the files ``tokenizer_type`` (default SentencePieceTokenizer) loads
    from. Looks at file names only (milliseconds): flag validation calls it before any work."""
    _, problem_of = _family(tokenizer_type)
    if not tokenizer_model:
        raise ConfigError("the tokenizer needs --tokenizer-model (a path)")
    problem = problem_of(tokenizer_model)
    if problem:
        raise ConfigError(f"--tokenizer-model {tokenizer_model}: {problem}")


def build_tokenizer(tokenizer_type: Optional[str], tokenizer_model: Optional[str]) -> Tokenizer:
    """Builds a tokenizer from Megatron-LM-style ``--tokenizer-type`` / ``--tokenizer-model``."""
    check_tokenizer_model(tokenizer_type, tokenizer_model)
    return _family(tokenizer_type)[0](tokenizer_model)


def _require_id(token_id: Optional[int], name: str, path: str) -> int:
    if token_id is None or token_id < 0:
        raise ValueError(f"{path}: tokenizer defines no {name} token, which SFT needs")
    return token_id
