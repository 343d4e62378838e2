"""Session fixtures for the data-pipeline tests: tiny tokenizers trained in-process, no
downloads."""

import random

import pytest

from tests.unit.data.helpers import (
    CHATML_TEMPLATE,
    load_train_tokenizer_tool,
    make_sentence,
    save_hf_tokenizer,
    write_jsonl,
)


@pytest.fixture(scope="session")
def corpus_path(tmp_path_factory):
    rng = random.Random(0)
    records = [{"prompt": make_sentence(rng), "response": make_sentence(rng)} for _ in range(300)]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", records)


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory, corpus_path):
    tool = load_train_tokenizer_tool()
    prefix = str(tmp_path_factory.mktemp("sp") / "tiny")
    assert tool.main(["--input", corpus_path, "--vocab-size", "400", "--model-prefix", prefix]) == 0
    return prefix + ".model"


@pytest.fixture(scope="session")
def hf_chat_dir(tmp_path_factory):
    """A byte-level BPE tokenizer directory with a ChatML chat template (eos = <|im_end|>)."""
    return save_hf_tokenizer(tmp_path_factory.mktemp("hf_chat"), CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def hf_plain_dir(tmp_path_factory):
    """The same kind of tokenizer without a chat template (built-in template applies)."""
    return save_hf_tokenizer(tmp_path_factory.mktemp("hf_plain"), None)
