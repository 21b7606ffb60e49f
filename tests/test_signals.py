"""No ghost runs: a signal to the in-process runner ends its run ``stopped`` with the reason, rows kept.

A real ``python -m server_app.simulate`` subprocess, stopped mid-run; and the mechanism itself in this process
(``server_app.lifecycle``), where the handoff to the handler the process had before is what Flower's own
``flwr-serverapp`` process relies on.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server_app import lifecycle
from server_app.lifecycle import RunStopped, stop_on_signals
from server_app.store import MetricsStore

ROOT = Path(__file__).resolve().parent.parent


def _running(db: Path) -> tuple[str, int] | None:
    """The run id and the rows so far, once the run has written a task; None before."""
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0) as con:
            row = con.execute("SELECT r.run_id, COUNT(u.seq) FROM runs r JOIN updates u USING (run_id) "
                              "WHERE r.status='running' GROUP BY r.run_id").fetchone()
    except sqlite3.OperationalError:  # the schema is being created
        return None
    return None if row is None else (row[0], row[1])


def _default_dispositions() -> None:
    """The child starts with default SIGINT: a test run in a background job inherits an ignored SIGINT."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_ends_the_run_stopped_with_its_rows(tmp_path: Path, sig: signal.Signals, code: int) -> None:
    db = tmp_path / "m.db"
    cmd = [sys.executable, "-m", "server_app.simulate", "--nodes", "4", "--quiet", "--set", f"metrics-db='{db}'",
           "--set", "strategy='fedbuff'", "--set", "model='logreg'", "--set", "local-steps=2",
           "--set", "eval-every=10", "--set", "max-updates=1000000"]  # would take hours: it is still running
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_dispositions)
    try:
        deadline = time.monotonic() + 120
        while (seen := _running(db)) is None:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never wrote a task"
            time.sleep(0.1)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    run_id, rows_before = seen
    name = signal.Signals(sig).name
    assert proc.returncode == code, err
    assert "Traceback" not in err and "Traceback" not in out
    assert err.strip().splitlines()[-1].startswith(f"stopped by {name}: exit {code}")
    with sqlite3.connect(db) as con:
        status, error, finished = con.execute("SELECT status, error, finished_at FROM runs WHERE run_id=?",
                                              (run_id,)).fetchone()
        (rows_after,) = con.execute("SELECT COUNT(*) FROM updates WHERE run_id=?", (run_id,)).fetchone()
        (evals,) = con.execute("SELECT COUNT(*) FROM evals WHERE run_id=?", (run_id,)).fetchone()
    assert (status, error) == ("stopped", f"stopped by {name}") and finished is not None
    assert rows_after >= rows_before >= 1 and evals >= 1  # what was acknowledged before the signal stayed


def test_a_signal_unwinds_the_block_and_restores_the_handlers() -> None:
    before = {s: signal.getsignal(s) for s in lifecycle.STOP_SIGNALS}
    # nested (the ServerApp inside the runner): the outer block's handlers stay
    with pytest.raises(RunStopped) as caught, stop_on_signals(handoff=False), stop_on_signals():
        assert signal.getsignal(signal.SIGTERM) is lifecycle._on_signal
        signal.raise_signal(signal.SIGTERM)
    assert caught.value.reason == "stopped by SIGTERM" and caught.value.exit_code == 143
    assert {s: signal.getsignal(s) for s in lifecycle.STOP_SIGNALS} == before


def test_the_signal_is_handed_on_to_the_handler_the_process_had() -> None:
    """Under Flower's ``flwr-serverapp`` that handler is Flower's graceful exit: it runs after the run is marked."""
    calls: list[int] = []

    def flower_like(signum: int, _frame: object) -> None:
        calls.append(signum)
        raise SystemExit(0)

    old = signal.signal(signal.SIGTERM, flower_like)
    # Python's own SIGINT handler, set here: a pytest-xdist worker may run with SIGINT ignored.
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit), stop_on_signals():
            signal.raise_signal(signal.SIGTERM)
        assert calls == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is flower_like
        with pytest.raises(KeyboardInterrupt), stop_on_signals():  # SIGINT's default: KeyboardInterrupt
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


def test_an_ignored_signal_stays_ignored() -> None:
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        with stop_on_signals():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
    finally:
        signal.signal(signal.SIGHUP, old)


def test_a_run_is_closed_once_and_beats_only_while_running(tmp_path: Path) -> None:
    store = MetricsStore(tmp_path / "m.db")
    store.start_run("r", "fedbuff", {})
    with lifecycle.Heartbeat(store.path, "r", every_s=0.01):
        time.sleep(0.1)
    (beat,) = store.db.execute("SELECT heartbeat_at FROM runs").fetchone()
    assert beat is not None and time.time() - beat < 5
    store.finish_run("stopped", "stopped by SIGTERM")
    store.finish_run("completed")  # a later path (the runtime's exit) does not overwrite why it ended
    store.heartbeat()
    assert store.db.execute("SELECT status, error, heartbeat_at FROM runs").fetchone() == (
        "stopped", "stopped by SIGTERM", beat)
    store.close()
