"""An in-process Flower ``Grid``: the real ServerApp and ClientApp code, no Ray, no SuperLink.

Messages are handed to ``ClientApp(message, context)`` on client threads (``executor="thread"``,
``server_app/client_threads.py``: torch releases the GIL, so clients run in parallel, but their Python code and the
engine's take turns on one lock) or in worker processes (``executor="process"``, ``server_app/client_processes.py``:
the message travels as bytes, ``server_app/pipe_codec.py``, and the engine keeps its interpreter to itself). Each
node keeps one ``Context`` for the run, as a SuperNode does. Like Flower's link state, a reply is returned by
``pull_messages`` once and then forgotten, and a client exception becomes an error reply.

A node runs one ClientApp call at a time, as a SuperNode does: a task sent while its previous one runs waits for
it, and one whose ``ttl`` (the run's ``task-ttl``) runs out meanwhile is answered as Flower's SuperLink answers
an expired message (``REPLY_MESSAGE_UNAVAILABLE``) instead of being run. A call that runs longer than its task's
``ttl`` costs its node, never the run: a client thread stuck in it is replaced by a new one (a thread cannot be
stopped; the node carries on when the call returns, as a SuperNode would), and a worker process is killed and
replaced (``server_app/client_processes.py``). Without this, as many hung calls as there are workers stalled every
node of the run.

``reorder_seed`` holds finished replies back and releases them in a random order over several pulls: the engine
must produce the same run whatever the arrival order (``tests/test_engine.py``).
"""

from __future__ import annotations

import ast
import collections
import itertools
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from flwr.app import Message, RecordDict, UserConfigValue
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from server_app.client_processes import (
    CLOSE_TIMEOUT_S,
    FIRST_NODE_ID,
    ClientAppLike,
    ClientProcesses,
    crashed_reply,
    expired,
    expired_reply,
    load_client_app,
    node_context,
    run_client,
)
from server_app.client_threads import ClientThreads

__all__ = ["EXECUTORS", "ClientAppLike", "LocalGrid"]

log = logging.getLogger("staleflower")

#: How clients run: ``thread`` (a pool in this process) or ``process`` (worker processes).
EXECUTORS = ("thread", "process")
Executor = Literal["thread", "process"]


