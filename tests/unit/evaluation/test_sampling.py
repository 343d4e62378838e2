"""Sampled generation (--task math --num-samples): temperature and top-p draws against the
distribution computed here by hand, reproducible per row seed whatever batch the row is in."""

import math
from collections import Counter

import pytest
import torch

from megatron_deft.evaluation.generation import Sampler, generate, top_p_sample

PROBS = [0.5, 0.3, 0.15, 0.05]  # the model's next-token distribution, whatever the context
VOCAB, PADDED, PAD, EOS = 4, 6, 5, 99  # EOS is never drawn: rows run to max_new_tokens
DRAWS = 1000


class FixedModel(torch.nn.Module):
    """Last-position logits log(PROBS), and a huge logit on the padding ids (>= VOCAB), which
    generation must never choose."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # generate reads the device

    def forward(
        self, input_ids, position_ids, attention_mask, inference_context, runtime_gather_output
    ):
        logits = torch.full((input_ids.shape[0], 1, PADDED), 50.0)
        logits[:, 0, :VOCAB] = torch.log(torch.tensor(PROBS))
        return logits


def _frequencies(temperature, top_p, draws=DRAWS):
    generator = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor(PROBS))
    counts = Counter(top_p_sample(logits, temperature, top_p, generator) for _ in range(draws))
    return {token: count / draws for token, count in counts.items()}


@pytest.mark.parametrize(
    "temperature, top_p, expected",
    [
        (1.0, 1.0, PROBS),
        # Nucleus 0.7: the likeliest tokens until their mass reaches 0.7 (0.5 + 0.3), renormalised.
        (1.0, 0.7, [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
        # Temperature 0.5 squares the probabilities before normalising.
        (0.5, 1.0, [p * p / sum(q * q for q in PROBS) for p in PROBS]),
    ],
)
def test_draws_follow_the_tempered_nucleus(temperature, top_p, expected):
    frequencies = _frequencies(temperature, top_p)
    for token, probability in enumerate(expected):
        tolerance = 4 * math.sqrt(probability * (1 - probability) / DRAWS) + 1e-9
        assert frequencies.get(token, 0.0) == pytest.approx(probability, abs=tolerance), token


def _sample(prompts, seeds, new_tokens=12):
    sampler = Sampler(seeds, 1.0, 1.0, "cpu")
    return generate(FixedModel(), prompts, {EOS}, PAD, new_tokens, VOCAB, sampler)


def test_a_row_draws_the_same_tokens_for_its_seed_in_any_batch():
    alone = _sample([[1, 2]], [7])
    batched = _sample([[3, 3, 3, 3, 3], [1, 2], [0]], [8, 7, None])  # longer / shorter prompts
    assert batched[1] == alone[0]
    assert batched[2] == [0] * 12  # greedy row (seed None): the argmax, never a padding id
    assert _sample([[1, 2]], [7]) == alone  # reproducible
    assert _sample([[1, 2]], [9]) != alone
    assert all(0 <= token < VOCAB for reply in batched for token in reply)
