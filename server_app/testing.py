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
speed (digits, logreg, 2 local steps, 4 nodes).
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from server_app.local_grid import ClientAppLike
from server_app.simulate import merge_config, run_local
from server_app.state import RunSummary
from strategies.base import Strategy
from strategies.config import key_of

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


def simulate(strategy: str | type[Strategy] = "fedbuff", *, nodes: int = 4, db: str | Path | None = None,
             clientapp: ClientAppLike | None = None, reorder_seed: int | None = None, workers: int = 2,
             run_id: int | None = None, **settings: Any) -> SimRun:
    """Run ``strategy`` (a name, ``module:Class``, or a ``Strategy`` subclass) in-process and return the run."""
    if isinstance(strategy, type):
        strategy = f"{strategy.__module__}:{strategy.__qualname__}"
    if db is None:
        db = Path(tempfile.mkdtemp(prefix="staleflower-")) / "metrics.db"
    values = {key_of(k): v for k, v in {**FAST_DEFAULTS, **settings}.items()}
    values.update({"strategy": strategy, "metrics-db": str(db)})
    summary = run_local(merge_config(overrides=values), nodes=nodes, clientapp=clientapp, workers=workers,
                        reorder_seed=reorder_seed, run_id=run_id)
    return SimRun(summary, Path(db))


@pytest.fixture(name="simulate")
def simulate_fixture(tmp_path: Path) -> Iterator[Callable[..., SimRun]]:
    """``simulate`` writing to a store under the test's ``tmp_path``."""
    def run(*args: Any, **kwargs: Any) -> SimRun:
        kwargs.setdefault("db", tmp_path / "metrics.db")
        return simulate(*args, **kwargs)

    yield run
