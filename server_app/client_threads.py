"""Client threads for ``LocalGrid(executor="thread")``: a pool of daemon threads whose close has a time limit.

Why not ``concurrent.futures.ThreadPoolExecutor``: it joins its threads when the interpreter exits, so a ClientApp
that never returns (a deadlock, a sleep) kept ``python -m server_app.simulate`` from exiting after its run was over
and recorded (the engine had long failed that task at ``task-ttl``). Here the threads are daemon threads, and
``close`` drops the tasks not started, waits up to a timeout for those running, and leaves behind one still running,
as ``ClientProcesses.close`` kills a worker still running after its timeout. ``submit`` returns a
``concurrent.futures.Future``, as the pool's did; tasks start in the order they were submitted.

A thread cannot be stopped, so one stuck in a call is ``retire``d instead: another thread takes its place at
once (the pool keeps ``workers`` threads serving), and the stuck one leaves when its call returns, if ever.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["ClientThreads"]

T = TypeVar("T")
_Task = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class ClientThreads:
    """``workers`` daemon threads running submitted calls in order."""

    def __init__(self, workers: int) -> None:
        self.tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self.closed = False
        self.threads: list[threading.Thread] = []
        self.retired: set[threading.Thread] = set()
        for _ in range(workers):
            self._start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` on a free thread; its result (or exception) in the future."""
        if self.closed:
            raise RuntimeError("the client threads are closed")
        future: Future[T] = Future()
        self.tasks.put((future, fn, args))
        return future

    def retire(self, thread: threading.Thread) -> None:
        """Start a thread in the place of ``thread`` (stuck in a call); ``thread`` leaves when its call returns."""
        if thread in self.retired or thread not in self.threads:
            return
        self.retired.add(thread)
        if not self.closed:
            self._start()

    def close(self, timeout: float) -> list[str]:
        """Drop the tasks not started; wait up to ``timeout`` s for the running ones; the threads still running.

        A retired thread is not waited for, but named if it still runs.
        """
        self.closed = True
        while True:
            try:
                task = self.tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in self.threads:
            self.tasks.put(None)  # one stop mark per thread, after the task it is running
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            if thread not in self.retired:  # a retired one is known to be stuck: no use waiting for it
                thread.join(max(deadline - time.monotonic(), 0.0))
        return [thread.name for thread in self.threads if thread.is_alive()]

    def _start(self) -> None:
        thread = threading.Thread(target=self._serve, name=f"client-{len(self.threads)}", daemon=True)
        self.threads.append(thread)
        thread.start()

    def _serve(self) -> None:
        me = threading.current_thread()
        while me not in self.retired and (task := self.tasks.get()) is not None:
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue  # cancelled by close() before it started
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - the caller's result() raises it, as with the pool
                future.set_exception(exc)
