"""The metrics store: one SQLite file in WAL mode, written only by the ServerApp, read by the dashboard.

The schema is DESIGN.md's contract (tables ``runs``, ``updates``, ``evals``); extra columns are allowed and
``evals.metrics_json`` carries strategy-specific numbers. WAL lets the dashboard read while a run writes;
``synchronous=NORMAL`` in WAL mode keeps every committed row across a crash of the writer process.

The rows of task outcomes (``updates``, ``task_metrics``, rows marked applied) are written in groups
(``GROUP_COMMIT_S``): a commit per event cost more than the row itself (25 us against 3 us), a tenth of the engine's
time per update with small models. A group's statements wait in order in this process and are written in one
transaction, so the store's write lock is held for milliseconds, not for the group's half second (the runs of a
comparison write one store from several processes at once). A group is written before the engine waits for a
client, with every evaluation, checkpoint and change of the run's status, and at the latest ``GROUP_COMMIT_S``
after its first row; a write that fails leaves the group waiting for the next. What the store says was applied
was applied, and what a crash can take is rows of the last fraction of a second, all after the last checkpoint,
which a resume rolls back anyway.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from strategies.base import Status
from strategies.config import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs(
    run_id TEXT PRIMARY KEY, started_at REAL, finished_at REAL, status TEXT, strategy TEXT, config_json TEXT,
    error TEXT, heartbeat_at REAL
);
CREATE TABLE IF NOT EXISTS updates(
    run_id TEXT, seq INTEGER, node_id INTEGER, dispatched_at REAL, completed_at REAL,
    base_version INTEGER, applied_version INTEGER, staleness INTEGER,
    bytes_up INTEGER, bytes_down INTEGER, compute_s REAL, comm_s REAL,
    status TEXT, reason TEXT, peer_id INTEGER, transport_bytes_up INTEGER, transport_bytes_down INTEGER,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS evals(
    run_id TEXT, t REAL, model_version INTEGER, updates_applied INTEGER,
    bytes_up_total INTEGER, bytes_down_total INTEGER, loss REAL, accuracy REAL, metrics_json TEXT,
    consensus_distance REAL
);
CREATE TABLE IF NOT EXISTS nodes(
    run_id TEXT, node_id INTEGER, idx INTEGER, partition_id INTEGER, device TEXT, network TEXT,
    slowdown REAL, dropout REAL, torch_device TEXT
);
CREATE TABLE IF NOT EXISTS task_metrics(
    run_id TEXT, seq INTEGER, node_id INTEGER, key TEXT, value REAL, PRIMARY KEY (run_id, seq, key)
);
CREATE TABLE IF NOT EXISTS checkpoints(
    run_id TEXT PRIMARY KEY, taken_at REAL, applied INTEGER, updates_rowid INTEGER, evals_rowid INTEGER,
    buffered_json TEXT, state BLOB
);
CREATE TABLE IF NOT EXISTS comparisons(
    comparison_id TEXT PRIMARY KEY, started_at REAL, finished_at REAL, status TEXT, spec_json TEXT, report_json TEXT
);
CREATE TABLE IF NOT EXISTS comparison_runs(
    run_id TEXT PRIMARY KEY, comparison_id TEXT, method TEXT, role TEXT, seed INTEGER, trial INTEGER
);
CREATE INDEX IF NOT EXISTS comparison_runs_by ON comparison_runs(comparison_id, role, method);
CREATE INDEX IF NOT EXISTS evals_run ON evals(run_id, t);
CREATE INDEX IF NOT EXISTS updates_run_time ON updates(run_id, completed_at);
"""

