"""Client processes for ``LocalGrid(executor="process")``: ClientApps that do not share the engine's interpreter lock.

With client threads, the engine's thread and the clients take turns on one interpreter lock; with processes each
worker has its own. A node is pinned to one worker (node index % workers) for the whole run, so its ``Context``
(the node state: error-feedback residuals, a downlink's model copy) lives in that worker from its first message
to the last, as a SuperNode keeps it. What crosses the process boundary is what Flower's transport carries: the
message's metadata, records and arrays (``server_app/pipe_codec.py``: a JSON head and the arrays' bytes, rebuilt
with the constructors Flower's own deserializer uses), one length-prefixed frame per message on a pipe. The
ClientApp is named, not sent: an import path ``"module:attr"`` that every worker imports, or a picklable callable
(a module-level function or ClientApp).

The engine's ends of the pipes are non-blocking: a task goes to an outbox that is written as far as the pipe
takes it, now and at every ``collect``, and ``collect`` reads whatever replies have arrived in one read per worker.
The engine so never waits on a worker, and a worker that blocks writing a reply is read at the next pull. A worker
reads its pipe only when it has run every task it holds (one read for all that arrived), so it needs no reader
thread of its own to share its interpreter lock with.

Workers come from the ``forkserver`` start method: one clean server process imports torch, Flower and the
ClientApp's module once, and each worker is forked from it (not from the engine's process, whose threads and
torch state a fork would copy). The first grid of a process pays for the server's start (about as much as one
``spawn`` worker; ``bench.scale`` times both); later workers start in milliseconds. As with any ``spawn`` or
``forkserver`` program, a script that starts a process grid must guard its entry point with
``if __name__ == "__main__":`` (each worker imports the main module), and a worker sees the environment variables
of the moment the forkserver started.

A worker that dies (a segfault, ``os._exit``, a signal) or must be killed costs the node whose task it was
running, never the run: that task fails with Flower's ``CLIENT_APP_CRASHED`` and the reason, that node is offline
for the rest of the run (its later tasks fail the same way at once, and it leaves ``get_node_ids``: a SuperNode
that is gone), and a new worker is forked in its place for its other nodes, which restart with a fresh ``Context``
(devices that reboot); their tasks queued behind that one had not started and go to the new worker. The engine
kills a worker in two cases: a call that runs longer than its message's ``ttl`` (the run's ``task-ttl``; when it
started is known to within one ``collect``: when the reply before it was read, or when it was sent to an idle
worker), and a reply frame ``pipe_codec`` cannot decode, which only a ClientApp tampering with its worker can
make (the frame stands where that task's reply should be: the worker answers its tasks in order). A worker that
dies before it is ready (it could not start) is not replaced: its nodes go offline. A task whose ``ttl`` ran out
while it waited in a worker's queue is answered as Flower's SuperLink answers an expired message
(``REPLY_MESSAGE_UNAVAILABLE``) instead of being run. Each reply answers its worker's oldest task, whatever
message it names. ``close()`` drops the tasks not started, asks every worker to stop after the task it is running
(SIGTERM), and kills the ones still running after a timeout.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import importlib
import logging
import multiprocessing as mp
import os
import pickle
import signal
import struct
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from typing import Literal

from flwr.app import Context, Error, Message, RecordDict, UserConfigValue
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from server_app import pipe_codec
from server_app.wire import message_sizes

log = logging.getLogger("staleflower")

# flwr.common.constant.ErrorCode
LOAD_CLIENT_APP_EXCEPTION = 1
CLIENT_APP_RAISED_EXCEPTION = 2
REPLY_MESSAGE_UNAVAILABLE = 4
CLIENT_APP_CRASHED = 8

#: Node ids of the in-process runner are 1000, 1001, ... (deterministic, unlike Flower's random ones).
FIRST_NODE_ID = 1000
#: How ``close()`` waits for a worker to finish the task it is running before terminating it, in seconds.
CLOSE_TIMEOUT_S = 5.0
#: A frame with no bytes: the worker has imported its ClientApp and takes tasks.
READY = b""

#: A task's message id and its reply.
Answer = tuple[str, Message]

#: What a node runs: a ``ClientApp``, or a plain function of (message, context) as tests and ``--clientapp`` give.
ClientAppLike = ClientApp | Callable[[Message, Context], Message]


def node_context(run_id: int, index: int, num_nodes: int, run_config: Mapping[str, UserConfigValue]) -> Context:
    """The ``Context`` node ``index`` keeps for the run: partition ids 0..n-1, as Flower's simulation sets them."""
    return Context(run_id=run_id, node_id=FIRST_NODE_ID + index, state=RecordDict(), run_config=dict(run_config),
                   node_config={"partition-id": index, "num-partitions": num_nodes})


