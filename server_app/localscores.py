"""Score what a node holds: the accuracy of the decentralized strategies' local models, beside the average's.

AD-PSGD, D-PSGD and AllReduce-SGD publish the average of the node models, which is what the run's evaluation
scores; but no node holds that average (AllReduce-SGD's nodes do, all alike). Every evaluation therefore also
scores the models the nodes hold (``Strategy.node_models``) and stores, in ``evals.metrics_json``:

- ``local-acc-mean``: the mean accuracy of the node models scored, ``local-acc-min``: the worst of them,
- ``local-acc-nodes``: how many were scored: every node up to ``SAMPLE``, else ``SAMPLE`` nodes drawn once with
  the run's seed (the same nodes at every evaluation of the run).

A node model that is the published model itself is not evaluated again. With ``evaluation = "federated"`` the
evaluation is a round trip to the nodes, and local models are not scored.

Which of these a run's ``target-accuracy`` reads is run-config ``target-score`` (``target_score``): by default the
node models' mean, because a decentralized run that stops when the average reaches the target has stopped on a
model nobody can use. A run without local scores (a star strategy, whose nodes hold the published model; or a
federated evaluation) reads the published model's accuracy whatever the choice: there is nothing else to read.
The comparison harness scores runs with the same choice and the same fallback (``server_app.compare_report``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from strategies.base import Strategy
from strategies.client import Weights
from strategies.config import RunConfig

SAMPLE = 8
#: ``target-score`` -> the ``evals.metrics_json`` key it reads (None: the published model's ``accuracy``).
SCORE_KEYS: dict[str, str | None] = {"local-mean": "local-acc-mean", "local-min": "local-acc-min", "average": None}
#: How a summary names the score read, where it is not the published model's.
SCORE_LABELS = {"local-mean": "node models' mean", "local-min": "worst node model"}


def sample(n: int, seed: int) -> list[int]:
    """The node indices scored: all of them up to ``SAMPLE``, else a seeded draw of ``SAMPLE``, in fleet order."""
    if n <= SAMPLE:
        return list(range(n))
    return sorted(int(i) for i in np.random.default_rng([seed, 0x10CA1]).choice(n, SAMPLE, replace=False))


def local_scores(cfg: RunConfig, strategy: Strategy, accuracy: float,
                 evaluate: Callable[[Weights], tuple[float, float]]) -> dict[str, float]:
    """``local-acc-mean``, ``local-acc-min`` and ``local-acc-nodes`` (see the module docstring); {} if none."""
    models = strategy.node_models()
    if not models or cfg.evaluation == "federated":
        return {}
    known = {id(strategy.weights): accuracy}
    accs = []
    for i in sample(len(models), cfg.seed):
        m = models[i]
        if id(m) not in known:
            known[id(m)] = evaluate(m)[1]
        accs.append(known[id(m)])
    return {"local-acc-mean": float(np.mean(accs)), "local-acc-min": float(min(accs)), "local-acc-nodes": len(accs)}


def local_score(choice: str, scores: Mapping[str, float] | None) -> float | None:
    """The local score ``target-score = choice`` names, from one evaluation's ``scores``; None where it has none.

    ``scores`` is what ``local_scores`` returned for that evaluation ({} or None where there are none).
    """
    key = SCORE_KEYS[choice]
    if key is None or not scores or key not in scores:
        return None
    return float(scores[key])


def target_score(choice: str, accuracy: float, scores: Mapping[str, float] | None) -> float:
    """The accuracy ``target-score = choice`` reads: the local score it names, else the published ``accuracy``."""
    local = local_score(choice, scores)
    return accuracy if local is None else local


def local_sql(choice: str) -> str:
    """The SQL expression of an ``evals`` row's local score under ``choice`` (NULL where it has none, or average)."""
    key = SCORE_KEYS[choice]
    return f"json_extract(metrics_json, '$.\"{key}\"')" if key else "NULL"


def score_sql(choice: str) -> str:
    """The SQL expression of an ``evals`` row's accuracy under ``choice``: its local score, else ``accuracy``."""
    return f"COALESCE({local_sql(choice)}, accuracy)" if SCORE_KEYS[choice] else "accuracy"
