"""The contract between the engine and a strategy.

The engine (``server_app/engine.py``) owns everything that is mechanism: dispatching, the clock, ordering,
time-outs, failures, evaluation and metrics. A strategy is policy only, and pure: no I/O, no clock reads, no
Flower types. It answers two questions:

- ``task_for(node)``: a node is free; what should it do (or should it wait)?
- ``apply(update)`` / ``fail(node)``: a result (or a failure) arrived, in clock order; what happens to the model?

Weights are lists of numpy arrays in the model's ``state_dict`` order. A strategy never mutates an array it has
published as ``weights``: each new version is a new list, because the engine keeps older versions alive while
tasks computed on them are in flight (clients send deltas relative to the version they were given).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import ClassVar, Protocol

import numpy as np
from flwr.app import Array

from strategies.client import ClientJob, Weights
from strategies.codecs import all_finite
from strategies.config import ConfigValue, Key, RunConfig
from strategies.robust import Aggregation, Collector, Parts
from strategies.taskkeys import TaskConfig
from strategies.tuning import DEFAULT_SPACE, Param


class Status(StrEnum):
    """The fate of a task, as the store's ``updates.status`` column records it (DESIGN.md).

    A strategy's ``Verdict`` uses the first three; the engine decides the other three. A ``StrEnum``, so a
    status compares equal to its string and is stored as one.
    """

    APPLIED = "applied"      # went into the model (at once, or when its buffer was flushed)
    BUFFERED = "buffered"    # held by the strategy; may become applied later
    DROPPED = "dropped"      # the strategy chose not to use it
    REJECTED = "rejected"    # the engine refused the reply (malformed, oversized, outlier)
    FAILED = "failed"        # no usable reply: dropout, lost node, client error, time-out
    RESTARTED = "restarted"  # abandoned by the strategy while in flight (k-sync, ABS)


VERDICT_STATUSES = (Status.APPLIED, Status.BUFFERED, Status.DROPPED)


class EngineView(Protocol):
    """What a strategy may read of the engine that runs it: the clock, the tasks in flight, the fleet's size.

    Read-only by construction: the engine hands a strategy this view when it builds it and never writes into
    the strategy afterwards; everything the strategy learns arrives through ``task_for``/``apply``/``fail``.
    """

    @property
    def now(self) -> float:
        """Seconds on the run's clock."""
        ...

    @property
    def in_flight(self) -> Mapping[int, int]:
        """Node -> model version its task in flight started from."""
        ...

    @property
    def fleet_size(self) -> int:
        """Nodes that can take work now (on the wall clock, those online)."""
        ...


@dataclass
class DetachedView:
    """The view of a strategy that runs outside an engine (unit tests): whatever the test sets."""

    now: float = 0.0
    in_flight: dict[int, int] = field(default_factory=dict)
    fleet_size: int = 0


@dataclass(frozen=True)
class Exchange:
    """Node-to-node traffic of a decentralized task, charged instead of the star's download and upload.

    Decentralized algorithms (``strategies/gossip.py``) move models between nodes, not to and from a server.
    The engine then times the task as ``compute + rounds * (slowest link load + slowest pair latency)``: in each
    round every ``(src, dst, nbytes)`` transfer runs at once, a node's uplink carries the sum of what it sends
    and its downlink the sum of what it receives, and a transfer between two nodes pays both one-way latencies.
    ``bytes_up``/``bytes_down`` are what this task's row is charged: the bytes its exchange put on uplinks and
    on downlinks of the fleet (a node-to-node transfer crosses one of each). ``peer`` is the node it averaged
    with, when it is one node. ``holds``: the node whose model the exchange locks for its duration (AD-PSGD's
    passive peer), and the links of both its nodes: the virtual clock serialises the exchanges sharing a node
    (``server_app/peerlocks.py``).
    ``phases``: exchanges run one after the other (their time is the sum; this exchange's own transfers come
    first); ``options``: alternative plans of the same collective, of which the clock charges the fastest
    (``strategies/collectives.py``). Node ids are the engine's (Flower's) ids.
    """

    transfers: tuple[tuple[int, int, int], ...] = ()
    rounds: int = 1
    bytes_up: int = 0
    bytes_down: int = 0
    peer: int | None = None
    holds: int | None = None
    phases: tuple[Exchange, ...] = ()
    options: tuple[Exchange, ...] = ()


