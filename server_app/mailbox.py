"""The engine's side of Flower's Grid: push a task's message, pull replies into their flights, time out the silent.

A SuperNode handles one message at a time and Flower cannot interrupt a running ClientApp. Under
``restart = "finish"`` (the default) an abandoned task stays a flight like any other until its reply arrives
(``server_app/restarts.py``). Under ``restart = "interrupt"`` (the virtual clock's what-if) the engine frees the
node at once; the mailbox then keeps waiting for that task's reply (an *abandoned* message) only to drop it, and
a task given to the same node meanwhile is *held* here until the node is free; on the virtual clock the held task
starts at its dispatch time all the same.

Everything here belongs to this process (message ids, deadlines, replies): none of it is checkpointed; a resumed
run sends its tasks in flight again (``resend``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server_app.state import Flight
from server_app.wire import message_sizes


class Mailbox:
    """Message ids, deadlines and held tasks of one run's flights."""

    def __init__(self, grid: Grid, ttl: float, stamp: Callable[[], float]) -> None:
        self.grid = grid
        self.ttl = ttl
        self.stamp = stamp                            # the run's clock, for arrival times
        self.by_msg: dict[str, Flight] = {}           # message id -> its flight
        self.msg_of: dict[int, str] = {}              # seq -> message id
        self.deadlines: dict[int, float] = {}         # seq -> monotonic deadline of its reply
        self.abandoned: dict[str, tuple[int, float]] = {}  # message id -> (node still busy with it, deadline)
        self.held: dict[int, tuple[Flight, Message]] = {}  # node -> task waiting for the node to be free

    def message(self, node: int, version: int, content: RecordDict) -> Message:
        """A train message for ``node`` (``group_id``: the model version it starts from)."""
        return Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(version),
                       ttl=self.ttl)

    def send(self, flight: Flight, msg: Message) -> None:
        """Push now, or hold until the node's abandoned task is over."""
        if any(node == flight.node for node, _ in self.abandoned.values()):
            self.deadlines[flight.seq] = time.monotonic() + self.ttl
            self.held[flight.node] = (flight, msg)
        else:
            self._push(flight, msg)

    def resend(self, flight: Flight) -> None:
        """Send a restored task's message again (a resumed run: the old process and its messages are gone)."""
        assert flight.content is not None
        self._push(flight, self.message(flight.node, flight.version, flight.content))

    def pull(self, flights: Iterable[Flight]) -> None:
        """Collect replies that arrived, free nodes whose abandoned task ended, and time out the silent."""
        waiting = [mid for mid, f in self.by_msg.items() if f.reply is None]
        if waiting:
            for reply in self.grid.pull_messages(waiting):
                f = self.by_msg.get(reply.metadata.reply_to_message_id)
                if f is not None and f.reply is None and not f.failure:
                    f.reply = reply
                    f.bytes_up, f.payload_up = _sizes(f, reply)
                    f.arrived_at = self.stamp()
        if self.abandoned:
            gone = {r.metadata.reply_to_message_id for r in self.grid.pull_messages(list(self.abandoned))}
            now = time.monotonic()
            gone |= {mid for mid, (_, deadline) in self.abandoned.items() if now > deadline}
            for mid in gone & set(self.abandoned):
                self._free(self.abandoned.pop(mid)[0])
        now = time.monotonic()
        for f in flights:
            if f.reply is None and not f.failure and now > self.deadlines.get(f.seq, now + self.ttl):
                f.failure = f"no reply within task-ttl = {self.ttl:g} s"
                f.arrived_at = self.stamp()

    def forget(self, flight: Flight) -> None:
        """The flight is complete: its message id, deadline and any hold on it go."""
        self.deadlines.pop(flight.seq, None)
        if (mid := self.msg_of.pop(flight.seq, None)) is not None:
            del self.by_msg[mid]
        if self.held.get(flight.node, (None,))[0] is flight:
            del self.held[flight.node]

    def abandon(self, flight: Flight) -> None:
        """The strategy gave up on the flight: drop its reply when it comes, keep its node busy until then."""
        deadline = self.deadlines.get(flight.seq, time.monotonic() + self.ttl)
        mid = self.msg_of.get(flight.seq)
        self.forget(flight)
        if mid is not None and flight.reply is None:
            self.abandoned[mid] = (flight.node, deadline)

    def clear(self) -> None:
        """Forget every message (a resumed run starts with none)."""
        self.by_msg.clear()
        self.msg_of.clear()
        self.deadlines.clear()
        self.abandoned.clear()
        self.held.clear()

    def _push(self, flight: Flight, msg: Message) -> None:
        ids = list(self.grid.push_messages([msg]))
        if not ids or not ids[0]:
            flight.failure = "push rejected by the SuperLink"
            flight.arrived_at = self.stamp()
            return
        self.deadlines[flight.seq] = time.monotonic() + self.ttl
        self.by_msg[ids[0]] = flight
        self.msg_of[flight.seq] = ids[0]

    def _free(self, node: int) -> None:
        """An abandoned task's reply arrived (and was dropped): send the node the task it was given meanwhile."""
        if node in self.held:
            flight, msg = self.held.pop(node)
            self._push(flight, msg)


def _sizes(flight: Flight, reply: Message) -> tuple[int, int]:
    """``message_sizes(reply)``; a reply that cannot be serialized again fails its task instead of the run.

    Flower hands over only replies it deserialized, which serialize again; a reply built in-process (a test's or
    a local grid's ClientApp) may hold what no record can carry. It is a failed task, as Flower's runtime makes a
    ClientApp's unsendable reply one (``server_app/local_grid.py``).
    """
    try:
        return message_sizes(reply)
    except Exception as exc:
        flight.failure = f"reply cannot be serialized ({type(exc).__name__}: {exc})"
        return 0, 0