def load_client_app(path: str) -> ClientAppLike:
    """Import ``"module:attr"``; a wrong path is a ``ValueError`` that says which part is wrong."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"a ClientApp import path is MODULE:ATTR (e.g. client_app.app:app), got {path!r}")
    try:
        found = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load ClientApp {path!r}: {exc}") from exc
    if not callable(found):
        raise ValueError(f"ClientApp {path!r} is a {type(found).__name__}, not a ClientApp or function")
    return found  # type: ignore[no-any-return]


def run_client(client_app: ClientAppLike, msg: Message, context: Context) -> Message:
    """``client_app(msg, context)`` as Flower's runtime runs it: an exception becomes an error reply.

    ``sys.exit()`` (or another ``BaseException``) in a ClientApp ends its process under Flower's runtime, which
    reports ``CLIENT_APP_CRASHED``; here it is that reply too. Without this, on a client thread it would reach the
    engine's thread through the task's future and end the run.

    The reply is sized as Flower's transport serializes it (``message_sizes``): what cannot travel (an int beyond
    int64) fails here, in the client, as it would on a SuperNode. Both executors call this, so a thread and a
    process give the same reply.
    """
    try:
        reply = client_app(msg, context)
        if reply.has_content():
            message_sizes(reply)
    except Exception as exc:  # a ClientApp exception becomes an error reply, as in Flower's runtime
        return error_reply(msg, CLIENT_APP_RAISED_EXCEPTION, f"{type(exc).__name__}: {exc}")
    except BaseException as exc:  # noqa: BLE001 - sys.exit() in a ClientApp ends its process in Flower, not the run
        return crashed_reply(msg, f"{type(exc).__name__}: {exc}")
    reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return reply


def to_bytes(msg: Message) -> bytes:
    """The message as it crosses the pipe (``server_app/pipe_codec.py``)."""
    return pipe_codec.encode(msg)


def from_bytes(data: bytes) -> Message:
    """A message from ``to_bytes``."""
    return pipe_codec.decode(data)


def app_spec(client_app: ClientAppLike | str) -> str | bytes:
    """What a worker is told to run: the import path as it is, or the callable pickled (by reference, mostly).

    A lambda or a function defined inside another cannot be pickled: that is a ``ValueError`` saying what to pass.
    """
    if isinstance(client_app, str):
        load_client_app(client_app)  # a wrong path fails here, in one line, not in every worker
        return client_app
    try:
        return pickle.dumps(client_app)
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        name = getattr(client_app, "__qualname__", type(client_app).__name__)
        raise ValueError(f"executor 'process' runs the ClientApp in worker processes, which must import it: pass "
                         f"an import path such as 'client_app.app:app', or a module-level function or ClientApp "
                         f"(got {name}, which cannot be pickled: {exc})") from None


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs besides its two pipes (pickled once, at its start)."""

    index: int
    workers: int
    run_id: int
    num_nodes: int
    run_config: dict[str, UserConfigValue]
    client_app: str | bytes  # ``app_spec``
    sys_path: list[str]      # the engine's, at the grid's start: an --app directory added to it is importable


