"""How a run's process ends, as the store must tell it: no run stays ``running`` after its process is gone.

A catchable end (SIGINT, SIGTERM, SIGHUP) becomes ``RunStopped``, raised in the main thread where the signal
lands, so it unwinds the engine like any exception and ``run_experiment`` records ``stopped`` with the signal's
name on its ordinary path; rows are committed one event at a time, so everything acknowledged before the
signal stays. An uncatchable end (SIGKILL, the OOM killer, a power cut) can write nothing: for it the run's
process beats a heartbeat (``runs.heartbeat_at``), and a reader calls a ``running`` run whose heartbeat stopped
not live (``dashboard/queries.py``).

One mechanism serves both entry points: ``python -m server_app.simulate`` wraps its whole command in
``stop_on_signals(handoff=False)`` and maps ``RunStopped`` to an exit code; the ServerApp wraps every run in
``stop_on_signals()``, which does nothing when the runner's handlers are already in place and, under Flower's own
processes, hands the signal on to Flower's handler once the run is recorded (see ``stop_on_signals``).
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from server_app.store import MetricsStore

log = logging.getLogger("staleflower")

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
# Seconds between heartbeats: well under the dashboard's STALE_AFTER_S (60 s), so that a run is called stale only
# after several beats in a row were missed, never because one write waited on a busy 2-core machine.
HEARTBEAT_S = 10.0


class RunStopped(BaseException):
    """A stop signal arrived.

    A ``BaseException``, like ``KeyboardInterrupt``: the ``except Exception`` blocks that turn a ClientApp's or a
    strategy's error into a failed task, or Flower's into a failed run, must not swallow a stop.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def reason(self) -> str:
        """What the run's row says: ``stopped by SIGTERM``."""
        return str(self)

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP."""
        return 128 + self.signum


_stopping: list[int] = []  # the signal being handled; later ones are ignored while the stop is being recorded


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    """Raise ``RunStopped`` once.

    A second signal (a second Ctrl-C) is ignored until the handlers are restored: it would otherwise interrupt the
    very write that records the stop, and leave the ghost this module prevents.
    """
    if _stopping:
        return
    _stopping.append(signum)
    raise RunStopped(signum)


Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


@contextmanager
def stop_on_signals(handoff: bool = True) -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into ``RunStopped`` for the duration.

    Nothing is installed (and the block runs as it is) outside the main thread, where Python cannot set signal
    handlers, and when the handlers are already ours (the runner's, around the ServerApp's). A signal the process
    ignores (SIGHUP under ``nohup``) stays ignored.

    ``handoff``: once ``RunStopped`` has unwound the block (the run is recorded ``stopped``), give the signal to
    the disposition the process had before, so the process ends as it would have without us: Flower's
    ``flwr-serverapp`` and ``flwr-simulation`` processes have handlers of their own that push the task's output
    and exit; a default SIGINT becomes ``KeyboardInterrupt``; a default SIGTERM or SIGHUP is raised again and
    ends the process by the signal. Without ``handoff`` the caller handles ``RunStopped`` itself.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Handler] = {}
    for sig in STOP_SIGNALS:
        current = signal.getsignal(sig)
        if current is _on_signal:
            continue
        if current is signal.SIG_IGN:
            continue
        previous[sig] = current
        signal.signal(sig, _on_signal)
    if not previous:  # already ours (or ignored): the outer block restores and hands off
        yield
        return
    try:
        yield
    except RunStopped as exc:
        _restore(previous)
        if handoff and exc.signum in previous:
            _hand_off(exc.signum, previous[exc.signum], exc)
        raise
    finally:
        _restore(previous)


def _restore(previous: dict[int, Handler]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    _stopping.clear()


def _hand_off(signum: int, handler: Handler, exc: RunStopped) -> None:
    """Deliver ``signum`` to the disposition the process had before ``stop_on_signals``."""
    if handler is signal.default_int_handler:
        raise KeyboardInterrupt(exc.reason) from None
    if callable(handler):
        handler(signum, None)  # Flower's graceful exit: pushes the task's output, then raises SystemExit
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action: the process ends by the signal


def on_runtime_exit(path: Path, run_id: str) -> None:
    """Outside the main thread, mark the run stopped when Flower's runtime exits on a signal or a stop request.

    Flower's simulation runtime runs the ServerApp in a thread, where no signal handler can be set; its own
    handler runs ``flwr_exit``'s exit handlers in the main thread, then the process ends within seconds, the
    ServerApp's thread with it. A run that finished first is left as it is (``MetricsStore.finish_run`` closes a
    run once).
    """
    if threading.current_thread() is threading.main_thread():
        return
    try:
        from flwr.supercore.exit import add_exit_handler
    except ImportError:  # another Flower version: the heartbeat still tells the dashboard the run is gone
        return

    def mark() -> None:
        store = MetricsStore(path)
        store.run_id = run_id
        try:
            store.finish_run("stopped", "stopped: Flower's runtime exited (signal or stop request)")
        finally:
            store.close()

    add_exit_handler(mark)


class Heartbeat:
    """Touches the run's ``heartbeat_at`` every ``HEARTBEAT_S`` from a daemon thread with its own connection.

    A quiet run (slow clients on the wall clock, a long evaluation) writes no row for minutes and is alive; a
    killed one also writes nothing. The heartbeat tells them apart: it stops only with the process (or the run).
    """

    def __init__(self, path: Path, run_id: str, every_s: float = HEARTBEAT_S) -> None:
        self.path, self.run_id, self.every_s = path, run_id, every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="staleflower-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join(timeout=5.0)

    def _beat(self) -> None:
        try:
            store = MetricsStore(self.path)
        except sqlite3.Error as exc:  # no heartbeat: the run goes on, and a reader may call it stale too early
            log.warning("no heartbeat for run %s: %s", self.run_id, exc)
            return
        store.run_id = self.run_id
        try:
            while True:
                try:
                    store.heartbeat()
                except sqlite3.Error as exc:  # a missed beat is harmless; the next one may get through
                    log.debug("heartbeat of run %s missed: %s", self.run_id, exc)
                if self._done.wait(self.every_s):
                    return
        finally:
            store.close()
