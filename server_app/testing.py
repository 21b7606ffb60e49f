"""Unit-test a strategy in simulation in a few lines.

``simulate(...)`` runs the real ServerApp and ClientApp in-process (``server_app.simulate.run_local``) on a
temporary metrics store and returns a ``SimRun`` with the summary and the store's rows. It is also a pytest
fixture: put ``pytest_plugins = ["server_app.testing"]`` in your ``conftest.py`` and ask for ``simulate``::

    from strategies import Strategy, Verdict
    from strategies.base import step

    class HalfStep(Strategy):                     # apply half of every delta, at once
        def apply(self, update):
            self._publish(step(self.weights, update.delta, 0.5))
            return Verdict("applied", applied=(update.seq,))

    def test_half_step(simulate):
        run = simulate(HalfStep, nodes=4, max_updates=12)
        assert run.summary.applied == 12
        assert all(r["status"] == "applied" for r in run.updates())

Settings are run-config keys written as Python names (``max_updates=12`` is ``max-updates``); the defaults favour
speed (digits, logreg, 2 local steps, 4 nodes). The strategy may be a class defined inside the test itself. The
fixture stops a run after ``timeout_s`` seconds (``DEFAULT_TIMEOUT_S``) and fails the test with a message naming
the strategy, and the engine stops a strategy whose verdicts break their contract (``server_app/contract.py``)
with a ``StrategyContractError`` naming it.
"""

from __future__ import annotations

import ctypes
import re
import sqlite3
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

try:
    import pytest

    from server_app.contract import strategy_label
    from server_app.local_grid import ClientAppLike
    from server_app.simulate import merge_config, run_local
    from server_app.state import RunSummary
    from strategies.base import Strategy
    from strategies.config import ConfigError, key_of
except ImportError as exc:  # the plugin found, its project not installed here: say how to install it
    raise ImportError(f"staleflower's pytest plugin (server_app.testing) cannot import {exc.name!r}: install the "
                      "project into this environment with `pip install -e <path to the staleflower checkout>`") from exc

FAST_DEFAULTS: dict[str, Any] = {"model": "logreg", "local_steps": 2, "max_updates": 20, "eval_every": 10,
                                 "min_nodes": 1}


@dataclass(frozen=True)
class SimRun:
    """A finished in-process run: its summary and its metrics store."""

    summary: RunSummary
    db: Path

    def rows(self, sql: str, *params: object) -> list[dict[str, Any]]:
        """Run a query on the store; rows as dicts."""
        with sqlite3.connect(self.db) as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sql, params)]

    def updates(self) -> list[dict[str, Any]]:
        """Rows of ``updates`` for this run, in seq order."""
        return self.rows("SELECT * FROM updates WHERE run_id=? ORDER BY seq", self.summary.run_id)

    def evals(self) -> list[dict[str, Any]]:
        """Rows of ``evals`` for this run, in time order."""
        return self.rows("SELECT * FROM evals WHERE run_id=? ORDER BY t, rowid", self.summary.run_id)

    def run_row(self) -> dict[str, Any]:
        """The ``runs`` row of this run."""
        return self.rows("SELECT * FROM runs WHERE run_id=?", self.summary.run_id)[0]


#: The fixture's wall-clock limit on one run, in seconds (``timeout_s=`` changes it; ``None`` removes it).
DEFAULT_TIMEOUT_S = 120.0


class SimulationTimeout(TimeoutError):
    """A run given to ``simulate`` went past its ``timeout_s``; the message names its strategy."""


def simulate(strategy: str | type[Strategy] = "fedbuff", *, nodes: int = 4, db: str | Path | None = None,
             clientapp: ClientAppLike | None = None, reorder_seed: int | None = None, workers: int = 2,
             run_id: int | None = None, timeout_s: float | None = None, app: str | Path | None = None,
             **settings: Any) -> SimRun:
    """Run ``strategy`` in-process and return the run.

    ``strategy`` is a registered name, ``module:Class``, or a ``Strategy`` subclass: one defined anywhere, a
    test function's body included (a class that cannot be imported by name is not checkpointed: set no
    ``checkpoint_every`` for it). ``timeout_s`` stops the run after that many seconds of wall-clock time with a
    ``SimulationTimeout`` naming the strategy; the run is recorded ``failed``. ``app``: your Flower app's directory
    (``--app``): its ``[tool.flwr.app.config]`` declares your ClientApp's keys (pass them as settings), and its
    ``clientapp`` component is the ClientApp unless ``clientapp`` is given.
    """
    if db is None:
        db = Path(tempfile.mkdtemp(prefix="staleflower-")) / "metrics.db"
    with _strategy_value(strategy, settings) as value:
        from server_app.simulate import app_config

        own = app_config(app)  # an app's own settings (its model, say) win over the fixture's fast defaults
        fast = {k: v for k, v in FAST_DEFAULTS.items() if key_of(k) not in own}
        values = {key_of(k): v for k, v in {**fast, **settings}.items()}
        values.update({"strategy": value, "metrics-db": str(db)})
        label = strategy_label(strategy) if isinstance(strategy, type) else strategy
        why = (f"simulate({label!r}) ran past timeout_s = {timeout_s:g} s: a strategy stuck in its code, or one "
               f"that never reaches the stop condition (max-updates counts applied updates)") if timeout_s else ""
        try:
            with _deadline(timeout_s, why):
                summary = run_local(merge_config(overrides=values, app=app), nodes=nodes,
                                    clientapp=clientapp or _app_clientapp(app), workers=workers,
                                    reorder_seed=reorder_seed, run_id=run_id, app=app)
        except _TimeUp:
            raise SimulationTimeout(why) from None
    return SimRun(summary, Path(db))


