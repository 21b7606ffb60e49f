"""A run's stop conditions, as a person reads them, and how far a running run is from the nearest.

The stored config (``runs.config_json``) holds the run-config keys ``max-updates`` (applied client updates),
``max-time`` (seconds on the run's clock) and ``target-accuracy``; 0 (or no key) leaves a condition off, and the
run stops at whichever set condition it meets first. So its progress is the largest of the fractions done: applied
updates over ``max-updates``, clock over ``max-time``, best accuracy so far over ``target-accuracy``.

Which accuracy ``target-accuracy`` reads is the run's ``target-score`` (server_app/localscores.py): ``local-mean``
(the node models' mean), ``local-min`` (the worst node model) or ``average`` (the published model's accuracy,
which for a decentralized strategy scores the average of its node models, held by no node). A run stored before
the key existed has none, and its target read the published model's accuracy: ``average``. An evaluation without
node models' scores (a star strategy's, whose nodes hold the published model) reads its accuracy whatever the
choice, as the run's stop did; the progress says which score it reads when it is not the published model's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KEYS = ("max-updates", "max-time", "target-accuracy")
SCORE_KEY = "target-score"
#: How the progress names the score it reads, where it is not the published model's (server_app/localscores.py's
#: SCORE_LABELS; "average" reads the published model's accuracy).
SCORE_NAMES = {"local-mean": "node models' mean", "local-min": "worst node model"}


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


def target_score(config: Mapping[str, Any]) -> str:
    """The run's ``target-score``: ``average`` when its stored config has none (stored before the key existed).

    A value the runner would not have accepted (the store may hold anything) reads the published model's accuracy
    too.
    """
    choice = config.get(SCORE_KEY, "average")
    return choice if isinstance(choice, str) and choice in (*SCORE_NAMES, "average") else "average"


def progress(config: Mapping[str, Any], applied: float | None, clock_s: float | None,
             best_accuracy: float | None, best_scores: Mapping[str, float | None] | None = None) -> Progress | None:
    """Progress toward the nearest stop condition (``None`` when none is set).

    ``applied`` counts the run's applied updates, ``clock_s`` its clock, ``best_accuracy`` its best evaluation
    so far (the published model's accuracy); a missing one counts as 0 (no task, no evaluation yet).
    ``best_scores`` maps ``local-mean`` and ``local-min`` to the best of that score so far (each evaluation's
    node-model score, else its accuracy), None where the run stored no such score: the target reads the one the
    run's ``target-score`` names when there is one, else ``best_accuracy``.
    """
    score = target_score(config)
    raw = (best_scores or {}).get(score) if score in SCORE_NAMES else None
    local = float(raw) if isinstance(raw, (int, float)) and math.isfinite(raw) else None
    best = best_accuracy if local is None else local
    done = {"max-updates": _number(applied), "max-time": _number(clock_s), "target-accuracy": _number(best)}
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
        read = "accuracy" if local is None else SCORE_NAMES[score]
        text = f"best {read} {done[key]:.3f} of the target {bound:.2f}"
    return Progress(fractions[key], f"{text} ({fractions[key]:.0%})")
