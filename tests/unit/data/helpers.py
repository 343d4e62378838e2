"""Helpers shared by the data-pipeline tests (fixtures are in conftest.py)."""

import importlib.util
import json
import os
import random

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))

WORDS = (
    "the cat sat on a mat and then it ran to the big red house where many dogs live "
    "how much money does she earn if he sells 12 apples for 3 dollars each answer is "
    "first we add the numbers then we divide by two so the total comes out to seven"
).split()

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_sentence(rng: random.Random, min_words: int = 3, max_words: int = 20) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))


def write_jsonl(path, records) -> str:
    """Writes dicts as JSON lines; str items are written verbatim (for malformed-line tests)."""
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


def load_tool(name: str):
    """Imports tools/<name>.py (a script, not a package module) by path."""
    path = os.path.join(REPO_ROOT, "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_train_tokenizer_tool():
    return load_tool("train_tokenizer")


class CharTokenizer:
    """One token per character (id = code point + 10): makes expected ids computable by hand."""

    vocab_size = 300
    pad_id, bos_id, eos_id = 0, 1, 2
    chat_template = None

    def encode(self, text):
        return [ord(c) + 10 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 10) for i in ids if i >= 10)


def save_hf_tokenizer(directory, chat_template, eos_token="<|im_end|>", extra_specials=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", *extra_specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(1)
    texts = [make_sentence(rng) for _ in range(300)] + ["user assistant system\n"] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token=eos_token
    )
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(str(directory))
    return str(directory)


def build_data(settings: dict, global_batch_size: int = 1, micro_batch_size: int = 1, **kwargs):
    """``build_sft_data`` with flat settings, each routed to the section that owns the field
    (DataConfig, RecordFormat, TokenizerConfig); ``seq_length`` (default 2048) and ``seed``
    (default 1234) are passed as is; a list for ``train_data``/``valid_data`` is comma-joined."""
    from megatron_deft.data import DataConfig, RecordFormat, TokenizerConfig, build_sft_data

    settings = dict(settings)
    row_settings = dict(
        seq_length=settings.pop("seq_length", 2048), seed=settings.pop("seed", 1234)
    )
    sections = (DataConfig, RecordFormat, TokenizerConfig)
    values = {cls: {} for cls in sections}
    for key, value in settings.items():
        (owner,) = [cls for cls in sections if key in cls.__dataclass_fields__]
        if key in ("train_data", "valid_data") and isinstance(value, list):
            value = ",".join(value)
        values[owner][key] = value
    built = [cls(**values[cls]) for cls in sections]
    return build_sft_data(
        *built,
        **row_settings,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        **kwargs,
    )