@dataclass(frozen=True, eq=False)
class Encoded:
    """A payload a codec has already encoded (``strategies.codecs``): one encoded array per tensor, in model order.

    The engine sends the arrays as they are; the node decodes them (any codec) like any received model.
    """

    arrays: tuple[Array, ...]


Payload = Weights | Encoded


@dataclass(frozen=True)
class Task:
    """What a free node is asked to do: train on model ``version`` with these extra settings.

    ``payload``, when given, is sent in place of the model (e.g. OLCO3's delayed average of compressed
    contributions): numpy arrays in model order (sent uncompressed), or arrays a codec has already ``Encoded``;
    the empty list sends nothing. A strategy hands the same object to every task that sends the same payload (the
    engine serializes it once for consecutive tasks, recognising it by identity) and never mutates it. ``base`` is
    the model that payload stands for when it is the node's own model (gossip: each node has its own): the reply's
    delta is taken against it instead of against ``version``. ``exchange`` replaces the star's link times and bytes
    with node-to-node traffic (see ``Exchange``).
    """

    version: int
    config: TaskConfig = field(default_factory=dict)
    payload: Payload | None = None
    base: Weights | None = None
    exchange: Exchange | None = None


@dataclass(frozen=True)
class Update:
    """A client's result, validated by the engine, handed to the strategy in clock order.

    A client sends either its delta (``base - trained``, what our ClientApp sends) or its trained model (what a
    ClientApp written for Flower's FedAvg sends). ``delta`` and ``model`` give either form; the one that was not
    sent is derived once, on first use, so a strategy that needs only what was sent pays for no extra pass over
    the weights. ``staleness`` is the number of versions published since ``base_version`` was sent.
    """

    seq: int
    node: int
    base_version: int
    staleness: int
    sent: Weights
    base: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    sent_is_delta: bool = True
    time: float = 0.0  # seconds on the run's clock when the result is applied

    @cached_property
    def delta(self) -> Weights:
        """``base - trained``: a descent direction."""
        if self.sent_is_delta:
            return self.sent
        return [np.subtract(b, x, dtype=b.dtype) for b, x in zip(self.base, self.sent, strict=True)]

    @cached_property
    def model(self) -> Weights:
        """The client's trained weights."""
        if not self.sent_is_delta:
            return self.sent
        return [np.subtract(b, d, dtype=b.dtype) for b, d in zip(self.base, self.sent, strict=True)]


@dataclass(frozen=True)
class Verdict:
    """What the strategy did with an update.

    ``status`` is the fate of this update; ``applied`` lists the seqs (this one and/or earlier buffered ones)
    that went into the model as a consequence, so the engine can mark them ``applied`` in the store.
    ``restart`` lists nodes whose task in flight is abandoned (k-sync's cancellation, ABS's restart): the engine
    records it as ``restarted`` with the computation it wasted and drops it from ``in_flight``; the node gets fresh
    work when that task has ended (``restart = "finish"``, as Flower runs it) or at once (``"interrupt"``).
    """

    status: Status
    reason: str = ""
    applied: tuple[int, ...] = ()
    restart: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        """Accept the plain strings too (``Verdict("applied")``), and refuse what a strategy may not decide."""
        status = Status(self.status)
        if status not in VERDICT_STATUSES:
            raise ValueError(f"a strategy's verdict is one of {[str(s) for s in VERDICT_STATUSES]}, not {status!r}")
        object.__setattr__(self, "status", status)


