"""tools/train_tokenizer.py: a usable SentencePiece model from JSONL, with fixed special ids."""

import os

import sentencepiece

from megatron_deft.data.chat_format import ROLE_MARKERS
from tests.unit.data.helpers import load_train_tokenizer_tool, write_jsonl


def test_model_has_fixed_specials_markers_and_exact_roundtrip(sp_model_path):
    model = sentencepiece.SentencePieceProcessor(model_file=sp_model_path)
    assert (model.unk_id(), model.bos_id(), model.eos_id(), model.pad_id()) == (0, 1, 2, 3)
    for marker in ROLE_MARKERS.values():
        assert len(model.encode(marker)) == 1, marker
    text = "first line\n\n  indented 12 ×  ünïcode 中\tend"  # unseen chars: byte fallback
    assert model.decode(model.encode(text)) == text
    leftovers = [
        name
        for name in os.listdir(os.path.dirname(sp_model_path))
        if name != "tiny.model" and name != "tiny.vocab"
    ]
    assert leftovers == []  # trained under a temporary name, then renamed


def test_field_mapped_input_and_errors(tmp_path, capsys):
    tool = load_train_tokenizer_tool()
    records = [
        {"question": f"how much is {i} plus {i}", "answer": f"it is {2 * i}"} for i in range(200)
    ]
    path = write_jsonl(tmp_path / "gsm.jsonl", records)
    prefix = str(tmp_path / "out" / "gsm")
    args = [
        "--input",
        path,
        "--prompt-key",
        "question",
        "--response-key",
        "answer",
        "--vocab-size",
        "300",
        "--model-prefix",
        prefix,
    ]
    assert tool.main(args) == 0
    model = sentencepiece.SentencePieceProcessor(model_file=prefix + ".model")
    assert model.decode(model.encode("how much is 7 plus 7")) == "how much is 7 plus 7"

    missing = str(tmp_path / "missing.jsonl")
    assert tool.main(["--input", missing, "--model-prefix", prefix]) == 1
    assert f"{missing}: file does not exist" in capsys.readouterr().err
    # Without the key mapping the GSM8K shape is not a prompt/response file: a located error.
    assert (
        tool.main(["--input", path, "--data-format", "prompt_response", "--model-prefix", prefix])
        == 1
    )
    assert f"{path}:1: missing key 'prompt'" in capsys.readouterr().err


def test_vocabulary_below_the_alphabet_is_a_one_line_error(tmp_path, capsys):
    tool = load_train_tokenizer_tool()
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(50)]
    )
    assert (
        tool.main(["--input", path, "--vocab-size", "20", "--model-prefix", str(tmp_path / "m")])
        == 1
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("error: sentencepiece could not train a 20-piece model:")
        and "Traceback" not in err
    )
