"""The same global batches and seed give the same losses, grad norms and final weights for every
(TP, PP, DP) layout: deft with the plain and the distributed optimizer, nll, cayley (mean p over
the micro-batch), eaft (top-k gathered over TP) and a threshold ablation with the plain one; 1F1B
and interleaved,
sequence parallelism, Qwen3-style attention (q/k RMSNorm, head size 24 != 64 / 4), and packed
rows run as THD streams (against the packed single-process run; TP 2 with sequence parallelism,
PP 2). Every run uses the output layer fused with the objective except the `unfused` case (the
objective on the full logits), which must match the fused reference too.

Three torchrun launches (1, 2 and 4 ranks) train 3 iterations per case; the reference is the
single-process (1,1,1) run. fp32 on CPU: only the summation order differs between layouts, so
we compare at 1e-5 relative, not bitwise. The same launches run activation recomputation (full
uniform / block, selective) against the same layout without it: bitwise equal.
"""

import glob
import os

import pytest
import torch

RTOL = 1e-5
# Final weights of the q/k-norm model: Adam's m / sqrt(v) magnifies rounding on embedding rows
# whose gradient is nearly zero (1.03e-5 observed at TP=2; a q/k-norm gradient missing its TP
# sum would be off by ~lr = 3e-3).
# The same holds for cayley, whose exponent a = f + (1 - f) p / (2 - p) passes p's rounding on
# (1.08e-5 observed at TP=2, with losses, exponents and grad norms within 1e-5).
WEIGHT_RTOL = {"qknorm": 3e-5, "cayley": 3e-5}
LAYOUT_CASES = {
    1: ["tp1pp1dp1"],
    2: ["tp2pp1dp1", "tp1pp2dp1", "tp1pp1dp2"],
    4: ["tp2pp2dp1"],
}
REFERENCE = "tp1pp1dp1"

WORKER_DIR = os.path.join(os.path.dirname(__file__), "workers")


@pytest.fixture(scope="module")
def runs(torchrun, tmp_path_factory):
    """{world size: (results, out_dir)} of the three launches."""
    out = {}
    for world in LAYOUT_CASES:
        out_dir = tmp_path_factory.mktemp(f"invariance{world}")
        out[world] = (torchrun(WORKER_DIR + "/parallel_invariance.py", world, out_dir), out_dir)
    return out


def _all_results(runs) -> dict:
    merged = {}
    for results, _ in runs.values():
        merged.update(results)
    return merged


def _weights(runs, case: str) -> dict:
    """Full weights of `case`, merged over its pipeline stages."""
    merged = {}
    for _, out_dir in runs.values():
        for path in sorted(glob.glob(os.path.join(out_dir, f"{case}.stage*.pt"))):
            merged.update(torch.load(path))
    assert merged, f"no weights for {case}"
    return merged


def _assert_close(actual: float, expected: float, what: str) -> None:
    assert abs(actual - expected) <= RTOL * abs(expected), f"{what}: {actual} != {expected}"


def _cases():
    for world, layouts in LAYOUT_CASES.items():
        for layout in layouts:
            for optimizer in ("plain", "distopt"):
                yield f"{layout}-deft-{optimizer}"
            for objective in ("nll", "cayley", "eaft", "nll_top:0.002"):
                yield f"{layout}-{objective}-plain"
    yield "tp1pp2dp1-deft-plain-interleaved"
    yield "tp1pp1dp2-deft-distopt-overlap"
    yield "tp2pp1dp1-deft-plain-unfused"
    for layout in ("tp1pp1dp1", "tp2pp1dp1", "tp2pp2dp1"):
        yield f"{layout}-deft-plain-qknorm"
    for layout in ("tp2pp1dp1", "tp2pp2dp1"):
        yield f"{layout}-deft-plain-sp"
    yield "tp1pp1dp1-deft-plain-packed"
    yield "tp1pp2dp1-deft-plain-packed"
    for layout in ("tp2pp1dp1", "tp2pp2dp1"):
        yield f"{layout}-deft-plain-packed-sp"


def _reference_of(case: str) -> str:
    """The single-process run of the same objective and model (--qk-layernorm is another)."""
    _, objective, _, *variant = case.split("-")
    own_model = {"qknorm": "-qknorm", "packed": "-packed"}  # a model / rows of their own
    return f"{REFERENCE}-{objective}-plain" + own_model.get(variant[0] if variant else "", "")


