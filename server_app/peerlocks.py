"""Model locks and node links on the virtual clock: a gossip exchange holds both its nodes for its whole duration.

AD-PSGD averages atomically: while an active node and its passive peer exchange and average their models, the
passive node's model is locked, and a second active node that picked the same peer waits until the first
exchange is over (Lian et al. 2018 serialise the averagings on a node with a lock). The exchange also occupies
both nodes' access links: each sends its model to the other, so it fills the active node's uplink and downlink
and the passive node's. An ``Exchange`` whose ``holds`` names a node is such an exchange; ``server_app.links``
times it alone at the links' full rates, and this module makes every exchange that shares a node with it queue.

**Discipline: FIFO per node, in ready-time order.** A node's link (both directions) carries one exchange at a
time, at its full rate, and its model is averaged with one partner at a time; an exchange holds both its nodes
(the active node and the passive peer ``holds``), so two exchanges that share a node, as passive peer of both,
or as the active node of one and the passive peer of the other, never overlap. FIFO rather than fair sharing for
the reason the server's link gives (``server_app/serverlink.py``): a slot must be computable once the slots ahead
of it are known. A task's exchange is *ready* when its compute is done (dispatch + compute; a gossip task has no
download). The exchanges holding node ``p`` start in (ready, dispatch seq) order, each when every node it holds
is free::

    start = max(ready, free_a, free_p);  free_a = free_p = start + x;  done = start + x
                                                     (a: the active node, p: its peer, x: the exchange's seconds)

so a task waits ``start - ready`` for its nodes, which the store counts as communication time (``comm_s``), and
two exchanges with a node in common never overlap on the clock. Every term is drawn at dispatch, so the
schedule never depends on replies or on their arrival order. A task drawn as a simulated dropout fails during
its compute and never takes the lock; a task that fails for real (an error reply, a lost node) keeps the slot it
was given: the passive node cannot know its partner is gone before the slot would have ended.

Like the server's link (``server_app/serverlink.py``), slots are final only once nothing can come ahead of them:
a task dispatched later is dispatched at or after the result the clock applies now, so its ready time is at or
after it. When the clock applies a result at time ``T``, the slots of every exchange ready at or before ``T`` are
committed; later ones stay tentative (a lower bound: a task dispatched later can only queue ahead of them and
delay them) and are found again at the next look.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from server_app.serverlink import Task, ready_at


def held(f: Task) -> tuple[int, ...]:
    """The nodes the task's exchange holds: its own and its passive peer's (none: no lock, or a dropout)."""
    ex, t = f.exchange, f.timing
    if ex is None or ex.holds is None or t is None or t.fail_after_s is not None:
        return ()
    return (f.node, ex.holds) if f.node != ex.holds else (f.node,)


@dataclass
class PeerLocks:
    """The nodes' FIFO queues: the slots already fixed, and the tentative waits of the others."""

    free: dict[int, float] = field(default_factory=dict)       # node -> when its committed exchanges are over
    committed: dict[int, float] = field(default_factory=dict)  # seq -> lock wait of an exchange whose slot is fixed

    def schedule(self, flights: Iterable[Task]) -> list[tuple[float, int, Task, float]]:
        """Set every locking task's ``wait_s`` (fixed, or tentative); the tentative ones as (ready, seq, task, end)."""
        queue: list[tuple[float, int, Task]] = []
        for f in flights:
            if not held(f):
                continue
            if f.seq in self.committed:
                f.wait_s = self.committed[f.seq]
            else:
                queue.append((ready_at(f), f.seq, f))
        queue.sort(key=lambda e: (e[0], e[1]))
        free = dict(self.free)
        tentative = []
        for ready, seq, f in queue:
            nodes = held(f)
            assert f.timing is not None
            start = max(ready, *(free.get(n, -math.inf) for n in nodes))
            end = start + f.timing.up_latency_s  # a gossip task's "upload" is its exchange
            free.update(dict.fromkeys(nodes, end))
            f.wait_s = start - ready
            tentative.append((ready, seq, f, end))
        return tentative

    def commit(self, flights: Iterable[Task], at: float) -> None:
        """The clock applies a result at ``at``: fix the slots of every exchange ready by then (see the docstring).

        The fixed waits of tasks no longer in flight are dropped first.
        """
        flights = list(flights)
        live = {f.seq for f in flights}
        self.committed = {seq: w for seq, w in self.committed.items() if seq in live}
        for ready, seq, f, end in self.schedule(flights):
            if ready > at:
                break
            self.committed[seq] = f.wait_s
            self.free.update(dict.fromkeys(held(f), end))