# Columns added after a table's first release: a store written by an older version gains them on open.
# Tables added later need nothing here: ``CREATE TABLE IF NOT EXISTS`` adds them to an older store on open.
ADDED_COLUMNS = {
    "runs": (("heartbeat_at", "REAL"),),
    "updates": (("peer_id", "INTEGER"), ("transport_bytes_up", "INTEGER"), ("transport_bytes_down", "INTEGER")),
    "evals": (("consensus_distance", "REAL"),),
}
UPDATE_COLUMNS = ("run_id", "seq", "node_id", "dispatched_at", "completed_at", "base_version", "applied_version",
                  "staleness", "bytes_up", "bytes_down", "compute_s", "comm_s", "status", "reason", "peer_id",
                  "transport_bytes_up", "transport_bytes_down")
EVAL_COLUMNS = ("run_id", "t", "model_version", "updates_applied", "bytes_up_total", "bytes_down_total", "loss",
                "accuracy", "metrics_json", "consensus_distance")
CONSENSUS_KEY = "consensus-distance"  # a strategy's state_summary key that goes to its own column

def sql_node_id(node_id: int) -> int:
    """Flower's node ids are unsigned 64-bit; SQLite integers are signed. Store the same 64 bits, signed.

    Readers get Flower's id back with ``node_id & (2**64 - 1)`` (``unsigned_node_id``).
    """
    return node_id - 2**64 if node_id >= 2**63 else node_id


def unsigned_node_id(stored: int) -> int:
    """Inverse of ``sql_node_id``."""
    return stored & (2**64 - 1)


def stored_run(db: sqlite3.Connection, run_id: str) -> tuple[dict[str, Any], int] | None:  # Any: the config's JSON
    """A recorded run's config and fleet size (None: no such run); what a resume starts from."""
    row = db.execute("SELECT config_json FROM runs WHERE run_id=?", (run_id,)).fetchone()
    if row is None:
        return None
    (nodes,) = db.execute("SELECT COUNT(*) FROM nodes WHERE run_id=?", (run_id,)).fetchone()
    return json.loads(row[0]), nodes


def checkpoint_extent(run_id: str, applied: object, updates_rowid: object, evals_rowid: object,
                      buffered_json: object) -> str:
    """A checkpoint row's extent as one string, the same when written and when read back (what a seal covers)."""
    return json.dumps([run_id, applied, updates_rowid, evals_rowid, buffered_json])


#: ``OR REPLACE``: a group written again after a failure it did not see the end of (a signal between the commit
#: and the bookkeeping) writes the same rows, not an error.
_INSERT_UPDATE = (f"INSERT OR REPLACE INTO updates({', '.join(UPDATE_COLUMNS)}) "
                  f"VALUES ({', '.join('?' * len(UPDATE_COLUMNS))})")

#: Longest the rows of a group of task outcomes wait for their commit while the engine is busy (module docstring):
#: the dashboard's view of a busy run lags by at most this.
GROUP_COMMIT_S = 0.5

#: A ``nodes`` row as ``record_nodes`` takes it: partition id and torch device are what the node said of itself.
NodeRow = tuple[int, int, object, str, str, float, float, object]

T = TypeVar("T")

UPDATE_STATUSES = tuple(str(s) for s in Status)
RUN_STATUSES = ("running", "completed", "failed", "stopped")
COMPARISON_ROLES = ("tune", "eval")  # a comparison's run tunes a method, or evaluates its chosen setting


@dataclass(frozen=True)
class UpdateRow:
    """One row of ``updates``: one task's fate."""

    seq: int
    node_id: int
    dispatched_at: float
    completed_at: float
    base_version: int
    applied_version: int | None
    staleness: int | None
    bytes_up: int
    bytes_down: int
    compute_s: float
    comm_s: float
    status: str
    reason: str = ""
    peer_id: int | None = None               # the node it averaged with (gossip strategies)
    transport_bytes_up: int | None = None    # what Flower's messages really carried, where bytes_up/down are
    transport_bytes_down: int | None = None  # node-to-node traffic instead (gossip strategies; see README)


