"""What a strategy may tune: its hyperparameters and their ranges, declared beside its code.

Every ``Strategy`` has a class attribute ``search_space``: run-config key -> ``Param``. The base class tunes the
learning rate only (``DEFAULT_SPACE``); a strategy with knobs of its own declares them next to its code::

    class FedBuff(Strategy):
        search_space = {"lr": LR, "buffer-size": IntRange(1, 10), "server-lr": LogUniform(0.25, 4.0)}

A user's own strategy (``package.module:Class``) inherits ``DEFAULT_SPACE`` or declares its own the same way.
The comparison harness (``python -m server_app.compare``) searches these spaces with an equal number of trials per
strategy. ``check_space`` holds a space to the run config: every key must be a run-config key that a tuner may
change (not the scenario's stop conditions, seed or store), and both ends of a range (every choice) must be values
the run config accepts. This module is plain data: no search library is imported here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeAlias, TypeGuard

from strategies.config import ConfigError, ConfigValue, Key, RunConfig

# Keys a search may not change: what is compared (strategy), the equal budget (stop conditions and the score the
# target reads, evaluation period), the seeds the harness sets itself, and where the rows go.
FIXED_KEYS = frozenset({"strategy", "seed", "metrics-db", "resume", "max-updates", "max-time", "target-accuracy",
                        "target-score", "eval-every", "clock"})


@dataclass(frozen=True)
class _FloatRange:
    """A float range ``[lo, hi]``; the subclasses say how it is drawn and which ranges are valid."""

    kind: ClassVar[str]
    lo: float
    hi: float

    def ends(self) -> tuple[ConfigValue, ...]:
        """The values the run config must accept."""
        return (float(self.lo), float(self.hi))

    def contains(self, value: object) -> bool:
        """Whether ``value`` lies in the range."""
        return _number(value) and self.lo <= float(value) <= self.hi

    def as_json(self) -> dict[str, object]:
        """Serialised form (the comparison's JSON)."""
        return {"type": self.kind, "lo": self.lo, "hi": self.hi}


@dataclass(frozen=True)
class LogUniform(_FloatRange):
    """A float drawn uniformly in log space over ``[lo, hi]`` (``0 < lo < hi``): learning rates and scales."""

    kind: ClassVar[str] = "log-uniform"

    def at(self, u: float) -> ConfigValue:
        """The value at ``u`` in [0, 1) of the range, evenly in log space (a space-filling design's point)."""
        return float(self.lo * (self.hi / self.lo) ** u)

    def check(self, key: str) -> None:
        """Raise ``ConfigError`` for an empty or non-positive range."""
        if not (0 < self.lo < self.hi and math.isfinite(self.hi)):
            raise ConfigError(f"search space {key}: log-uniform needs 0 < lo < hi, got [{self.lo}, {self.hi}]")


@dataclass(frozen=True)
class Uniform(_FloatRange):
    """A float drawn uniformly over ``[lo, hi]``: mixing rates, exponents."""

    kind: ClassVar[str] = "uniform"

    def at(self, u: float) -> ConfigValue:
        """The value at ``u`` in [0, 1) of the range."""
        return float(self.lo + u * (self.hi - self.lo))

    def check(self, key: str) -> None:
        """Raise ``ConfigError`` for an empty range."""
        if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < self.hi):
            raise ConfigError(f"search space {key}: uniform needs lo < hi, got [{self.lo}, {self.hi}]")


