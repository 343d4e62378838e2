"""build_tokenizer: Megatron-LM type names, local-only loading, special ids, clear errors."""

import json
import os
import shutil

import pytest
import sentencepiece
from transformers import AutoTokenizer

from megatron_deft.config import ConfigError
from megatron_deft.data.tokenizer import Tokenizer, build_tokenizer, check_tokenizer_model


def test_sentencepiece_ids_match_the_model_file(sp_model_path):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model_path)
    raw = sentencepiece.SentencePieceProcessor(model_file=sp_model_path)
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (
        raw.get_piece_size(),
        raw.eos_id(),
        raw.bos_id(),
        raw.pad_id(),
    )
    assert tok.chat_template is None
    assert tok.encode("the cat\nsat") == raw.encode("the cat\nsat")


def test_hugging_face_directory(hf_chat_dir):
    tok = build_tokenizer("HuggingFaceTokenizer", hf_chat_dir)
    raw = AutoTokenizer.from_pretrained(hf_chat_dir)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (
        raw.convert_tokens_to_ids("<|im_end|>"),
        raw.convert_tokens_to_ids("<s>"),
        raw.convert_tokens_to_ids("<pad>"),
    )
    assert tok.vocab_size == len(raw) and tok.chat_template == raw.chat_template
    text = "the cat<|im_end|>"
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) and ids[-1] == tok.eos_id  # no BOS/EOS added by encode
    assert [text[a:b] for a, b in offsets][-1] == "<|im_end|>"
    assert tok.decode(ids) == text


def test_errors_name_the_problem(tmp_path, sp_model_path):
    with pytest.raises(ValueError, match="--tokenizer-type 'GPT2BPETokenizer' is not one of"):
        build_tokenizer("GPT2BPETokenizer", sp_model_path)
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", None)
    missing = str(tmp_path / "nope.model")
    with pytest.raises(ValueError, match=f"{missing}: no such SentencePiece model file"):
        build_tokenizer("SentencePieceTokenizer", missing)
    with pytest.raises(ValueError, match="no such Hugging Face tokenizer directory"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "no_dir"))


def _hf_variant(source, target, keep):
    os.makedirs(target)
    for name in keep:
        shutil.copy(os.path.join(source, name), target)
    return str(target)


def _transformers_loads_with_eos(directory) -> bool:
    """The reference: transformers builds a fast tokenizer with an EOS token from the files."""
    try:
        tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError):
        return False
    return tok.is_fast and tok.eos_token_id is not None


def test_hugging_face_directory_is_checked_by_its_files(tmp_path, hf_chat_dir):
    """The check (file names only) accepts exactly the directories transformers makes a usable
    tokenizer of, and says in one line which files a rejected one lacks."""
    from transformers import PreTrainedTokenizerFast

    bpe = tmp_path / "bpe"  # Qwen2's form: vocab.json + merges.txt, converted by transformers
    bpe.mkdir()
    PreTrainedTokenizerFast.from_pretrained(hf_chat_dir).backend_tokenizer.model.save(str(bpe))
    (bpe / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>"})
    )
    cases = {
        str(bpe): None,
        hf_chat_dir: None,
        _hf_variant(hf_chat_dir, tmp_path / "no_config", ["tokenizer.json"]): (
            "has no tokenizer_config.json nor special_tokens_map.json: its special tokens (EOS) "
            "are undefined"
        ),
        _hf_variant(hf_chat_dir, tmp_path / "config_only", ["tokenizer_config.json"]): (
            "not a Hugging Face tokenizer directory: it has no tokenizer.json, nor "
            "tokenizer.model, nor vocab.json + merges.txt"
        ),
    }
    for directory, problem in cases.items():
        assert _transformers_loads_with_eos(directory) == (problem is None), directory
        if problem is None:
            check_tokenizer_model("HuggingFaceTokenizer", directory)
            continue
        with pytest.raises(ConfigError) as error:
            check_tokenizer_model("HuggingFaceTokenizer", directory)
        assert str(error.value) == f"--tokenizer-model {directory}: {problem}"


def test_a_file_for_a_directory_and_back_names_the_other_tokenizer_type(hf_chat_dir, sp_model_path):
    with pytest.raises(ConfigError, match="is a directory, SentencePieceTokenizer reads a .model"):
        check_tokenizer_model("SentencePieceTokenizer", hf_chat_dir)
    with pytest.raises(ConfigError, match="needs --tokenizer-type SentencePieceTokenizer"):
        check_tokenizer_model("HuggingFaceTokenizer", sp_model_path)
    check_tokenizer_model(None, sp_model_path)  # the trainer's default type: SentencePiece
