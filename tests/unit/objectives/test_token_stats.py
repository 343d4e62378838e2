"""The per-token statistics are declared once (token_stats.TOKEN_STATS): the loss returns
exactly the ones an objective has, and the trainer's report, its log labels, the token-class
histograms and the evaluation's sums are built from the same table."""

import pytest
import torch

from megatron_deft.evaluation.scoring import SUM_KEYS, empty_sums, summarize
from megatron_deft.objectives import (
    linear_vocab_parallel_loss,
    parse_objective,
    vocab_parallel_loss,
)
from megatron_deft.objectives.token_stats import STAT_NAMES, TOKEN_STATS, stats_of
from megatron_deft.training.metrics import OBJECTIVE_STATS
from megatron_deft.training.step import REPORT_KEYS
from megatron_deft.training.token_classes import histogram_stats, histogram_upper

# name -> the statistics it must have beside gate, p_target, nll and renyi2_entropy
EXPECTED = {
    "nll": {"exponent"},
    "p": {"exponent"},
    "dft": set(),
    "tsallis:q=2": {"exponent"},
    "deft": {"exponent"},
    "cayley": {"exponent"},
    "eaft": {"topk_entropy"},
    "p_top:0.1": {"exponent"},
    "nll_bottom:0.1": {"exponent"},
}
COMMON = {"gate", "p_target", "nll", "renyi2_entropy"}


@pytest.mark.parametrize("name", EXPECTED)
def test_both_loss_paths_return_exactly_the_objectives_statistics(name):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 2, 8, generator=g), torch.randn(11, 8, generator=g)
    target = torch.randint(0, 11, (5, 2), generator=g)
    expected = COMMON | EXPECTED[name] | {"valid"}
    _, unfused = vocab_parallel_loss(hidden @ weight.t(), target, name)
    _, fused = linear_vocab_parallel_loss(hidden, weight, target, name)
    assert set(unfused) == set(fused) == expected
    assert {stat.name for stat in stats_of(parse_objective(name))} | {"valid"} == expected


def test_reports_labels_and_sums_are_built_from_the_one_table():
    assert REPORT_KEYS == ("loss", "tokens", *STAT_NAMES, "confident_conflict")
    assert SUM_KEYS == ("tokens", *STAT_NAMES, "sum_p2")
    labelled = {stat.name for stat in TOKEN_STATS if stat.label}
    assert set(OBJECTIVE_STATS) == labelled | {"confident_conflict"}
    assert histogram_stats(parse_objective("deft")) == ("gate", "p_target", "exponent")
    assert histogram_stats(parse_objective("eaft")) == ("gate", "p_target")
    assert histogram_upper(parse_objective("tsallis:q=3"), "exponent") == 3.0
    assert histogram_upper(parse_objective("tsallis:q=0.5"), "exponent") == 1.0


def test_evaluation_summary_keeps_only_the_objectives_statistics():
    sums = empty_sums("cpu")
    sums[0] = 4.0  # tokens
    assert "exponent" not in summarize(sums, parse_objective("eaft"))
    assert "topk_entropy" in summarize(sums, parse_objective("eaft"))
    summary = summarize(sums, parse_objective("deft"))
    assert "exponent" in summary and "topk_entropy" not in summary and "sum_p2" in summary
