"""FedBuff (Nguyen et al., AISTATS 2022, arXiv 2106.06639): buffered asynchronous aggregation.

Each arriving delta is scaled by ``s(staleness)`` and added to a buffer; when ``buffer-size`` (K) deltas are in,
``w <- w - server-lr * buffer / K`` and a new version is published. Until then the updates are ``buffered``;
they become ``applied`` together when the buffer is flushed.
"""

from __future__ import annotations

from strategies.base import Strategy, Update, Verdict, step, weighted_sum
from strategies.staleness import staleness_fn


class FedBuff(Strategy):
    """Buffered asynchronous aggregation with staleness weighting and a server learning rate."""

    name = "fedbuff"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.cfg
        self.s = staleness_fn(c.staleness_fn, c.staleness_a, c.staleness_b)
        self.buffer: list[tuple[float, Update]] = []

    def apply(self, update: Update) -> Verdict:
        """Buffer the weighted delta; flush when K are in."""
        self.buffer.append((self.s(update.staleness), update))
        k = self.cfg.buffer_size
        if len(self.buffer) < k:
            return Verdict("buffered", f"buffer {len(self.buffer)}/{k}")
        total = weighted_sum([(weight / k, u.delta) for weight, u in self.buffer])
        applied = tuple(u.seq for _, u in self.buffer)
        self.buffer = []
        self._publish(step(self.weights, total, self.cfg.server_lr))
        return Verdict("applied", applied=applied)

    def state_summary(self) -> dict[str, float]:
        """Buffer fill."""
        return {"buffered": float(len(self.buffer))}