# Activation recomputation (workers/parallel_invariance.py RECOMPUTE_CASES): {layout: variants
# compared with the layout's run without recomputation}; all of them with dropout.
RECOMPUTE_RUNS = {
    "tp1pp1dp1": ("full-uniform", "full-block", "selective"),
    "tp1pp2dp1": ("full-block",),
}
MICRO_BATCHES = 4  # global batch 8 / micro-batch 2 at DP 1


def _recompute_cases():
    for layout, variants in RECOMPUTE_RUNS.items():
        for variant in ("none", *variants):
            yield f"{layout}-recompute-{variant}"
            yield f"{layout}-recompute-{variant}-forwards"


def test_every_case_ran(runs):
    assert sorted(_all_results(runs)) == sorted([*_cases(), *_recompute_cases()])


@pytest.mark.parametrize(
    "case", [f"{layout}-recompute-{v}" for layout, vs in RECOMPUTE_RUNS.items() for v in vs]
)
def test_recompute_gives_the_losses_and_gradients_of_the_run_without(runs, case):
    """Bitwise: recomputation re-runs the same operations on the same inputs, dropout masks
    included (the RNG state is saved with the kept input and replayed)."""
    results = _all_results(runs)
    reference = case.rsplit("-recompute-", 1)[0] + "-recompute-none"
    assert results[case] == results[reference]
    for tag in ("-grads", ""):  # the last backward's gradients, then the trained weights
        got, want = _weights(runs, case + tag), _weights(runs, reference + tag)
        assert sorted(got) == sorted(want)
        for name, tensor in want.items():
            assert torch.equal(got[name], tensor), f"{case}{tag} {name}"


def test_recompute_reruns_what_its_flags_name(runs):
    """Forwards per layer and of its core attention over the 3 iterations: m = micro-batches x
    iterations without recomputation, 2m for what is recomputed. `block` recomputes the first
    --recompute-num-layers 1 layer of each stage: layers 1 and 3 at PP=2."""
    results = _all_results(runs)
    once, twice, attention = [12, 12], [24, 24], [12, 24]
    assert MICRO_BATCHES * 3 == 12
    expected = {
        "tp1pp1dp1-recompute-none": [once] * 4,
        "tp1pp1dp1-recompute-full-uniform": [twice] * 4,
        "tp1pp1dp1-recompute-full-block": [twice, once, once, once],
        "tp1pp1dp1-recompute-selective": [attention] * 4,
        "tp1pp2dp1-recompute-none": [once] * 4,
        "tp1pp2dp1-recompute-full-block": [twice, once, twice, once],
    }
    for case, counts in expected.items():
        assert results[f"{case}-forwards"] == counts, case


def test_recompute_runs_use_dropout_and_train(runs):
    """Guards the bitwise comparison: dropout changed the losses (so its masks had to be
    replayed) and the gradients are not zero."""
    results = _all_results(runs)
    with_dropout, without = results["tp1pp1dp1-recompute-none"], results[f"{REFERENCE}-deft-plain"]
    assert abs(with_dropout[0]["loss"] - without[0]["loss"]) > 1e-4
    grads = _weights(runs, "tp1pp1dp1-recompute-none-grads")
    assert max(g.abs().max().item() for g in grads.values()) > 1e-4


@pytest.mark.parametrize("case", [c for c in _cases() if c != _reference_of(c)])
def test_loss_curve_grad_norms_and_weights_match_single_process(runs, case):
    results = _all_results(runs)
    reference = results[_reference_of(case)]
    history = results[case]
    assert len(history) == len(reference) == 3
    for it, (got, want) in enumerate(zip(history, reference)):
        assert got["tokens"] == want["tokens"]
        assert got["updated"] and want["updated"]
        for key in ("loss", "nll", "grad_norm", "gate", "exponent", "p_target", "renyi2_entropy"):
            _assert_close(got[key], want[key], f"{case} iteration {it + 1} {key}")
        _assert_histograms_close(
            got["token_class_counts"], want["token_class_counts"], f"{case} iteration {it + 1}"
        )
    final, expected = _weights(runs, case), _weights(runs, _reference_of(case))
    assert sorted(final) == sorted(expected)
    rtol = max(WEIGHT_RTOL.get(part, RTOL) for part in case.split("-"))
    for name, tensor in expected.items():
        error = (final[name] - tensor).abs().max().item()
        assert error <= rtol * tensor.abs().max().item(), f"{case} {name}: max error {error}"