# ---------------------------------------------------------------------------------------------------- framing
class Frames:
    """Bytes read from a pipe, cut into frames: a 4-byte little-endian length, then that many bytes."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, chunk: bytes | memoryview) -> list[bytes]:
        """Add what was read; return the frames it completes (each copied once, out of a view of the buffer)."""
        self.buffer += chunk
        buf, pos, out = self.buffer, 0, []
        with memoryview(buf) as view:
            while len(buf) - pos >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buf, pos)
                if len(buf) - pos - _HEADER.size < size:
                    break
                out.append(bytes(view[pos + _HEADER.size:pos + _HEADER.size + size]))
                pos += _HEADER.size + size
        del buf[:pos]
        return out


def framed(data: bytes) -> bytes:
    """``data`` as one frame."""
    return _HEADER.pack(len(data)) + data


_HEADER = struct.Struct("<I")
#: Bytes asked of one read: many replies of a small model at once (one system call per look, not two per reply).
#: Read into a buffer kept for the purpose (``Reader``): ``os.read`` would allocate this much for every read and
#: give most of it back, which cost 17 us for a 1.5 kB read (against 1.8) and 370 us for a 500 kB one (111).
READ_CHUNK = 1 << 20

#: Pipe capacity asked of Linux (its default is 64 KiB; 1 MiB is the usual unprivileged ceiling).
PIPE_BYTES = 1 << 20


def _widen(fd: int) -> None:
    """Ask for a larger pipe buffer, so that the engine's writes rarely find it full; nothing happens elsewhere."""
    with contextlib.suppress(AttributeError, OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)  # Linux only


class Reader:
    """Non-allocating reads of up to ``READ_CHUNK`` bytes into one buffer, reused by every read."""

    def __init__(self) -> None:
        self.buffer = bytearray(READ_CHUNK)
        self.view = memoryview(self.buffer)

    def read(self, fd: int) -> memoryview:
        """What one read of ``fd`` gives (empty at its end), valid until the next read; raises as ``os.read``."""
        return self.view[:os.readv(fd, [self.buffer])]


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte to a blocking pipe."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])


# ------------------------------------------------------------------------------------------------ worker side
class _Stop(Exception):
    """SIGTERM arrived while the worker waited for a task."""


def serve(setup: WorkerSetup, tasks: Connection, replies: Connection) -> None:
    """A worker's main: run each task frame through the ClientApp of its node's Context; reply with a frame.

    The worker reads its pipe only when it has no task left, one large read for every frame that has arrived;
    replies are written as they are made (blocking: the engine reads them at each pull). The engine never blocks
    on this worker (its writes are non-blocking), so neither waits for the other in a circle. SIGTERM (the
    engine's ``close``) stops the worker after the task it is running; so does the end of its input.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the engine stops us
    state = {"idle": False, "stop": False}

    def on_term(signum: int, frame: object) -> None:
        state["stop"] = True
        if state["idle"]:
            raise _Stop

    signal.signal(signal.SIGTERM, on_term)
    sys.path[:] = setup.sys_path
    import torch

    torch.set_num_threads(1)  # one core per worker: the workers are the parallelism
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = setup.run_id, 0, 1
    app: ClientAppLike | None = None
    broken = ""
    try:
        spec = setup.client_app
        app = load_client_app(spec) if isinstance(spec, str) else pickle.loads(spec)
    except Exception as exc:  # noqa: BLE001 - every task then says why, as Flower's LOAD_CLIENT_APP_EXCEPTION
        broken = f"cannot load the ClientApp in client process {setup.index}: {type(exc).__name__}: {exc}"
    contexts: dict[int, Context] = {}
    fd_in, fd_out = tasks.fileno(), replies.fileno()
    inbox, todo, reader = Frames(), collections.deque[bytes](), Reader()
    try:
        _write_all(fd_out, framed(READY))
        while not state["stop"]:
            if not todo:
                state["idle"] = True
                try:
                    chunk = reader.read(fd_in)
                finally:
                    state["idle"] = False
                if not chunk:
                    return  # the engine closed our input, or died
                todo.extend(inbox.feed(chunk))
                continue
            msg = from_bytes(todo.popleft())
            if expired(msg):
                reply = expired_reply(msg)
            elif app is None:
                reply = error_reply(msg, LOAD_CLIENT_APP_EXCEPTION, broken)
            else:
                node = msg.metadata.dst_node_id
                if node not in contexts:
                    contexts[node] = node_context(setup.run_id, node - FIRST_NODE_ID, setup.num_nodes,
                                                  setup.run_config)
                reply = run_client(app, msg, contexts[node])
            try:
                data = to_bytes(reply)
            except Exception as exc:  # noqa: BLE001 - message_sizes passed, the pipe's encoder did not: still a reply
                failed = error_reply(msg, CLIENT_APP_RAISED_EXCEPTION, f"reply cannot be serialized: {exc}")
                data = to_bytes(failed)
            _write_all(fd_out, framed(data))
    except (_Stop, OSError):
        pass  # stopped, or the engine is gone: nobody to answer


# ------------------------------------------------------------------------------------------------ engine side
@dataclass
class Worker:
    """The engine's handle on one worker process and its two pipes (non-blocking on this side)."""

    index: int
    process: BaseProcess
    tasks: Connection                 # write end: task frames
    replies: Connection               # read end: reply frames
    outbox: bytearray = field(default_factory=bytearray)     # frames the pipe had no room for yet
    inbox: Frames = field(default_factory=Frames)
    pending: dict[str, Message] = field(default_factory=dict)  # message id -> the task, until its reply
    ready_at: float | None = None     # time.monotonic() of its READY frame
    dead: str = ""                    # why it is gone; "" while it runs
    since: float = 0.0                # time.monotonic() when its first pending task started (at the latest)


