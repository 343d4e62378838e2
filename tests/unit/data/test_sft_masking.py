"""Loss masking: exactly the response/assistant tokens (plus their EOS) carry loss, per format and
tokenizer; the next-token label shift; the over-long policy and its counts."""

import jinja2
import numpy as np
import pytest

from megatron_deft.data.chat_format import ROLE_MARKERS, last_reply_span, tokenize_conversation
from megatron_deft.data.config import RecordFormat
from megatron_deft.data.jsonl import DataError, ReadReport, Sample, read_samples
from megatron_deft.data.packing import IGNORE_INDEX, build_row
from megatron_deft.data.sft_dataset import tokenize_samples
from megatron_deft.data.tokenizer import build_tokenizer
from tests.unit.data.helpers import CHATML_TEMPLATE, CharTokenizer, write_jsonl

MULTI_TURN = {
    "messages": [
        {"role": "system", "content": "first we add the numbers"},
        {"role": "user", "content": "how much money does she earn"},
        {"role": "assistant", "content": "the total comes out to seven"},
        {"role": "user", "content": "then we divide by two"},
        {"role": "assistant", "content": "so the answer is 3 dollars"},
    ]
}
FORMATS = {
    "prompt_response": (
        {"prompt": "the cat sat on a mat", "response": "then it ran to the big red house"},
        {},
    ),
    "gsm8k_keys": (
        {"question": "how much money", "answer": "12 apples\n#### 12"},
        {"prompt_key": "question", "response_key": "answer"},
    ),
    "messages": (MULTI_TURN, {}),
}


class CharTemplateTokenizer(CharTokenizer):
    """Char-level tokenizer with a Jinja chat template: template spans computable by hand."""

    def __init__(self, template):
        self.chat_template = template

    def render_chat(self, messages, add_generation_prompt):
        return jinja2.Template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt
        )

    def encode_with_offsets(self, text):
        return self.encode(text), [(i, i + 1) for i in range(len(text))]


@pytest.fixture(scope="module")
def tokenizers(sp_model_path, hf_chat_dir, hf_plain_dir):
    return {
        "sentencepiece": build_tokenizer("SentencePieceTokenizer", sp_model_path),
        "hf_chat_template": build_tokenizer("HuggingFaceTokenizer", hf_chat_dir),
        "hf_builtin_template": build_tokenizer("HuggingFaceTokenizer", hf_plain_dir),
    }


def test_labels_shift_hand_computed():
    # Built-in template, char tokens (id = ord + 10), BOS=1, EOS=2, PAD=0.
    messages = (("user", "hi"), ("assistant", "yo"))
    ids, flags = tokenize_conversation(messages, CharTokenizer())
    prefix = [1] + [ord(c) + 10 for c in "<|user|>\nhi\n<|assistant|>\n"]
    assert ids == prefix + [ord("y") + 10, ord("o") + 10, 2]
    k = len(prefix)
    assert flags == [False] * k + [True] * 3

    seq_length = len(ids) + 3
    samples, _ = tokenize_samples([Sample(messages, "f", 1)], CharTokenizer(), seq_length)
    row = build_row(samples, (0,), seq_length, pad_id=0)
    expected_labels = [IGNORE_INDEX] * seq_length
    expected_labels[k - 1] = ord("y") + 10  # the "\n" closing the header predicts "y"
    expected_labels[k] = ord("o") + 10
    expected_labels[k + 1] = 2  # "o" predicts EOS; EOS itself (position k+2) has no target
    assert row["labels"].tolist() == expected_labels
    assert row["loss_mask"].tolist() == [float(x != IGNORE_INDEX) for x in expected_labels]
    assert row["tokens"].tolist() == ids + [0, 0, 0]
    assert row["position_ids"].tolist() == list(range(len(ids))) + [0, 0, 0]


def test_chat_template_spans_hand_computed():
    tok = CharTemplateTokenizer(CHATML_TEMPLATE)
    ids, flags = tokenize_conversation(
        (("user", "ab"), ("assistant", "cd"), ("user", "e"), ("assistant", "f")), tok
    )
    text = (
        "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\ncd<|im_end|>\n"
        "<|im_start|>user\ne<|im_end|>\n<|im_start|>assistant\nf<|im_end|>\n"
    )
    assert ids == [ord(c) + 10 for c in text]
    expected = np.zeros(len(text), dtype=bool)
    for reply in ("cd<|im_end|>", "f<|im_end|>"):  # content + end-of-turn, not the trailing "\n"
        start = text.index("assistant\n" + reply) + len("assistant\n")
        expected[start : start + len(reply)] = True
    assert flags == expected.tolist()


def _expected_response_ids(tokenizer, responses):
    """Independent expectation: each response encoded alone, closed by EOS (<|im_end|> is EOS
    of the ChatML test tokenizer)."""
    out = []
    for response in responses:
        out += tokenizer.encode(response) + [tokenizer.eos_id]
    return out


@pytest.mark.parametrize(
    "tokenizer_name", ["sentencepiece", "hf_chat_template", "hf_builtin_template"]
)
@pytest.mark.parametrize("format_name", sorted(FORMATS))
def test_only_response_tokens_carry_loss(tmp_path, tokenizers, tokenizer_name, format_name):
    tokenizer = tokenizers[tokenizer_name]
    record, keys = FORMATS[format_name]
    path = write_jsonl(tmp_path / "data.jsonl", [record])
    samples, _ = read_samples([path], RecordFormat(**keys))
    responses = [content for role, content in samples[0].messages if role == "assistant"]
    tokenized, _ = tokenize_samples(samples, tokenizer, seq_length=512)
    row = build_row(tokenized, (0,), 512, tokenizer.pad_id)
    targets = row["labels"][row["labels"] != IGNORE_INDEX].tolist()
    assert targets == _expected_response_ids(tokenizer, responses)
    assert tokenizer.decode(targets).replace(" ", "") == "".join(
        r + tokenizer.decode([tokenizer.eos_id]) for r in responses
    ).replace(" ", "")
    assert np.array_equal(row["loss_mask"], (row["labels"] != IGNORE_INDEX).astype(np.float32))


