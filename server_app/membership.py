"""Fleet membership on the wall clock: nodes that join late, vanish mid-task, and come back.

The ServerApp discovers the nodes online at start (``server_app.app.discover``). On the virtual clock that list is
the fleet for the whole run: a run must be a function of its seed. On the wall clock (a real deployment) devices
come and go, so the engine keeps a ``Membership`` that re-reads Flower's ``grid.get_node_ids()`` (the nodes whose
heartbeats are current) at most every ``every_s`` seconds, without ever blocking the event loop:

- **a node not seen before** is sent a ``query.describe`` message; when the answer arrives (or the describe fails,
  or times out after ``describe_s``) the node joins the fleet: a row in the store's ``nodes`` table, a profile
  (informative only on the wall clock, where the links are real), a place in the idle queue, room in the
  concurrency cap. Its data partition is whatever its ``--node-config`` says.
- **a known node missing from the list is offline**: it gets no new task. Its task in flight, if any, ends as
  Flower's ``NODE_UNAVAILABLE`` error reply (when its heartbeats stop: within 2 x 30 s in Flower 1.41) or when
  ``task-ttl`` expires, whichever comes first, and is recorded as ``failed``; the work goes to the nodes still
  online. It takes work again as soon as it is back online (with SuperNode authentication a device keeps its
  node id across restarts; without, it comes back as a new node).
- **the strategy's ``num_nodes``** follows the number of nodes online, so a policy that counts the fleet (FedAvg's
  round size, the K of the K-families and ABS) never waits for more results than the fleet can give.
- **an empty fleet** (every node offline, nothing in flight) is waited out for up to ``task-ttl`` seconds: a
  device that lost its link may come back; only then does the run stop as stalled.

Newcomers and a changing ``num_nodes`` are for *elastic* strategies: FedAvg, FedAsync, FedBuff and the K-family
with ABS (``ELASTIC``), or a strategy of your own with a class attribute ``elastic = True``. The others keep the
fleet they started with (the OLCO3 family's periods and the gossip graphs are built for a fixed set of nodes):
newcomers are left out (logged), and an offline node simply gets no task until it is back.

Only the engine calls this module: ``Membership(engine)`` at start when the clock is ``wall``, ``sync()`` before
it hands out work, ``usable(node)`` to skip offline nodes, ``wait()`` when it has nothing in flight.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Message, RecordDict

from server_app.profiles import NodeProfile, ProfileError, assign_profiles
from strategies.bounded import KAggregation
from strategies.fedasync import FedAsync
from strategies.fedavg import FedAvg
from strategies.fedbuff import FedBuff

if TYPE_CHECKING:
    from server_app.engine import Engine

log = logging.getLogger("staleflower")

#: Seconds between two looks at ``grid.get_node_ids()`` (one HTTP call to the SuperLink); a failed task forces one.
REFRESH_S = 3.0

#: Strategies that work on a fleet that changes during the run (see the module docstring).
ELASTIC = (FedAvg, FedAsync, FedBuff, KAggregation)


class Membership:
    """Tracks which nodes of a wall-clock run are online, admits newcomers, and keeps the engine's fleet in step."""

    def __init__(self, engine: Engine, *, every_s: float | None = None, describe_s: float | None = None) -> None:
        self.engine = engine
        self.every_s = REFRESH_S if every_s is None else every_s
        self.describe_s = describe_s if describe_s is not None else min(engine.cfg.task_ttl, 60.0)
        self.online: set[int] = set(engine.nodes)
        self.describing: dict[str, tuple[int, float]] = {}   # describe message id -> (node, deadline)
        self.asked: set[int] = set()                         # newcomers with a describe in flight
        self.last = time.monotonic()
        self.changed = False                                 # the usable set grew since the last wait()
        self.failed_seen = 0                                 # failed tasks when the nodes were last looked at
        self.elastic = isinstance(engine.strategy, ELASTIC) or bool(getattr(engine.strategy, "elastic", False))
        self.ignored: set[int] = set()                       # newcomers a fixed-fleet strategy cannot take

    # ------------------------------------------------------------------------------------------- engine API
    def usable(self, node: int) -> bool:
        """Whether ``node`` may be given a task now (it was online at the last look)."""
        return node in self.online

    def sync(self, force: bool = False) -> None:
        """Re-read the online nodes (at most every ``every_s`` s), collect describes, admit newcomers."""
        if self.describing:
            self._collect()
        now = time.monotonic()
        # A task just failed: maybe its node is gone (Flower's NODE_UNAVAILABLE); look now, not in every_s.
        failed = self.engine.totals.statuses.get("failed", 0)
        if not force and failed == self.failed_seen and now - self.last < self.every_s:
            return
        self.last, self.failed_seen = now, failed
        online = set(self.engine.grid.get_node_ids())
        known = set(self.engine.nodes)
        back = (online & known) - self.online
        gone = (self.online & known) - online
        for node in sorted(back):
            log.info("node %d is back online", node)
        for node in sorted(gone):
            log.info("node %d went offline: no new tasks until it is back", node)
        if back:
            self.changed = True
        self.online = online & known
        new = sorted(online - known - self.asked - self.ignored)
        if new and not self.elastic:
            log.warning("node(s) %s joined late: left out, strategy %s needs the fleet it started with",
                        new, self.engine.cfg.strategy)
            self.ignored.update(new)
        elif new:
            self._ask(new)
        self._resize()

    def wait(self) -> bool:
        """Nothing in flight: wait up to ``task-ttl`` s for a node to join or come back; True if one did."""
        deadline = time.monotonic() + self.engine.cfg.task_ttl
        while True:
            self.sync(force=True)
            if self.changed:
                self.changed = False
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(min(self.every_s, 1.0))

    # ------------------------------------------------------------------------------------------- internals
    def _ask(self, nodes: list[int]) -> None:
        msgs = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query.describe",
                        ttl=self.describe_s) for n in nodes]
        deadline = time.monotonic() + self.describe_s
        for node, mid in zip(nodes, self.engine.grid.push_messages(msgs), strict=True):
            self.asked.add(node)
            if mid:
                self.describing[mid] = (node, deadline)
            else:
                self._admit(node, {})

    def _collect(self) -> None:
        for reply in self.engine.grid.pull_messages(list(self.describing)):
            node, _ = self.describing.pop(reply.metadata.reply_to_message_id, (None, 0.0))
            if node is None:
                continue
            ok = reply.has_content() and "describe" in reply.content.config_records
            self._admit(node, dict(reply.content.config_records["describe"]) if ok else {})
        now = time.monotonic()
        for mid, (node, deadline) in list(self.describing.items()):
            if now > deadline:
                del self.describing[mid]
                self._admit(node, {})

    def _admit(self, node: int, info: dict) -> None:
        """Add ``node`` to the engine's fleet: nodes table, profile, idle queue, strategy's count."""
        e = self.engine
        self.asked.discard(node)
        if node in e.nodes:
            return
        idx = len(e.nodes)
        profile = self._profile(idx)
        e.nodes.append(node)
        e.profiles[node] = profile
        e.store.record_nodes([(node, idx, info.get("partition-id"), profile.device.name, profile.network.name,
                               profile.slowdown, profile.dropout, info.get("torch-device"))])
        self.online.add(node)
        self.changed = True
        e.idle.append(node)
        log.info("node %d joined the run (partition %s)", node, info.get("partition-id", "unknown"))
        self._resize()

    def _profile(self, idx: int) -> NodeProfile:
        """The profile the fleet's mix (and profile file) gives node index ``idx``; informative on the wall clock."""
        c = self.engine.cfg
        def profile(file: str) -> NodeProfile:
            return assign_profiles(idx + 1, mix=c.profiles, seed=c.seed, straggler_fraction=c.straggler_fraction,
                                   straggler_slowdown=c.straggler_slowdown, dropout=c.dropout, profile_file=file)[idx]

        try:
            return profile(c.profile_file)
        except ProfileError:  # a profile file written for another fleet size
            return profile("")

    def _resize(self) -> None:
        """Concurrency cap, failure limit and the strategy's node count follow the fleet online."""
        e = self.engine
        n = max(1, len([x for x in e.nodes if x in self.online]))
        e.cap = min(e.cfg.concurrency, len(e.nodes)) if e.cfg.concurrency > 0 else len(e.nodes)
        e.failure_limit = max(e.failure_limit, 10 * len(e.nodes))
        if self.elastic:
            e.strategy.num_nodes = n
