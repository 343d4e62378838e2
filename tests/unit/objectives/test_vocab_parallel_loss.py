"""Single-process checks of vocab_parallel_loss against the float64 reference (reference.py)."""

import math

import pytest
import torch

from megatron_deft.objectives import vocab_parallel_loss
from tests.unit.objectives.reference import reference

OBJECTIVES = [
    "nll",
    "p",
    "dft",
    "tsallis:q=0.5",
    "tsallis:q=2",
    "deft",
    "cayley",
    "eaft",
    "eaft:k=4,alpha=0.5",
]
# The DEFT reference code's threshold ablations: they drop the tokens outside the threshold.
THRESHOLDS = ["p_top:0.05", "p_bottom:0.05", "nll_top:th=0.05", "OnlyBottomLogP-0.05"]


def make_batch(seq=7, batch=3, vocab=37, seed=0, scale=3.0):
    """Logits [s, b, V], targets with -100 entries, and a loss mask with zeros."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(seq, batch, vocab, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, vocab, (seq, batch), generator=g)
    target[0, :] = -100
    target[seq // 2, 1] = -100
    loss_mask = torch.ones(seq, batch)
    loss_mask[-1, 0] = 0
    loss_mask[-2, -1] = 0
    return logits, target, loss_mask


def run(logits, target, objective, loss_mask=None, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss, stats = vocab_parallel_loss(x, target, objective, loss_mask=loss_mask, **kw)
    (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum().backward()
    return loss, stats, x.grad


def run_reference(logits, target, objective, loss_mask=None):
    x = logits.detach().double().requires_grad_(True)
    loss, stats = reference(x, target, objective, loss_mask)
    (
        loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    ).sum().backward()
    return loss.detach(), stats, x.grad


@pytest.mark.parametrize("objective", OBJECTIVES + THRESHOLDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_gradient_and_stats_match_float64_reference(objective, dtype):
    logits, target, loss_mask = make_batch()
    logits = logits.to(dtype)  # the reference sees exactly the rounded inputs
    loss, stats, grad = run(logits, target, objective, loss_mask)
    ref_loss, ref_stats, ref_grad = run_reference(logits, target, objective, loss_mask)

    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6)
    grad_tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-4)
    torch.testing.assert_close(grad.double(), ref_grad, **grad_tol)
    for key, value in ref_stats.items():
        torch.testing.assert_close(
            stats[key].double(), value.double(), rtol=2e-6, atol=2e-6, msg=key
        )
    assert set(stats) == set(ref_stats)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_ignored_and_masked_tokens_have_zero_loss_grad_and_stats(objective):
    logits, target, loss_mask = make_batch()
    loss, stats, grad = run(logits.float(), target, objective, loss_mask)
    invalid = (target == -100) | (loss_mask == 0)
    assert invalid.sum() == 6 and torch.equal(stats["valid"], ~invalid)
    assert torch.all(loss[invalid] == 0) and torch.all(grad[invalid] == 0)
    for key, value in stats.items():
        if key != "valid":
            assert torch.all(value[invalid] == 0), key
    assert torch.all(grad[~invalid].abs().sum(-1) > 0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradcheck_float64_with_stop_gradients_held_fixed(objective):
    """gradcheck of f(z) = ref_frozen(z) + [ours(z) - sg(ours(z))]: its value (and so the numerical
    Jacobian) is the float64 reference with the detached exponent/weight fixed at the evaluation
    point, its analytical Jacobian is our backward."""
    logits, target, loss_mask = make_batch(seq=3, batch=2, vocab=11, seed=1)
    _, frozen_stats = vocab_parallel_loss(logits, target, objective, loss_mask=loss_mask)

    def composite(z):
        ours, _ = vocab_parallel_loss(
            z, target, objective, loss_mask=loss_mask, reusable_backward=True
        )
        ref, _ = reference(z, target, objective, loss_mask, frozen=frozen_stats)
        return ref.detach() + ours - ours.detach()

    assert torch.autograd.gradcheck(composite, (logits.clone().requires_grad_(True),))


@pytest.mark.parametrize("objective", ["nll", "p", "tsallis:q=0.3"])
def test_gradcheck_float64_direct_for_objectives_without_stop_gradient(objective):
    logits, target, loss_mask = make_batch(seq=3, batch=2, vocab=11, seed=2)

    def fn(z):
        return vocab_parallel_loss(z, target, objective, loss_mask, reusable_backward=True)[0]

    assert torch.autograd.gradcheck(fn, (logits.clone().requires_grad_(True),))


def test_qlog_family_limits_are_exact():
    """tsallis q -> 0 tends to NLL (the expm1 form keeps precision); q = 1 is exactly 1 - p."""
    logits, target, _ = make_batch(seed=3)
    logits = logits.float()
    nll, _ = vocab_parallel_loss(logits, target, "nll")
    tiny, _ = vocab_parallel_loss(logits, target, "tsallis:q=1e-7")
    torch.testing.assert_close(tiny, nll, rtol=1e-5, atol=1e-6)
    one, _ = vocab_parallel_loss(logits, target, "tsallis:q=1")
    p, _ = vocab_parallel_loss(logits, target, "p")
    torch.testing.assert_close(one, p, rtol=0, atol=1e-7)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_extreme_logits_stay_finite(objective):
    """+-1e4 logits (p -> 0 and p -> 1) and a one-entry vocabulary give finite values and
    gradients."""
    logits = torch.tensor([[1e4, -1e4, 0.0, 5.0], [1e4, -1e4, 0.0, 5.0], [-1e4, -1e4, -1e4, -1e4]])
    target = torch.tensor([1, 0, 2])  # p ~ 0, p ~ 1, uniform
    loss, stats, grad = run(logits, target, objective)
    ref_loss, _, ref_grad = run_reference(logits, target, objective)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert all(torch.isfinite(v.float()).all() for v in stats.values())
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-6, atol=1e-6)

    single = torch.randn(5, 1)  # V = 1: p = 1 for every token
    loss, stats, grad = run(single, torch.zeros(5, dtype=torch.long), objective)
    assert torch.isfinite(loss).all() and torch.all(grad == 0) and torch.all(stats["p_target"] == 1)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_target_logit_of_minus_inf_gives_the_limits_and_a_finite_gradient(objective):
    """p = 0 exactly (a masked-out target): -log p = inf, 1 - p = 1, p log p -> 0, (1 - p^a)/a =
    1/a; the gradient is still gate * (softmax - onehot) with gate p^0 = 1 for nll, p^a = 0 for the
    other q-log objectives and dft, and eaft's H~^alpha (independent of the target)."""
    logits = torch.randn(2, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    logits[0, 2] = float("-inf")
    target = torch.tensor([2, 4])
    loss, stats, grad = run(logits, target, objective)
    ref_loss, ref_stats, _ = run_reference(logits, target, objective)

    name = objective.split(":")[0]
    gate0 = {"nll": 1.0, "eaft": ref_stats["gate"][0].item()}.get(name, 0.0)
    if name in ("nll", "eaft"):
        expected_loss0 = math.inf
    elif name == "dft":
        expected_loss0 = 0.0
    else:  # q-log with a > 0 (p: a = 1)
        expected_loss0 = 1 / ref_stats["exponent"][0].item()
    assert loss[0].item() == pytest.approx(expected_loss0, rel=1e-12)
    torch.testing.assert_close(loss[1], ref_loss[1], rtol=1e-12, atol=0)

    gate = torch.tensor([gate0, ref_stats["gate"][1].item()], dtype=torch.float64)
    error = torch.softmax(logits, -1) - torch.nn.functional.one_hot(target, 6).double()
    weights = torch.linspace(0.5, 1.5, 2, dtype=torch.float64)  # run()'s loss weights
    torch.testing.assert_close(grad, (weights * gate)[:, None] * error, rtol=1e-12, atol=1e-15)
    assert stats["gate"][0].item() == pytest.approx(gate0, rel=1e-12)


@pytest.mark.parametrize("objective", OBJECTIVES + THRESHOLDS)
@pytest.mark.parametrize("padding_logit", [0.0, 60.0])
def test_padding_ids_are_outside_the_softmax(objective, padding_logit):
    """Megatron's padded vocab columns (ids >= vocab_size) with vocab_size given: the loss, stats
    and real-id gradient are the float64 reference on the unpadded logits, whatever the padding
    holds (0 as after HF conversion, or larger than every real logit: it would win the max and the
    top-k), and the padding gets gradient 0."""
    logits, target, loss_mask = make_batch(vocab=37)
    padded = torch.cat(
        [logits, torch.full((*logits.shape[:-1], 11), padding_logit, dtype=logits.dtype)], dim=-1
    )  # [s, b, 48]
    padded[..., 37:] += torch.randn(*logits.shape[:-1], 11, dtype=logits.dtype)
    loss, stats, grad = run(padded.float(), target, objective, loss_mask, vocab_size=37)
    ref_loss, ref_stats, ref_grad = run_reference(logits.float(), target, objective, loss_mask)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(grad[..., :37].double(), ref_grad, rtol=1e-5, atol=1e-7)
    assert torch.all(grad[..., 37:] == 0)
    for key, value in ref_stats.items():
        torch.testing.assert_close(
            stats[key].double(), value.double(), rtol=2e-6, atol=2e-6, msg=key
        )
    if padding_logit > 0:  # the same logits without vocab_size: padding dominates the softmax
        unmasked, _, _ = run(padded.float(), target, objective, loss_mask)
        assert not torch.allclose(unmasked.double(), ref_loss, rtol=1e-3, atol=1e-4)
    with pytest.raises(
        ValueError, match=r"target id 40 .* outside \[0, 37\) \(vocab size 37, padded to 48"
    ):
        vocab_parallel_loss(padded.float(), torch.full_like(target, 40), objective, vocab_size=37)
    with pytest.raises(ValueError, match=r"vocab_size 49 must be in \[1, 48\]"):
        vocab_parallel_loss(padded.float(), target, objective, vocab_size=49)


@pytest.mark.parametrize("objective", THRESHOLDS)
def test_thresholds_drop_tokens_from_the_loss_the_gradient_and_the_count(objective):
    """A token outside the threshold is not counted (valid False), with loss, gradient and stats
    0; the others get the unthresholded objective's values (1 - p or -log p)."""
    logits, target, loss_mask = make_batch(seed=4)
    loss, stats, grad = run(logits.float(), target, objective, loss_mask)
    base = "p" if objective.lower().startswith(("p_", "onlytopp", "onlybottomp")) else "nll"
    full_loss, full_stats, full_grad = run(logits.float(), target, base, loss_mask)
    p, th = full_stats["p_target"], 0.05
    keep = (p >= th) if "top" in objective.lower() else (p <= th)
    kept = full_stats["valid"] & keep
    assert 0 < kept.sum() < full_stats["valid"].sum()  # the threshold splits the tokens
    assert torch.equal(stats["valid"], kept)
    assert torch.equal(loss, torch.where(kept, full_loss, 0.0))
    assert torch.equal(grad, torch.where(kept.unsqueeze(-1), full_grad, 0.0))
    assert torch.all(stats["gate"][~kept] == 0) and torch.all(stats["p_target"][~kept] == 0)


def test_ids_under_a_zero_loss_mask_are_not_checked():
    logits, target, loss_mask = make_batch()
    target[-1, 0] = -1  # loss_mask[-1, 0] == 0: e.g. a pad label; never read
    loss, _ = vocab_parallel_loss(logits.float(), target, "nll", loss_mask)
    assert loss[-1, 0] == 0 and torch.isfinite(loss).all()


def test_cayley_mean_uses_only_valid_tokens():
    logits, target, loss_mask = make_batch(seed=4)
    loss_a, _ = vocab_parallel_loss(logits.float(), target, "cayley", loss_mask)
    changed = logits.clone()
    changed[0] += 50 * torch.randn_like(changed[0])  # row 0 is all -100
    loss_b, _ = vocab_parallel_loss(changed.float(), target, "cayley", loss_mask)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    fully_masked, stats = vocab_parallel_loss(
        logits.float(), torch.full_like(target, -100), "cayley"
    )
    assert torch.all(fully_masked == 0) and not stats["valid"].any()


def test_caller_logits_untouched_by_default_and_inplace_is_equivalent():
    logits, target, loss_mask = make_batch(seed=5)
    logits = logits.float().requires_grad_(True)
    before = logits.detach().clone()
    loss, _ = vocab_parallel_loss(logits, target, "deft", loss_mask)
    loss.sum().backward()
    assert torch.equal(logits.detach(), before)

    buffer = before.clone().requires_grad_(True)
    scaled = buffer * 1.0  # a non-leaf fp32 tensor, like an output layer's logits
    loss_inplace, _ = vocab_parallel_loss(scaled, target, "deft", loss_mask, inplace=True)
    assert not torch.equal(scaled.detach(), before)  # documented: the buffer now holds exp(z - max)
    loss_inplace.sum().backward()
    torch.testing.assert_close(loss_inplace, loss, rtol=0, atol=0)
    torch.testing.assert_close(buffer.grad, logits.grad, rtol=0, atol=0)


def test_second_backward_needs_reusable_backward():
    logits, target, _ = make_batch(seed=6)
    x = logits.float().requires_grad_(True)
    loss, _ = vocab_parallel_loss(x, target, "deft")
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="reusable_backward=True"):
        loss.sum().backward()

    y = logits.float().requires_grad_(True)
    loss, _ = vocab_parallel_loss(y, target, "deft", reusable_backward=True)
    loss.sum().backward(retain_graph=True)
    first = y.grad.clone()
    loss.sum().backward()
    torch.testing.assert_close(y.grad, 2 * first)
    torch.testing.assert_close(first, x.grad)