class Strategy(ABC):
    """Server half of an algorithm. Subclass, set ``name``, implement ``apply``, decorate with ``@register``.

    Built once per run with the run's settings, the initial model, the fleet (node ids in fleet order: the
    order of partition ids, so a node's index is its place on a topology) and a read-only ``EngineView``.
    """

    name: ClassVar[str] = ""
    keeps_node_state: ClassVar[bool] = False  # its client half keeps state on the node across tasks
    elastic: ClassVar[bool] = False  # works on a fleet that changes during a run (server_app/membership.py)
    # Its nodes compute the next task while the last one's communication is under way (AD-PSGD's communication
    # thread, the OLCO3 family's upload behind the next period): the virtual clock hides that communication behind
    # the next computation (server_app/overlap.py), unless the run config says ``overlap = false``.
    overlap: ClassVar[bool] = False
    # What the comparison harness may tune, and over which ranges (strategies/tuning.py): the learning rate here.
    search_space: ClassVar[Mapping[str, Param]] = DEFAULT_SPACE
    # Run-config keys of its own, declared beside its code (strategies/config.py ``Key``): the run config accepts
    # and checks them when this strategy runs, and the strategy reads ``self.cfg["key"]``; tunable like any key.
    hyperparameters: ClassVar[Mapping[str, Key]] = {}

    def __init__(self, cfg: RunConfig, weights: Weights, fleet: Sequence[int], view: EngineView | None = None) -> None:
        self.cfg = cfg
        self.weights: Weights = weights
        self.version = 0
        self.nodes: tuple[int, ...] = tuple(fleet)
        self.view: EngineView = view if view is not None else DetachedView(fleet_size=len(self.nodes))
        self.aggregation = Aggregation(cfg)

    def hyperparameter(self, key: str) -> ConfigValue:
        """One of its own ``hyperparameters``: the run's value, or the declared default.

        A run's config always holds the value (``strategies.parse_config`` fills in defaults); a strategy built
        outside a run, on a bare ``RunConfig()`` (a unit test), gets the default.
        """
        return self.cfg.extra[key] if key in self.cfg.extra else self.hyperparameters[key].default

    def aggregate(self, parts: Parts) -> Weights:
        """``sum_i c_i x_i`` of a set of client contributions under the run's ``aggregation`` rule.

        Every strategy combines a set of updates through this (or ``collector``), so robust aggregation
        (``strategies/robust.py``) composes with all of them; under ``mean`` it is the plain weighted sum.
        """
        return self.aggregation.combine(parts)

    def collector(self) -> Collector:
        """A buffer that sums contributions as they arrive (``mean``) or keeps them for a robust rule."""
        return Collector(self.aggregation, self.weights)

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        """Refuse, with a ``ConfigError`` naming the key, run-config values this strategy cannot run with.

        Called before anything runs (``strategies.check_implemented``, which the ServerApp and ``simulate`` call).
        Default: every value the run config accepts is fine.
        """
        return None

    @classmethod
    def aggregation_set(cls, cfg: RunConfig) -> int | None:
        """How many updates one aggregation combines (None: as many as the fleet, or it varies).

        ``strategies.check_implemented`` refuses a robust ``aggregation`` that cannot act on sets this small.
        """
        return None

    @property
    def num_nodes(self) -> int:
        """Nodes the policy counts: those online for an elastic strategy, else the fleet it started with."""
        return self.view.fleet_size if self.elastic else len(self.nodes)

    @property
    def in_flight(self) -> Mapping[int, int]:
        """Node -> version its task in flight started from (the engine's, read-only)."""
        return self.view.in_flight

    def task_for(self, node: int) -> Task | None:
        """A node is free: give it the newest model (asynchronous default). ``None`` makes it wait."""
        return Task(self.version)

    @abstractmethod
    def apply(self, update: Update) -> Verdict:
        """Incorporate (or buffer, or drop) one client update."""

    def fail(self, node: int, base_version: int) -> Verdict:
        """A task on ``node`` failed (dropout, lost node, client error, rejected update). Default: nothing."""
        return Verdict(Status.DROPPED)

    @staticmethod
    def client(job: ClientJob) -> tuple[list[Array], dict[str, float]]:
        """Client half: local steps from the received model; upload the delta ``received - trained``, compressed.

        ``job.state`` persists on the node across tasks of a run (Flower's ``context.state``): the place for
        error-feedback residuals and in-flight queues of algorithms that need them.
        """
        trained, metrics = job.train(job.received)
        arrays, _ = job.compress([w - t for w, t in zip(job.received, trained, strict=True)])
        return arrays, metrics

    def state_summary(self) -> dict[str, float]:
        """Numbers worth logging at evaluation time (buffer fill, K, bound...)."""
        return {}

    def node_models(self) -> Sequence[Weights]:
        """The models the nodes hold, in fleet order, when each node has its own (decentralized); () otherwise.

        Every evaluation scores a sample of them beside the published model (``server_app/localscores.py``).
        """
        return ()

    @classmethod
    def client_half_reason(cls, cfg: RunConfig) -> str:
        """Why this run needs staleflower's ClientApp on its nodes ("" when any Flower ClientApp will do).

        A stock Flower ClientApp (``flwr new``'s, Flower's quickstarts) trains the model it is sent and replies
        with the trained weights; the server derives the delta. That serves every strategy whose client half is
        ``Strategy.client`` with no codec. A strategy with a client half of its own, or a codec, needs ours: the
        ServerApp refuses such a run up front on a fleet of stock ClientApps (``server_app.app``).
        """
        own = next((c for c in cls.__mro__ if "client" in vars(c)), Strategy)
        if own is not Strategy:
            return f"strategy {cls.name or cls.__qualname__!r} runs its own client half ({own.__qualname__}.client)"
        if cfg.codec != "none":
            return f"codec = {cfg.codec!r} is applied by staleflower's ClientApp before it uploads"
        if cfg.codec_downlink != "none":
            return f"codec-downlink = {cfg.codec_downlink!r} sends models only staleflower's ClientApp decodes"
        if cfg.local_executor != "sequential":
            return f"local-executor = {cfg.local_executor!r} is staleflower's ClientApp's multi-thread trainer"
        return ""

    @classmethod
    def node_state_reason(cls, cfg: RunConfig) -> str:
        """Why this run keeps state on its nodes across tasks ("" if it does not): such state is not checkpointed."""
        if cls.keeps_node_state:
            return f"strategy {cls.name!r} keeps its in-flight queues on the nodes"
        if cfg.error_feedback and cfg.codec != "none":
            return "error-feedback residuals live on the nodes"
        if cfg.codec == "powersgd":
            return "PowerSGD's warm-start matrices live on the nodes"
        if cfg.codec_downlink != "none":
            return "codec-downlink keeps each node's model copy on the node"
        return ""

    def _publish(self, weights: Weights) -> None:
        """Install a new model version, refused with ``ModelNotFinite`` if any entry is NaN or Inf.

        Every strategy's updates reach the global model here, so this one check covers them all: a model that
        overflowed (``server-lr = 1e300``, a diverging run) would otherwise be sent to every node, evaluated
        as NaN and the run end ``completed``. The check is one pass of ``all_finite`` over the new arrays; the
        version before stays published, so the last checkpoint is still the last good model.
        """
        if not all(all_finite(w) for w in weights):
            raise ModelNotFinite(f"global model is not finite after update {self.version + 1} (version "
                                 f"{self.version} kept): lower lr or server-lr, or screen updates (update-filter)")
        self.weights = weights
        self.version += 1


class ModelNotFinite(RuntimeError):
    """A strategy's new global model has a NaN or Inf entry: the run cannot go on, and ends ``failed``."""


def step(weights: Sequence[np.ndarray], direction: Sequence[np.ndarray], scale: float) -> Weights:
    """``weights - scale * direction`` as new arrays in the weights' dtypes."""
    return [(w - scale * d).astype(w.dtype, copy=False) for w, d in zip(weights, direction, strict=True)]
