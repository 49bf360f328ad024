"""The tolerance rule of a comparison, as a value (compare.py's docstring derives it).

    rel_tol  = factor * max(floor, min_floor)                  floor: float32's rel_l2 at the point
    abs_tol  = max(abs_floor, factor * min_floor * scale)      scale: the RMS it combines
    elem_tol = factor * max(float32's largest error, abs_floor)   (n_bad)

``Tolerances()`` is the rule every comparison uses; its defaults are metrics.py's constants. A trace
point's own rule can be changed by name, as llama.cpp's test-backend-ops overrides one op's tolerance
and says why next to it::

    Tolerances(overrides={"self_attn.probs": {"factor": 30, "reason": "my softmax uses exp2"}})
    Tolerances(overrides={"model.layers.1.mlp.act": 100})  # a number: the factor
    Tolerances(overrides={"lm_head": PointTolerance(factor=20, abs_floor=1e-6)})  # a whole rule

A key matches a trace point named exactly so, or ending in "." + key (every layer's point); when
several match, the longest key wins."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from types import MappingProxyType
from typing import Mapping

from .errors import UsageError
from .metrics import ABS_FLOOR, AMPLIFY, FACTOR, MIN_FLOOR


@dataclass(frozen=True)
class PointTolerance:
    """The rule's numbers at one trace point (reason: why they differ from the defaults)."""

    factor: float = FACTOR
    min_floor: float = MIN_FLOOR
    abs_floor: float = ABS_FLOOR
    reason: str = ""

    def rel_tol(self, floor: float) -> float:
        """The largest rel_l2 that agrees, given the float32 reference's rel_l2 there."""
        return self.factor * max(floor, self.min_floor)

    def abs_tol(self, scale: float) -> float:
        """The largest max_abs that agrees near zero, given the RMS of what the op combines."""
        return max(self.abs_floor, self.factor * self.min_floor * scale)

    def elem_tol(self, floor_max_abs: float) -> float:
        """The largest elementwise error that is not counted in n_bad."""
        return self.factor * max(floor_max_abs, self.abs_floor)


_NUMBERS = ("factor", "min_floor", "abs_floor")


def _check_number(where: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise UsageError(f"{where}={value!r}: must be a finite number > 0")


def _override_fields(key: object, value: object) -> dict[str, object]:
    """An override as the PointTolerance fields it changes (a number is the factor)."""
    if not isinstance(key, str) or not key:
        raise UsageError(f"tolerance override key {key!r}: must be a trace point name or suffix")
    if isinstance(value, PointTolerance):  # a whole rule
        return asdict(value)
    changes = {"factor": value} if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(changes, Mapping):
        raise UsageError(
            f"tolerance override {key!r}: give a number (the factor), a dict of {_NUMBERS} and reason, "
            f"or a PointTolerance"
        )
    unknown = sorted(set(changes) - {f.name for f in fields(PointTolerance)})
    if unknown:
        raise UsageError(f"tolerance override {key!r}: unknown field(s) {unknown}; known: {[*_NUMBERS, 'reason']}")
    for name in _NUMBERS:
        if name in changes:
            _check_number(f"overrides[{key!r}].{name}", changes[name])
    return dict(changes)


@dataclass(frozen=True)
class Tolerances:
    """The tolerance rule: defaults for every trace point, per-point overrides by name, and the
    ratio past which a propagated error is labelled amplified."""

    factor: float = FACTOR
    min_floor: float = MIN_FLOOR
    abs_floor: float = ABS_FLOOR
    amplify: float = AMPLIFY
    overrides: Mapping[str, Mapping] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (*_NUMBERS, "amplify"):
            _check_number(name, getattr(self, name))
        normalised = {key: _override_fields(key, value) for key, value in dict(self.overrides).items()}
        object.__setattr__(self, "overrides", MappingProxyType(normalised))  # frozen all the way down

    @property
    def default(self) -> PointTolerance:
        return PointTolerance(self.factor, self.min_floor, self.abs_floor)

    def override_for(self, name: str) -> str | None:
        """The override key that applies to trace point ``name`` (the longest that matches), or None."""
        keys = [key for key in self.overrides if name == key or name.endswith("." + key)]
        return max(keys, key=len) if keys else None

    def at(self, name: str) -> PointTolerance:
        """The rule at trace point ``name``: the defaults, changed by the override that applies."""
        key = self.override_for(name)
        return self.default if key is None else replace(self.default, **self.overrides[key])

    def check_overrides_match(self, names: list[str]) -> None:
        """Every override names at least one of the trace points compared (a typo would change nothing)."""
        unused = [key for key in self.overrides if not any(n == key or n.endswith("." + key) for n in names)]
        if unused:
            raise UsageError(
                f"tolerance override(s) {unused} match no trace point of this model "
                f"(a key is a full name, e.g. {names[min(1, len(names) - 1)]!r}, or its end after a dot, "
                f"e.g. 'self_attn.probs')"
            )