@pytest.mark.parametrize(
    "target_value, match",
    [(37, r"target id 37 .* outside \[0, 37\)"), (-1, "target id -1"), (-7, "-100")],
)
def test_out_of_range_targets_raise_clear_error(target_value, match):
    logits, target, _ = make_batch()
    target[2, 1] = target_value
    with pytest.raises(ValueError, match=match):
        vocab_parallel_loss(logits.float(), target, "nll")


def test_bad_arguments_raise_clear_errors():
    logits, target, loss_mask = make_batch()
    with pytest.raises(ValueError, match="target shape"):
        vocab_parallel_loss(logits, target[:, :2], "nll")
    with pytest.raises(ValueError, match="loss_mask shape"):
        vocab_parallel_loss(logits, target, "nll", loss_mask=loss_mask[:, :1])
    with pytest.raises(TypeError, match="int64/int32"):
        vocab_parallel_loss(logits, target.float(), "nll")
    with pytest.raises(ValueError, match="valid objectives: nll, p, dft"):
        vocab_parallel_loss(logits, target, "tsallis:-1")
    with pytest.raises(ValueError, match="k >= 2"):
        vocab_parallel_loss(logits, target, "eaft:k=0")
    for not_logits in (torch.tensor(1.0), logits.tolist()):  # 0-d, not a tensor
        with pytest.raises(TypeError, match=r"logits must be a floating tensor \[\.\.\., V/tp\]"):
            vocab_parallel_loss(not_logits, target, "nll")
