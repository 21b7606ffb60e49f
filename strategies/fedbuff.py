"""FedBuff (Nguyen et al., AISTATS 2022, arXiv 2106.06639): buffered asynchronous aggregation.

Each arriving delta is scaled by ``s(staleness)`` and added to a buffer; when ``buffer-size`` (K) deltas are in,
``w <- w - server-lr * buffer / K`` and a new version is published. Until then the updates are ``buffered``;
they become ``applied`` together when the buffer is flushed.
"""

from __future__ import annotations

from collections.abc import Sequence

from strategies.base import EngineView, Status, Strategy, Update, Verdict, step
from strategies.client import Weights
from strategies.config import RunConfig
from strategies.registry import register
from strategies.staleness import staleness_fn
from strategies.tuning import LR, IntRange, LogUniform, Uniform


@register
class FedBuff(Strategy):
    """Buffered asynchronous aggregation with staleness weighting and a server learning rate."""

    name = "fedbuff"
    elastic = True
    search_space = {"lr": LR, "buffer-size": IntRange(1, 16), "staleness-a": Uniform(0.0, 2.0),
                    "server-lr": LogUniform(0.25, 4.0)}

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        c = self.cfg
        self.s = staleness_fn(c.staleness_fn, c.staleness_a, c.staleness_b)
        self.buffer = self.collector()
        self.buffered: list[int] = []

    @classmethod
    def aggregation_set(cls, cfg: RunConfig) -> int | None:
        """A flush combines ``buffer-size`` updates."""
        return cfg.buffer_size

    def apply(self, update: Update) -> Verdict:
        """Add the weighted delta to the buffer; flush when K are in."""
        k = self.cfg.buffer_size
        self.buffer.add_update_delta(update, self.s(update.staleness) / k)
        self.buffered.append(update.seq)
        if len(self.buffered) < k:
            return Verdict(Status.BUFFERED, f"buffer {len(self.buffered)}/{k}")
        applied = tuple(self.buffered)
        self._publish(step(self.weights, self.buffer.result(), self.cfg.server_lr))
        self.buffer, self.buffered = self.collector(), []
        return Verdict(Status.APPLIED, applied=applied)

    def state_summary(self) -> dict[str, float]:
        """Buffer fill."""
        return {"buffered": float(len(self.buffered))}
