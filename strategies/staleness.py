"""Staleness weighting functions s(tau): how much an update computed ``tau`` versions ago still counts.

Forms as in FedAsync (Xie, Koyejo, Gupta 2019) and FedBuff (Nguyen et al. 2022), see
``../shared/notes/algorithms.md`` section 6:

- ``constant``:   s = 1
- ``polynomial``: s = (tau + 1) ** -a
- ``hinge``:      s = 1 if tau <= b else 1 / (a * (tau - b) + 1)
- ``sqrt``:       s = 1 / sqrt(1 + tau)   (FedBuff's default; ``polynomial`` with a = 0.5)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from strategies.config import STALENESS_FNS, ConfigError

StalenessFn = Callable[[int], float]


def staleness_fn(name: str, a: float = 0.5, b: float = 4.0) -> StalenessFn:
    """Return s(tau) for a name of ``STALENESS_FNS`` with parameters a and b."""
    forms: dict[str, StalenessFn] = {
        "constant": lambda tau: 1.0,
        "polynomial": lambda tau: (tau + 1.0) ** -a,
        "hinge": lambda tau: 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0),
        "sqrt": lambda tau: 1.0 / math.sqrt(1.0 + tau),
    }
    if name not in forms:
        raise ConfigError(f"staleness-fn = {name!r} is not one of: {', '.join(STALENESS_FNS)}")
    fn = forms[name]

    def weight(tau: int) -> float:
        if tau < 0:
            raise ValueError(f"staleness must be >= 0, got {tau}")
        return fn(tau)

    return weight