class ClientProcesses:
    """``workers`` processes running the ClientApp of ``num_nodes`` nodes, node ``i`` on worker ``i % workers``.

    Not thread-safe: ``LocalGrid`` calls it under its lock.
    """

    def __init__(self, client_app: ClientAppLike | str, num_nodes: int, run_config: Mapping[str, UserConfigValue],
                 *, run_id: int, workers: int, start_method: Literal["forkserver", "spawn"] = "forkserver") -> None:
        spec = app_spec(client_app)
        context: ForkServerContext | SpawnContext
        if start_method == "forkserver":
            context = mp.get_context("forkserver")
            # What the forkserver imports when this process starts it (later grids reuse it): forks get it free.
            context.set_forkserver_preload(["__main__", "torch", __name__]
                                           + ([spec.partition(":")[0]] if isinstance(spec, str) else []))
        elif start_method == "spawn":
            context = mp.get_context("spawn")
        else:
            raise ValueError(f"start_method must be forkserver or spawn, got {start_method!r}")
        self.started_at = time.monotonic()
        self.context = context
        self.reader = Reader()
        self.undelivered: list[Answer] = []   # replies to hand over at the next collect() (a dead worker's errors)
        self.offline: dict[int, str] = {}     # node -> why: its worker died or was killed running its task
        count = min(workers, num_nodes)
        self.setups = [WorkerSetup(index, count, run_id, num_nodes, dict(run_config), spec, list(sys.path))
                       for index in range(count)]
        self.workers: list[Worker] = [self._start(setup) for setup in self.setups]
        atexit.register(self.close)  # after multiprocessing's own exit hook was registered: runs before it

    def _start(self, setup: WorkerSetup) -> Worker:
        """Start worker ``setup.index`` on two fresh pipes."""
        tasks_r, tasks_w = self.context.Pipe(duplex=False)
        replies_r, replies_w = self.context.Pipe(duplex=False)
        for conn in (tasks_w, replies_w):
            _widen(conn.fileno())
        process = self.context.Process(target=serve, args=(setup, tasks_r, replies_w), name=f"client-{setup.index}")
        process.start()
        tasks_r.close()  # the worker holds the only other ends: its death is an end of file here
        replies_w.close()
        os.set_blocking(tasks_w.fileno(), False)
        os.set_blocking(replies_r.fileno(), False)
        return Worker(setup.index, process, tasks_w, replies_r)

    def worker_of(self, node_id: int) -> Worker:
        """The worker that holds the node's Context."""
        return self.workers[(node_id - FIRST_NODE_ID) % len(self.workers)]

    def alive(self, node_id: int) -> bool:
        """Whether the node is online: its worker runs and no call of its overran (as the last ``collect`` knows)."""
        return node_id not in self.offline and not self.worker_of(node_id).dead

    def submit(self, msg: Message) -> None:
        """Send the task to its node's worker; a dead worker's answer is an error reply at the next ``collect``."""
        node = msg.metadata.dst_node_id
        worker = self.worker_of(node)
        if worker.dead or node in self.offline:
            why = self.offline.get(node) or worker.dead
            self.undelivered.append((msg.metadata.message_id, crashed_reply(msg, why)))
            return
        if not worker.pending:
            worker.since = time.monotonic()
        worker.outbox += framed(to_bytes(msg))
        worker.pending[msg.metadata.message_id] = msg
        self._flush(worker)
        if worker.dead:  # found writing: the worker was running a task only if one was there before this one
            self.undelivered.extend(self._lost(worker, blame=len(worker.pending) > 1))

    def collect(self, now: float | None = None) -> list[Answer]:
        """Every reply that has arrived, and the error replies of workers found dead or replaced, with their tasks.

        A worker answers its tasks in order, one reply each, so a reply answers the worker's oldest task, whatever
        message it names (a ClientApp may name any). ``now``: the caller's ``time.monotonic()``, if it has one.
        """
        out, self.undelivered = self.undelivered, []
        now = time.monotonic() if now is None else now
        for worker in list(self.workers):
            if worker.dead:
                continue
            head = next(iter(worker.pending), None)
            self._flush(worker)
            try:
                while True:
                    chunk = self.reader.read(worker.replies.fileno())
                    if not chunk:  # end of file: the worker is gone (after what it wrote, read above)
                        worker.dead = self._why(worker)
                        break
                    for frame in worker.inbox.feed(chunk):
                        if frame == READY:
                            worker.ready_at = time.monotonic()
                            continue
                        try:
                            reply = from_bytes(frame)
                        except Exception as exc:  # noqa: BLE001 - not what serve() writes: the worker is broken
                            worker.dead = self._broken(worker, f"{type(exc).__name__}: {exc}")
                            break
                        if worker.pending:  # else a frame no task asked for (only a tampering ClientApp writes one)
                            task = next(iter(worker.pending))
                            del worker.pending[task]
                            out.append((task, reply))
                    if worker.dead or len(chunk) < READ_CHUNK:
                        break
            except BlockingIOError:
                pass  # nothing more for now
            except OSError:
                worker.dead = self._why(worker)
            if worker.dead:
                out.extend(self._lost(worker))
            elif worker.pending:
                first = next(iter(worker.pending))
                if first != head:
                    worker.since = now  # the reply before it was read now: it started by now
                elif now - worker.since > (ttl := worker.pending[first].metadata.ttl):
                    worker.process.kill()  # SIGKILL by its own pid: the only way to stop the call
                    worker.process.join(1.0)
                    worker.dead = (f"its ClientApp has run {now - worker.since:.3g} s, longer than its task's ttl "
                                   f"of {ttl:g} s (client process {worker.index} was killed)")
                    out.extend(self._lost(worker))
        return out

    def wait_ready(self, timeout: float) -> float:
        """Block until every worker has loaded its ClientApp; seconds since the start (start-up cost)."""
        deadline = time.monotonic() + timeout
        while (waiting := [w.replies for w in self.workers if w.ready_at is None and not w.dead]) \
                and time.monotonic() < deadline:
            wait(waiting, timeout=max(deadline - time.monotonic(), 0))
            self.undelivered.extend(self.collect())
        ready = [w.ready_at for w in self.workers if w.ready_at is not None]
        return (max(ready) if ready else time.monotonic()) - self.started_at

    def pids(self) -> list[int]:
        """Process ids of the workers still running (for memory accounting)."""
        return [w.process.pid for w in self.workers if not w.dead and w.process.pid is not None]

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop every worker after the task it is running (SIGTERM); kill one still running after ``timeout`` s.

        Tasks not started are dropped, as a thread pool's shutdown cancels them.
        """
        atexit.unregister(self.close)
        for w in self.workers:
            w.outbox.clear()
            w.tasks.close()
            if w.process.exitcode is None:
                w.process.terminate()  # SIGTERM by its own pid: serve() stops after its running task
        deadline = time.monotonic() + timeout
        running = [w for w in self.workers if w.process.exitcode is None]
        while running and time.monotonic() < deadline:
            # Read (and drop) replies meanwhile: a worker blocked writing one could not finish.
            wait([w.process.sentinel for w in running], timeout=min(max(deadline - time.monotonic(), 0), 0.05))
            for w in running:
                with contextlib.suppress(OSError):
                    while self.reader.read(w.replies.fileno()):
                        pass
            running = [w for w in running if w.process.exitcode is None]
        for w in running:
            w.process.kill()  # SIGKILL by its own pid
            w.process.join(1.0)
        for w in self.workers:
            w.replies.close()
            w.dead = w.dead or "closed"

    # -----------------------------------------------------------------------------------------------------
    def _flush(self, worker: Worker) -> None:
        """Write as much of the outbox as the pipe takes now, never waiting; a broken pipe marks the worker dead."""
        while worker.outbox and not worker.dead:
            try:
                with memoryview(worker.outbox) as view, view[:READ_CHUNK] as part:
                    done = os.write(worker.tasks.fileno(), part)
            except BlockingIOError:
                return
            except OSError:  # broken pipe: it died
                worker.dead = self._why(worker)
                return
            del worker.outbox[:done]

    def _lost(self, worker: Worker, blame: bool = True) -> list[Answer]:
        """Replace a dead worker (``worker.dead`` says why); returns the error replies of the offline node's tasks.

        The node whose task it ran goes offline; a new worker takes its other nodes and their tasks not started. A
        worker that never became ready is not replaced (it would fail again): its tasks fail, its nodes go
        offline. With no task in flight (it died idle; ``blame=False``) no node is to blame: the new worker
        takes them all.
        """
        if worker.ready_at is None:
            return self._bury(worker)
        pending = list(worker.pending.values())
        worker.pending.clear()
        worker.outbox.clear()
        for conn in (worker.tasks, worker.replies):
            conn.close()
        why, node = worker.dead, None
        if pending and blame:
            node = pending[0].metadata.dst_node_id
            why = f"node {node}: {why}; the node is offline for the rest of the run"
            self.offline[node] = why
        log.warning("%s; client process %d is replaced, its other nodes restart with a fresh Context", why,
                    worker.index)
        self.workers[worker.index] = self._start(self.setups[worker.index])
        lost = []
        for msg in pending:
            if msg.metadata.dst_node_id == node:
                lost.append((msg.metadata.message_id, crashed_reply(msg, why)))
            else:
                self.submit(msg)
        return lost

    @staticmethod
    def _broken(worker: Worker, why: str) -> str:
        """Kill a worker whose reply cannot be decoded: the task it answers is unknown, what follows it untrusted.

        Only a ClientApp that tampers with its worker (``serve``'s encoder, the pipe) gets here; it costs the node
        whose reply it was (the worker answers in order), as a crash does, never the run.
        """
        worker.process.kill()  # SIGKILL by its own pid
        worker.process.join(1.0)
        return f"client process {worker.index} (pid {worker.process.pid}) sent a reply that cannot be decoded ({why})"

    @staticmethod
    def _why(worker: Worker) -> str:
        """The reason a worker is gone, from its exit code."""
        worker.process.join(1.0)  # the pipe ended: its exit code follows at once
        code = worker.process.exitcode
        how = f"exit code {code}"
        if code is not None and code < 0:
            how = f"killed by signal {signal.Signals(-code).name if -code in signal.valid_signals() else -code}"
        return f"client process {worker.index} (pid {worker.process.pid}) died ({how})"

    def _bury(self, worker: Worker) -> list[Answer]:
        """A dead worker's tasks in flight (and unsent) become error replies."""
        worker.outbox.clear()
        lost = [(mid, crashed_reply(msg, worker.dead)) for mid, msg in worker.pending.items()]
        worker.pending.clear()
        return lost


def expired(msg: Message) -> bool:
    """Whether the task's ``ttl`` has run out (Flower's SuperLink then no longer hands it to its node)."""
    return msg.metadata.created_at + msg.metadata.ttl < time.time()


def error_reply(msg: Message, code: int, reason: str) -> Message:
    """An error reply to ``msg`` (Flower's ``ErrorCode`` ``code``) with a message id of its own, as a reply has."""
    reply = Message(Error(code, reason), reply_to=msg)
    reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    return reply


def expired_reply(msg: Message) -> Message:
    """Flower's answer for a task whose ``ttl`` ran out before its node could start it (it was busy)."""
    return error_reply(msg, REPLY_MESSAGE_UNAVAILABLE, f"the task's ttl of {msg.metadata.ttl:g} s ran out before "
                       f"node {msg.metadata.dst_node_id} could start it (it was running an earlier task)")


def crashed_reply(msg: Message, why: str) -> Message:
    """Flower's reply for a ClientApp process that crashed: ``CLIENT_APP_CRASHED`` with the reason."""
    return error_reply(msg, CLIENT_APP_CRASHED, why)
