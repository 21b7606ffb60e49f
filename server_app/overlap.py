"""Communication hidden behind computation on the virtual clock, for the strategies whose nodes overlap them.

A star or gossip task is charged its parts one after the other: download, compute, upload (or exchange). Some
algorithms run them at once on a node: AD-PSGD's computation thread computes the next gradient while its
communication thread averages with a peer (Lian et al. 2018), and the OLCO3 family starts the next period's local
steps while the last period's update is still uploading (that is what its delay D is for). Such a strategy says
so with ``Strategy.overlap = True``, and with the run-config key ``overlap`` on (the default) the clock charges
it::

    hidden  = done_prev - ready_prev     if the node's next task is dispatched at done_prev, else 0
    compute = max(0, compute_drawn - hidden)

``ready_prev`` is when the node's previous task finished computing, ``done_prev`` when its communication ended
(a lock wait or a server-link queue included): the next task's computation started at ``ready_prev``, so the part
of it that fits before ``done_prev`` is hidden. One step of pipelining, as in both papers: a node computes at most
one task ahead of its communication. A node that was given no task at ``done_prev`` (the strategy had none for it
then, e.g. an OLCO3 node D periods ahead) hid nothing: its next computation could not start early. The download
of the next task is still charged in full after ``done_prev``, which is conservative for the OLCO3 family (the
stale average it downloads could be fetched early too).

The store's ``compute_s`` of such a task is the compute it was charged, the part not hidden. A simulated dropout
keeps its drawn times (it fails during its compute). With ``overlap = false`` every strategy is charged in
sequence, as runs were before the declaration existed.

What the node computes is not changed: a task still trains on the model it was dispatched with, so the gradient
of an overlapped AD-PSGD step is computed on the model after its previous averaging, not during it (slightly
fresher than the paper's, which this timing does not penalise).
"""

from __future__ import annotations

import dataclasses

from server_app.profiles import TaskTiming
from server_app.serverlink import Task, ready_at


def finished(tails: dict[int, tuple[float, float]], f: Task, done: float) -> None:
    """Remember when the node's task ``f`` ended its compute and its communication (``done``)."""
    if f.timing is not None and f.timing.fail_after_s is None:
        tails[f.node] = (done, max(done - ready_at(f), 0.0))


def hide(tails: dict[int, tuple[float, float]], node: int, now: float, timing: TaskTiming) -> TaskTiming:
    """The timing of a task dispatched to ``node`` at ``now``, its compute less what the last communication hid."""
    done, hidden = tails.pop(node, (-1.0, 0.0))
    if done != now or hidden <= 0 or timing.fail_after_s is not None:
        return timing
    return dataclasses.replace(timing, compute_s=max(timing.compute_s - hidden, 0.0))
