"""build_tokenizer: Megatron-LM type names, local-only loading, special ids, clear errors."""

import pytest
import sentencepiece
from transformers import AutoTokenizer

from megatron_deft.data.tokenizer import Tokenizer, build_tokenizer


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
    with pytest.raises(ValueError, match="tokenizer_type='GPT2BPETokenizer' is not one of"):
        build_tokenizer("GPT2BPETokenizer", sp_model_path)
    with pytest.raises(ValueError, match="needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", None)
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match=f"model file does not exist: {missing}"):
        build_tokenizer("SentencePieceTokenizer", missing)
    with pytest.raises(FileNotFoundError, match="tokenizer directory does not exist"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "no_dir"))
