"""OLCO3 and the delay-tolerant local-SGD family: the average of everyone's progress arrives D periods late.

OLCO3 (Xu, Yan, Gao, Huang; OpenReview E_U8Zvx7zrf) overlaps local computation with compressed communication.
The paper's algorithm box was not available; the rule here is **our reconstruction** from its abstract
(``docs/algorithms.md``, tagged [design]), built to carry the abstract's two corrections.
Per node i and period t, with p local steps, compressor C, error memory e and delay D:

    delta_i^t = x_i^{t,0} - x_i^{t,p}                        local progress of the period
    c_i^t = C(delta_i^t + e_i^t),  e_i^{t+1} = delta_i^t + e_i^t - c_i^t          (error feedback)
    xbar^{t+1} = xbar^t - mean_j c_j^{t-D}                    the average arrives D periods late (c^s = 0, s < 0)
    x_i^{t+1,0} = xbar^{t+1} - sum_{s=t-D+1..t} c_i^s - e_i^{t+1}

The last line is the node's new starting point. ``- sum c_i^s`` is *staleness compensation* (the node adds back
its own contributions still in flight, so progress made during the delay is not lost) and ``- e_i^{t+1}`` is
*compression compensation* (it adds back what the compressor has not sent yet). Without error feedback (or
without a codec) e = 0. From x_i^{0,0} = xbar^0, empty queues and e = 0, the *virtual-sequence identity*

    mean_i x_i^{t,0} = xbar^t - mean_i(sum_{s=t-D..t-1} c_i^s + e_i^t)          (in-flight c_i + e_i)

makes the mean of the local models follow synchronous local SGD exactly, ``mean_i x_i^{t+1,0} = mean_i x_i^{t,0} -
mean_i delta_i^t`` (``tests/test_olco3.py`` checks both forms every period).

**Two-way compression and the server's residual.** With ``codec-downlink`` the server compresses each period's
average with its own error memory e_s (a ``strategies.links.LinkCompressor`` in update mode, one link to every
node): it sends chat^s = C(cbar^s + e_s) and keeps e_s <- cbar^s + e_s - chat^s, where cbar^s = mean_j c_j^s.
Since sum_s chat^s = sum_s cbar^s - e_s, the nodes hold xhat^t = xbar^t + e_s^(t-D) (the model the server
publishes and evaluates is xhat too), where e_s^(k) is the server's memory after sending the averages of periods
0..k-1 (0 for k <= 0), so that

    mean_i x_i^{t,0} = xbar^t - mean_i(in-flight c_i + e_i^t) + e_s^(t-D)

**The nodes do not compensate for e_s, by design.** e_s is the difference between the exact mean of everyone's
contributions and what was broadcast; a node knows what it received and its own contributions, never the others',
so it cannot compute e_s, and being sent it would cost one dense model per period: the bytes two-way compression
is there to save. The identity therefore holds for the *server's* virtual sequence, ``mean_i x_i^{t,0} -
e_s^(t-D)``, which follows synchronous local SGD exactly; the nodes' own mean is off from it by the server's
residual, bounded like any error-feedback memory and delivered with later averages. ``tests/test_olco3.py`` checks
that the identity, with codec-downlink, fails by exactly e_s^(t-D).

**Pipe-SGD** (Li et al., NeurIPS 2018; ``pipe-sgd``) communicates every gradient step: a period is one SGD step,
so ``local-steps`` must be 1 (any other value is refused with a ``ConfigError``: the virtual clock charges
``local-steps`` steps per task, so quietly running one step would misreport time; a period of several local steps
restarted from the stale average is ``naive-overlap``). ``momentum`` > 0 is refused too: a node's optimizer lives
for one task, whose single step is plain SGD whatever the momentum. Every node computes on the same model w^t:

    delta_i^t = lr * g_i(w^t)                                one SGD step on node i's batch, from w^t
    c_i^t = C(delta_i^t + e_i^t),  e_i^{t+1} = delta_i^t + e_i^t - c_i^t          (error feedback, optional)
    w^{t+1} = w^t - mean_i c_i^{t-D}                          (c^s = 0 for s < 0)

Without a codec, ``w^{t+1} = w^t - lr * mean_i g_i(w^{t-D})``: the gradients of step t are averaged while steps
t+1..t+D compute, and applied D steps later. D = 0 is synchronous SGD (EF-SGD with a codec and error feedback),
D = 1 the paper's pipeline of width 2. There is no compensation: every node starts each step from w^t, which is the
xbar of the family's server half. The paper's own compression (truncation, scalar quantization) has no error
feedback (``codec = "fp16"`` or ``"qsgd"``, ``error-feedback = false``); a biased codec with ``error-feedback =
true`` is the constructed Pipe-EF-SGD baseline of the notes ([design]).

The family, one server half and one client half with a policy each:

| strategy        | delay | start of a period                          | what it is                                |
|-----------------|-------|--------------------------------------------|-------------------------------------------|
| olco3           | D     | xbar - in-flight own c - e                 | both compensations                        |
| olco3-          | D     | xbar - in-flight own c                     | ablation: staleness compensation only,    |
| staleness-only  |       |                                            | the error memory e is not added back      |
| naive-overlap   | D     | xbar (the stale average)                   | no compensation: D periods of work lost   |
| pipe-sgd        | D     | xbar (= w^t; a period is one SGD step)     | Pipe-SGD (Li et al. 2018): D-stale        |
|                 |       |                                            | gradient averaging, optional EF codec     |
| cocod-sgd       | 1     | avg of last period's start models - own    | CoCoD-SGD (Shen et al. 2019), its own     |
|                 |       | last progress                              | rule: the server sends the stale model    |
| overlap-local-  | 1     | own last model pulled toward a stale       | Overlap-Local-SGD (Wang et al. 2020),     |
| sgd             |       | anchor: x - mixing (x - z)                 | our server-relayed adaptation (below)     |
| local-sgd       | 0     | the fresh average (blocking)               | periodic averaging (FedAvg with equal     |
|                 |       |                                            | weights, every node every period)         |

With D = 0 and no codec OLCO3 is local SGD; with D = 1 and no codec it is CoCoD-SGD (both tested). Every node
takes part in every period (the classic data-centre setting of these papers): a node may run at most D periods
ahead of the last complete average, and a failed or rejected task is redone for the same period. The server
sends each node the averages it has not seen (one per period, compressed with ``codec-downlink`` and a
server-side error memory when set: two-way compression, see above); the node keeps its copy of xbar, its in-flight
queue and its error memory in Flower's ``context.state``, one snapshot per period so that a redone period starts
from the same state. The global model the server evaluates is xbar (xhat with ``codec-downlink``) with every
complete average applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from flwr.app import Array

from strategies.base import Encoded, EngineView, Payload, Status, Strategy, Task, Update, Verdict, step
from strategies.client import ClientJob, Weights
from strategies.codecs import CodecSpec
from strategies.config import ConfigError, RunConfig
from strategies.fedavg import FedAvg
from strategies.links import LinkCompressor
from strategies.registry import register
from strategies.taskkeys import DELAY, MIXING, PAYLOAD, ROUND, TaskConfig
from strategies.tuning import LR, Uniform

EVERY_NODE = "every node"  # the one link of the averages' broadcast: every node gets the same messages


class DelayedAveraging(Strategy):
    """Server half of OLCO3, naive overlap and Pipe-SGD: periods, a D-period pipeline, averages of contributions."""

    compensation: ClassVar[str] = "both"  # both | staleness | none
    keeps_node_state = True
    overlap = True  # a node starts its next period while its last update uploads (the point of the delay D)
    search_space = {"lr": LR}

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        self.check_config(cfg)
        super().__init__(cfg, weights, fleet, view)
        self.delay = self.period_delay()
        self.next_round: dict[int, int] = {}
        self.running: dict[int, int] = {}               # node -> period of its task in flight
        self.contrib: dict[int, dict[int, Update]] = {}  # period -> node -> update
        self.completed = 0                              # periods whose average is known
        self.sent: dict[int, Payload] = {}              # period -> its average as sent to nodes
        self.start: Weights = self.weights              # period 0's payload: the initial model
        down = CodecSpec(self.cfg.codec_downlink, self.cfg.codec_ratio, self.cfg.codec_levels, self.cfg.codec_rank)
        self.down: LinkCompressor[str] | None = LinkCompressor(down) if down.name != "none" else None

    def period_delay(self) -> int:
        """D: the run's ``delay``; the engine has turned ``"auto"`` into a number from the fleet by now."""
        if isinstance(self.cfg.delay, str):
            raise ConfigError(f"delay = {self.cfg.delay!r} is worked out from the fleet's profiles by the engine "
                              "(server_app/autodelay.py); a strategy built outside an engine needs a number")
        return self.cfg.delay

    def task_for(self, node: int) -> Task | None:
        """Next period for ``node``, unless it would run more than D periods ahead of the last complete average."""
        r = self.next_round.get(node, 0)
        if node in self.running or r > self.completed + self.delay:
            return None
        self.running[node] = r
        kind, payload = self.payload_for(r)
        config: TaskConfig = {ROUND: r, DELAY: self.delay, PAYLOAD: kind, MIXING: self.cfg.mixing}
        return Task(self.version, config, payload)

    def payload_for(self, r: int) -> tuple[str, Payload]:
        """Period 0: the initial model; later: the average of period r - 1 - D (none yet while r <= D)."""
        if r == 0:
            return "model", self.start
        a = r - 1 - self.delay
        return ("average", self.sent[a]) if a >= 0 else ("none", [])

    def apply(self, update: Update) -> Verdict:
        """Collect a contribution; close every period whose contributions are all in, in order."""
        r = self.running.pop(update.node)
        self.contrib.setdefault(r, {})[update.node] = update
        self.next_round[update.node] = r + 1
        applied: list[int] = []
        while len(self.contrib.get(self.completed, {})) >= self.num_nodes:
            applied += self._close(self.completed)
        if update.seq in applied:
            return Verdict(Status.APPLIED, applied=tuple(applied))
        return Verdict(Status.BUFFERED, f"period {r}: {len(self.contrib.get(r, {}))}/{self.num_nodes} in",
                       tuple(applied))

    def fail(self, node: int, base_version: int) -> Verdict:
        """The period is redone by the same node (every node takes part in every period)."""
        self.running.pop(node, None)
        return Verdict(Status.DROPPED)

    def _close(self, r: int) -> list[int]:
        updates = self.contrib.pop(r)
        mean = self.aggregate([(1.0 / len(updates), u.sent) for u in updates.values()])
        if self.down is None:
            self.sent[r] = applied_mean = mean
        else:  # two-way compression: the server compresses the average too, with its own error memory
            arrays, applied_mean = self.down.send_update(EVERY_NODE, mean, seed=r * 1000)
            self.sent[r] = Encoded(tuple(arrays))
        self._publish(step(self.weights, applied_mean, 1.0))
        self.completed = r + 1
        oldest_needed = min(self.next_round.get(n, 0) for n in self.next_round) - 1 - self.delay
        for old in [k for k in self.sent if k < oldest_needed]:
            del self.sent[old]
        return [u.seq for u in updates.values()]

    def state_summary(self) -> dict[str, float]:
        """Complete periods, how far the fastest node runs ahead, and D (chosen by the engine with ``"auto"``)."""
        ahead = max(self.next_round.values(), default=0) - self.completed
        return {"periods": float(self.completed), "ahead": float(ahead), "delay": float(self.delay)}

    # ------------------------------------------------------------------------------------------- client half
    @classmethod
    def client(cls, job: ClientJob) -> tuple[list[Array], dict[str, float]]:
        """One period on the node: apply the new average, start with the policy's compensations, train, send C."""
        r, d = int(job.task[ROUND]), int(job.task[DELAY])
        queue: dict[int, Weights]
        if job.task[PAYLOAD] == "model":
            xbar, queue = job.received, {}
        else:
            xbar, queue = _load(job, r - 1, d)
            if job.task[PAYLOAD] == "average":
                xbar = [x - c for x, c in zip(xbar, job.received, strict=True)]
                queue.pop(r - 1 - d, None)
        start = cls.start_point(xbar, list(queue.values()), _residual(job, r - 1))
        trained, metrics = job.train(start)
        arrays, sent = job.compress([s - t for s, t in zip(start, trained, strict=True)],
                                    memory_from=_key(r - 1, "e"), memory_to=_key(r, "e"))
        queue[r] = sent
        _save(job, r, xbar, queue)
        return arrays, metrics

    @classmethod
    def start_point(cls, xbar: Weights, in_flight: list[Weights], residual: Weights | None) -> Weights:
        """Where a period starts: ``xbar`` minus what the policy compensates for."""
        start = [x.copy() for x in xbar]
        if cls.compensation in ("both", "staleness"):
            for c in in_flight:
                for s, ci in zip(start, c, strict=True):
                    s -= ci
        if cls.compensation == "both" and residual is not None:
            for s, e in zip(start, residual, strict=True):
                s -= e
        return start


