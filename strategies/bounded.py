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
|               |           |                                                   | (adaptive: unless mostly done)       |

ABS runs in one of two modes (its hyperparameter ``abs-mode``). All the rules below are **our design**: the ABS
paper's body was not available, only its abstract (``docs/algorithms.md``): K^t is "chosen adaptively" and the
staleness bound moves with it.

**``abs-mode = "clock"``** (open loop, what AdaSync always uses; the presets behind RESULTS.md's ABS figures pin
it): functions of the run's clock only, blind to loss and arrival times.

- ``K(t) = min(N, k * 2^floor(t / k-double-every))``: K starts at ``k`` and doubles every ``k-double-every``
  seconds of the run's clock (``k-double-every = 0`` keeps it fixed), as AdaSync grows K over wall-clock time.
- ``tau(t) = max(1, ceil(staleness-bound * k / K(t)))``: the bound starts at ``staleness-bound`` and shrinks as K
  grows, so the server waits for more workers exactly when it tolerates less staleness.

**``abs-mode = "adaptive"``** (the default; closed loop, from what the server measures). ``k-double-every`` and
``staleness-bound`` are not used. Measured on the run's clock, per node i: ``d_i``, the durations (dispatch to
arrival) of its last W = ``abs-window`` tasks (a task the strategy abandoned counts with the time until its node
was free again: its whole duration under ``restart = "finish"``, a lower bound under ``"interrupt"``), and ``e_i``
the age of its task in flight (0 if none). Then:

- node estimate ``m_i = max(median(d_i), e_i)`` (``e_i`` alone before its first sample); fleet median
  ``M = median_i median(d_i)`` over the nodes with a sample;
- persistent stragglers ``S = {i : m_i > q * M}``, q = ``abs-straggler-factor``: never waited for,
  ``N_eff = N - |S|`` (N: nodes online). Their arrivals are still used;
- time per unit of progress: with ``D_(1) <= ... <= D_(N_eff)`` the sorted ``m_i`` of the nodes not in S (M for a
  node without a sample), an update that waits for K distinct nodes takes about ``D_(K)`` and applies K
  arrivals, so ``K_time = argmin_{1 <= K <= N_eff} D_(K) / K`` (the largest K on a tie; ``N_eff`` before any
  sample);
