"""The run's clock: when a task is due, which result comes next, and how long its parts took.

``VirtualClock`` (``clock = "virtual"``): at dispatch the clock draws the task's download and compute time from the
node's profile with a seeded generator; the upload time follows from the reply's real serialized size. Results
are applied strictly in (virtual completion time, dispatch seq) order, so a run is a function of its seed, however
the real replies arrive. A reply can only be applied once no task still outstanding could complete earlier:
every outstanding task has a lower bound (download + compute + upload latency), and the head waits until all
bounds are past it (conservative discrete-event simulation). Clients still run in parallel meanwhile. Star
transfers also cross the server's own link (``server-bandwidth``, ``server-latency``; ``server_app/serverlink.py``):
downloads queue for it at dispatch, uploads in the order they become ready, first come first served; an upload's
completion is known once those queued ahead of it are. A gossip exchange holds both its nodes (the passive peer's
model lock, both nodes' links) for its duration, so exchanges with a node in common queue for it the same way
(``server_app/peerlocks.py``). A strategy that overlaps communication and computation has the last task's
communication hidden behind the node's next compute (``server_app/overlap.py``).

``ScriptedClock``: a virtual clock whose compute times come from a function of (node index, task index) and
whose links are instant (the server's too): for tests that need an exact schedule.

``WallClock`` (``clock = "wall"``): replies are applied in real arrival order; times are real seconds since the
run started, and a task's compute time is what its client reports.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Protocol

from server_app.links import exchange_seconds
from server_app.overlap import hide
from server_app.peerlocks import held
from server_app.profiles import TaskTiming, sample_task
from server_app.serverlink import ServerLink, due, earliest, ready_at, timing_of
from server_app.state import EngineState, Flight
from strategies.base import Exchange
from strategies.config import RunConfig


class Clock(Protocol):
    """What the engine asks of a clock."""

    virtual: bool

    def now(self, state: EngineState) -> float:
        """Seconds on the run's clock, for stamping a dispatch or an arrival."""
        ...

    def draw(self, state: EngineState, node: int, payload_down: int, exchange: Exchange | None) -> TaskTiming | None:
        """A task's timings, drawn at dispatch (None: the clock learns them from the task itself)."""
        ...

    def head(self, state: EngineState) -> tuple[float, Flight] | None:
        """The next result in clock order and its completion time, once nothing outstanding can come earlier.

        The engine applies the result it returns next (or stops the run).
        """
        ...

    def durations(self, flight: Flight, now: float, client_compute_s: float) -> tuple[float, float]:
        """``(compute_s, comm_s)`` of a completed task."""
        ...

    def wasted(self, flight: Flight, now: float) -> tuple[float, float]:
        """``(compute_s, comm_s)`` spent so far by a task abandoned at ``now`` (before its upload)."""
        ...