@register
class OLCO3(DelayedAveraging):
    """OLCO3: staleness compensation and compression compensation (our reconstruction, see module docstring)."""

    name = "olco3"
    compensation = "both"


@register
class OLCO3StalenessOnly(DelayedAveraging):
    """OLCO3 ablation: staleness compensation only (in-flight own c added back, the error memory e not).

    What it ablates: OLCO3's *compression compensation*. A period starts from ``xbar^{t+1} - sum_{s=t-D+1..t}
    c_i^s`` where OLCO3 also subtracts ``e_i^{t+1}``; everything else (server half, queues, error feedback, what
    is uploaded) is OLCO3's, so the two differ exactly by ``e_i`` in every start point. Method (d) of the notes'
    OLCO3 experiment (section 7.2): compression with error feedback and staleness compensation, no compression
    compensation. The mean of the local models is then off the synchronous sequence by ``mean_i e_i``. With no
    codec, or without ``error-feedback``, e = 0 and it is olco3.
    """

    name = "olco3-staleness-only"
    compensation = "staleness"


@register
class NaiveOverlap(DelayedAveraging):
    """Overlap without compensation: every period restarts from the stale average."""

    name = "naive-overlap"
    compensation = "none"


@register
class PipeSGD(DelayedAveraging):
    """Pipe-SGD (Li et al., NeurIPS 2018): one SGD step per period, its average applied D steps later; optional EF.

    ``w^{t+1} = w^t - mean_i c_i^{t-D}`` with ``c_i^t = C(lr g_i(w^t) + e_i^t)`` (module docstring): every node
    computes step t's gradient on the same w^t while the averages of steps t-D..t-1 are in flight. A period is one
    SGD step: ``local-steps`` other than 1 and ``momentum`` > 0 are refused (``check_config``).
    """

    name = "pipe-sgd"
    compensation = "none"

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Pipe-SGD communicates every step: one SGD step per period, no momentum (one step of a fresh optimizer)."""
        if cfg.local_steps != 1:
            raise ConfigError(f"strategy = 'pipe-sgd' communicates every SGD step: a period is one step, so set "
                              f"local-steps = 1 (got {cfg.local_steps}); several local steps restarted from the "
                              f"stale average is strategy = 'naive-overlap'")
        if cfg.momentum != 0:
            raise ConfigError(f"strategy = 'pipe-sgd' runs one SGD step per task with a fresh optimizer, where "
                              f"momentum has no effect: set momentum = 0 (got {cfg.momentum})")


@register
class CoCoDSGD(DelayedAveraging):
    """CoCoD-SGD (Shen et al., IJCAI 2019): ``x_i <- avg_j(x_j^{t,0}) + (x_i^{t,p} - x_i^{t,0})``, delay 1.

    Implemented from its own rule, independently of OLCO3's algebra: the server sends the average of last period's
    start models (which is xbar with every average but the newest), and the node subtracts its own last progress.
    """

    name = "cocod-sgd"

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        self.models: dict[int, Weights] = {0: self.start}  # period -> the model it starts from

    def period_delay(self) -> int:
        """CoCoD-SGD overlaps exactly one period."""
        return 1

    def payload_for(self, r: int) -> tuple[str, Payload]:
        """Period r >= 1 starts from avg_j x_j^{r-1,0}: the model after r - 1 complete averages."""
        return ("model", self.start) if r == 0 else ("stale-model", self.models[r - 1])

    def _close(self, r: int) -> list[int]:
        seqs = super()._close(r)
        self.models[r + 1] = self.weights
        for old in [k for k in self.models if k < min(self.next_round.values(), default=0) - 1]:
            del self.models[old]
        return seqs

    @classmethod
    def client(cls, job: ClientJob) -> tuple[list[Array], dict[str, float]]:
        """Start from the stale average minus own last progress; upload this period's progress."""
        r = int(job.task[ROUND])
        start = job.received
        if r > 0:
            last = job.state[_key(r - 1, "delta")]
            start = [m - dl for m, dl in zip(job.received, last, strict=True)]
        trained, metrics = job.train(start)
        arrays, sent = job.compress([s - t for s, t in zip(start, trained, strict=True)],
                                    memory_from=_key(r - 1, "e"), memory_to=_key(r, "e"))
        job.state[_key(r, "delta")] = sent
        _forget(job, r - 1)
        return arrays, metrics


