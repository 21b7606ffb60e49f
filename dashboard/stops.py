"""A run's stop conditions, as a person reads them, and how far a running run is from the nearest.

The stored config (``runs.config_json``) holds the run-config keys ``max-updates`` (applied client updates),
``max-time`` (seconds on the run's clock) and ``target-accuracy``; 0 (or no key) leaves a condition off, and the
run stops at whichever set condition it meets first. So its progress is the largest of the fractions done: applied
updates over ``max-updates``, clock over ``max-time``, best accuracy so far over ``target-accuracy``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEYS = ("max-updates", "max-time", "target-accuracy")


@dataclass(frozen=True)
class Progress:
    """How far a run is toward stopping: ``fraction`` in [0, 1], and a sentence saying toward what."""

    fraction: float
    text: str


def _number(value: Any) -> float:
    """A config value as a positive finite number, else 0 (off): a stored config may hold anything."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return 0.0
    return x if math.isfinite(x) and x > 0 else 0.0


def conditions(config: Mapping[str, Any]) -> dict[str, float]:
    """The stop conditions set in ``config``: key -> bound (only those above 0)."""
    return {k: b for k in KEYS if (b := _number(config.get(k)))}


def _bound(key: str, bound: float) -> str:
    if key == "max-updates":
        return f"{bound:,.0f} applied updates"
    if key == "max-time":
        return f"{bound:,.4g} s on its clock"
    return f"{bound:.2f} accuracy"


def describe(config: Mapping[str, Any]) -> str:
    """``stops at 200 applied updates or 0.90 accuracy``; ``no stop condition set`` when none is."""
    parts = [_bound(k, b) for k, b in conditions(config).items()]
    if not parts:
        return "no stop condition set"
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    return f"stops at {listed}" + (", whichever comes first" if len(parts) > 1 else "")


def progress(config: Mapping[str, Any], applied: float | None, clock_s: float | None,
             best_accuracy: float | None) -> Progress | None:
    """Progress toward the nearest stop condition (``None`` when none is set).

    ``applied`` counts the run's applied updates, ``clock_s`` its clock, ``best_accuracy`` its best evaluation
    so far; a missing one counts as 0 (no task, no evaluation yet).
    """
    done = {"max-updates": _number(applied), "max-time": _number(clock_s), "target-accuracy": _number(best_accuracy)}
    fractions = {k: min(done[k] / b, 1.0) for k, b in conditions(config).items()}
    if not fractions:
        return None
    key = max(fractions, key=fractions.__getitem__)
    bound = conditions(config)[key]
    if key == "max-updates":
        text = f"{done[key]:,.0f} of {bound:,.0f} applied updates"
    elif key == "max-time":
        text = f"{done[key]:,.1f} of {bound:,.4g} s on its clock"
    else:
        text = f"best accuracy {done[key]:.3f} of the target {bound:.2f}"
    return Progress(fractions[key], f"{text} ({fractions[key]:.0%})")