class VirtualClock:
    """Timings drawn from the node profiles (see the module docstring)."""

    virtual = True
    server_link = True  # star transfers cross ``state.link`` when the run has one

    def __init__(self, cfg: RunConfig, flops_per_step: float) -> None:
        self.cfg = cfg
        self.flops_per_step = flops_per_step
        self._queue_key: tuple[int, int] | None = None
        self._order: list[tuple[float, int, Flight]] = []  # see _queue
        self._dropouts: list[Flight] = []
        self._locking: dict[int, Flight] = {}  # seq -> a task in flight whose exchange holds node locks

    def now(self, state: EngineState) -> float:
        """The virtual time of the last applied result."""
        return state.now

    def draw(self, state: EngineState, node: int, payload_down: int, exchange: Exchange | None) -> TaskTiming:
        """Draw a task's times; a node-to-node exchange replaces the star's download and upload."""
        c = self.cfg
        timing = sample_task(state.profiles[node], state.rng, local_steps=c.local_steps,
                             flops_per_step=self.flops_per_step, bytes_down=payload_down,
                             compute_dist=c.compute_dist, compute_jitter=c.compute_jitter,
                             network_jitter=c.network_jitter)
        if c.overlap and state.strategy is not None and state.strategy.overlap:  # the last communication hid some
            timing = hide(state.tails, node, state.now, timing)
        if exchange is None:
            if self.server_link and state.link is not None:
                timing = state.link.download(timing, state.now, payload_down, state.profiles[node].network.latency_s)
            return timing
        # The node already holds its model (the message carrying it is this emulation's transport, not the
        # algorithm's traffic): no download; the "upload" is the exchange, whatever the reply's size.
        return dataclasses.replace(timing, down_s=0.0, up_latency_s=exchange_seconds(exchange, state.profiles),
                                   up_bps=math.inf)

    def head(self, state: EngineState) -> tuple[float, Flight] | None:
        """The earliest known completion, unless an outstanding task could still complete before it.

        With the server's link, the result returned fixes its upload slot and those queued ahead of it; likewise
        the slots of the gossip exchanges queued for their nodes (``server_app/peerlocks.py``).
        """
        found = self._head(state)
        if found is not None:
            state.locks.commit(self._locking.values(), found[0])
        return found

    def _head(self, state: EngineState) -> tuple[float, Flight] | None:
        link = state.link if self.server_link else None
        queue = self._queue(state, link)
        state.locks.schedule(self._locking.values())  # only exchanges that hold locks have a wait to compute
        if link is not None:
            found = link.head(queue, self._dropouts)
            if found is not None:
                link.commit(found[1])
            return found
        # Without the server's link: the same walk, every completion on the task's own timing.
        return earliest(queue, self._dropouts, lambda ready, seq, f: due(f))

    def _queue(self, state: EngineState, link: ServerLink | None) -> list[tuple[float, int, Flight]]:
        """The tasks in flight by (ready time, seq), sorted again only when tasks were dispatched or left.

        Kept alongside: the tasks whose exchanges hold node locks (``server_app/peerlocks.py``), so that the locks'
        schedule walks those, not every task in flight, each time the engine looks.

        The engine looks for the next result many times while replies come in; only a dispatch or a departure
        changes this order (ready times are fixed at dispatch).
        """
        flights = state.flights
        key = (state.seq, len(flights))
        if key == self._queue_key:
            return self._order
        if self._queue_key is None:  # the first look (or the first after a resume)
            self._order, self._dropouts, self._locking = [], [], {}
            new = list(flights)
        else:  # drop those gone, insert those dispatched since the last look
            self._order = [e for e in self._order if e[1] in flights]
            self._dropouts = [f for f in self._dropouts if f.seq in flights]
            if self._locking:
                self._locking = {seq: f for seq, f in self._locking.items() if seq in flights}
            new = [seq for seq in range(self._queue_key[0], state.seq) if seq in flights]
        for seq in new:
            f = flights[seq]
            if held(f):  # fixed at dispatch, like the ready time
                self._locking[seq] = f
            if f.timing is not None and f.timing.fail_after_s is not None:
                self._dropouts.append(f)  # may end before its ready time: kept out of the ready-time order
            else:
                bisect.insort(self._order, (ready_at(f), seq, f))
        self._queue_key = key
        if link is not None:
            link.forget_gone(flights)
        return self._order

    def durations(self, flight: Flight, now: float, client_compute_s: float) -> tuple[float, float]:
        """The drawn compute time; download plus the upload of the reply's content size (and its wait, if any)."""
        t = timing_of(flight)
        if flight.done_at is not None:  # through the server's link: the upload waited for its slot
            return t.compute_s, flight.done_at - flight.dispatched_at - t.compute_s
        up = t.upload_s(flight.payload_up) + flight.wait_s if flight.bytes_up else 0.0
        return t.compute_s, t.down_s + up

    def wasted(self, flight: Flight, now: float) -> tuple[float, float]:
        """Compute done between the end of the download and ``now``; the download so far."""
        t = timing_of(flight)
        elapsed = now - flight.dispatched_at
        return min(max(elapsed - t.down_s, 0.0), t.compute_s), min(elapsed, t.down_s)


class ScriptedClock(VirtualClock):
    """A virtual clock with instant links and compute times from ``script(node_index, task_index)`` seconds."""

    server_link = False

    def __init__(self, script: Callable[[int, int], float]) -> None:
        super().__init__(RunConfig(), 0.0)
        self.script = script

    def draw(self, state: EngineState, node: int, payload_down: int, exchange: Exchange | None) -> TaskTiming:
        """The scripted compute time of this node's current task; no download, upload or failure."""
        compute = float(self.script(state.position(node), state.node_tasks.get(node, 0)))
        return TaskTiming(down_s=0.0, compute_s=compute, up_latency_s=0.0, up_bps=math.inf, fail_after_s=None)


class WallClock:
    """Real seconds since the run started; results in arrival order."""

    virtual = False

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def now(self, state: EngineState) -> float:
        """Real seconds since the run started."""
        return time.monotonic() - self.t0

    def draw(self, state: EngineState, node: int, payload_down: int, exchange: Exchange | None) -> None:
        """Nothing to draw: the task takes what it takes."""
        return None

    def head(self, state: EngineState) -> tuple[float, Flight] | None:
        """The earliest arrival in hand."""
        done = [f for f in state.flights.values() if f.arrived_at is not None]
        if not done:
            return None
        first = min(done, key=lambda f: (f.arrived_at, f.seq))
        assert first.arrived_at is not None
        return first.arrived_at, first

    def durations(self, flight: Flight, now: float, client_compute_s: float) -> tuple[float, float]:
        """What the client says it computed, at most the task's whole time; the rest is communication.

        The claim is the client's: a client saying it computed for a year on a task that took a second is held
        to the second, so that no reply can make the store's compute totals say what never happened.
        """
        elapsed = max(now - flight.dispatched_at, 0.0)
        compute = min(max(client_compute_s, 0.0), elapsed)
        return compute, elapsed - compute

    def wasted(self, flight: Flight, now: float) -> tuple[float, float]:
        """All of the elapsed time counts as compute: the wall clock cannot tell the parts apart."""
        return now - flight.dispatched_at, 0.0


def make_clock(cfg: RunConfig, flops_per_step: float) -> Clock:
    """The clock run-config key ``clock`` names."""
    return VirtualClock(cfg, flops_per_step) if cfg.clock == "virtual" else WallClock()


