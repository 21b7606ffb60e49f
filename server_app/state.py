"""The engine's records: tasks in flight, published versions, totals, and the one ``EngineState`` that holds them.

Everything that decides the rest of a run lives in ``EngineState``, and nothing else does: a checkpoint
(``server_app/checkpoint.py``) pickles it whole and a resumed run continues from it. What belongs to one process
(the Grid, the store, message ids, replies in hand) stays out of it, in the engine and the mailbox.

``EngineState`` is also the ``EngineView`` a strategy reads (``strategies.base``): the clock, the tasks in flight
and the fleet's size, through read-only properties.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecordValues, Message, RecordDict

from server_app.contract import Contract
from server_app.peerlocks import PeerLocks
from server_app.profiles import NodeProfile, TaskTiming
from server_app.wire import to_record
from strategies.base import Exchange, Status, Strategy
from strategies.client import Weights

if TYPE_CHECKING:
    from server_app.downlink import DownlinkCompressor
    from server_app.intake import UpdateGuard
    from server_app.serverlink import ServerLink


@dataclass(frozen=True)
class ModelSpec:
    """Names, initial weights and training cost of the run's model (the same on server and clients).

    Plain numpy, so the engine and its tests need no torch: ``server_app.evaluation.model_spec`` builds one from
    the run's torch model.
    """

    names: list[str]
    initial: list[np.ndarray]
    flops_per_step: float

    @property
    def num_params(self) -> int:
        """Number of scalars in the model."""
        return int(sum(w.size for w in self.initial))


@dataclass
class Flight:
    """A task dispatched and not yet applied: what was sent, and what is known of its outcome so far."""

    seq: int
    node: int
    version: int
    dispatched_at: float
    bytes_down: int
    timing: TaskTiming | None = None     # drawn at dispatch on the virtual clock
    base: Weights | None = None          # the node's own model the task trains from (gossip); else the version's
    exchange: Exchange | None = None     # node-to-node traffic charged instead of the star's (gossip)
    content: RecordDict | None = None    # what was sent, to send it again after a resume
    failure: str = ""                    # set for failures known without a reply
    abandoned: tuple[float, int] | None = None  # restart = "finish": (clock time, staleness) when abandoned
    done_at: float | None = None         # completion fixed by the server's link (serverlink.py), once applied
    wait_s: float = 0.0                  # a gossip exchange's wait for its peer's model lock (peerlocks.py)
    # The outcome, filled in by the mailbox (this process only; a checkpoint leaves these out).
    reply: Message | None = None
    bytes_up: int = 0                    # real serialized size of the reply
    payload_up: int = 0                  # its content's size: what the virtual clock charges
    arrived_at: float | None = None      # seconds on the run's clock when the reply (or failure) was known


@dataclass
class Version:
    """A published model version kept alive while tasks computed on it are in flight."""

    weights: Weights
    names: list[str]
    users: int = 0
    _record: ArrayRecord | None = None

    @property
    def record(self) -> ArrayRecord:
        """The version as a record, serialized on first use (gossip tasks send each node's own model instead)."""
        if self._record is None:
            self._record = to_record(self.names, self.weights)
        return self._record


@dataclass
class Totals:
    """Running totals for evaluations and the summary."""

    applied: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def count(self, status: Status, n: int = 1) -> None:
        """``n`` more tasks ended with ``status`` (a negative ``n`` moves them away from it)."""
        left = self.statuses.get(status, 0) + n
        if left:
            self.statuses[str(status)] = left
        else:
            self.statuses.pop(str(status), None)


@dataclass
class EngineState:
    """Everything that decides the rest of a run; checkpointed and restored whole (see the module docstring)."""

    nodes: list[int]                                  # the fleet in fleet order (partition ids)
    profiles: dict[int, NodeProfile]
    rng: np.random.Generator                          # the virtual clock's draws
    cap: int                                          # tasks in flight at once
    fleet_online: int                                 # nodes that can take work (wall clock: those online)
    guard: UpdateGuard
    downlink: DownlinkCompressor | None
    strategy: Strategy | None = None                  # set right after the state: the strategy reads it as a view
    idle: deque[int] = field(default_factory=deque)   # free nodes, in the order they became free
    flights: dict[int, Flight] = field(default_factory=dict)   # seq -> task in flight
    versions: dict[int, Version] = field(default_factory=dict)
    node_tasks: dict[int, int] = field(default_factory=dict)   # node -> index of its latest task (task seeds)
    totals: Totals = field(default_factory=Totals)
    seq: int = 0
    now: float = 0.0
    last_eval: tuple[int, float, float] | None = None  # (applied, loss, accuracy)
    last_local: dict[str, float] = field(default_factory=dict)  # its local scores (server_app/localscores.py)
    failing: int = 0                                    # consecutive failed tasks
    last_failure: str = ""
    contract: Contract = field(default_factory=Contract)  # the checks of verdicts (server_app/contract.py)
    link: ServerLink | None = None                      # the server's own link; None: unlimited
    locks: PeerLocks = field(default_factory=PeerLocks)  # gossip peers' model locks (server_app/peerlocks.py)
    # node -> (end of its last task's communication, the part of it after its compute) (server_app/overlap.py)
    tails: dict[int, tuple[float, float]] = field(default_factory=dict)

    def position(self, node: int) -> int:
        """``nodes.index(node)`` without the scan (72 us per task at 10,000 nodes): the fleet only grows at its end."""
        index: dict[int, int] | None = self.__dict__.get("_positions")
        if index is None or len(index) != len(self.nodes):
            index = self.__dict__["_positions"] = {}
            for i, n in enumerate(self.nodes):
                index.setdefault(n, i)  # the first place, as list.index
        return index[node]

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (a checkpoint) without ``position``'s index, which is rebuilt on use."""
        state = dict(self.__dict__)
        state.pop("_positions", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle (a checkpoint); one written before ``contract`` existed gets one that trusts its earlier seqs.

        One written before the server link existed ran without one, and goes on without one; one written before
        the peers' model locks gets empty ones, and one written before overlap was charged hides nothing at first.
        """
        state.setdefault("contract", Contract(since=state.get("seq", 0)))
        state.setdefault("link", None)
        state.setdefault("locks", PeerLocks())
        state.setdefault("tails", {})
        state.setdefault("last_local", {})
        self.__dict__.update(state)

    # -------------------------------------------------------------------------------- the strategy's view
    @property
    def in_flight(self) -> Mapping[int, int]:
        """Node -> version its task in flight started from (a task the strategy abandoned is not its any more)."""
        return MappingProxyType({f.node: f.version for f in self.flights.values() if f.abandoned is None})

    @property
    def fleet_size(self) -> int:
        """Nodes that can take work now."""
        return self.fleet_online

    @property
    def policy(self) -> Strategy:
        """The strategy, once built."""
        assert self.strategy is not None, "the strategy is built right after the state"
        return self.strategy


@dataclass(frozen=True)
class RunSummary:
    """What a finished run reports."""

    run_id: str
    stop_reason: str
    time: float
    version: int
    applied: int
    bytes_up: int
    bytes_down: int
    loss: float
    accuracy: float
    statuses: dict[str, int]
    weights: Weights

    def as_config(self) -> dict[str, ConfigRecordValues]:
        """Flat form for a ConfigRecord (the ServerApp leaves it in ``context.state``)."""
        out: dict[str, ConfigRecordValues] = {
            k: getattr(self, k) for k in ("run_id", "stop_reason", "time", "version", "applied", "bytes_up",
                                          "bytes_down", "loss", "accuracy")
        }
        out.update({f"status-{k}": v for k, v in self.statuses.items()})
        return out

    @classmethod
    def from_config(cls, cfg: Mapping[str, ConfigRecordValues], weights: Weights) -> RunSummary:
        """Inverse of ``as_config``."""
        def scalar(key: str) -> int | float | str:
            value = cfg[key]
            assert not isinstance(value, bytes | list), f"as_config writes numbers and strings, not {value!r}"
            return value

        statuses = {k[len("status-"):]: int(scalar(k)) for k in cfg if k.startswith("status-")}
        return cls(run_id=str(scalar("run_id")), stop_reason=str(scalar("stop_reason")), time=float(scalar("time")),
                   version=int(scalar("version")), applied=int(scalar("applied")), bytes_up=int(scalar("bytes_up")),
                   bytes_down=int(scalar("bytes_down")), loss=float(scalar("loss")),
                   accuracy=float(scalar("accuracy")), statuses=statuses, weights=weights)
