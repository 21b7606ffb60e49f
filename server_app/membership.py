"""Fleet membership on the wall clock: nodes that join late, vanish mid-task, and come back.

The ServerApp discovers the nodes online at start (``server_app.app.discover``). On the virtual clock that list is
the fleet for the whole run: a run must be a function of its seed. On the wall clock (a real deployment) devices
come and go, so the engine keeps a ``Membership`` that re-reads Flower's ``grid.get_node_ids()`` (the nodes whose
heartbeats are current) at most every ``every_s`` seconds, without ever blocking the event loop:

- **a node not seen before** is sent a ``query.describe`` message; when the answer arrives (or the describe fails,
  or times out after ``describe_s``) the node joins the fleet: a row in the store's ``nodes`` table, a profile
  (informative only on the wall clock, where the links are real), a place in the idle queue, room in the
  concurrency cap. Its data partition is whatever its ``--node-config`` says. The answer is the node's word:
  ``server_app.intake.read_describe`` keeps only the fields the server reads, each of the right kind and in
  range; a field that is not is left out (and logged), and the node joins all the same.
- **a known node missing from the list is offline**: it gets no new task. Its task in flight, if any, ends as
  Flower's ``NODE_UNAVAILABLE`` error reply (when its heartbeats stop: within 2 x 30 s in Flower 1.41) or when
  ``task-ttl`` expires, whichever comes first, and is recorded as ``failed``; the work goes to the nodes still
  online. It takes work again as soon as it is back online (with SuperNode authentication a device keeps its
  node id across restarts; without, it comes back as a new node).
- **the strategy's ``num_nodes``** follows the number of nodes online, so a policy that counts the fleet (FedAvg's
  round size, the K of the K-families and ABS) never waits for more results than the fleet can give.
- **an empty fleet** (every node offline, nothing in flight) is waited out for up to ``task-ttl`` seconds: a
  device that lost its link may come back; only then does the run stop as stalled.

Newcomers and a changing fleet size are for *elastic* strategies (class flag ``elastic = True``: FedAvg, FedAsync,
FedBuff, the K-family with ABS, or a strategy of your own). The others keep the fleet they started with (the
OLCO3 family's periods and the gossip graphs are built for a fixed set of nodes): newcomers are left out (logged),
and an offline node simply gets no task until it is back.

``Membership`` never touches the engine: ``sync()`` returns a ``FleetChange`` (who joined, with what they said of
themselves; how many are online) and the engine applies it. The engine calls ``sync()`` before it hands out work,
``usable(node)`` to skip offline nodes, and ``wait()`` when it has nothing in flight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from server_app.intake import read_describe
from server_app.profiles import NodeProfile, ProfileError, assign_profiles
from strategies.config import RunConfig

log = logging.getLogger("staleflower")

#: Seconds between two looks at ``grid.get_node_ids()`` (one HTTP call to the SuperLink); a failed task forces one.
REFRESH_S = 3.0


@dataclass
class FleetChange:
    """What the engine must apply after a look at the fleet: newcomers to admit, and the nodes online."""

    joined: list[tuple[int, dict[str, object]]] = field(default_factory=list)  # (node, its describe reply)
    online: int = 0                                                           # known nodes online now


def fleet_profiles(cfg: RunConfig, num_nodes: int, profile_file: str | None = None) -> list[NodeProfile]:
    """The profiles the run config gives a fleet of ``num_nodes`` (``profile_file``: the config's by default)."""
    return assign_profiles(num_nodes, mix=cfg.profiles, seed=cfg.seed, straggler_fraction=cfg.straggler_fraction,
                           straggler_slowdown=cfg.straggler_slowdown, dropout=cfg.dropout,
                           slow_link_fraction=cfg.slow_link_fraction, slow_link_factor=cfg.slow_link_factor,
                           profile_file=cfg.profile_file if profile_file is None else profile_file)


def node_profile(cfg: RunConfig, idx: int) -> NodeProfile:
    """The profile the fleet's mix (and profile file) gives node index ``idx``; informative on the wall clock."""
    try:
        return fleet_profiles(cfg, idx + 1)[idx]
    except ProfileError:  # a profile file written for another fleet size
        return fleet_profiles(cfg, idx + 1, "")[idx]


class Membership:
    """Tracks which nodes of a wall-clock run are online and admits newcomers (see the module docstring)."""

    def __init__(self, grid: Grid, cfg: RunConfig, nodes: list[int], *, elastic: bool,
                 failed: Callable[[], int], every_s: float | None = None, describe_s: float | None = None) -> None:
        self.grid = grid
        self.cfg = cfg
        self.known: set[int] = set(nodes)
        self.elastic = elastic
        self.failed = failed                                 # failed tasks so far: a new failure forces a look
        self.every_s = REFRESH_S if every_s is None else every_s
        self.describe_s = describe_s if describe_s is not None else min(cfg.task_ttl, 60.0)
        self.online: set[int] = set(nodes)
        self.describing: dict[str, tuple[int, float]] = {}   # describe message id -> (node, deadline)
        self.asked: set[int] = set()                         # newcomers with a describe in flight
        self.last = time.monotonic()
        self.changed = False                                 # the usable set grew since the last wait()
        self.failed_seen = 0                                 # failed tasks when the nodes were last looked at
        self.ignored: set[int] = set()                       # newcomers a fixed-fleet strategy cannot take

    # ------------------------------------------------------------------------------------------- engine API
    def usable(self, node: int) -> bool:
        """Whether ``node`` may be given a task now (it was online at the last look)."""
        return node in self.online

    def sync(self, force: bool = False) -> FleetChange:
        """Re-read the online nodes (at most every ``every_s`` s), collect describes, admit newcomers."""
        change = FleetChange()
        if self.describing:
            self._collect(change)
        now = time.monotonic()
        # A task just failed: maybe its node is gone (Flower's NODE_UNAVAILABLE); look now, not in every_s.
        failed = self.failed()
        if force or failed != self.failed_seen or now - self.last >= self.every_s:
            self.last, self.failed_seen = now, failed
            self._look(change)
        change.online = max(1, len(self.online & self.known))
        return change

    def wait(self) -> FleetChange | None:
        """Nothing in flight: wait up to ``task-ttl`` s for a node to join or come back (None if none did)."""
        deadline = time.monotonic() + self.cfg.task_ttl
        joined: list[tuple[int, dict[str, object]]] = []
        while True:
            change = self.sync(force=True)
            joined += change.joined
            if self.changed:
                self.changed = False
                change.joined = joined
                return change
            if time.monotonic() > deadline:
                return None
            time.sleep(min(self.every_s, 1.0))

    # ------------------------------------------------------------------------------------------- internals
    def _look(self, change: FleetChange) -> None:
        online = set(self.grid.get_node_ids())
        back = (online & self.known) - self.online
        gone = (self.online & self.known) - online
        for node in sorted(back):
            log.info("node %d is back online", node)
        for node in sorted(gone):
            log.info("node %d went offline: no new tasks until it is back", node)
        if back:
            self.changed = True
        self.online = online & self.known
        new = sorted(online - self.known - self.asked - self.ignored)
        if new and not self.elastic:
            log.warning("node(s) %s joined late: left out, strategy %s needs the fleet it started with",
                        new, self.cfg.strategy)
            self.ignored.update(new)
        elif new:
            self._ask(new, change)

    def _ask(self, nodes: list[int], change: FleetChange) -> None:
        msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.describe",
                        ttl=self.describe_s) for n in nodes]
        deadline = time.monotonic() + self.describe_s
        for node, mid in zip(nodes, self.grid.push_messages(msgs), strict=True):
            self.asked.add(node)
            if mid:
                self.describing[mid] = (node, deadline)
            else:
                self._admit(node, {}, change)

    def _collect(self, change: FleetChange) -> None:
        for reply in self.grid.pull_messages(list(self.describing)):
            node, _ = self.describing.pop(reply.metadata.reply_to_message_id, (None, 0.0))
            if node is None:
                continue
            info, problem = read_describe(reply)
            if problem:
                log.warning("node %d described itself wrongly (%s): taken as undescribed where it lied", node,
                            problem)
            self._admit(node, info, change)
        now = time.monotonic()
        for mid, (node, deadline) in list(self.describing.items()):
            if now > deadline:
                del self.describing[mid]
                self._admit(node, {}, change)

    def _admit(self, node: int, info: Mapping[str, object], change: FleetChange) -> None:
        """A newcomer joins: the engine adds it to the fleet when it applies the change."""
        self.asked.discard(node)
        if node in self.known:
            return
        self.known.add(node)
        self.online.add(node)
        self.changed = True
        change.joined.append((node, dict(info)))
        log.info("node %d joined the run (partition %s)", node, info.get("partition-id", "unknown"))