@dataclass(frozen=True)
class IntRange:
    """An integer in ``[lo, hi]``, both included; ``log`` draws it uniformly in log space (``lo >= 1``)."""

    lo: int
    hi: int
    log: bool = False

    def at(self, u: float) -> ConfigValue:
        """The integer at ``u`` in [0, 1): each of the ``hi - lo + 1`` values owns an equal slice (in log space)."""
        if self.log:
            value = math.floor(math.exp(math.log(self.lo) + u * (math.log(self.hi + 1) - math.log(self.lo))))
        else:
            value = self.lo + math.floor(u * (self.hi - self.lo + 1))
        return int(min(max(value, self.lo), self.hi))

    def check(self, key: str) -> None:
        """Raise ``ConfigError`` for an empty range, or a log range that reaches 0."""
        if not (isinstance(self.lo, int) and isinstance(self.hi, int) and self.lo < self.hi):
            raise ConfigError(f"search space {key}: int range needs integers lo < hi, got [{self.lo}, {self.hi}]")
        if self.log and self.lo < 1:
            raise ConfigError(f"search space {key}: a log int range needs lo >= 1, got {self.lo}")

    def ends(self) -> tuple[ConfigValue, ...]:
        """The values the run config must accept."""
        return (self.lo, self.hi)

    def contains(self, value: object) -> bool:
        """Whether ``value`` is an integer in the range."""
        return _number(value) and float(value).is_integer() and self.lo <= value <= self.hi

    def as_json(self) -> dict[str, object]:
        """Serialised form (the comparison's JSON)."""
        return {"type": "int", "lo": self.lo, "hi": self.hi, "log": self.log}


@dataclass(frozen=True)
class Choice:
    """One of a few values (strings, numbers or booleans): ``Choice(("polynomial", "hinge"))``."""

    options: tuple[ConfigValue, ...]

    def at(self, u: float) -> ConfigValue:
        """The option whose equal slice of [0, 1) holds ``u``."""
        return self.options[min(math.floor(u * len(self.options)), len(self.options) - 1)]

    def check(self, key: str) -> None:
        """Raise ``ConfigError`` for fewer than two options or a repeated one."""
        if len(self.options) < 2 or len(set(self.options)) != len(self.options):
            raise ConfigError(f"search space {key}: a choice needs two or more distinct options, got {self.options}")

    def ends(self) -> tuple[ConfigValue, ...]:
        """The values the run config must accept."""
        return tuple(self.options)

    def contains(self, value: object) -> bool:
        """Whether ``value`` is one of the options."""
        return value in self.options

    def as_json(self) -> dict[str, object]:
        """Serialised form (the comparison's JSON)."""
        return {"type": "choice", "options": list(self.options)}


Param: TypeAlias = LogUniform | Uniform | IntRange | Choice
PARAM_TYPES = (LogUniform, Uniform, IntRange, Choice)

#: Local SGD's learning rate: every strategy's first knob.
LR = LogUniform(0.005, 0.5)
DEFAULT_SPACE: Mapping[str, Param] = {"lr": LR}


def check_space(space: Mapping[str, Param], owner: str = "", declared: Mapping[str, Key] | None = None) -> None:
    """Hold a search space to the run config; ``ConfigError`` naming ``owner`` (a strategy) on the first problem.

    ``declared``: the owner's own hyperparameters (``Strategy.hyperparameters``), tunable like any key.
    """
    where = f"{owner}: " if owner else ""
    declared = declared or {}
    known = set(RunConfig().to_mapping()) | set(declared)
    if not space:
        raise ConfigError(f"{where}the search space is empty (tune at least the learning rate)")
    for key, param in space.items():
        if not isinstance(param, PARAM_TYPES):
            raise ConfigError(f"{where}search space {key}: {param!r} is not a LogUniform, Uniform, IntRange or Choice")
        if key not in known:
            try:
                RunConfig.from_mapping({key: 0}, declared)
            except ConfigError as exc:
                raise ConfigError(f"{where}search space: {exc}") from exc
        if key in FIXED_KEYS:
            raise ConfigError(f"{where}search space {key}: {key} is fixed by the comparison, not tuned "
                              f"(fixed: {', '.join(sorted(FIXED_KEYS))})")
        try:
            param.check(key)
            for value in param.ends():
                RunConfig.from_mapping({key: value}, declared)
        except ConfigError as exc:
            raise ConfigError(f"{where}search space {key}: {exc}") from exc


def space_as_json(space: Mapping[str, Param]) -> dict[str, dict[str, object]]:
    """The space in the comparison's JSON form, keys sorted."""
    return {key: space[key].as_json() for key in sorted(space)}


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