@pytest.mark.parametrize("tokenizer_name", ["sentencepiece", "hf_chat_template"])
def test_multi_turn_masks_every_non_assistant_turn(tokenizers, tokenizer_name):
    tokenizer = tokenizers[tokenizer_name]
    messages = tuple((m["role"], m["content"]) for m in MULTI_TURN["messages"])
    ids, flags = tokenize_conversation(messages, tokenizer)
    flagged = np.flatnonzero(flags)
    # Loss tokens form exactly one contiguous run per assistant turn ...
    runs = np.split(flagged, np.flatnonzero(np.diff(flagged) != 1) + 1)
    assert len(runs) == 2
    replies = [content for role, content in messages if role == "assistant"]
    for run, reply in zip(runs, replies):
        assert [ids[i] for i in run] == tokenizer.encode(reply) + [tokenizer.eos_id]
    # ... and every system/user text lies outside the runs.
    masked_text = tokenizer.decode([i for i, f in zip(ids, flags) if not f])
    for role, content in messages:
        if role != "assistant":
            assert content in masked_text


def test_overlong_truncate_and_drop_are_counted():
    tok = CharTokenizer()
    short = Sample(
        (("user", "a"), ("assistant", "b")), "f", 1
    )  # BOS + "<|user|>\na\n" (11) + "<|assistant|>\n" (14) + "b" + EOS = 28
    long_reply = Sample((("user", "a"), ("assistant", "b" * 40)), "f", 2)
    long_prompt = Sample((("user", "a" * 60), ("assistant", "b")), "f", 3)
    samples = [short, long_reply, long_prompt]
    seq_length = 40
    kept, report = tokenize_samples(samples, tok, seq_length, overlong="truncate")
    assert len(kept) == 2 and report.num_truncated == 2 and report.num_dropped_no_loss == 1
    assert kept.lengths.tolist() == [28, 40]
    assert report.num_loss_tokens == 2 + (
        40 - 26
    )  # short: "b" + EOS; truncated: the reply's first 14
    kept, report = tokenize_samples(samples, tok, seq_length, overlong="drop")
    assert len(kept) == 1 and report.num_dropped_overlong == 2 and report.num_truncated == 0


def test_chat_template_failures_name_the_sample():
    not_prefix_consistent = (
        "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}{% endfor %}"
    )
    raising = "{{ raise_exception('roles must alternate') }}"
    messages = (("user", "u"), ("assistant", "a"))
    for template, message in (
        (not_prefix_consistent, "renders the first"),
        (raising, "roles must alternate"),
    ):
        tok = CharTemplateTokenizer(template)
        tok.render_chat = _with_raise_exception(tok)
        with pytest.raises(DataError, match=rf"^data.jsonl:7: .*{message}"):
            tokenize_samples([Sample(messages, "data.jsonl", 7)], tok, 100)
        report = ReadReport()
        kept, _ = tokenize_samples(
            [Sample(messages, "data.jsonl", 7)], tok, 100, skip_bad_samples=True, read_report=report
        )
        assert len(kept) == 0 and dict(report.skipped) == {"chat_template": 1}


def _with_raise_exception(tok):
    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def render(messages, add_generation_prompt):
        template = jinja2.Template(tok.chat_template)
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            raise_exception=raise_exception,
        )

    return render


@pytest.mark.parametrize(
    "tokenizer_name", ["sentencepiece", "hf_chat_template", "hf_builtin_template"]
)
def test_generation_prompt_is_the_training_prefix(tokenizers, tokenizer_name):
    """The prefix last_reply_span cuts off (what generation starts from) is the earlier turns
    followed by the assistant header, and the span is the last reply closed by EOS."""
    tokenizer = tokenizers[tokenizer_name]
    messages = tuple((m["role"], m["content"]) for m in MULTI_TURN["messages"])
    ids, flags = tokenize_conversation(messages, tokenizer)
    start, end = last_reply_span(flags)
    prompt = ids[:start]
    if tokenizer.chat_template:  # the template's own generation prompt for the earlier turns
        earlier = [{"role": role, "content": content} for role, content in messages[:-1]]
        expected_prompt = tokenizer.encode_with_offsets(tokenizer.render_chat(earlier, True))[0]
    else:
        expected_prompt = tokenize_conversation(messages[:-1], tokenizer)[0] + tokenizer.encode(
            ROLE_MARKERS["assistant"] + "\n"
        )
    assert prompt == expected_prompt
    reply = tokenizer.encode(messages[-1][1]) + [tokenizer.eos_id]
    assert end == start + len(reply)
    assert prompt == ids[: len(prompt)]
    assert ids[len(prompt) : len(prompt) + len(reply)] == reply  # the reply follows directly
    assert not flags[len(prompt) - 1] and all(flags[len(prompt) : len(prompt) + len(reply)])


def test_template_that_rewrites_replies_is_rejected():
    upper = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
    upper += "{% if add_generation_prompt %}assistant: {% endif %}"
    with pytest.raises(ValueError, match="does not render message 1 verbatim"):
        tokenize_conversation((("user", "u"), ("assistant", "reply")), CharTemplateTokenizer(upper))
