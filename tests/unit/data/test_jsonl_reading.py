"""JSONL reading: the three input shapes, format detection, and every bad-input case."""

import pytest

from megatron_deft.data.config import DataConfig, RecordFormat, TokenizerConfig
from megatron_deft.data.jsonl import DataError, read_samples
from tests.unit.data.helpers import build_data, write_jsonl

PAIR = {"prompt": "p", "response": "r"}
CHAT = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}


def test_prompt_response_becomes_user_assistant(tmp_path):
    path = write_jsonl(
        tmp_path / "a.jsonl", [{"prompt": "2+2?", "response": "4"}, {"prompt": "", "response": "x"}]
    )
    samples, report = read_samples([path], RecordFormat("prompt_response"))
    assert [s.messages for s in samples] == [
        (("user", "2+2?"), ("assistant", "4")),
        (("user", ""), ("assistant", "x")),
    ]
    assert [(s.path, s.line) for s in samples] == [(path, 1), (path, 2)]
    assert report.num_samples == 2 and report.num_skipped == 0


def test_field_mapped_pairs_gsm8k_keys_detected(tmp_path):
    path = write_jsonl(
        tmp_path / "gsm.jsonl",
        [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}],
    )
    samples, _ = read_samples([path], RecordFormat(prompt_key="question", response_key="answer"))
    assert [s.messages for s in samples] == [
        (("user", "q1"), ("assistant", "a1")),
        (("user", "q2"), ("assistant", "a2")),
    ]


def test_messages_multi_turn_and_detection_per_file(tmp_path):
    chat = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"},
        ]
    }
    chat_path = write_jsonl(tmp_path / "chat.jsonl", [chat])
    pair_path = write_jsonl(tmp_path / "pair.jsonl", [PAIR])
    samples, _ = read_samples([chat_path, pair_path], RecordFormat("auto"))
    assert samples[0].messages == (
        ("system", "s"),
        ("user", "u1"),
        ("assistant", "a1"),
        ("user", "u2"),
        ("assistant", "a2"),
    )
    assert samples[1].messages == (("user", "p"), ("assistant", "r"))
    assert (samples[1].path, samples[1].line) == (pair_path, 1)


BAD_CASES = {
    "malformed_json": ('{"prompt": "p", "response": ', "malformed JSON", "malformed_json"),
    "not_an_object": ("[1, 2]", "expected a JSON object", "invalid"),
    "missing_response_key": ({"prompt": "p"}, "missing key 'response'", "missing_key"),
    "missing_prompt_key": ({"response": "r"}, "missing key 'prompt'", "missing_key"),
    "empty_response": ({"prompt": "p", "response": ""}, "is empty", "empty_response"),
    "blank_response": ({"prompt": "p", "response": "  \n"}, "is empty", "empty_response"),
    "non_string_response": ({"prompt": "p", "response": 4}, "must be a string", "invalid"),
    "unknown_role": (
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]},
        "unknown role 'tool'",
        "unknown_role",
    ),
    "message_missing_content": (
        {"messages": [{"role": "user"}]},
        "missing key 'content'",
        "missing_key",
    ),
    "empty_assistant_turn": (
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""}]},
        "is empty",
        "empty_response",
    ),
    "no_assistant_turn": (
        {"messages": [{"role": "user", "content": "u"}]},
        "no assistant message",
        "empty_response",
    ),
    "empty_messages": ({"messages": []}, "non-empty list", "invalid"),
    "other_keys_after_detection": ({"text": "t"}, "missing key 'prompt'", "missing_key"),
    # JSON escapes of lone UTF-16 surrogates decode to str values no tokenizer can encode.
    "lone_surrogate_response": (
        '{"prompt": "p", "response": "ok \\ud800"}',
        "lone surrogate escape \\ud800 at character 3",
        "invalid_unicode",
    ),
    "lone_surrogate_content": (
        '{"messages": [{"role": "user", "content": "\\udfff"}, '
        '{"role": "assistant", "content": "a"}]}',
        "messages[0] key 'content' holds the lone surrogate",
        "invalid_unicode",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_line_error_names_file_and_line(tmp_path, case):
    bad, message, reason = BAD_CASES[case]
    good = CHAT if "messages" in str(bad) else PAIR
    # Line 2 is blank: it is not a sample, yet the bad line must still be reported as line 4.
    path = write_jsonl(tmp_path / "bad.jsonl", [good, "", good, bad, good])
    with pytest.raises(DataError) as info:
        read_samples([path], RecordFormat("auto"))
    assert str(info.value).startswith(f"{path}:4: ")
    assert message in str(info.value)
    assert info.value.reason == reason


def test_undetectable_first_sample(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "t"}, PAIR])
    with pytest.raises(
        DataError, match=rf"^{path}:1: cannot detect the data format.*found keys \['text'\]"
    ):
        read_samples([path])


