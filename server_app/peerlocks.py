"""Model locks on the virtual clock: a gossip exchange holds its passive peer's model for its whole duration.

AD-PSGD averages atomically: while an active node and its passive peer exchange and average their models, the
passive node's model is locked, and a second active node that picked the same peer waits until the first
exchange is over (Lian et al. 2018 serialise the averagings on a node with a lock). An ``Exchange`` whose
``holds`` names a node is such an exchange; ``server_app.links`` times it alone, and this module makes it queue.

**Discipline: FIFO per locked node, in ready-time order.** A task's exchange is *ready* when its compute is done
(dispatch + compute; a gossip task has no download). The exchanges holding node ``p`` start in (ready, dispatch
seq) order, each when the previous one is over::

    start = max(ready, free_p);  free_p = start + x;  done = start + x       (x: the exchange's own seconds)

so a task waits ``start - ready`` for the lock, which the store counts as communication time (``comm_s``), and
two exchanges with the same passive node never overlap on the clock. Every term is drawn at dispatch, so the
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


def holder(f: Task) -> int | None:
    """The node whose model lock the task's exchange holds (None: no lock, or a dropout that never gets there)."""
    ex, t = f.exchange, f.timing
    if ex is None or ex.holds is None or t is None or t.fail_after_s is not None:
        return None
    return ex.holds


@dataclass
class PeerLocks:
    """The locked nodes' FIFO queues: the slots already fixed, and the tentative waits of the others."""

    free: dict[int, float] = field(default_factory=dict)       # node -> when its committed exchanges are over
    committed: dict[int, float] = field(default_factory=dict)  # seq -> lock wait of an exchange whose slot is fixed

    def schedule(self, flights: Iterable[Task]) -> list[tuple[float, int, Task, float]]:
        """Set every locking task's ``wait_s`` (fixed, or tentative); the tentative ones as (ready, seq, task, end)."""
        queue: list[tuple[float, int, Task]] = []
        for f in flights:
            if holder(f) is None:
                continue
            if f.seq in self.committed:
                f.wait_s = self.committed[f.seq]
            else:
                queue.append((ready_at(f), f.seq, f))
        queue.sort(key=lambda e: (e[0], e[1]))
        free = dict(self.free)
        tentative = []
        for ready, seq, f in queue:
            node = holder(f)
            assert node is not None and f.timing is not None
            start = max(ready, free.get(node, -math.inf))
            free[node] = end = start + f.timing.up_latency_s  # a gossip task's "upload" is its exchange
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
            node = holder(f)
            assert node is not None
            self.committed[seq] = f.wait_s
            self.free[node] = end
