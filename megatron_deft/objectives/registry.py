"""Parsing `--sft-objective` strings into an `Objective` (a spec from specs.SPECS + its values).

Accepted spellings: `name`, `name:<value>` (the first parameter), `name:key=value,key=value`, plus
the names of the DEFT paper's reference code (each spec's `aliases`, e.g. `original`, `DEFT`,
`Cayley_Trans`, and `alias_prefix` forms such as `GeneralFamily-<q>` or `OnlyTopP-<th>`).
"""

import math
from dataclasses import dataclass
from typing import Union

from megatron_deft.objectives.specs import SPECS, ObjectiveSpec, usage

OBJECTIVE_NAMES = tuple(SPECS)
_ALIASES = {alias: spec.name for spec in SPECS.values() for alias in spec.aliases}
_ALIAS_PREFIXES = {spec.alias_prefix: spec for spec in SPECS.values() if spec.alias_prefix}


@dataclass(frozen=True)
class Objective:
    """A parsed, validated token-level objective.

    Attributes:
        name: canonical name, one of OBJECTIVE_NAMES.
        params: the objective's parameters as (key, value) pairs in declaration order
            (tsallis: q; eaft: k, alpha), defaults filled in. Hashable: an Objective can key
            caches.
    """

    name: str
    params: tuple = ()

    @property
    def spec(self) -> ObjectiveSpec:
        return SPECS[self.name]

    def param(self, key: str) -> Union[int, float]:
        """The value of one parameter, e.g. `objective.param("q")`."""
        return dict(self.params)[key]

    @property
    def family(self) -> str:
        """ "qlog" (loss (1 - p^a)/a with a detached exponent) or "wnll" (loss -w log p)."""
        return self.spec.family

    @property
    def topk(self) -> int:
        """k of the top-k entropy, 0 when the objective does not need it."""
        key = self.spec.topk_param
        return int(self.param(key)) if key else 0

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params)


def usage_text() -> str:
    """Every objective's form and the reference-code names, for errors and the CLI help."""
    forms = [
        usage(spec, lambda p: f"<{'required' if p.default is None else p.default}>")
        for spec in SPECS.values()
    ]
    aliases = list(_ALIASES)
    aliases += [f"{prefix}<{spec.params[0].name}>" for prefix, spec in _ALIAS_PREFIXES.items()]
    return f"valid objectives: {', '.join(forms)}; reference-code names: {', '.join(aliases)}"


def _error(spec: str, why: str) -> ValueError:
    return ValueError(f"invalid SFT objective {spec!r}: {why}. {usage_text()}")


def _convert(text: str, name: str, param, raw) -> Union[int, float]:
    """Converts and range-checks one parameter value."""
    kind = "an integer" if param.kind is int else "a number"
    try:
        value = float(raw)
        if param.kind is int:
            if value != int(value):
                raise ValueError
            value = int(value)
    except (TypeError, ValueError, OverflowError):
        raise _error(text, f"{name} parameter {param.name}={raw!r} is not {kind}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise _error(text, f"{name} parameter {param.name}={raw!r} must be finite")
    if not param.admits(value):
        raise _error(text, f"{name} needs {param.rule}, got {param.name}={raw!r}")
    return value


def _split_spec(text: str) -> tuple[ObjectiveSpec, dict]:
    """`name[:v | :k=v,k=v]` or a reference-code name -> (spec, raw params)."""
    for prefix, spec in _ALIAS_PREFIXES.items():
        if text.startswith(prefix):
            return spec, {spec.params[0].name: text[len(prefix) :]}
    name, _, arg_text = text.partition(":")
    name = _ALIASES.get(name, name.strip().lower())
    if name not in SPECS:
        raise _error(text, f"unknown name {name!r}")
    spec = SPECS[name]
    positional = [param.name for param in spec.params]
    raw: dict = {}
    named = False
    for i, item in enumerate(a.strip() for a in arg_text.split(",") if arg_text):
        key, eq, value = item.partition("=")
        if not eq:  # positional value: the i-th parameter
            if named:
                raise _error(text, f"positional value {item!r} after a key=value parameter")
            if i >= len(positional):
                raise _error(text, f"{name} takes {len(positional)} parameter(s), got {item!r}")
            key, value = positional[i], item
        named = named or bool(eq)
        key = key.strip()
        if key not in positional:
            raise _error(text, f"{name} has no parameter {key!r}")
        if key in raw:
            raise _error(text, f"{name} parameter {key} is given twice")
        raw[key] = value.strip()
    return spec, raw


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
    text = spec.strip()
    found, raw = _split_spec(text)
    raw.update({k: v for k, v in params.items() if v is not None})
    values = {}
    for param in found.params:
        if param.name in raw:
            values[param.name] = _convert(text, found.name, param, raw.pop(param.name))
        elif param.default is None:
            example = f"{found.name}:{param.name}=0.5"
            raise _error(text, f"{found.name} needs parameter {param.name} (e.g. {example})")
        else:
            values[param.name] = param.kind(param.default)
    if raw:
        raise _error(text, f"{found.name} has no parameter(s) {sorted(raw)}")
    return Objective(found.name, tuple(values.items()))