class MetricsStore:
    """Writer of one run's rows. Open, ``start_run``, record, ``finish_run``, close."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(SCHEMA)
        self._add_columns()
        self.run_id = ""
        self._group: list[tuple[str, list[tuple[Any, ...]]]] = []  # statements waiting, in order, with their rows
        self._group_since = 0.0  # when the group's first statement came

    def commit(self) -> None:
        """Write the waiting group of task outcomes in one transaction (the engine calls it before it waits).

        If the write fails (a signal, a full disk) the group waits on, whole, for the next commit, which recording
        the run's end makes.
        """
        if not self._group:
            return
        group, self._group = self._group, []
        try:
            with self._atomic():
                for sql, rows in group:
                    self.db.executemany(sql, rows)
        except BaseException:
            self._group = group + self._group
            raise

    def _grouped(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Add a statement to the group (module docstring); written when the group is old enough, or before."""
        if not self._group:
            self._group_since = time.monotonic()
        if self._group and self._group[-1][0] == sql:
            self._group[-1][1].extend(rows)  # the same statement again: one executemany
        else:
            self._group.append((sql, rows))
        if time.monotonic() - self._group_since >= GROUP_COMMIT_S:
            self.commit()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction of its own, after the group is written (a failure here rolls back only this)."""
        self.commit()
        with self._atomic():
            yield

    @contextlib.contextmanager
    def _atomic(self) -> Iterator[None]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, or a rollback of the whole on any error.

        The connection is in autocommit mode (``isolation_level=None``), where ``with self.db`` alone opens no
        transaction: every statement, every row of an ``executemany``, would commit on its own (a WAL commit per
        row, ~40 us, and a group or a resume's rollback half written by a crash). ``IMMEDIATE`` takes the write
        lock first, waiting on the busy timeout, so a transaction that reads before it writes (a checkpoint's
        extent) cannot fail on upgrading its lock while another process writes.
        """
        with self.db:  # commits on success, rolls back on an error
            self.db.execute("BEGIN IMMEDIATE")
            yield

    @classmethod
    def open(cls, path: str | Path) -> MetricsStore:
        """The store at ``path``, or a ``ConfigError`` saying why it cannot be opened there.

        The path comes from the user (``metrics-db``): a folder, a read-only place or a file that is not SQLite is
        their mistake, told in one line before the run starts, not a traceback from inside sqlite3.
        """
        try:
            return cls(path)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"metrics-db: cannot open a metrics store at {path}: {exc}") from None

    def _add_columns(self) -> None:
        for table, columns in ADDED_COLUMNS.items():
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            for name, kind in columns:
                if name not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def start_run(self, run_id: str, strategy: str, config: Mapping[str, object]) -> None:
        """Register a run as ``running``."""
        self.run_id = run_id
        with self._transaction():
            self.db.execute(
                "INSERT INTO runs(run_id, started_at, finished_at, status, strategy, config_json) VALUES (?,?,?,?,?,?)",
                (run_id, time.time(), None, "running", strategy, json.dumps(dict(config), sort_keys=True)),
            )

    def record_nodes(self, rows: Iterable[NodeRow]) -> None:
        """The fleet: ``(node_id, idx, partition_id, device, network, slowdown, dropout, torch_device)``."""
        with self._transaction():
            self.db.executemany("INSERT INTO nodes VALUES (?,?,?,?,?,?,?,?,?)",
                                [(self.run_id, sql_node_id(r[0]), *r[1:]) for r in rows])

    def record_update(self, row: UpdateRow) -> None:
        """Insert one task outcome (committed with its group: module docstring)."""
        if row.status not in UPDATE_STATUSES:
            raise ValueError(f"unknown update status {row.status!r}")
        self._grouped(
            _INSERT_UPDATE,
            [(self.run_id, row.seq, sql_node_id(row.node_id), row.dispatched_at, row.completed_at, row.base_version,
              row.applied_version, row.staleness, row.bytes_up, row.bytes_down, row.compute_s, row.comm_s,
              row.status, row.reason, None if row.peer_id is None else sql_node_id(row.peer_id),
              row.transport_bytes_up, row.transport_bytes_down)],
        )

    def record_task_metrics(self, seq: int, node_id: int, metrics: Mapping[str, float]) -> None:
        """The numbers of a task's reply ``metrics`` record (``train-loss``, ``exec-*``...), one row per key."""
        self._grouped("INSERT OR REPLACE INTO task_metrics VALUES (?,?,?,?,?)",
                      [(self.run_id, seq, sql_node_id(node_id), k, float(v)) for k, v in metrics.items()])

    def mark_applied(self, seqs: Iterable[int], version: int) -> None:
        """Buffered updates went into the model as ``version``.

        The strategy's reason ("buffer 3/5") is cleared; the update guard's note ("clipped from X to Y (...)",
        always first, ``; ``-separated) stays: it says what was applied.
        """
        self._grouped(
            "UPDATE updates SET status='applied', applied_version=?, reason=CASE WHEN reason LIKE 'clipped from %'"
            " THEN substr(reason, 1, instr(reason || '; ', '; ') - 1) ELSE '' END WHERE run_id=? AND seq=?",
            [(version, self.run_id, s) for s in seqs],
        )

    def record_eval(self, t: float, version: int, applied: int, bytes_up: int, bytes_down: int,
                    loss: float, accuracy: float, extra: Mapping[str, float] | None = None) -> None:
        """One evaluation of the global (or average) model; ``extra[CONSENSUS_KEY]`` goes to its own column."""
        extra = dict(extra or {})
        consensus = extra.pop(CONSENSUS_KEY, None)
        with self._transaction():
            self.db.execute(
                f"INSERT INTO evals({', '.join(EVAL_COLUMNS)}) VALUES ({', '.join('?' * len(EVAL_COLUMNS))})",
                (self.run_id, t, version, applied, bytes_up, bytes_down, loss, accuracy,
                 json.dumps(extra, sort_keys=True), consensus),
            )

    def save_checkpoint(self, applied: int, seal: Callable[[str], bytes]) -> None:
        """Replace the run's checkpoint, with the store's extent at this moment, in one transaction.

        ``seal(extent)`` returns the checkpoint's bytes: ``extent`` (``checkpoint_extent``) describes the row they
        go into, so the checkpoint can authenticate its row and not only itself (``server_app/checkpoint.py``).
        """
        with self._transaction():
            (u_rowid,) = self.db.execute("SELECT COALESCE(MAX(rowid), 0) FROM updates").fetchone()
            (e_rowid,) = self.db.execute("SELECT COALESCE(MAX(rowid), 0) FROM evals").fetchone()
            buffered = json.dumps(self.db.execute("SELECT seq, reason FROM updates WHERE run_id=? AND "
                                                  "status='buffered'", (self.run_id,)).fetchall())
            state = seal(checkpoint_extent(self.run_id, applied, u_rowid, e_rowid, buffered))
            self.db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?,?,?,?)",
                            (self.run_id, time.time(), applied, u_rowid, e_rowid, buffered, state))

    def load_checkpoint(self, run_id: str, load: Callable[[bytes, str], T]) -> T:
        """The run's checkpoint as ``load(blob, extent)`` decodes (and verifies) it; the store is only read."""
        return load(*self._checkpoint(run_id)[:2])

    def resume_run(self, run_id: str, load: Callable[[bytes, str], T]) -> T:
        """Reopen a run at its checkpoint: decode it, then roll back later rows and mark the run running.

        ``load`` runs first and may refuse the checkpoint by raising: nothing is written before it returns, so a
        corrupted or tampered checkpoint leaves the store as it was.
        """
        blob, extent, u_rowid, e_rowid, buffered = self._checkpoint(run_id)
        state = load(blob, extent)
        with self._transaction():
            self.db.execute("DELETE FROM updates WHERE run_id=? AND rowid>?", (run_id, u_rowid))
            self.db.execute("DELETE FROM evals WHERE run_id=? AND rowid>?", (run_id, e_rowid))
            back = [(reason, run_id, seq) for seq, reason in json.loads(buffered)]
            self.db.executemany("UPDATE updates SET status='buffered', applied_version=NULL, reason=? "
                                "WHERE run_id=? AND seq=?", back)
            self.db.execute("UPDATE runs SET status='running', finished_at=NULL, error=NULL WHERE run_id=?", (run_id,))
        self.run_id = run_id
        return state

    def _checkpoint(self, run_id: str) -> tuple[bytes, str, int, int, str]:
        """The checkpoint row of ``run_id``: its blob, its extent as sealed, and the rollback it calls for."""
        row = self.db.execute("SELECT applied, updates_rowid, evals_rowid, buffered_json, state FROM checkpoints "
                              "WHERE run_id=?", (run_id,)).fetchone()
        if row is None:
            known = self.db.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()
            why = "no such run" if known is None else f"the run ({known[0]}) has no checkpoint: set checkpoint-every"
            raise LookupError(f"cannot resume run {run_id} from {self.path}: {why}")
        applied, u_rowid, e_rowid, buffered, state = row
        if not isinstance(state, bytes):  # a BLOB comes back as bytes; anything else was not written by us
            state = b""
        return state, checkpoint_extent(run_id, applied, u_rowid, e_rowid, buffered), u_rowid, e_rowid, buffered

    def finish_run(self, status: str, error: str = "") -> None:
        """Close the run with its final status, once: a run already closed keeps its status and reason.

        Two paths may close one run when a runtime stops it (``server_app/lifecycle.py``); the first says why.
        """
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        with self._transaction():
            self.db.execute(
                "UPDATE runs SET finished_at=?, status=?, error=? WHERE run_id=? AND status='running'",
                (time.time(), status, error or None, self.run_id),
            )

    def heartbeat(self) -> None:
        """Say the running run's process is alive (``runs.heartbeat_at``, Unix time; ``lifecycle.Heartbeat``)."""
        with self._transaction():
            self.db.execute("UPDATE runs SET heartbeat_at=? WHERE run_id=? AND status='running'",
                            (time.time(), self.run_id))

    # ---------------------------------------------------------------- comparisons (python -m server_app.compare)
    # Written by the comparison harness, not the ServerApp: its runs are ordinary runs, and these rows say which
    # comparison each belongs to, for which method, in which role (tune or eval), on which seed and trial.
    def start_comparison(self, comparison_id: str, spec: Mapping[str, object]) -> None:
        """Register a comparison as ``running``, with its command line's meaning (``spec``) as JSON."""
        with self._transaction():
            self.db.execute("INSERT INTO comparisons(comparison_id, started_at, finished_at, status, spec_json) "
                            "VALUES (?,?,?,?,?)",
                            (comparison_id, time.time(), None, "running", json.dumps(dict(spec), sort_keys=True)))

    def tag_run(self, run_id: str, comparison_id: str, method: str, role: str, seed: int,
                trial: int | None = None) -> None:
        """Say, before it starts, which comparison run ``run_id`` belongs to (``trial``: tuning runs only)."""
        if role not in COMPARISON_ROLES:
            raise ValueError(f"unknown comparison role {role!r}")
        with self._transaction():
            self.db.execute("INSERT INTO comparison_runs VALUES (?,?,?,?,?,?)",
                            (run_id, comparison_id, method, role, seed, trial))

    def finish_comparison(self, comparison_id: str, status: str, report: Mapping[str, object] | None = None) -> None:
        """Close a comparison with a run status and, when it got that far, its JSON report."""
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown comparison status {status!r}")
        with self._transaction():
            self.db.execute("UPDATE comparisons SET finished_at=?, status=?, report_json=? WHERE comparison_id=?",
                            (time.time(), status, None if report is None else json.dumps(dict(report)),
                             comparison_id))

    def close(self) -> None:
        """Commit the open group, then close the connection (closing alone would roll the group back)."""
        try:
            self.commit()
        finally:
            self.db.close()
