"""The server's own link on the virtual clock: a finite pipe every star transfer crosses, first come first served.

Without it every node's transfer is timed on the node's own access link only, as if the parameter server had
infinite bandwidth: a server never congests, however many nodes talk to it at once. With it (run-config
``server-bandwidth`` in Mbit/s each way, ``server-latency`` one-way in ms), the server's link is a resource with
one queue per direction (full duplex: a cloud VM's bandwidth figure holds for inbound and outbound traffic at
once, as the "Amazon EC2 instance network bandwidth" documentation states).

**Sharing discipline: FIFO per direction.** The server transmits (or receives) one transfer at a time at its full
rate ``B``; a transfer of ``b`` bytes holds the server's side for ``8 b / B`` seconds, and the next one starts when
it is done. The transfer itself flows at the slower of the two ends, so it ends ``8 b / min(B, node rate)`` after
its server slot starts, plus both one-way latencies. FIFO rather than fair sharing, because under the clock's
conservative discrete-event simulation a transfer's times must be computable once those ahead of it are known:
with fair sharing every later arrival would change the completion of every transfer in progress. FIFO moves the
same bytes in the same total time; it only orders the transfers instead of interleaving them (under contention
the first finish earlier and the last at the same time as with fair sharing).

Downloads (server -> node), with ``t`` the dispatch time, ``L_s`` the server's and ``L_n`` the node's latency::

    start = max(t, server_out_free);  server_out_free = start + 8 b / B
    done  = start + L_s + L_n + max(8 b / B, 8 b / node_down)          (node_down: the task's drawn rate)

Tasks are dispatched in virtual-time order, so a download's slot is assigned at dispatch, once and for all.

Uploads (node -> server): a task's upload is *ready* when its download and compute are done (known at dispatch),
but its size only when the reply arrives. Slots go in ready-time order, ties by dispatch seq::

    start = max(ready, server_in_free);  server_in_free = start + 8 b / B
    done  = start + L_n + L_s + 8 b / min(B, node_up)

An upload's completion is known only once every upload queued ahead of it is known (a task still computing, whose
reply may be an upload of any size, blocks those behind it): until then the task counts with its lower bound,
``ready + L_n + L_s``, which stays a lower bound whatever is ahead of it. The clock applies a result only when no
outstanding task could complete earlier; when it does, no task dispatched later can be ready before it (it is
dispatched at or after that completion), so the slots of the applied upload and of every upload ahead of it are
final: they are committed and never recomputed.

Node-to-node exchanges (gossip, all-reduce) do not cross the server and are left to ``server_app.links``; every
star transfer does, whatever it carries (a model, OLCO3's delayed averages, a compressed downlink difference).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from flwr.app import Message

from server_app.profiles import TaskTiming
from strategies.base import Exchange
from strategies.config import RunConfig


class Task(Protocol):
    """What the link reads of a task in flight (``server_app.state.Flight``), and the one thing it writes."""

    seq: int
    node: int
    dispatched_at: float
    timing: TaskTiming | None
    exchange: Exchange | None
    failure: str
    reply: Message | None
    payload_up: int
    done_at: float | None
    wait_s: float


F = TypeVar("F", bound=Task)


@dataclass
class ServerLink:
    """The server's two FIFO queues and the upload slots already fixed (see the module docstring)."""

    bps: float          # bits per second, each way
    latency_s: float    # one-way
    out_free: float = 0.0   # when the server's outbound side is next free
    in_free: float = 0.0    # when its inbound side is next free, after every committed upload
    committed: dict[int, float] = field(default_factory=dict)  # seq -> completion of an upload whose slot is fixed
    # The last schedule's uploads with a known slot, in queue order: (seq, completion, in_free after it).
    tentative: list[tuple[int, float, float]] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def of(cls, cfg: RunConfig) -> ServerLink | None:
        """The link ``server-bandwidth`` (Mbit/s) and ``server-latency`` (ms) describe; None when unlimited (0)."""
        if cfg.server_bandwidth <= 0:
            return None
        return cls(bps=cfg.server_bandwidth * 1e6, latency_s=cfg.server_latency * 1e-3)

    def seconds(self, nbytes: int) -> float:
        """How long ``nbytes`` hold one side of the server."""
        return 8.0 * nbytes / self.bps

    def download(self, timing: TaskTiming, at: float, nbytes: int, node_latency_s: float) -> TaskTiming:
        """A star task's timing through the server: its download queued now, its upload's latency and rate capped.

        ``timing`` is the task as the node's own link alone would time it (``profiles.sample_task``). A simulated
        dropout keeps its drawn share of the task's (now longer) download and compute.
        """
        node_s = max(timing.down_s - node_latency_s, 0.0)  # the node link's transmission time
        own = self.seconds(nbytes)
        start = max(at, self.out_free)
        self.out_free = start + own
        down_s = start - at + self.latency_s + node_latency_s + max(own, node_s)
        fail = timing.fail_after_s
        before = timing.down_s + timing.compute_s
        if fail is not None and before > 0:
            fail *= (down_s + timing.compute_s) / before
        return dataclasses.replace(timing, down_s=down_s, up_latency_s=timing.up_latency_s + self.latency_s,
                                   up_bps=min(timing.up_bps, self.bps), fail_after_s=fail)

    def head(self, order: Sequence[tuple[float, int, F]], dropouts: Iterable[F] = ()) -> tuple[float, F] | None:
        """The next result and its completion time, once no outstanding task could complete earlier; else None.

        ``order``: the tasks in flight as ``(ready, seq, flight)``, sorted (ready: dispatch + download + compute),
        but for ``dropouts``, the tasks failed at dispatch (a simulated dropout), which end when their timing says.
        A task's completion is known when it does not upload through the server (a node-to-node exchange, a
        failure, an error reply: its own timing says when), when its upload slot is committed, or when its reply is
        in hand and every upload queued ahead of it is known; any other task counts with its lower bound (the walk:
        ``earliest``). The slots found on the way are kept for ``commit``.
        """
        committed, free, blocked = self.committed, self.in_free, False
        tentative: list[tuple[int, float, float]] = []

        def completion(ready: float, seq: int, f: F) -> float | None:
            nonlocal free, blocked
            at = committed.get(seq) if committed else None
            if at is not None and f.reply is None and not f.failure:
                at = None  # a resumed run: the slot was fixed before the checkpoint, the reply is not in hand yet
            if at is not None:
                return at
            reply = f.reply
            if f.exchange is not None or f.failure or (reply is not None and reply.has_error()):
                return due(f)  # no upload through the server
            if reply is None or blocked:
                blocked = True
                return None
            start = ready if ready > free else free
            free = start + 8.0 * f.payload_up / self.bps
            done = start + timing_of(f).upload_s(f.payload_up)
            tentative.append((seq, done, free))
            return done

        found = earliest(order, dropouts, completion)
        self.tentative = tentative
        return found

    def forget_gone(self, live: Container[int]) -> None:
        """Drop the committed slots of tasks no longer in flight (abandoned; applied ones are popped by ``commit``)."""
        if self.committed:
            self.committed = {seq: at for seq, at in self.committed.items() if seq in live}

    def commit(self, head: Task) -> None:
        """``head`` is applied next: fix its upload slot and those of every upload ahead of it (see the docstring).

        A head that does not upload through the server fixes nothing: the slots ahead are found again, the same.
        """
        for i, (seq, _, _) in enumerate(self.tentative):
            if seq == head.seq:
                for ahead, done, free in self.tentative[:i + 1]:
                    self.committed[ahead] = done
                    self.in_free = free
                break
        self.tentative = []
        if head.seq in self.committed:
            head.done_at = self.committed.pop(head.seq)

    def __getstate__(self) -> dict[str, object]:
        """Pickle (a checkpoint) without the last schedule's slots: they are found again from the flights."""
        return {**self.__dict__, "tentative": []}


