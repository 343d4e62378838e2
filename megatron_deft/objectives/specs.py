"""The objectives as data: one declarative spec each, read by the loss, the parser, the CLI help,
the README table and the evaluation. Nothing else branches on objective names.

Every objective is a per-token loss whose gradient w.r.t. the logits z is

    d loss / d z = gate * (softmax(z) - onehot(y)),        gate detached,

in one of two families (p = softmax(z)_y is the target probability):

    q-log  ("qlog"):       loss = (1 - p^a) / a = -expm1(a log p) / a,   gate = p^a
                           a is a detached exponent; a = 0 is the NLL limit -log p.
    weighted NLL ("wnll"): loss = -w log p,                              gate = w
                           w is a detached weight.

A spec gives the family, the exponent / weight as a function of the per-token quantities it
declares it needs, and optionally which tokens it keeps (the DEFT reference code's threshold
ablations): a dropped token has loss 0 and gradient 0 and is not counted in the per-token mean.
Adding an objective is one entry in SPECS (plus its entry in the tests' float64 reference).
"""

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist

CAYLEY_EXPONENT_MIN = 1e-3

QUANTITIES = ("log_p", "sum_p2", "topk_entropy", "batch_mean_p")
"""Per-token quantities an objective may need: log p, sum_v p_v^2, the normalised top-k
entropy, and the mean of p over the valid tokens of the micro-batch (one scalar)."""


class TokenQuantities(NamedTuple):
    """The per-token inputs of a spec's functions, all [N] (detached)."""

    log_p: torch.Tensor
    sum_p2: torch.Tensor
    topk_entropy: Optional[torch.Tensor]
    valid: torch.Tensor
    mean_group: Optional[dist.ProcessGroup] = None

    @property
    def p(self) -> torch.Tensor:
        return self.log_p.exp()


