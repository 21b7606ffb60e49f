"""FedAvg (McMahan et al. 2017, arXiv 1602.05629): synchronous rounds, example-weighted averaging.

A round hands the current model to up to ``concurrency`` nodes (all nodes when 0), waits until every task of
the round has come back or failed, then averages the returned models weighted by ``num-examples``:
``w <- sum_i n_i (w - delta_i) / sum_i n_i``, which is what Flower's own ``FedAvg`` computes from the clients'
weights (``tests/test_strategies.py`` checks this against ``flwr.serverapp.strategy.FedAvg``). Nodes that finish
early wait: that is the straggler cost the asynchronous strategies avoid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.base import EngineView, Status, Strategy, Task, Update, Verdict, step
from strategies.client import Weights
from strategies.config import RunConfig
from strategies.registry import register
from strategies.taskkeys import SERVER_ROUND
from strategies.tuning import LR


@register
class FedAvg(Strategy):
    """Synchronous federated averaging."""

    name = "fedavg"
    elastic = True
    search_space = {"lr": LR}

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        self.round = 0
        self.members: set[int] = set()
        self.outstanding = 0
        self.results: list[Update] = []

    def round_size(self) -> int:
        """Nodes per round: ``concurrency`` when set, else every node."""
        c = self.cfg.concurrency
        return min(c, self.num_nodes) if c > 0 else self.num_nodes

    def task_for(self, node: int) -> Task | None:
        """Join the open round if it has room and the node is not in it yet."""
        if node in self.members or len(self.members) >= self.round_size():
            return None
        self.members.add(node)
        self.outstanding += 1
        return Task(self.version, {SERVER_ROUND: self.round + 1})

    def apply(self, update: Update) -> Verdict:
        """Hold the result until the round is complete."""
        self.results.append(update)
        self.outstanding -= 1
        return self._maybe_close() or Verdict(Status.BUFFERED, "waiting for the round to complete")

    def fail(self, node: int, base_version: int) -> Verdict:
        """A failed task leaves the round; the round closes with the results it has."""
        self.outstanding -= 1
        return self._maybe_close() or Verdict(Status.DROPPED)

    def _maybe_close(self) -> Verdict | None:
        if self.outstanding > 0 or len(self.members) < self.round_size():
            return None
        applied = tuple(u.seq for u in self.results)
        if self.results:
            counts = self.example_counts()
            total = sum(counts)
            if all(u.sent_is_delta for u in self.results):  # our ClientApp: average the deltas
                mean = self.aggregate([(n / total, u.delta) for n, u in zip(counts, self.results, strict=True)])
                self._publish(step(self.weights, mean, 1.0))
            else:  # Flower-style clients sent weights: average them directly, as Flower's FedAvg does
                self._publish(self.aggregate([(n / total, u.model) for n, u in zip(counts, self.results,
                                                                                    strict=True)]))
        self.round += 1
        self.members.clear()
        self.results = []
        return Verdict(Status.APPLIED, applied=applied) if applied else None

    def example_counts(self) -> list[int]:
        """Each result's ``num-examples``, capped at ``examples-cap`` x the round's median claim when set.

        A count is the client's own claim: one node claiming 2**53 examples would own the average. The median
        of the round's claims is an honest count as long as fewer than half the round lies, so the cap bounds a
        liar's weight to ``examples-cap`` honest nodes'; 1 makes no node weigh more than the median node.
        """
        counts = [u.num_examples for u in self.results]
        if self.cfg.examples_cap > 0:
            cap = max(1, int(self.cfg.examples_cap * float(np.median(counts))))
            counts = [min(n, cap) for n in counts]
        return counts

    def state_summary(self) -> dict[str, float]:
        """Round number."""
        return {"round": float(self.round)}
