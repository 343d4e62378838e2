"""Conversation -> token ids + per-token loss flags (True on the tokens the model must learn).

Two mechanisms, picked by the tokenizer:

1. The tokenizer's own chat template (Hugging Face ``chat_template``). The whole conversation
   is rendered once and tokenized once (exactly what inference sees). Each assistant turn's
   character span is found by rendering prefixes: the span starts where
   ``render(messages[:i], add_generation_prompt=True)`` ends and stops where
   ``render(messages[:i+1])`` ends, minus trailing whitespace (template layout, not something
   the model generates). Tokens *starting* inside a span carry loss, so the template's
   end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...) is learned with the reply.
   No EOS is appended on this path: the template must close assistant turns itself (all common
   chat templates do). Templates that rewrite earlier turns when later ones are added, or do
   not render a reply verbatim, are rejected, because their spans are not well defined.

2. The built-in template, for tokenizers without one::

       [BOS]                                     (if the tokenizer has a BOS token)
       <|system|>\\n{content}\\n                  no loss
       <|user|>\\n{content}\\n                    no loss
       <|assistant|>\\n                           no loss
       {content} [EOS]                           loss
       ... further turns ...

   Each piece is encoded separately, so the loss boundary is exact. ``tools/train_tokenizer.py``
   makes the three markers single SentencePiece tokens. Generation starts from the prefix
   :func:`last_reply_span` cuts off, which ends with the assistant header.

3. A prompt format (``--prompt-format``, :mod:`megatron_deft.data.prompt_formats`): a fixed
   text template around the question instead of either template.
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_deft.data.prompt_formats import PromptFormatError, format_conversation
from megatron_deft.data.tokenizer import Tokenizer

ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
Messages = Sequence[Tuple[str, str]]


class ChatTemplateError(ValueError):
    """The tokenizer's chat template cannot render this conversation consistently."""


def tokenize_conversation(
    messages: Messages, tokenizer: Tokenizer, prompt_format: Optional[str] = None
) -> Tuple[List[int], List[bool]]:
    """Returns ``(ids, loss_flags)``, equally long; ``loss_flags[t]`` marks response tokens
    (assistant content and the token closing it). ``prompt_format``: a name in
    ``prompt_formats.PROMPT_FORMATS``, used instead of any chat template."""
    if prompt_format is not None:
        try:
            return format_conversation(messages, tokenizer, prompt_format)
        except PromptFormatError as error:
            raise ChatTemplateError(str(error)) from None
    if tokenizer.chat_template:
        return _tokenize_with_chat_template(messages, tokenizer)
    return _builtin_pieces(messages, tokenizer)


def last_reply_span(flags: Sequence[bool]) -> Tuple[int, int]:
    """[start, end) of the last run of loss tokens: the final assistant turn's trained span.

    ``ids[:start]`` is then exactly the prefix that reply was trained after, and
    ``ids[start:end]`` what the model was trained to produce from it: the reply, anything the
    template writes in front of it inside the turn (e.g. Qwen3's empty think block), and the
    token closing the turn (EOS or the template's end-of-turn token) last.
    """
    end = len(flags)
    while end and not flags[end - 1]:
        end -= 1
    start = end
    while start and flags[start - 1]:
        start -= 1
    if start == end:
        raise ChatTemplateError("the conversation has no assistant reply carrying loss")
    return start, end


def _builtin_pieces(messages: Messages, tokenizer: Tokenizer) -> Tuple[List[int], List[bool]]:
    ids: List[int] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    flags: List[bool] = [False] * len(ids)

    def add(piece_ids: List[int], loss: bool) -> None:
        ids.extend(piece_ids)
        flags.extend([loss] * len(piece_ids))

    for role, content in messages:
        if role == "assistant":
            add(tokenizer.encode(ROLE_MARKERS[role] + "\n"), loss=False)
            add(tokenizer.encode(content) + [tokenizer.eos_id], loss=True)
        else:
            add(tokenizer.encode(f"{ROLE_MARKERS[role]}\n{content}\n"), loss=False)
    return ids, flags


def _tokenize_with_chat_template(messages: Messages, tokenizer: Tokenizer):
    dicts = _as_dicts(messages)
    full = _render(tokenizer, dicts, add_generation_prompt=False)
    spans = []
    for index, (role, content) in enumerate(messages):
        if role != "assistant":
            continue
        start = len(_render_prefix(tokenizer, dicts[:index], True, full))
        end = len(_render_prefix(tokenizer, dicts[: index + 1], False, full))
        end = start + len(full[start:end].rstrip())
        # Guards against templates that drop or rewrite replies: the span must hold the reply.
        if content.strip() not in full[start:end]:
            raise ChatTemplateError(f"the chat template does not render message {index} verbatim")
        spans.append((start, end))
    ids, offsets = tokenizer.encode_with_offsets(full)
    token_starts = np.fromiter((start for start, _ in offsets), dtype=np.int64, count=len(offsets))
    flags = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        flags |= (token_starts >= lo) & (token_starts < hi)
    return ids, flags.tolist()


def _render_prefix(tokenizer: Tokenizer, dicts: List[dict], add_generation_prompt: bool, full: str):
    text = _render(tokenizer, dicts, add_generation_prompt)
    if not full.startswith(text):
        raise ChatTemplateError(
            f"the chat template renders the first {len(dicts)} message(s) differently once later "
            "messages follow, so assistant spans are ambiguous; use a prefix-consistent template"
        )
    return text


def _render(tokenizer: Tokenizer, dicts: List[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.render_chat(dicts, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja templates raise arbitrary errors (e.g. role order checks)
        raise ChatTemplateError(f"chat template failed: {type(error).__name__}: {error}") from error


def _as_dicts(messages: Messages) -> List[dict]:
    return [{"role": role, "content": content} for role, content in messages]
