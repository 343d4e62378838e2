"""Objective names and parameters: parsing `--sft-objective` strings into an `Objective`.

Every objective is a per-token loss whose gradient w.r.t. the logits z is

    d loss / d z = gate * (softmax(z) - onehot(y)),        gate detached,

and falls in one of two families (p = softmax(z)_y is the target probability):

    q-log  ("qlog"):      loss = (1 - p^a) / a = -expm1(a * log p) / a,   gate = p^a
                          a is a detached exponent; a = 0 is the NLL limit -log p.
    weighted NLL ("wnll"): loss = -w * log p,                               gate = w
                          w is a detached weight.

| name      | family | exponent a / weight w                                        | reference            |
|-----------|--------|--------------------------------------------------------------|----------------------|
| nll       | qlog   | a = 0                                                        | cross entropy        |
| p         | qlog   | a = 1 (loss 1 - p)                                           | DEFT paper           |
| tsallis   | qlog   | a = q (parameter, q > 0)                                     | Tsallis q-log        |
| deft      | qlog   | a = sum_v p_v^2 (Renyi-2 concentration)                      | arXiv 2602.11424     |
| cayley    | qlog   | a = clamp(f + (1-f) p/(2-p), 1e-3, 1), f = 0.5 mean(p)       | arXiv 2602.11424     |
| dft       | wnll   | w = p                                                        | arXiv 2508.05629     |
| eaft      | wnll   | w = (H_topk / ln k)^alpha, H_topk over the top-k logits      | arXiv 2601.02151     |

Accepted spellings: `name`, `name:<value>` (the first parameter), `name:key=value,key=value`, plus the
names used by the DEFT paper's reference code: `original`/`logp` (nll), `p`, `GeneralFamily-<q>`
(tsallis q), `Cayley_Trans` (cayley), `DEFT` (deft).
"""

import math
from dataclasses import dataclass
from typing import Union

# Parameters each objective accepts, in positional order, with defaults (None = required).
_PARAMETERS: dict[str, dict[str, Union[float, int, None]]] = {
    "nll": {},
    "p": {},
    "dft": {},
    "tsallis": {"q": None},
    "deft": {},
    "cayley": {},
    "eaft": {"k": 20, "alpha": 1.0},
}
_FAMILY = {"dft": "wnll", "eaft": "wnll"}  # everything else is q-log
_REFERENCE_ALIASES = {"original": "nll", "logp": "nll", "Cayley_Trans": "cayley", "DEFT": "deft"}
_TSALLIS_ALIAS_PREFIX = "GeneralFamily-"

OBJECTIVE_NAMES = tuple(_PARAMETERS)


@dataclass(frozen=True)
class Objective:
    """A parsed, validated token-level objective.

    Attributes:
        name: canonical name, one of OBJECTIVE_NAMES.
        params: the objective's parameters as (key, value) pairs in declaration order
            (tsallis: q; eaft: k, alpha), defaults filled in. Hashable, so an Objective can key caches.
    """

    name: str
    params: tuple = ()

    def param(self, key: str) -> Union[int, float]:
        """The value of one parameter, e.g. `objective.param("q")`."""
        return dict(self.params)[key]

    @property
    def family(self) -> str:
        """ "qlog" (loss (1 - p^a)/a with a detached exponent) or "wnll" (loss -w log p)."""
        return _FAMILY.get(self.name, "qlog")

    @property
    def topk(self) -> int:
        """k of the top-k entropy (eaft), 0 when the objective does not need it."""
        return int(self.param("k")) if self.name == "eaft" else 0

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params)


def _usage() -> str:
    forms = []
    for name, params in _PARAMETERS.items():
        if not params:
            forms.append(name)
        else:
            args = ",".join(f"{k}=<{'required' if v is None else v}>" for k, v in params.items())
            forms.append(f"{name}:{args}")
    aliases = ", ".join(list(_REFERENCE_ALIASES) + [_TSALLIS_ALIAS_PREFIX + "<q>"])
    return f"valid objectives: {', '.join(forms)}; reference-code names: {aliases}"


def _error(spec: str, why: str) -> ValueError:
    return ValueError(f"invalid SFT objective {spec!r}: {why}. {_usage()}")


def _convert(spec: str, name: str, key: str, raw) -> Union[int, float]:
    """Converts and range-checks one parameter value."""
    kind = "an integer" if key == "k" else "a number"
    try:
        value = float(raw)
        if key == "k":
            if value != int(value):
                raise ValueError
            value = int(value)
    except (TypeError, ValueError, OverflowError):
        raise _error(spec, f"{name} parameter {key}={raw!r} is not {kind}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise _error(spec, f"{name} parameter {key}={raw!r} must be finite")
    # eaft's k = 1 would give a top-1 entropy of 0, hence weight 0: nothing would be trained.
    ranges = {
        "q": (value > 0, "q > 0"),
        "k": (value >= 2, "k >= 2"),
        "alpha": (value >= 0, "alpha >= 0"),
    }
    ok, rule = ranges[key]
    if not ok:
        raise _error(spec, f"{name} needs {rule}, got {key}={raw!r}")
    return value


def _split_spec(spec: str) -> tuple[str, dict]:
    """`name[:v | :k=v,k=v]` or a reference-code alias -> (canonical name, raw params)."""
    if spec.startswith(_TSALLIS_ALIAS_PREFIX):
        return "tsallis", {"q": spec[len(_TSALLIS_ALIAS_PREFIX) :]}
    name, _, arg_text = spec.partition(":")
    name = _REFERENCE_ALIASES.get(name, name.strip().lower())
    if name not in _PARAMETERS:
        raise _error(spec, f"unknown name {name!r}")
    raw: dict = {}
    positional = list(_PARAMETERS[name])
    named = False
    for i, item in enumerate(a.strip() for a in arg_text.split(",") if arg_text):
        key, eq, value = item.partition("=")
        if not eq:  # positional value: the i-th parameter
            if named:
                raise _error(spec, f"positional value {item!r} after a key=value parameter")
            if i >= len(positional):
                raise _error(spec, f"{name} takes {len(positional)} parameter(s), got {item!r}")
            key, value = positional[i], item
        named = named or bool(eq)
        key = key.strip()
        if key not in _PARAMETERS[name]:
            raise _error(spec, f"{name} has no parameter {key!r}")
        if key in raw:
            raise _error(spec, f"{name} parameter {key} is given twice")
        raw[key] = value.strip()
    return name, raw


def parse_objective(spec: Union[str, Objective], **params) -> Objective:
    """Parses an objective spec; keyword `params` (e.g. from CLI flags) override the string's.

    Raises:
        ValueError: unknown name, unknown parameter, missing required parameter or out-of-range
            value; the message lists the valid names and forms.
    """
    if isinstance(spec, Objective):
        spec = str(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise _error(str(spec), "expected a non-empty string")
    name, raw = _split_spec(spec.strip())
    raw.update({k: v for k, v in params.items() if v is not None})
    values = {}
    for key, default in _PARAMETERS[name].items():
        if key in raw:
            values[key] = _convert(spec, name, key, raw.pop(key))
        elif default is None:
            raise _error(spec, f"{name} needs parameter {key} (e.g. {name}:{key}=0.5)")
        else:
            values[key] = default
    if raw:
        raise _error(spec, f"{name} has no parameter(s) {sorted(raw)}")
    return Objective(name, tuple(values.items()))