def _assert_histograms_close(got, want, what: str) -> None:
    """Token-class histograms [classes + 1, stats, bins + 2]: every row has the same tokens in
    every layout; a value within rounding of a bin edge may land in the neighbouring bin, so bin
    counts may differ by a token or two, and the value sums agree to RTOL."""
    got, want = torch.tensor(got), torch.tensor(want)
    assert got.shape == want.shape, what
    counts_got, counts_want = got[..., :-2], want[..., :-2]
    assert torch.equal(counts_got.sum(-1), counts_want.sum(-1)), f"{what}: tokens per class"
    assert (counts_got - counts_want).abs().sum(-1).max() <= 4, f"{what}: bin counts"
    assert torch.allclose(got[..., -2:], want[..., -2:], rtol=RTOL, atol=1e-9), f"{what}: sums"


def test_token_class_histograms_are_filled_per_class(runs):
    """The mock data's two classes (short / long samples) split the tokens of every iteration."""
    history = _all_results(runs)[f"{REFERENCE}-deft-plain"]
    for record in history:
        # [3, stats, bins + 2], float64 as reported (a plain torch.tensor would round to float32)
        counts = torch.tensor(record["token_class_counts"], dtype=torch.float64)
        tokens = counts[:, 0, :-2].sum(-1)
        assert tokens[0] == record["tokens"] and tokens[1] > 0 and tokens[2] > 0
        assert tokens[1] + tokens[2] == tokens[0]
        # gate mean of the histogram = the logged token mean (both float64 sums of the gates)
        assert abs(counts[0, 0, -2] / tokens[0] - record["gate"]) <= 1e-12


def test_training_moved_the_weights_and_batches_differ_in_token_counts(runs):
    """Guards the comparison above against vacuous passes."""
    results = _all_results(runs)
    reference = results[f"{REFERENCE}-deft-plain"]
    assert len({h["tokens"] for h in reference}) == 3  # variable loss-token counts
    assert reference[0]["loss"] != reference[-1]["loss"]
    initial, final = (
        _weights(runs, f"{REFERENCE}-deft-plain-init"),
        _weights(runs, f"{REFERENCE}-deft-plain"),
    )
    moved = max((final[k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-3


def test_qk_norm_weights_trained_with_their_head_size(runs):
    """Guards the qknorm comparison: the per-head norms exist with d = 24 and moved from 1."""
    weights = _weights(runs, "tp2pp2dp1-deft-plain-qknorm")
    norms = {
        k: v for k, v in weights.items() if k.endswith(("q_layernorm.weight", "k_layernorm.weight"))
    }
    assert len(norms) == 2 * 4  # q and k, 4 layers
    for name, weight in norms.items():
        assert weight.shape == (24,) and (weight - 1).abs().max() > 1e-4, name
    assert weights["decoder.layers.0.self_attention.linear_proj.weight"].shape == (64, 4 * 24)


def test_initial_weights_are_layout_invariant(runs):
    reference = _weights(runs, f"{REFERENCE}-deft-plain-init")
    for layout in ("tp2pp1dp1", "tp1pp2dp1", "tp1pp1dp2", "tp2pp2dp1"):
        weights = _weights(runs, f"{layout}-deft-plain-init")
        assert sorted(weights) == sorted(reference)
        for name, tensor in reference.items():
            assert torch.equal(weights[name], tensor), f"{layout} {name}"


def test_objectives_differ(runs):
    """Guards the per-objective comparisons: each case trained its own objective."""
    results = _all_results(runs)
    first = {
        objective: results[f"{REFERENCE}-{objective}-plain"][0]
        for objective in ("deft", "nll", "cayley", "eaft")
    }
    losses = sorted(record["loss"] for record in first.values())
    assert min(b - a for a, b in zip(losses, losses[1:])) > 1e-3
    assert first["deft"]["exponent"] > 0 and first["nll"]["exponent"] == 0
    assert 0 < first["cayley"]["exponent"] != first["deft"]["exponent"]
    assert 0 < first["eaft"]["gate"] < 1
    # The logged NLL (-log p_target) is the loss itself for the nll objective.
    nll = first["nll"]
    assert abs(nll["nll"] - nll["loss"]) <= 1e-6 * nll["loss"]


def test_threshold_ablation_counts_only_the_tokens_it_keeps(runs):
    """Guards the nll_top comparison: the threshold dropped some loss tokens of every batch (so
    the count compared across layouts is the thresholded one), and kept some."""
    results = _all_results(runs)
    for full, kept in zip(
        results[f"{REFERENCE}-nll-plain"], results[f"{REFERENCE}-nll_top:0.002-plain"]
    ):
        assert 0 < kept["tokens"] < full["tokens"]
