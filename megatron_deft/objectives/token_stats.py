"""The per-token statistics of an objective, declared once.

The loss computes them (columns of its stats tensor, in this order), the trainer sums them over
the loss tokens into its report, logs their token means (console, ``train/<name>`` in
TensorBoard) and bins the ``histogram`` ones per token class; the evaluation sums them the same
way. An objective has the statistics whose ``applies`` accepts its spec.
"""

from dataclasses import dataclass
from typing import Callable, Optional

from megatron_deft.objectives.specs import ObjectiveSpec


@dataclass(frozen=True)
class TokenStat:
    """One per-token statistic."""

    name: str
    """Key in the loss's stats, the trainer's report, logs and evaluation summaries."""
    label: Optional[str]
    """Console label of its token mean among the objective's statistics (None: logged on its
    own, beside the loss)."""
    applies: Callable[[ObjectiveSpec], bool]
    """Whether an objective (its spec) has this statistic."""
    histogram: bool = False
    """Binned per token class (training/token_classes.py)."""
    upper: Callable[[ObjectiveSpec, dict], float] = lambda spec, params: 1.0
    """Upper edge of its histogram range, from the spec and its parameter values."""


def _always(spec: ObjectiveSpec) -> bool:
    return True


TOKEN_STATS = (
    TokenStat("gate", "mean gate", _always, histogram=True),
    TokenStat("p_target", "mean p_target", _always, histogram=True),
    TokenStat("nll", None, _always),  # -log p_target: comparable across objectives
    TokenStat("renyi2_entropy", "mean renyi2 entropy", _always),
    TokenStat(
        "exponent",
        "mean exponent",
        lambda spec: spec.family == "qlog",
        histogram=True,
        upper=lambda spec, params: spec.exponent_max(params),
    ),
    TokenStat("topk_entropy", "mean top-k entropy", lambda spec: spec.topk_param is not None),
)
"""Every statistic, in the loss's column order."""

STAT_NAMES = tuple(stat.name for stat in TOKEN_STATS)
BY_NAME = {stat.name: stat for stat in TOKEN_STATS}


def stats_of(objective) -> tuple:
    """The TokenStat entries ``objective`` (a parsed Objective) has."""
    return tuple(stat for stat in TOKEN_STATS if stat.applies(objective.spec))
