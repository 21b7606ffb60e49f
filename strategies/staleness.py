"""Staleness weighting functions s(tau): how much an update computed ``tau`` versions ago still counts.

Forms as in FedAsync (Xie, Koyejo, Gupta 2019) and FedBuff (Nguyen et al. 2022), see
``docs/algorithms.md``:

- ``constant``:   s = 1
- ``polynomial``: s = (tau + 1) ** -a
- ``hinge``:      s = 1 if tau <= b else 1 / (a * (tau - b) + 1)
- ``sqrt``:       s = 1 / sqrt(1 + tau)   (FedBuff's default; ``polynomial`` with a = 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from strategies.config import STALENESS_FNS, ConfigError

StalenessFn = Callable[[int], float]


@dataclass(frozen=True)
class Staleness:
    """s(tau) of one named form; a plain object (not a closure) so a strategy holding it can be checkpointed."""

    name: str
    a: float = 0.5
    b: float = 4.0

    def __call__(self, tau: int) -> float:
        """The weight of an update ``tau`` versions stale."""
        if tau < 0:
            raise ValueError(f"staleness must be >= 0, got {tau}")
        if self.name == "constant":
            return 1.0
        if self.name == "polynomial":
            return float((tau + 1.0) ** -self.a)  # a positive base: real (typeshed types float ** float as Any)
        if self.name == "hinge":
            return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)
        return 1.0 / math.sqrt(1.0 + tau)


def staleness_fn(name: str, a: float = 0.5, b: float = 4.0) -> StalenessFn:
    """Return s(tau) for a name of ``STALENESS_FNS`` with parameters a and b."""
    if name not in STALENESS_FNS:
        raise ConfigError(f"staleness-fn = {name!r} is not one of: {', '.join(STALENESS_FNS)}")
    return Staleness(name, a, b)
