"""Prompt formats: fixed text templates around a question, instead of a chat template.

The DEFT paper's math runs write the question into a fixed template (the Qwen2.5-Math
evaluation harness's "prompt types") and its medical / FigFont runs train on prompts already
written in each model's format (``use_original_prompt``). A :class:`PromptFormat` is such a
template; ``--prompt-format NAME`` picks one from :data:`PROMPT_FORMATS` for training
(``megatron_deft.data.chat_format.tokenize_conversation``), preprocessing and evaluation alike,
so a model is scored on exactly the prompt text it was trained after. A formatted sample is::

    [BOS]                                  (format.bos and the tokenizer has a BOS token)
    prompt.replace("{input}", question)    no loss
    {reply}{end}                           loss (end: the format's closing text, or EOS)

Each piece is encoded separately, so the loss boundary is exact; no chat template is applied.
Only a one-question conversation (a user message, then the reply) can be formatted.

Sources of the strings (``source`` of each entry): ``qwen-boxed`` and ``deepseek-math`` are
the Qwen2.5-Math evaluation harness's templates of those names, as the DEFT repository uses
them; ``llama-base-boxed-with-bos`` is named by the DEFT repository's recipe table but its text
was not found in public material, so it is written here in the same style (a base-model
"Question/Answer" prompt with the boxed-answer instruction, after BOS); ``raw`` is the DEFT
medical / FigFont data's own pre-formatted prompt, used verbatim.
"""

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""The instruction every boxed math format appends to the question."""


@dataclass(frozen=True)
class PromptFormat:
    """One prompt template."""

    prompt: str
    """The prompt text; ``{input}`` is replaced by the question (no other braces are read, so
    LaTeX in the template or the question stays as written)."""
    end: str = ""
    """Text that closes a reply and carries loss (e.g. Qwen's ``<|im_end|>``); empty: the
    tokenizer's EOS token."""
    bos: bool = True
    """Start with the tokenizer's BOS token, if it has one (as Hugging Face tokenizers and vLLM
    do for a plain prompt)."""
    source: str = ""
    """Where the text comes from (verified or written here)."""

    def render(self, question: str) -> str:
        return self.prompt.replace("{input}", question)


PROMPT_FORMATS: Dict[str, PromptFormat] = {
    "qwen-boxed": PromptFormat(
        prompt=(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n{input}\n" + BOXED_INSTRUCTION + "<|im_end|>\n"
            "<|im_start|>assistant\n"
        ),
        end="<|im_end|>",
        source="Qwen2.5-Math evaluation harness (verified)",
    ),
    "deepseek-math": PromptFormat(
        prompt="User: {input}\n" + BOXED_INSTRUCTION + "\n\nAssistant:",
        source="Qwen2.5-Math evaluation harness (verified)",
    ),
    "llama-base-boxed-with-bos": PromptFormat(
        prompt="Question: {input}\n" + BOXED_INSTRUCTION + "\nAnswer: ",
        source="written here (the DEFT repository names it; its text was not found)",
    ),
    "raw": PromptFormat(
        prompt="{input}",
        source="the DEFT medical / FigFont data's pre-formatted prompts, verbatim",
    ),
}
"""Every prompt format by its ``--prompt-format`` name."""

PROMPT_FORMAT_NAMES = tuple(PROMPT_FORMATS)


class PromptFormatError(ValueError):
    """The conversation cannot be written in the prompt format."""


def question_and_reply(messages: Sequence[Tuple[str, str]], name: str) -> Tuple[str, str]:
    """The (question, reply) of a one-question conversation; PromptFormatError otherwise."""
    if [role for role, _ in messages] != ["user", "assistant"]:
        roles = ", ".join(role for role, _ in messages)
        raise PromptFormatError(
            f"--prompt-format {name} takes one user message and its reply, got roles {roles}"
        )
    return messages[0][1], messages[1][1]


def prompt_ids(question: str, tokenizer, name: str) -> List[int]:
    """The ids a reply to ``question`` is generated after in format ``name``."""
    form = PROMPT_FORMATS[name]
    bos = [tokenizer.bos_id] if form.bos and tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(form.render(question))


def end_ids(tokenizer, name: str) -> List[int]:
    """The ids closing a reply in format ``name`` (its ``end`` text, or EOS)."""
    end = PROMPT_FORMATS[name].end
    return tokenizer.encode(end) if end else [tokenizer.eos_id]


def format_conversation(
    messages: Sequence[Tuple[str, str]], tokenizer, name: str
) -> Tuple[List[int], List[bool]]:
    """``(ids, loss_flags)`` of a one-question conversation in format ``name`` (module
    docstring): the prompt carries no loss, the reply and its closing ids do."""
    question, reply = question_and_reply(messages, name)
    prompt = prompt_ids(question, tokenizer, name)
    answer = tokenizer.encode(reply) + end_ids(tokenizer, name)
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)