- loss trend (AdaSync's rule, on the training loss the nodes report, ``train-loss``; the strategy cannot see the
  server's evaluation): ``L_t`` the mean of the last ``max(k, N)`` reported losses, ``L_0`` that mean when the
  window first filled, ``K_loss = ceil(k * sqrt(L_0 / L_t))`` (k until ``L_0`` exists). A ClientApp that reports
  no ``train-loss`` leaves ``K_loss = k`` and then ``K = K_time``: arrival-time statistics only;
- ``K(t) = max(1, min(N_eff, K_time, max(k, K_loss)))``; when the first arrival reports no loss,
  ``K(t) = max(1, min(N_eff, K_time))``;
- the staleness the fleet produces at that K: during one typical task the others deliver about ``N_eff`` arrivals,
  ``N_eff / K`` updates; ``s_p`` is the p-quantile (p = ``abs-staleness-quantile``) of the staleness of the last
  ``W * N`` arrivals from nodes not in S. ``tau(t) = max(1, ceil(c * max(N_eff / K(t), s_p)))`` with
  c = ``abs-tau-factor`` > 1: never absolute, always relative to the fleet's natural staleness;
- a task overtaken by the bound (staleness ``s > tau``) is spared, not restarted, when most of it is done:
  ``e_i / m_i >= phi`` (phi = ``abs-spare-done``; ``m_i`` its own median, else M) and ``s <= 2 tau``. An arrival
  with ``tau < s <= 2 tau`` is applied with weight ``w = tau / s``; beyond ``2 tau`` it is dropped. An update
  applies ``w <- w - server-lr * (1/|P|) sum_{u in P} w_u delta_u`` (``w_u = 1`` within the bound).

A restart abandons the node's task in flight; the engine records it as ``restarted``. Under ``restart = "finish"``
(the default, what Flower does) the node stays busy until that task ends and then gets the newest model; under
``restart = "interrupt"`` (a what-if) it gets the newest model at once (``server_app/restarts.py``). ABS checks
tau(t) at every result, not only at updates: an arrival staler than the bound in force at its arrival is dropped,
and tasks in flight the bound has overtaken restart, so ABS's clock mode never applies an update staler than tau at
its arrival (the adaptive mode: never staler than 2 tau, and down-weighted beyond tau); k-sync and AdaSync only
ever apply fresh (staleness 0) updates.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from typing import ClassVar

from strategies.base import EngineView, Status, Strategy, Task, Update, Verdict, step
from strategies.client import Weights
from strategies.config import Key, RunConfig
from strategies.registry import register
from strategies.taskkeys import TRAIN_LOSS
from strategies.tuning import LR, IntRange, LogUniform, Uniform

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


ABS_MODES = ("adaptive", "clock")


@register
class ABS(KAggregation):
    """ABS: K(t) first arrivals per update, no cancellation, restart of nodes staler than tau(t).

    ``abs-mode = "adaptive"`` (default) chooses K and tau from what the server measures; ``"clock"`` follows the
    open-loop schedules of ``k-double-every`` and ``staleness-bound`` (the module docstring has both).
    """

    name = "abs"
    search_space = {"lr": LR, "k": K_RANGE, "abs-straggler-factor": LogUniform(1.5, 10.0),
                    "abs-tau-factor": LogUniform(1.0, 4.0), "abs-staleness-quantile": Uniform(0.5, 1.0),
                    "abs-spare-done": Uniform(0.0, 1.0), "abs-window": IntRange(2, 32, log=True)}
    hyperparameters = {
        "abs-mode": Key("adaptive", choices=ABS_MODES,
                        help="adaptive: K and tau from measured task durations, training loss and staleness; "
                             "clock: K doubles every k-double-every s, tau = staleness-bound * k / K"),
        "abs-straggler-factor": Key(3.0, lo=1.0, hi=1e6, help="q: a node whose task duration exceeds q x the "
                                    "fleet median is a persistent straggler, never waited for (adaptive)"),
        "abs-tau-factor": Key(1.5, lo=1.0, hi=1e3, help="c: tau = ceil(c * max(N_eff / K, staleness quantile)) "
                              "(adaptive)"),
        "abs-staleness-quantile": Key(0.9, lo=0.0, hi=1.0, help="p: the quantile of observed staleness that "
                                      "tau covers (adaptive)"),
        "abs-spare-done": Key(0.5, lo=0.0, hi=1.0, help="phi: a task overtaken by tau that is this share done "
                              "finishes, down-weighted by tau / staleness, instead of restarting (adaptive)"),
        "abs-window": Key(8, lo=1, hi=10_000, help="W: task durations kept per node (adaptive)"),
    }
    distinct = True
    adaptive = True
    bounded = True

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        self.closed_loop = self.hyperparameter("abs-mode") == "adaptive"
        self.window = int(self.hyperparameter("abs-window"))
        self.sent: dict[int, float] = {}                 # node -> dispatch time of its current (or last) task
        self.abandoned: set[int] = set()                 # nodes whose task was restarted, not yet free again
        self.durations: dict[int, deque[float]] = {}     # node -> its last W task durations
        self.medians: dict[int, float] = {}              # node -> median of those
        self.stale: deque[tuple[int, int]] = deque(maxlen=self.window * max(len(self.nodes), 2))  # (node, s)
        self.losses: deque[float] = deque(maxlen=max(cfg.k, len(self.nodes), 1))
        self.loss0: float | None = None
        self.seen_loss: bool | None = None               # None before the first arrival
        self.weight_of: dict[int, float] = {}            # seq -> weight of a down-weighted pending arrival

    @classmethod
    def aggregation_set(cls, cfg: RunConfig) -> int | None:
        """K starts at ``k`` (the adaptive mode goes below it only when stragglers leave fewer nodes)."""
        return cfg.k

    # ----------------------------------------------------------------------------------------- measurements
    def task_for(self, node: int) -> Task | None:
        """As k-async; the adaptive mode also notes when the node's task starts (and how long an abandoned took)."""
        task = super().task_for(node)
        if task is not None and self.closed_loop:
            now = self.view.now
            if node in self.abandoned and node in self.sent:
                self._sample(node, now - self.sent[node])
            self.abandoned.discard(node)
            self.sent[node] = now
        return task

    def _sample(self, node: int, duration: float) -> None:
        d = self.durations.setdefault(node, deque(maxlen=self.window))
        d.append(max(duration, 0.0))
        self.medians[node] = statistics.median(d)

    def _fleet(self) -> tuple[float | None, dict[int, float], set[int]]:
        """M, the estimate m_i of every node seen, and the persistent stragglers S."""
        median = statistics.median(self.medians.values()) if self.medians else None
        now = self.view.now
        est = dict(self.medians)
        for node in self.in_flight:
            if node in self.sent:
                est[node] = max(est.get(node, 0.0), now - self.sent[node])
        if median is None or median <= 0:
            return median, est, set()
        q = float(self.hyperparameter("abs-straggler-factor"))
        return median, est, {n for n, m in est.items() if m > q * median}

    def _k_parts(self) -> tuple[int, int, int, int]:
        """K, N_eff, K_time and K_loss (the module docstring's equations)."""
        median, est, slow = self._fleet()
        n = self.num_nodes
        n_eff = max(1, n - len(slow))
        if median is None:
            k_time = n_eff
        else:
            known = sorted(est.get(node, median) for node in self._online() if node not in slow)[:n_eff]
            known = sorted(known + [median] * (n_eff - len(known)))  # nodes not seen yet: the fleet median
            k_time = min(range(1, n_eff + 1), key=lambda k: (known[k - 1] / k, -k))
        k0 = min(self.cfg.k, n)
        k_loss = k0
        if self.loss0 is not None and self.losses:
            mean = statistics.fmean(self.losses)
            k_loss = math.ceil(k0 * math.sqrt(self.loss0 / mean)) if mean > 0 else n
        # arrivals, none with a training loss: the arrival times alone
        cap = min(n_eff, k_time) if self.seen_loss is False else min(n_eff, k_time, max(k0, k_loss))
        k = max(1, cap)
        return k, n_eff, k_time, k_loss

    def _online(self) -> list[int]:
        """The nodes the strategy knows of: the fleet it started with and any seen since."""
        return sorted(set(self.nodes) | set(self.sent))

    def k_now(self) -> int:
        """K now: the clock schedule, or the closed-loop rule."""
        if not self.closed_loop:
            return super().k_now()
        return self._k_parts()[0]

    def bound_now(self) -> int:
        """Tau now: the clock schedule, or ``ceil(c * max(N_eff / K, s_p))``."""
        if not self.closed_loop:
            return super().bound_now()
        k, n_eff, _, _ = self._k_parts()
        _, _, slow = self._fleet()
        seen = sorted(s for node, s in self.stale if node not in slow)
        p = float(self.hyperparameter("abs-staleness-quantile"))
        s_p = seen[min(len(seen) - 1, math.ceil(p * len(seen)) - 1)] if seen else 0
        return max(1, math.ceil(float(self.hyperparameter("abs-tau-factor")) * max(n_eff / k, s_p)))

    # ---------------------------------------------------------------------------------------------- policy
    def apply(self, update: Update) -> Verdict:
        """Measure the arrival; then the clock mode's rule, or the adaptive one (down-weight within 2 tau)."""
        if not self.closed_loop:
            return super().apply(update)
        self.now = max(self.now, update.time)
        if update.node in self.sent:
            self._sample(update.node, update.time - self.sent[update.node])
        loss = update.metrics.get(TRAIN_LOSS)
        if isinstance(loss, int | float) and math.isfinite(loss):
            self.seen_loss = True
            self.losses.append(float(loss))
            if self.loss0 is None and len(self.losses) == self.losses.maxlen:
                self.loss0 = statistics.fmean(self.losses)
        elif self.seen_loss is None:
            self.seen_loss = False
        tau = self.bound_now()  # the bound in force at its arrival, before its own staleness counts
        self.stale.append((update.node, update.staleness))
        if update.staleness > 2 * tau:
            return Verdict(Status.DROPPED, f"staleness {update.staleness} > 2 tau {2 * tau}",
                           restart=self._over_bound())
        reason = ""
        if update.staleness > tau:
            self.weight_of[update.seq] = tau / update.staleness
            reason = f"staleness {update.staleness} > tau {tau}: weight {tau / update.staleness:.3g}"
        self.pending.append(update)
        k = self.k_now()
        if len(self.pending) < k:
            note = f"{len(self.pending)}/{k} arrivals"
            return Verdict(Status.BUFFERED, f"{reason}; {note}" if reason else note, restart=self._over_bound())
        verdict = self._flush()
        return Verdict(verdict.status, reason, verdict.applied, verdict.restart) if reason else verdict

    def _flush(self) -> Verdict:
        if not self.closed_loop:
            return super()._flush()
        n = len(self.pending)
        mean = self.aggregate([(self.weight_of.pop(u.seq, 1.0) / n, u.delta) for u in self.pending])
        applied = tuple(u.seq for u in self.pending)
        self.pending = []
        self._publish(step(self.weights, mean, self.cfg.server_lr))
        return Verdict(Status.APPLIED, applied=applied, restart=self.to_restart())

    def _over_bound(self) -> tuple[int, ...]:
        """Tasks in flight staler than tau; the adaptive mode spares those mostly done (within 2 tau)."""
        if not self.closed_loop:
            return super()._over_bound()
        tau = self.bound_now()
        median, _, _ = self._fleet()
        phi = float(self.hyperparameter("abs-spare-done"))
        now = self.view.now
        out = []
        for node, v in self.in_flight.items():
            gap = self.version - v
            if gap <= tau:
                continue
            typical = self.medians.get(node, median)
            done = (now - self.sent[node]) / typical if typical and node in self.sent else 0.0
            if gap <= 2 * tau and done >= phi:
                continue
            out.append(node)
        self.abandoned.update(out)
        return tuple(sorted(out))

    def state_summary(self) -> dict[str, float]:
        """K and tau; the adaptive mode adds N_eff, K_time, K_loss and the stragglers it does not wait for."""
        out = super().state_summary()
        if self.closed_loop:
            k, n_eff, k_time, k_loss = self._k_parts()
            out.update({"n-eff": float(n_eff), "k-time": float(k_time), "k-loss": float(k_loss),
                        "stragglers": float(self.num_nodes - n_eff)})
        return out


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