def _app_clientapp(app: str | Path | None) -> ClientAppLike | None:
    """The ``clientapp`` component of ``app``'s pyproject.toml, imported with ``app`` on the path (as Flower does)."""
    if app is None:
        return None
    from server_app.simulate import app_component, import_from, load_object

    import_from(app)
    path = app_component(app, "clientapp")
    return cast("ClientAppLike", load_object(path)) if path else None


@pytest.fixture(name="simulate")
def simulate_fixture(tmp_path: Path) -> Iterator[Callable[..., SimRun]]:
    """``simulate`` writing to a store under the test's ``tmp_path``; a run past its ``timeout_s`` fails the test.

    ``timeout_s`` defaults to ``DEFAULT_TIMEOUT_S`` here (a test must end), and to no limit for ``simulate``.
    """
    def run(*args: Any, **kwargs: Any) -> SimRun:
        kwargs.setdefault("db", tmp_path / "metrics.db")
        kwargs.setdefault("timeout_s", DEFAULT_TIMEOUT_S)
        try:
            return simulate(*args, **kwargs)
        except SimulationTimeout as exc:
            pytest.fail(str(exc), pytrace=False)

    yield run


# ------------------------------------------------------------------------------- strategies given as classes
_aliases: dict[str, tuple[type[Strategy], int]] = {}  # attribute of this module -> (class, runs using it)
_aliases_lock = threading.Lock()


@contextmanager
def _strategy_value(strategy: str | type[Strategy], settings: dict[str, Any]) -> Iterator[str]:
    """The run-config ``strategy`` value that names ``strategy`` for the ServerApp and every client thread.

    A class its module holds by name is ``module:Class``. Any other (defined in a function, nested, made by
    ``type()``) is lent to this module as an attribute for the run and named ``server_app.testing:ATTR``:
    the registry imports ``module:Class`` names, and a module already imported is found in ``sys.modules``.
    Checkpoints pickle the strategy by its own name, so such a class runs without them.
    """
    if not isinstance(strategy, type):
        yield strategy
        return
    if not issubclass(strategy, Strategy):
        raise TypeError(f"simulate() takes a Strategy subclass, a registered name or 'module:Class', not {strategy!r}")
    name, module = strategy.__qualname__, sys.modules.get(strategy.__module__)
    if name.isidentifier() and getattr(module, name, None) is strategy:
        yield f"{strategy.__module__}:{name}"
        return
    if settings.get("checkpoint_every"):
        raise ConfigError(f"checkpoint_every: checkpoints pickle the strategy by name, and {name} cannot be "
                          "imported by name: define it at module level to checkpoint it")
    settings["checkpoint_every"] = 0
    this = sys.modules[__name__]
    with _aliases_lock:
        base = "local_" + re.sub(r"\W", "_", name.replace(".<locals>.", "__"))
        attr, n = base, 1
        while attr in _aliases and _aliases[attr][0] is not strategy:
            n += 1
            attr = f"{base}_{n}"
        _aliases[attr] = (strategy, _aliases.get(attr, (strategy, 0))[1] + 1)
        setattr(this, attr, strategy)
    try:
        yield f"{__name__}:{attr}"
    finally:
        with _aliases_lock:
            cls, users = _aliases.pop(attr)
            if users > 1:
                _aliases[attr] = (cls, users - 1)
            else:
                delattr(this, attr)


# --------------------------------------------------------------------------------------------- the time limit
class _TimeUp(BaseException):
    """Raised in the thread running a simulation when its time is up.

    A ``BaseException``: the ``except Exception`` blocks that turn a client's error into a failed task must not
    absorb it.
    """


@contextmanager
def _deadline(timeout_s: float | None, why: str) -> Iterator[None]:
    """Interrupt the calling thread with ``_TimeUp(why)`` after ``timeout_s`` seconds.

    A timer thread raises the exception in this thread (CPython's ``PyThreadState_SetAsyncExc``), so the run
    stays in the caller's thread and the limit holds wherever the run is: in the engine's loop, in a strategy's
    code, or waiting for clients. It lands at the next Python instruction (not inside one long C call). No
    signal is used, so it works off the main thread and leaves pytest-timeout's SIGALRM alone.
    """
    if not timeout_s:
        yield
        return

    class TimeUp(_TimeUp):
        def __init__(self) -> None:
            super().__init__(why)

    target, lock, armed = threading.get_ident(), threading.Lock(), [True]

    def fire() -> None:
        with lock:
            if armed[0]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), ctypes.py_object(TimeUp))

    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:  # after this, no exception is pending for this thread, nor can one be raised
            armed[0] = False
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)
        timer.cancel()