def _serialise_ast_parse() -> None:
    """Make ``ast.parse`` safe to call from several threads at once (CPython 3.11 needs it).

    CPython 3.11 keeps the AST converter's recursion depth in interpreter-wide state: two threads parsing at
    once fail with ``SystemError: AST constructor recursion depth mismatch``. Clients here run on threads, and
    ``Array.numpy()`` (``np.load``, hence ``ast.literal_eval``) is how a stock Flower ClientApp reads its model,
    so without this a task fails now and then and a virtual-clock run stops being a function of its seed. Our
    own code reads arrays without ``ast`` (``strategies.codecs.array_of``); a user's ClientApp may not.
    """
    if getattr(ast.parse, "_staleflower_serialised", False):
        return
    parse, lock = ast.parse, threading.Lock()

    def serialised(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return parse(*args, **kwargs)

    serialised._staleflower_serialised = True  # type: ignore[attr-defined]
    ast.parse = serialised


class LocalGrid(Grid):
    """A Grid over ``num_nodes`` in-process nodes running ``client_app`` on ``workers`` threads or processes.

    ``client_app`` is a ClientApp, a function of (message, context), or an import path ``"module:attr"``. With
    ``executor="process"`` the workers import it: a path, or a callable that pickles (a module-level one; a lambda
    or closure is a ``ValueError``). Node state then lives in the workers, and ``contexts`` is empty.
    """

    def __init__(self, client_app: ClientAppLike | str, num_nodes: int, run_config: Mapping[str, UserConfigValue],
                 *, run_id: int = 1, workers: int = 2, reorder_seed: int | None = None,
                 executor: Executor = "thread") -> None:
        if num_nodes < 1:
            raise ValueError("num_nodes must be >= 1")
        if executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
        self._run = Run.create_empty(run_id)
        # Deterministic node ids, unlike Flower's random ones.
        self.node_ids = [FIRST_NODE_ID + i for i in range(num_nodes)]
        self.known = set(self.node_ids)
        self.executor = executor
        self.processes: ClientProcesses | None = None
        if executor == "process":
            self.processes = ClientProcesses(client_app, num_nodes, run_config, run_id=run_id, workers=workers)
        else:
            _serialise_ast_parse()
            self.client_app = load_client_app(client_app) if isinstance(client_app, str) else client_app
        self.contexts = {} if self.processes else {
            FIRST_NODE_ID + i: node_context(run_id, i, num_nodes, run_config) for i in range(num_nodes)}
        self.pool = ClientThreads(workers) if not self.processes else None
        # Client threads: each busy node's tasks not answered yet (the first one running or about to), the call
        # each node is running (started, ttl, thread), and the replies made since the last pull.
        self.queues: dict[int, collections.deque[Message]] = {}
        self.running: dict[int, tuple[float, float, threading.Thread]] = {}
        self.done: dict[str, Message] = {}
        self.held: dict[str, Message] = {}
        self.rng = random.Random(reorder_seed) if reorder_seed is not None else None
        self.lock = threading.Lock()

    # Grid API -------------------------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        """Set the run (kept for API compatibility)."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run this grid serves."""
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Deprecated in Flower; kept so older strategies still run."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        """All nodes; with processes, those whose worker has not died and whose call never overran its ttl."""
        with self.lock:
            self._collect()
            if self.processes is None:
                return list(self.contexts)
            return [n for n in self.node_ids if self.processes.alive(n)]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Start each message; unknown destinations are rejected (``None``), as Flower does."""
        ids: list[str] = []
        for msg in messages:
            if msg.metadata.dst_node_id not in self.known:
                ids.append(None)  # type: ignore[arg-type]  # Flower's Grid types say str; its grids return None too
                continue
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            with self.lock:
                if self.processes is not None:
                    self.processes.submit(msg)
                else:
                    self._submit(msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """Replies that are ready, each returned once."""
        wanted = set(message_ids)
        with self.lock:
            self._collect()
        ready = [m for m in self.held if m in wanted]  # what arrived (a few), not what is asked for (all in flight)
        if self.rng is not None:  # release a random subset, in a random order
            self.rng.shuffle(ready)
            ready = ready[: self.rng.randint(0, len(ready))]
        return [self.held.pop(m) for m in ready]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Push, then wait for every reply (or the timeout)."""
        ids = [i for i in self.push_messages(messages) if i]
        wanted, out = set(ids), list[Message]()
        deadline = None if timeout is None else time.monotonic() + timeout
        # A pull hands each reply over once, and each task gives one: counting them ends the wait, whatever
        # message a reply names.
        while len(out) < len(ids) and (deadline is None or time.monotonic() < deadline):
            got = self.pull_messages(wanted)
            out.extend(got)
            if not got:
                time.sleep(0.001)
        return out

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the clients after the tasks they are running, waiting up to ``timeout`` s for them.

        A worker process still running then is killed; a client thread cannot be, so it is left behind (a daemon
        thread: the process can still exit), with a warning naming it.
        """
        if self.processes is not None:
            self.processes.close(timeout)
        else:
            assert self.pool is not None
            stuck = self.pool.close(timeout)
            if stuck:
                log.warning("%s still running a ClientApp when the grid closed (stuck past a task's ttl, or still "
                            "running %g s later); left behind", ", ".join(stuck), timeout)

    # ---------------------------------------------------------------------------------------------------------
    def _submit(self, msg: Message) -> None:
        """Queue a task for a client thread, behind its node's call if one runs (caller holds ``lock``)."""
        node = msg.metadata.dst_node_id
        if (waiting := self.queues.get(node)) is not None:
            waiting.append(msg)
        else:
            assert self.pool is not None
            self.queues[node] = collections.deque([msg])
            self.pool.submit(self._drain, node)

    def _handle(self, msg: Message) -> Message:
        return run_client(self.client_app, msg, self.contexts[msg.metadata.dst_node_id])

    def _drain(self, node: int) -> None:
        """On a client thread: run the node's tasks in order until none is left."""
        while True:
            with self.lock:
                waiting = self.queues[node]
                while waiting and expired(waiting[0]):
                    gone = waiting.popleft()
                    self.done[gone.metadata.message_id] = expired_reply(gone)
                if not waiting:
                    del self.queues[node]
                    return
                msg = waiting[0]
                self.running[node] = (time.monotonic(), float(msg.metadata.ttl), threading.current_thread())
            try:
                reply = self._handle(msg)
            except BaseException as exc:  # noqa: BLE001 - run_client answers the ClientApp's; this is a subclass's
                reply = crashed_reply(msg, f"{type(exc).__name__}: {exc}")
            with self.lock:
                del self.running[node]
                waiting.popleft()
                self.done[msg.metadata.message_id] = reply

    def _collect(self) -> None:
        """Hold every reply made so far; replace a client thread whose call overran (caller holds ``lock``)."""
        now = time.monotonic()
        if self.processes is not None:
            self.held.update(self.processes.collect(now))  # by the task's own id, as for threads
            return
        assert self.pool is not None
        for node, (started, ttl, thread) in self.running.items():
            if now - started <= ttl:
                continue
            if thread not in self.pool.retired:
                log.warning("node %d: its ClientApp has run %.3g s, longer than its task's ttl of %g s; its client "
                            "thread is replaced (a thread cannot be stopped), the node's next tasks wait for it",
                            node, now - started, ttl)
                self.pool.retire(thread)
            waiting = self.queues[node]  # what waits behind the stuck call, unless expired (bounded memory)
            for msg in [m for m in itertools.islice(waiting, 1, None) if expired(m)]:
                waiting.remove(msg)
                self.done[msg.metadata.message_id] = expired_reply(msg)
        if self.done:
            self.held.update(self.done)  # by the task's own id: a reply naming another message cannot hide it
            self.done.clear()
