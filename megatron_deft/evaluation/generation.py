"""Greedy decoding and sampling from a tensor- and pipeline-parallel megatron-core GPT with a
KV cache.

megatron-core's static-batching inference context (``StaticInferenceContext``) keeps every
layer's keys and values, so each step runs only the new position. All rows share one position
counter: the first forward pass (the prefill) covers the shortest prompt, with the causal mask;
then one position per step for every row. A row whose prompt is longer keeps feeding its own
prompt tokens until it ends, and only then its chosen tokens, so every cached position of a row
is one of its real tokens and the unmasked decode attention is exact. megatron-core gathers the
last position's logits ``[b, V]`` over the tensor-parallel ranks in inference (once per step;
the ``[b, s, V]`` logits are never materialised) and the choice leaves out the padding ids.

A row's next token is the argmax (greedy) or, with a :class:`Sampler`, a draw from
softmax(logits / T) restricted to the top-p nucleus (the fewest most likely tokens whose
probabilities sum to >= p), from the row's own ``torch.Generator``, seeded per row: a row's
draws depend only on its seed (not on the batch it shares or the data-parallel split), and every
tensor-parallel rank draws the same token from the same gathered logits and the same seed. A
generator advances only on the steps its row is generating.
With pipeline parallelism every step is one micro-batch through the stages
(:func:`megatron_deft.evaluation.pipeline.last_stage_result`): each stage caches the keys and
values of its own layers, and the last stage's next ids are broadcast to all stages.
"""

from typing import Collection, List, Optional, Sequence

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_deft.data.batch import attention_mask_from_segments
from megatron_deft.evaluation.pipeline import last_stage_result


def causal_mask(tokens: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool causal mask (True = masked) for [b, s] ids, on their device."""
    b, s = tokens.shape
    return attention_mask_from_segments(torch.zeros(b, s, dtype=torch.long)).to(tokens.device)


def causal_inputs(tokens: torch.Tensor) -> dict:
    """The model's inputs for [b, s] ids: positions 0..s-1 and the causal mask."""
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).expand(b, s)
    return dict(input_ids=tokens, position_ids=positions, attention_mask=causal_mask(tokens))


def causal_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """[b, s] ids -> [b, s, V/tp] logits of a single-stage model (:func:`causal_inputs`)."""
    return model(**causal_inputs(tokens))


def top_p_sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """One draw from softmax(logits / temperature) [V] cut to its top-p nucleus: the tokens, most
    likely first, up to and including the one whose cumulative probability reaches top_p; their
    probabilities renormalised. float64, stable sort: the same logits and generator state give
    the same id on every device and rank."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the likelier tokens
    kept = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
    choice = torch.multinomial(kept / kept.sum(), 1, generator=generator)
    return int(order[choice])


class Sampler:
    """Per-row next-token choice: greedy where the row's seed is None, else :func:`top_p_sample`
    with a generator seeded with it."""

    def __init__(self, seeds: Sequence[Optional[int]], temperature: float, top_p: float, device):
        self.temperature, self.top_p = temperature, top_p
        self.generators = [
            None if seed is None else torch.Generator(device=device).manual_seed(seed)
            for seed in seeds
        ]

    def __call__(self, logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """[b, V] logits, [b] bool rows generating now -> [b] ids (argmax where not sampled)."""
        ids = logits.argmax(dim=-1)
        for row in torch.nonzero(active).flatten().tolist():
            if self.generators[row] is not None:
                ids[row] = top_p_sample(
                    logits[row], self.temperature, self.top_p, self.generators[row]
                )
        return ids


def _greedy(logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    stop_ids: Collection[int],
    pad_id: int,
    max_new_tokens: int,
    vocab_size: int,
    sampler: Optional[Sampler] = None,
) -> List[List[int]]:
    """Continuation of each prompt until a stop id (kept, last) or ``max_new_tokens``: greedy,
    or chosen by ``sampler`` (one entry per prompt).

    Args:
        model: this pipeline stage's GPT chunk; the last stage returns the last position's
            gathered [b, 1, V] logits under an inference context.
        prompts: b lists of token ids (any lengths >= 1); every tensor- and pipeline-parallel
            rank passes the same prompts.
        stop_ids: ids that end a reply (EOS, a chat template's end-of-turn token).
        vocab_size: the tokenizer's vocabulary; padding ids >= vocab_size are never chosen.

    Returns:
        b lists of generated ids.
    """
    device = next(model.parameters()).device
    choose = sampler or _greedy
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # [b]
    total = int(lengths.max()) + max_new_tokens  # the longest prompt, then its new tokens
    tokens = torch.full((len(prompts), total), pad_id, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long)
    context = StaticInferenceContext(len(prompts), total)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    generated = [[] for _ in prompts]
    start, end = 0, int(lengths.min())
    while True:
        chunk = tokens[:, start:end]  # [b, end - start]: the prefill, then one position
        positions = torch.arange(start, end, device=device).expand_as(chunk)
        mask = causal_mask(chunk) if start == 0 else None  # decode steps attend to all cached
        inputs = dict(
            input_ids=chunk,
            position_ids=positions,
            attention_mask=mask,
            inference_context=context,
            runtime_gather_output=True,
        )
        replying = lengths <= end  # rows past their prompt: `end` holds a generated token
        active = replying & ~done
        # [b]: the token at `end`, chosen from the last stage's [b, 1, V] logits
        next_ids = last_stage_result(
            model, inputs, lambda logits: choose(logits[:, -1, :vocab_size], active), done.long()
        )
        context.sequence_len_offset += end - start
        for row in torch.nonzero(active).flatten().tolist():
            generated[row].append(int(next_ids[row]))
            done[row] = generated[row][-1] in stop_ids or len(generated[row]) == max_new_tokens
        if bool(done.all()):
            return generated
        # Finished rows feed padding: nothing reads their logits again.
        tokens[:, end] = torch.where(replying, torch.where(done, pad_id, next_ids), tokens[:, end])
        start, end = end, end + 1