def test_bad_bytes_reported_at_their_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "p", "response": "r"}\n{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: malformed JSON"):
        read_samples([str(path)])


def test_explicit_format_rejects_other_shape(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [CHAT])
    with pytest.raises(DataError, match=rf"^{tmp_path / 'a.jsonl'}:1: missing key 'prompt'"):
        read_samples([path], RecordFormat("prompt_response"))


def test_missing_file_is_an_error_even_when_skipping(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=rf"^{missing}: file does not exist"):
        read_samples([missing], RecordFormat(skip_bad_samples=True))


def test_file_without_samples_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(DataError, match="contains no usable samples"):
        read_samples([path])


def test_skip_bad_samples_counts_every_reason(tmp_path):
    bad_cases = [
        BAD_CASES[name][0] for name in ("malformed_json", "missing_response_key", "empty_response")
    ]
    lines = [
        PAIR,
        bad_cases[0],
        {"prompt": "kept", "response": "yes"},
        bad_cases[1],
        bad_cases[2],
        bad_cases[1],
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    samples, report = read_samples([path], RecordFormat(skip_bad_samples=True))
    assert [s.line for s in samples] == [1, 3]
    assert dict(report.skipped) == {"malformed_json": 1, "missing_key": 2, "empty_response": 1}
    assert report.num_skipped == 4 and report.num_samples == 2
    assert report.examples[0].startswith(f"{path}:2: malformed JSON")


def test_lone_surrogate_fails_at_its_line_or_is_counted(tmp_path, sp_model_path):
    """Through the real SentencePiece tokenizer (whose C++ binding cannot take such a str)."""
    path = write_jsonl(tmp_path / "s.jsonl", [PAIR, '{"prompt": "\\ud800", "response": "r"}', PAIR])
    config = dict(train_data=path, tokenizer_model=sp_model_path, seq_length=32)
    with pytest.raises(DataError, match=f"^{path}:2: record key 'prompt' holds the lone"):
        build_data(config)
    built = build_data(dict(config, skip_bad_samples=True))
    assert built.reports[0].skipped == {"invalid_unicode": 1}
    assert built.reports[0].num_samples == 2


@pytest.mark.parametrize(
    "section, settings, message",
    [
        (RecordFormat, dict(data_format="jsonl"), "--data-format 'jsonl' is not one of auto"),
        (RecordFormat, dict(prompt_key=""), "--prompt-key and --response-key must be non-empty"),
        (RecordFormat, dict(prompt_key="q", response_key="q"), "are both 'q'"),
        (DataConfig, dict(overlong="cut"), "--overlong 'cut' is not one of truncate, drop"),
        (TokenizerConfig, dict(tokenizer_type="GPT2BPETokenizer"), "--tokenizer-type 'GPT2BPE"),
        (TokenizerConfig, dict(tokenizer_model=""), "--tokenizer-model is empty"),
    ],
)
def test_sections_check_their_own_fields(section, settings, message):
    with pytest.raises(ValueError, match=message):
        section(**settings)


def test_config_accepts_comma_separated_paths():
    config = DataConfig(train_data="a.jsonl,b.jsonl", valid_data="")
    assert config.train_paths() == ["a.jsonl", "b.jsonl"] and config.valid_paths() == []
