"""ABS and the bounded-staleness family: a parameter server that updates after K arrivals.

One server half, with a policy per algorithm (Dutta, Wang, Joshi, "Slow and Stale Gradients Can Win the Race";
ABS: Tan, Zhu, Zhang, arXiv 2301.08895; ``docs/algorithms.md``). Every node runs
``local-steps`` SGD steps from the model it was given and uploads its delta; after K arrivals the server applies
``w <- w - server-lr * mean(delta)`` and publishes a new version.

| strategy      | K         | who may start a task                              | after an update                      |
|---------------|-----------|---------------------------------------------------|--------------------------------------|
| async-sgd     | 1         | any free node, on the newest model                | -                                    |
| k-batch-async | k         | any free node (a fast node may give several of K) | -                                    |
| k-async       | k         | a node whose upload is in the pending K waits     | -                                    |
| k-sync        | k         | as k-async                                        | the rest are cancelled and restart   |
| adasync       | K(t)      | as k-sync                                         | as k-sync                            |
| ssp           | 1         | a node more than ``staleness-bound`` tasks ahead  | -                                    |
|               |           | of the slowest node waits                         |                                      |
| abs           | K(t)      | as k-async                                        | nodes whose staleness now exceeds    |
|               |           |                                                   | tau(t) drop their work and restart   |

The adaptive schedules are **our design** (the ABS paper's exact rules were not available; the notes give only
their direction: K grows, the staleness bound tightens as it does):

- ``K(t) = min(N, k * 2^floor(t / k-double-every))``: K starts at ``k`` and doubles every ``k-double-every``
  seconds of the run's clock (``k-double-every = 0`` keeps it fixed), as AdaSync grows K over wall-clock time.
- ``tau(t) = max(1, ceil(staleness-bound * k / K(t)))``: the bound starts at ``staleness-bound`` and shrinks as K
  grows, so the server waits for more workers exactly when it tolerates less staleness.

A restart abandons the node's task in flight; the engine records it as ``restarted``. Under ``restart = "finish"``
(the default, what Flower does) the node stays busy until that task ends and then gets the newest model; under
``restart = "interrupt"`` (a what-if) it gets the newest model at once (``server_app/restarts.py``). ABS checks
tau(t) at every result, not only at updates: an arrival staler than the bound in force at its arrival is dropped,
and tasks in flight the bound has overtaken restart, so ABS never applies an update staler than tau at its
arrival; k-sync and AdaSync only ever apply fresh (staleness 0) updates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

from strategies.base import EngineView, Status, Strategy, Task, Update, Verdict, step
from strategies.client import Weights
from strategies.config import RunConfig
from strategies.registry import register
from strategies.tuning import LR, IntRange, LogUniform

K_RANGE = IntRange(1, 16)                  # min(k, nodes) is used: a small fleet caps it
DOUBLE_EVERY_RANGE = LogUniform(0.05, 20.0)  # clock seconds; the presets use 0.2
BOUND_RANGE = IntRange(1, 16)


class KAggregation(Strategy):
    """Server half of the family; subclasses set the policy."""

    elastic = True  # K counts the nodes online
    distinct: ClassVar[bool] = False      # a node whose upload is pending waits for the update
    cancel_rest: ClassVar[bool] = False   # after an update, every task still in flight restarts
    adaptive: ClassVar[bool] = False      # K(t) and tau(t) follow the schedules
    bounded: ClassVar[bool] = False       # restart nodes staler than tau(t)
    search_space = {"lr": LR}  # async-sgd; the K-families add k, the adaptive ones k-double-every, ABS its bound

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        self.pending: list[Update] = []
        self.now = 0.0

    @classmethod
    def aggregation_set(cls, cfg: RunConfig) -> int | None:
        """An update combines K arrivals: at least ``k`` (the adaptive K only grows)."""
        return 1 if cls.k_now is not KAggregation.k_now else cfg.k

    def k_now(self) -> int:
        """K at the current clock time."""
        k = min(self.cfg.k, self.num_nodes)
        every = self.cfg.k_double_every
        if self.adaptive and every > 0:
            k = min(self.num_nodes, k * 2 ** int(self.now // every))
        return k

    def bound_now(self) -> int:
        """tau(t): the largest staleness ABS lets an update reach."""
        return max(1, math.ceil(self.cfg.staleness_bound * min(self.cfg.k, self.num_nodes) / self.k_now()))

    def task_for(self, node: int) -> Task | None:
        """The newest model, unless the policy makes the node wait."""
        if self.distinct and any(u.node == node for u in self.pending):
            return None
        return Task(self.version)

    def apply(self, update: Update) -> Verdict:
        """Collect; after K arrivals apply their mean delta and decide who restarts.

        Under a bound (ABS), tau(t) is enforced at every result, not only at updates: an arrival staler than the
        bound in force now is dropped, and tasks in flight that the shrinking bound has overtaken restart.
        """
        self.now = max(self.now, update.time)
        if self.bounded and update.staleness > (tau := self.bound_now()):
            return Verdict(Status.DROPPED, f"staleness {update.staleness} > tau {tau}", restart=self.to_restart())
        self.pending.append(update)
        k = self.k_now()
        if len(self.pending) < k:
            return Verdict(Status.BUFFERED, f"{len(self.pending)}/{k} arrivals", restart=self._over_bound())
        return self._flush()

    def fail(self, node: int, base_version: int) -> Verdict:
        """A lost task. When K has come down to the arrivals in hand (the fleet lost a node), apply them now."""
        self.now = max(self.now, self.view.now)
        if self.pending and len(self.pending) >= self.k_now():
            return self._flush()
        return Verdict(Status.DROPPED, restart=self._over_bound())

    def _flush(self) -> Verdict:
        mean = self.aggregate([(1.0 / len(self.pending), u.delta) for u in self.pending])
        applied = tuple(u.seq for u in self.pending)
        self.pending = []
        self._publish(step(self.weights, mean, self.cfg.server_lr))
        return Verdict(Status.APPLIED, applied=applied, restart=self.to_restart())

    def to_restart(self) -> tuple[int, ...]:
        """Nodes whose task in flight is abandoned after an update."""
        if self.cancel_rest:
            return tuple(sorted(self.in_flight))
        return self._over_bound()

    def _over_bound(self) -> tuple[int, ...]:
        """Under a bound (ABS), nodes whose task in flight is staler than tau(t) now; else none."""
        if not self.bounded:
            return ()
        tau = self.bound_now()
        return tuple(sorted(n for n, v in self.in_flight.items() if self.version - v > tau))

    def state_summary(self) -> dict[str, float]:
        """K, and tau where it applies."""
        out = {"k": float(self.k_now()), "pending": float(len(self.pending))}
        if self.bounded:
            out["tau"] = float(self.bound_now())
        return out


@register
class AsyncSGD(KAggregation):
    """Asynchronous SGD: every arrival is applied at once, however stale."""

    name = "async-sgd"

    def k_now(self) -> int:
        """Always 1."""
        return 1


@register
class KBatchAsync(KAggregation):
    """K-batch-async SGD: update after any K arrivals; a finished node fetches the newest model at once."""

    name = "k-batch-async"
    search_space = {"lr": LR, "k": K_RANGE}


@register
class KAsync(KAggregation):
    """K-async SGD: update after K arrivals from distinct nodes; the others keep computing, stale or not."""

    name = "k-async"
    search_space = {"lr": LR, "k": K_RANGE}
    distinct = True


@register
class KSync(KAggregation):
    """K-sync SGD: every node computes on the current model; the first K are applied, the rest cancelled."""

    name = "k-sync"
    search_space = {"lr": LR, "k": K_RANGE}
    distinct = True
    cancel_rest = True


@register
class AdaSync(KSync):
    """AdaSync: K-sync with K growing over time (the schedule of the module docstring)."""

    name = "adasync"
    search_space = {"lr": LR, "k": K_RANGE, "k-double-every": DOUBLE_EVERY_RANGE}
    adaptive = True


@register
class ABS(KAggregation):
    """ABS: K(t) first arrivals per update, no cancellation, restart of nodes staler than tau(t)."""

    name = "abs"
    search_space = {"lr": LR, "k": K_RANGE, "k-double-every": DOUBLE_EVERY_RANGE, "staleness-bound": BOUND_RANGE}
    distinct = True
    adaptive = True
    bounded = True


@register
class SSP(KAggregation):
    """Stale synchronous parallel (Ho et al. 2013): a node more than ``staleness-bound`` tasks ahead waits."""

    name = "ssp"
    search_space = {"lr": LR, "staleness-bound": IntRange(0, 16)}

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        self.clock: dict[int, int] = {}

    def k_now(self) -> int:
        """Every arrival is applied."""
        return 1

    def task_for(self, node: int) -> Task | None:
        """Wait while this node is more than the bound ahead of the slowest one (nodes not seen yet count as 0)."""
        slowest = min(self.clock.values()) if len(self.clock) >= self.num_nodes else 0
        if self.clock.get(node, 0) - slowest > self.cfg.staleness_bound:
            return None
        return Task(self.version)

    def apply(self, update: Update) -> Verdict:
        """Count the node's finished task, then apply it."""
        self.clock[update.node] = self.clock.get(update.node, 0) + 1
        return super().apply(update)