@register
class OverlapLocalSGD(DelayedAveraging):
    """Overlap-Local-SGD (Wang, Liang, Joshi, ICASSP 2020): pull toward a stale anchor instead of averaging.

    At the end of its period a node pulls its model toward the anchor z, ``x <- x - alpha (x - z)`` with
    ``alpha = mixing``, and the next anchor is the average of the pulled models, computed while the next period
    runs. Our adaptation to a server-relayed setting: a node's pulled model reaches the server with its upload, so
    the anchor a node receives for period r is the average of the models that started period r - 1 (one period
    older than in the paper's all-reduce). Nodes upload ``z - x_pulled``, a delta against the anchor they got.
    """

    name = "overlap-local-sgd"
    search_space = {"lr": LR, "mixing": Uniform(0.05, 1.0)}  # mixing: the pull toward the anchor

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        super().__init__(cfg, weights, fleet, view)
        self.anchors: dict[int, Weights] = {0: self.start, 1: self.start}  # period -> its anchor

    def period_delay(self) -> int:
        """The anchor is one period stale."""
        return 1

    def payload_for(self, r: int) -> tuple[str, Payload]:
        """Period r's anchor: the average of the models that started period r - 1."""
        return ("model" if r == 0 else "anchor"), self.anchors[r]

    def _close(self, r: int) -> list[int]:
        updates = self.contrib.pop(r)
        mean = self.aggregate([(1.0 / len(updates), u.sent) for u in updates.values()])
        anchor = step(self.anchors[r], mean, 1.0)
        self.anchors[r + 2] = anchor
        self._publish(anchor)
        self.completed = r + 1
        for old in [k for k in self.anchors if k < min(self.next_round.values(), default=0)]:
            del self.anchors[old]
        return [u.seq for u in updates.values()]

    @classmethod
    def client(cls, job: ClientJob) -> tuple[list[Array], dict[str, float]]:
        """Train from the start this node computed last period, pull toward the anchor, upload anchor - pulled."""
        r, alpha = int(job.task[ROUND]), float(job.task[MIXING])
        anchor = job.received
        start = anchor if r == 0 else job.state[_key(r, "start")]
        trained, metrics = job.train(start)
        pulled = [x - alpha * (x - z) for x, z in zip(trained, anchor, strict=True)]
        arrays, _ = job.compress([z - x for z, x in zip(anchor, pulled, strict=True)],
                                 memory_from=_key(r - 1, "e"), memory_to=_key(r, "e"))
        job.state[_key(r + 1, "start")] = pulled
        _forget(job, r)
        return arrays, metrics


