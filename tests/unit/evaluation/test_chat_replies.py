"""Evaluation of chat-template replies whose end-of-turn token is not EOS (Qwen, Llama 3): the
prompt is the trained prefix, generation stops at the token that closed the trained replies,
and exact-match compares with the trained continuation (here, as in Qwen3's template, an empty
think block the template writes before the last assistant answer)."""

import pytest
import torch

from megatron_deft.data.jsonl import Sample
from megatron_deft.data.tokenizer import build_tokenizer
from megatron_deft.evaluation.evaluator import eval_item, is_exact_match
from megatron_deft.evaluation.generation import generate
from tests.unit.data.helpers import save_hf_tokenizer

QWEN3_LIKE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message['content']"
    " + '<|im_end|>\\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ITEM_MESSAGES = (("user", "how much money"), ("assistant", "12 apples"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = save_hf_tokenizer(
        tmp_path_factory.mktemp("qwen3_like"),
        QWEN3_LIKE,
        eos_token="<|endoftext|>",
        extra_specials=["<|endoftext|>", "<think>", "</think>"],
    )
    return build_tokenizer("HuggingFaceTokenizer", path)


@pytest.fixture(scope="module")
def item(tokenizer):
    return eval_item(7, Sample(messages=ITEM_MESSAGES, path="eval.jsonl", line=3), tokenizer)


def test_prompt_is_the_trained_prefix_and_the_reply_ends_with_the_end_of_turn_token(
    tokenizer, item
):
    index, prompt, reference, expected, (ids, flags) = item
    assert index == 7 and reference == "12 apples"
    assert tokenizer.decode(prompt) == (
        "<|im_start|>user\nhow much money<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(expected) == "<think>\n\n</think>\n\n12 apples<|im_end|>"
    (im_end,) = tokenizer.encode("<|im_end|>")
    assert expected[-1] == im_end != tokenizer.eos_id
    n = len(prompt)
    assert ids[: n + len(expected)] == prompt + expected
    assert not any(flags[:n]) and all(flags[n : n + len(expected)])


class TeacherModel(torch.nn.Module):
    """Greedy logits that continue ``script`` (position t predicts script[t + 1]) and then
    repeat ``junk``: a model trained to the reply that does not stop by itself."""

    def __init__(self, script, vocab, junk):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # generate reads the device
        self.script, self.vocab, self.junk = script, vocab, junk

    def forward(
        self, input_ids, position_ids, attention_mask, inference_context, runtime_gather_output
    ):
        """Logits of the last position only, like megatron-core under an inference context."""
        assert inference_context is not None and runtime_gather_output
        t = int(position_ids[0, -1])
        following = self.script[t + 1] if t + 1 < len(self.script) else self.junk
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab)
        logits[:, 0, following] = 1.0
        return logits


def test_generation_stops_at_the_end_of_turn_token_and_matches(tokenizer, item):
    _, prompt, _, expected, _ = item
    junk = tokenizer.encode(" apples")[-1]
    model = TeacherModel(prompt + expected, tokenizer.vocab_size, junk)
    stop_ids = {tokenizer.eos_id, expected[-1]}
    (generated,) = generate(model, [prompt], stop_ids, tokenizer.pad_id, 40, tokenizer.vocab_size)
    assert generated == expected and is_exact_match(tokenizer, generated, expected)
    # Stopping at EOS only (the former behaviour) runs past the reply: never an exact match.
    (runaway,) = generate(
        model, [prompt], {tokenizer.eos_id}, tokenizer.pad_id, 40, tokenizer.vocab_size
    )
    assert len(runaway) == 40 and runaway[: len(expected)] == expected
    assert not is_exact_match(tokenizer, runaway, expected)
    # The answer alone (no think block, no end-of-turn) is not what the model was trained to say.
    answer_only = tokenizer.encode("12 apples")
    assert not is_exact_match(tokenizer, answer_only, expected)


def test_a_conversation_the_template_cannot_split_names_its_file_and_line():
    from megatron_deft.config import ConfigError

    class RewritingTemplate:  # upper-cases replies: no verbatim span to evaluate against
        chat_template = "upper"

        def render_chat(self, messages, add_generation_prompt):
            text = "".join(f"{m['role']}: {m['content'].upper()}\n" for m in messages)
            return text + ("assistant: " if add_generation_prompt else "")

    sample = Sample(messages=(("user", "u"), ("assistant", "reply")), path="eval.jsonl", line=12)
    with pytest.raises(ConfigError, match="eval.jsonl:12: the chat template does not render"):
        eval_item(0, sample, RewritingTemplate())
    ends_with_user = Sample(messages=(("user", "u"),), path="eval.jsonl", line=13)
    with pytest.raises(ConfigError, match="eval.jsonl:13: the last message must be"):
        eval_item(0, ends_with_user, RewritingTemplate())


def test_answer_pattern_compares_the_extracted_answers(tokenizer, item):
    """--answer-pattern: GSM8K-style final answers are compared, not the whole replies."""
    import re

    from megatron_deft.config import ConfigError
    from megatron_deft.evaluation.evaluator import extract_answer

    expected = item.expected  # "<think>\n\n</think>\n\n12 apples<|im_end|>"
    number = re.compile(r"(\d+) apples")
    assert extract_answer(number, tokenizer.decode(expected)) == "12"
    assert extract_answer(re.compile(r"\d+ apples"), "so 12 apples") == "12 apples"  # no group
    assert extract_answer(number, "no apples") is None
    assert not is_exact_match(tokenizer, tokenizer.encode("12 apples"), expected)
    assert is_exact_match(tokenizer, tokenizer.encode("12 apples"), expected, number)
    assert not is_exact_match(tokenizer, tokenizer.encode("13 apples"), expected, number)
    assert not is_exact_match(tokenizer, tokenizer.encode("some apples"), expected, number)

    gsm8k = re.compile(r"####\s*(-?[0-9.,]+)")
    sample = Sample(
        messages=(("user", "3 + 4?"), ("assistant", "3 + 4 = 7.\n#### 7")),
        path="gsm8k.jsonl",
        line=5,
    )
    with_answer = eval_item(0, sample, tokenizer, gsm8k)
    other_reasoning = tokenizer.encode("4 + 3 makes 7\n#### 7<|im_end|>")
    assert is_exact_match(tokenizer, other_reasoning, with_answer.expected, gsm8k)
    assert not is_exact_match(tokenizer, other_reasoning, with_answer.expected)
    with pytest.raises(ConfigError, match=r"eval.jsonl:3: --answer-pattern .*finds no answer"):
        eval_item(7, Sample(messages=ITEM_MESSAGES, path="eval.jsonl", line=3), tokenizer, gsm8k)
