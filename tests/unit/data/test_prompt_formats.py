"""--prompt-format: the DEFT paper's prompt templates, the same for training (the data pipeline's
tokens and loss flags), preprocessing and the evaluator's prompts. The expected texts are
written out here, not taken from the table."""

import json

import pytest

from megatron_deft.data import RecordFormat, build_tokenizer, read_samples, tokenize_conversation
from megatron_deft.data.chat_format import ChatTemplateError
from megatron_deft.data.prompt_formats import PROMPT_FORMATS
from megatron_deft.evaluation.math_answers import prompt_and_stop
from tests.unit.data.helpers import build_data, save_hf_tokenizer

CHAT_TEMPLATE = (  # a chat template the formats must not use
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QUESTION, REPLY = "What is {1+1}?", "It is \\boxed{2}."
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
EXPECTED_PROMPTS = {
    "qwen-boxed": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"{QUESTION}\n{INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    ),
    "deepseek-math": f"User: {QUESTION}\n{INSTRUCTION}\n\nAssistant:",
    "llama-base-boxed-with-bos": f"Question: {QUESTION}\n{INSTRUCTION}\nAnswer: ",
    "raw": QUESTION,
}
EXPECTED_END = {"qwen-boxed": "<|im_end|>"}  # the others close with EOS


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return save_hf_tokenizer(
        tmp_path_factory.mktemp("tok"),
        CHAT_TEMPLATE,
        eos_token="<|endoftext|>",
        extra_specials=["<|endoftext|>"],
    )


@pytest.fixture(scope="module")
def tokenizer(tokenizer_path):
    return build_tokenizer("HuggingFaceTokenizer", tokenizer_path)


def test_every_format_is_tested():
    assert set(EXPECTED_PROMPTS) == set(PROMPT_FORMATS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PROMPTS))
def test_formatted_sample_tokens_and_loss(tokenizer, name):
    messages = (("user", QUESTION), ("assistant", REPLY))
    ids, flags = tokenize_conversation(messages, tokenizer, name)
    prompt = [tokenizer.bos_id] + tokenizer.encode(EXPECTED_PROMPTS[name])
    end = tokenizer.encode(EXPECTED_END[name]) if name in EXPECTED_END else [tokenizer.eos_id]
    reply = tokenizer.encode(REPLY) + end
    assert ids == prompt + reply
    assert flags == [False] * len(prompt) + [True] * len(reply)
    # The evaluator generates after exactly the trained prefix and stops at the trained end.
    assert prompt_and_stop(QUESTION, tokenizer, name) == (prompt, end[-1])


def test_training_reads_the_format_from_the_records_settings(tokenizer, tokenizer_path, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": QUESTION, "answer": REPLY}) + "\n")
    records = RecordFormat(prompt_key="question", response_key="answer")
    (sample,), _ = read_samples([str(path)], records)
    formatted, formatted_flags = tokenize_conversation(sample.messages, tokenizer, "deepseek-math")
    chat, _ = tokenize_conversation(sample.messages, tokenizer)  # without: the chat template
    assert len(chat) != len(formatted)
    settings = dict(
        train_data=str(path),
        prompt_key="question",
        response_key="answer",
        prompt_format="deepseek-math",
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=tokenizer_path,
    )
    (report,) = build_data(settings).reports
    assert report.num_tokens == len(formatted)
    assert report.num_loss_tokens == sum(formatted_flags[1:])  # token 0 is never a target


def test_a_conversation_the_format_cannot_hold_is_one_error(tokenizer):
    messages = (("system", "be brief"), ("user", QUESTION), ("assistant", REPLY))
    with pytest.raises(ChatTemplateError, match="--prompt-format deepseek-math takes one user"):
        tokenize_conversation(messages, tokenizer, "deepseek-math")


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="--prompt-format 'chatml' is not one of qwen-boxed"):
        RecordFormat(prompt_format="chatml")


def test_the_papers_parquet_layout_reads_nested_keys(tmp_path):
    """The DEFT paper's Parquet keeps prompt and response in the extra_info struct column."""
    import pyarrow
    import pyarrow.parquet

    rows = [{"extra_info": {"question": "1+1?", "answer": "2", "llama_prompt": "Q: 1+1?"}}]
    path = str(tmp_path / "train.parquet")
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    records = RecordFormat(prompt_key="extra_info.question", response_key="extra_info.answer")
    (sample,), _ = read_samples([path], records)
    assert sample.messages == (("user", "1+1?"), ("assistant", "2"))
    records = RecordFormat(prompt_key="extra_info.llama_prompt", response_key="extra_info.x")
    with pytest.raises(ValueError, match=r"train.parquet:row 0: missing key 'extra_info.x'"):
        read_samples([path], records)