def earliest(order: Sequence[tuple[float, int, F]], dropouts: Iterable[F],
             completion: Callable[[float, int, F], float | None]) -> tuple[float, F] | None:
    """The next result in clock order and its completion time, once no outstanding task could complete earlier.

    ``order``: the tasks in flight as ``(ready, seq, flight)``, sorted by ready time (dispatch + download +
    compute), but for ``dropouts``, the tasks failed at dispatch, which end when their timing says (``due``).
    ``completion(ready, seq, flight)`` is a task's completion once it is known, else None: the task then counts
    with its lower bound. Every task in ``order`` completes, and its lower bound lies, at or after its ready time,
    so the walk stops at the first task ready after the best completion found.
    """
    best: tuple[float, int] | None = None
    best_flight: F | None = None
    for f in dropouts:
        at = due(f)
        if at is not None and (best is None or (at, f.seq) < best):
            best, best_flight = (at, f.seq), f
    bound: tuple[float, int] | None = None
    for ready, seq, f in order:
        if best is not None and ready > best[0]:
            break
        at = completion(ready, seq, f)
        if at is None:
            lb = (lower_bound(f), seq)
            if bound is None or lb < bound:
                bound = lb
        elif best is None or (at, seq) < best:
            best, best_flight = (at, seq), f
    if best is None or best_flight is None or (bound is not None and bound < best):
        return None
    return best[0], best_flight


def timing_of(f: Task) -> TaskTiming:
    """The task's timing, drawn at dispatch."""
    assert f.timing is not None, "a virtual clock draws every task's timing at dispatch"
    return f.timing


def lower_bound(f: Task) -> float:
    """Earliest virtual time this task could complete (a gossip exchange's lock wait included)."""
    return f.dispatched_at + timing_of(f).lower_bound_s() + f.wait_s


def ready_at(f: Task) -> float:
    """When the task's upload can start: dispatch + download + compute."""
    t = timing_of(f)
    return f.dispatched_at + t.down_s + t.compute_s


def due(f: Task) -> float | None:
    """Virtual completion time on the task's own timing, once it is known (reply in hand, or a failure).

    A gossip exchange's wait for its peer's model lock (``server_app/peerlocks.py``) comes before its transfers.
    """
    t = timing_of(f)
    if t.fail_after_s is not None:
        return f.dispatched_at + t.fail_after_s
    if f.failure:
        return f.dispatched_at + t.lower_bound_s()
    if f.reply is None:
        return None
    if f.reply.has_error():
        return f.dispatched_at + t.down_s + t.compute_s
    return f.dispatched_at + t.down_s + t.compute_s + f.wait_s + t.upload_s(f.payload_up)