@dataclass(frozen=True)
class Param:
    """One parameter of an objective: `name=value` in `--sft-objective name:name=value`."""

    name: str
    kind: type
    """int or float."""
    default: Optional[float]
    """None: the parameter is required."""
    low: float
    high: float = math.inf
    low_open: bool = False
    """True: the value must exceed `low` (else it may equal it)."""
    high_open: bool = False
    """True: the value must be below `high`."""

    def admits(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    @property
    def rule(self) -> str:
        """e.g. "q > 0", "0 <= th < 1"."""
        upper = "" if self.high == math.inf else f" {'<' if self.high_open else '<='} {self.high:g}"
        if self.high == math.inf:
            return f"{self.name} {'>' if self.low_open else '>='} {self.low:g}"
        return f"{self.low:g} {'<' if self.low_open else '<='} {self.name}{upper}"


@dataclass(frozen=True)
class ObjectiveSpec:
    """What one objective is."""

    name: str
    family: str
    """"qlog" (loss (1 - p^a)/a, gate p^a) or "wnll" (loss -w log p, gate w)."""
    coefficient: Callable[[TokenQuantities, dict], torch.Tensor]
    """The detached exponent a (qlog) or weight w (wnll) per token [N], from the quantities and
    the parameter values {name: value}."""
    needs: tuple
    """The QUANTITIES the coefficient or `keep` reads (log_p is always available)."""
    loss_text: str
    """Loss per token, for the README table and the CLI help."""
    gate_text: str
    source: str
    params: tuple = ()
    """Param entries, in positional order."""
    keep: Optional[Callable[[TokenQuantities, dict], torch.Tensor]] = None
    """Tokens counted [N] bool (None: every valid token)."""
    aliases: tuple = ()
    """Exact names of the DEFT reference code (`trainer.objective_trans`)."""
    alias_prefix: Optional[str] = None
    """A reference-code prefix followed by the first parameter, e.g. "GeneralFamily-<q>"."""
    exponent_max: Callable[[dict], float] = lambda params: 1.0
    """The largest exponent a it can give (a histogram's range), from the parameter values."""

    @property
    def topk_param(self) -> Optional[str]:
        """The parameter giving k of the top-k entropy, when the objective needs it."""
        return "k" if "topk_entropy" in self.needs else None


def qlog_loss(log_p: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """(1 - p^a) / a written as -expm1(a log p) / a: exact for small a, and -log p at a = 0."""
    safe = torch.where(exponent == 0, torch.ones_like(exponent), exponent)
    return torch.where(exponent == 0, -log_p, -torch.expm1(exponent * log_p) / safe)


def _qlog(log_p, exponent):
    # p^0 is 1 also where p = 0 (a target logit of -inf): exp(0 * -inf) would be nan
    return qlog_loss(log_p, exponent), torch.exp(torch.where(exponent == 0, 0.0, exponent * log_p))


def _wnll(log_p, weight):
    # 0 * -log p is 0 (the limit p log p -> 0 as p -> 0), not 0 * inf = nan
    return torch.where(weight == 0, 0.0, -weight * log_p), weight


FAMILIES = {"qlog": _qlog, "wnll": _wnll}
"""family -> (log p [N], coefficient [N]) -> (loss [N], gate [N])."""


def batch_mean_p(q: TokenQuantities) -> torch.Tensor:
    """Mean of p over the valid tokens (and, with `mean_group`, over that group's ranks' valid
    tokens: one SUM all-reduce of [sum p, count]). 0 when there is no valid token."""
    p = q.p
    totals = torch.stack([torch.where(q.valid, p, 0.0).sum(), q.valid.sum().to(p.dtype)])
    if q.mean_group is not None and dist.get_world_size(q.mean_group) > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=q.mean_group)
    return totals[0] / totals[1].clamp(min=1)


def cayley_exponent(q: TokenQuantities) -> torch.Tensor:
    """a = clamp(f + (1 - f) p / (2 - p), 1e-3, 1) with f = 0.5 * batch_mean_p."""
    p, floor = q.p, 0.5 * batch_mean_p(q)
    return (floor + (1 - floor) * p / (2 - p)).clamp(CAYLEY_EXPONENT_MIN, 1.0)


def _constant(value: float) -> Callable:
    return lambda q, params: torch.full_like(q.log_p, value)


_THRESHOLD_TOP = Param("th", float, None, 0.0, 1.0, high_open=True)
_THRESHOLD_BOTTOM = Param("th", float, None, 0.0, 1.0, low_open=True)


def _p_at_least(q, params):
    return q.p >= params["th"]


def _p_at_most(q, params):
    return q.p <= params["th"]


_DEFT_PAPER = "DEFT, arXiv 2602.11424"

_TABLE = (
    ObjectiveSpec(
        name="nll",
        family="qlog",
        coefficient=_constant(0.0),
        needs=(),
        loss_text="-log p",
        gate_text="1",
        source="cross entropy",
        aliases=("original", "logp"),
    ),
    ObjectiveSpec(
        name="p",
        family="qlog",
        coefficient=_constant(1.0),
        needs=(),
        loss_text="1 - p",
        gate_text="p",
        source="DEFT paper (probability objective)",
    ),
    ObjectiveSpec(
        name="dft",
        family="wnll",
        coefficient=lambda q, params: q.p,
        needs=(),
        loss_text="-sg(p) log p",
        gate_text="p",
        source="Dynamic Fine-Tuning, arXiv 2508.05629",
    ),
    ObjectiveSpec(
        name="tsallis",
        family="qlog",
        coefficient=lambda q, params: torch.full_like(q.log_p, params["q"]),
        needs=(),
        loss_text="(1 - p^q)/q",
        gate_text="p^q",
        source="Tsallis q-log family (q -> 0: NLL, q = 1: 1 - p)",
        params=(Param("q", float, None, 0.0, low_open=True),),
        alias_prefix="GeneralFamily-",
        exponent_max=lambda params: max(1.0, params["q"]),
    ),
    ObjectiveSpec(
        name="deft",
        family="qlog",
        coefficient=lambda q, params: q.sum_p2,
        needs=("sum_p2",),
        loss_text="(1 - p^a)/a, a = sg(sum_v p_v^2)",
        gate_text="p^a",
        source=f"{_DEFT_PAPER} (parameter-free; H2 = -log sum p^2 is the Renyi-2 entropy)",
        aliases=("DEFT",),
    ),
    ObjectiveSpec(
        name="cayley",
        family="qlog",
        coefficient=lambda q, params: cayley_exponent(q),
        needs=("batch_mean_p",),
        loss_text="(1 - p^a)/a, a = sg(clamp(f + (1-f) p/(2-p), 1e-3, 1)), f = 0.5 mean(p)",
        gate_text="p^a",
        source="DEFT paper's Cayley-transform trajectory",
        aliases=("Cayley_Trans",),
    ),
    ObjectiveSpec(
        name="eaft",
        family="wnll",
        coefficient=lambda q, params: q.topk_entropy.clamp(min=0).pow(params["alpha"]),
        needs=("topk_entropy",),
        loss_text="-sg(H~)^alpha log p, H~ = entropy of softmax over the top-k logits / ln k",
        gate_text="H~^alpha",
        source="Entropy-Adaptive Fine-Tuning, arXiv 2601.02151",
        # k = 1 would give a top-1 entropy of 0, hence weight 0: nothing would be trained.
        params=(Param("k", int, 20, 2.0), Param("alpha", float, 1.0, 0.0)),
    ),
    ObjectiveSpec(
        name="p_top",
        family="qlog",
        coefficient=_constant(1.0),
        needs=(),
        loss_text="1 - p on tokens with p >= th, others dropped",
        gate_text="p",
        source=f"{_DEFT_PAPER}, threshold ablation",
        params=(_THRESHOLD_TOP,),
        keep=_p_at_least,
        alias_prefix="OnlyTopP-",
    ),
    ObjectiveSpec(
        name="p_bottom",
        family="qlog",
        coefficient=_constant(1.0),
        needs=(),
        loss_text="1 - p on tokens with p <= th, others dropped",
        gate_text="p",
        source=f"{_DEFT_PAPER}, threshold ablation",
        params=(_THRESHOLD_BOTTOM,),
        keep=_p_at_most,
        alias_prefix="OnlyBottomP-",
    ),
    ObjectiveSpec(
        name="nll_top",
        family="qlog",
        coefficient=_constant(0.0),
        needs=(),
        loss_text="-log p on tokens with p >= th, others dropped",
        gate_text="1",
        source=f"{_DEFT_PAPER}, threshold ablation",
        params=(_THRESHOLD_TOP,),
        keep=_p_at_least,
        alias_prefix="OnlyTopLogP-",
    ),
    ObjectiveSpec(
        name="nll_bottom",
        family="qlog",
        coefficient=_constant(0.0),
        needs=(),
        loss_text="-log p on tokens with p <= th, others dropped",
        gate_text="1",
        source=f"{_DEFT_PAPER}, threshold ablation",
        params=(_THRESHOLD_BOTTOM,),
        keep=_p_at_most,
        alias_prefix="OnlyBottomLogP-",
    ),
)
SPECS = {spec.name: spec for spec in _TABLE}
"""name -> spec, in the order of the README table and the CLI help."""


def objective_terms(spec: ObjectiveSpec, params: dict, q: TokenQuantities):
    """(loss [N], gate [N], exponent [N] or None, counted [N] bool) of one objective: the spec's
    coefficient through its family; tokens outside `counted` (invalid, or dropped by the spec's
    threshold) get loss and gate 0."""
    counted = q.valid if spec.keep is None else q.valid & spec.keep(q, params)
    coefficient = spec.coefficient(q, params)
    loss, gate = FAMILIES[spec.family](q.log_p, coefficient)
    zero = torch.zeros_like(loss)
    exponent = coefficient if spec.family == "qlog" else None
    return torch.where(counted, loss, zero), torch.where(counted, gate, zero), exponent, counted


def usage(spec: ObjectiveSpec, placeholder: Callable[[Param], str]) -> str:
    """`name` or `name:key=<...>,...` with each parameter shown by `placeholder`."""
    if not spec.params:
        return spec.name
    return spec.name + ":" + ",".join(f"{p.name}={placeholder(p)}" for p in spec.params)


def objectives_table() -> str:
    """The README's objective table (a test keeps the README equal to it)."""
    rows = ["| `--sft-objective` | loss per token | gate | source |", "|---|---|---|---|"]
    for spec in SPECS.values():
        form = usage(spec, lambda p: f"{p.default:g}" if p.default is not None else f"<{p.rule}>")
        rows.append(f"| `{form}` | {spec.loss_text} | {spec.gate_text} | {spec.source} |")
    return "\n".join(rows)