@register
class LocalSGDAveraging(FedAvg):
    """Local SGD / periodic averaging: every node, every period, blocking, equal weights: ``w <- mean_i x_i``."""

    name = "local-sgd"

    def round_size(self) -> int:
        """Every node, whatever ``concurrency`` says."""
        return self.num_nodes

    def apply(self, update: Update) -> Verdict:
        """Equal weights: the period average of the papers, not FedAvg's example weighting."""
        return super().apply(Update(update.seq, update.node, update.base_version, update.staleness, update.sent,
                                    update.base, 1, update.metrics, update.sent_is_delta))


# ---------------------------------------------------------------------------------------- per-period node state
def _key(r: int, what: str) -> str:
    return f"delayed-avg/{r}/{what}"


def _residual(job: ClientJob, r: int) -> Weights | None:
    return job.state.get(_key(r, "e")) if job.error_feedback else None


def _load(job: ClientJob, r: int, delay: int) -> tuple[Weights, dict[int, Weights]]:
    """The node's xbar and in-flight queue as they were at the end of period r."""
    xbar = job.state[_key(r, "xbar")]
    queue = {s: job.state[_key(r, f"c{s}")] for s in range(max(0, r - delay), r + 1) if _key(r, f"c{s}") in job.state}
    return xbar, queue


def _save(job: ClientJob, r: int, xbar: Weights, queue: dict[int, Weights]) -> None:
    """Keep the state of periods r and r - 1 only: enough to redo period r + 1 or r."""
    job.state[_key(r, "xbar")] = xbar
    for s, c in queue.items():
        job.state[_key(r, f"c{s}")] = c
    _forget(job, r - 1)


def _forget(job: ClientJob, keep_from: int) -> None:
    for key in list(job.state):
        if key.startswith("delayed-avg/") and int(key.split("/")[1]) < keep_from:
            del job.state[key]
