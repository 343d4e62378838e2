"""Independent float64 reference for the objectives, written from the formulas on the full softmax.

Stop-gradients are `.detach()`; (1 - p^a)/a is evaluated as 1 - exp(a log p) (no expm1), so this
shares no code or numerical trick with megatron_deft.objectives.
"""

import math

import torch

from megatron_deft.objectives import parse_objective


def reference(logits, target, objective, loss_mask=None, frozen=None):
    """Returns (loss [...], stats dict) in float64. `frozen`: a stats dict whose detached exponent /
    weight is reused instead of recomputed (the objective with its stop-gradients held fixed)."""
    objective = parse_objective(objective)
    z = logits.double()
    valid = target != -100
    if loss_mask is not None:
        valid = valid & (loss_mask != 0)
    log_probs = torch.log_softmax(z, dim=-1)
    log_p = log_probs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    p = log_p.exp()
    sum_p2 = (log_probs.exp() ** 2).sum(-1)
    stats = {
        "p_target": p.detach(),
        "nll": -log_p.detach(),
        "renyi2_entropy": -torch.log(sum_p2).detach(),
    }
    name = objective.name
    if name in ("dft", "eaft"):
        if name == "dft":
            weight = p.detach()
        else:
            k = min(objective.param("k"), z.shape[-1])
            top = z.topk(k, dim=-1).values
            q = torch.softmax(top, -1)
            entropy = torch.special.entr(q).sum(-1) / math.log(k) if k > 1 else torch.zeros_like(p)
            stats["topk_entropy"] = entropy.detach()
            weight = entropy.detach() ** objective.param("alpha")
        if frozen is not None:
            weight = frozen["gate"].double()
        loss = -weight * log_p
        stats["gate"] = weight
    else:
        if name in ("nll", "nll_top", "nll_bottom"):
            a = torch.zeros_like(p)
        elif name in ("p", "p_top", "p_bottom"):
            a = torch.ones_like(p)
        elif name == "tsallis":
            a = torch.full_like(p, objective.param("q"))
        elif name == "deft":
            a = sum_p2.detach()
        else:  # cayley
            pd = p.detach()
            f = 0.5 * pd[valid].mean() if valid.any() else torch.zeros((), dtype=pd.dtype)
            a = (f + (1 - f) * pd / (2 - pd)).clamp(1e-3, 1.0)
        if frozen is not None:
            a = frozen["exponent"].double()
        p_pow_a = torch.exp(a * log_p)  # p ** a, differentiable at p = 0
        loss = torch.where(
            a == 0, -log_p, (1 - p_pow_a) / torch.where(a == 0, torch.ones_like(a), a)
        )
        stats["exponent"] = a
        stats["gate"] = p_pow_a.detach()
    # The DEFT reference code's threshold ablations keep only tokens with p >= th (top) or
    # p <= th (bottom); the others leave the loss and its token count.
    if name.endswith("_top"):
        valid = valid & (p.detach() >= objective.param("th"))
    elif name.endswith("_bottom"):
        valid = valid & (p.detach() <= objective.param("th"))
    stats["valid"] = valid
    zero = torch.zeros_like(loss)
    loss = torch.where(valid, loss, zero)
    stats = {
        key: value if key == "valid" else torch.where(valid, value, torch.zeros_like(value))
        for key, value in stats.items()
    }
    return loss, stats
