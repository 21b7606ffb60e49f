"""FedAsync (Xie, Koyejo, Gupta 2019, arXiv 1903.03934): apply every arrival by staleness-weighted mixing.

``w <- (1 - alpha_t) w + alpha_t x``, where ``x = base - delta`` is the client's model and
``alpha_t = mixing * s(staleness)`` with ``s`` one of ``strategies.staleness``. Clients may add the proximal term
``prox-mu/2 ||x - w_base||^2`` of the paper (run-config ``prox-mu``).
"""

from __future__ import annotations

from collections.abc import Sequence

from strategies.base import EngineView, Status, Strategy, Update, Verdict
from strategies.client import Weights
from strategies.config import RunConfig
from strategies.registry import register
from strategies.staleness import staleness_fn
from strategies.tuning import LR, Uniform


@register
class FedAsync(Strategy):
    """Asynchronous mixing of every arriving client model."""

    name = "fedasync"
    elastic = True
    search_space = {"lr": LR, "mixing": Uniform(0.05, 1.0), "staleness-a": Uniform(0.0, 2.0)}

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        c = self.cfg
        self.s = staleness_fn(c.staleness_fn, c.staleness_a, c.staleness_b)
        self.last_alpha = 0.0

    @classmethod
    def aggregation_set(cls, cfg: RunConfig) -> int | None:
        """Each update is mixed in alone."""
        return 1

    def apply(self, update: Update) -> Verdict:
        """Mix the client's model into the global one: ``w - alpha (w - x)``."""
        alpha = self.cfg.mixing * self.s(update.staleness)
        self._publish([w - alpha * (w - x) for w, x in zip(self.weights, update.model, strict=True)])
        self.last_alpha = alpha
        return Verdict(Status.APPLIED, applied=(update.seq,))

    def state_summary(self) -> dict[str, float]:
        """The last mixing weight."""
        return {"alpha": self.last_alpha}
