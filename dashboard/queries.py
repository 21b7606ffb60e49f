"""Read-only SQL over the metrics store: every aggregate the dashboard shows, computed by SQLite.

The store is DESIGN.md's contract (tables ``runs``, ``updates``, ``evals``), written by the ServerApp in WAL
mode. This module only reads it:

- through a read-only URI connection (``file:...?mode=ro``: SQLite refuses any write to the store or its WAL)
  with a short busy timeout;
- inside one short read transaction per page load (``snapshot``): every view of a refresh sees the same
  committed state, and under WAL a reader never blocks the writer (nor the writer the reader);
- with every aggregation in SQL: per selected run, grouped passes over its tasks (``stage``) into small
  temporary tables (per time bucket, staleness and status; per node) from which every per-task view is a
  ``GROUP BY`` of a few thousand rows; the per-node views read only the tasks of the nodes they draw
  (``pick_nodes``: at most ``MAX_NODES``); window functions for cumulative sums and evaluation thinning; a top-N
  query for the run list (``list_runs``: the newest few hundred, never the whole ``runs`` table joined with its
  tasks); index range scans for evaluations, the first evaluation reaching a target and the timeline's latest
  tasks. Python never loops over rows (only over the few selected runs), and what a page returns is bounded by
  nodes drawn x buckets, not by the length of the run, the number of runs or the size of the fleet
  (BENCHMARKS.md, "Dashboard load time").

Columns beyond the contract are used only when present: ``runs.error``, ``evals.metrics_json`` (the strategy's
state, and the node models' scores, read by SQLite's JSON functions: ``LOCAL_SCORES``),
``evals.consensus_distance`` (gossip strategies) and the ``nodes`` table (device and network of each node); the
``comparisons`` and ``comparison_runs`` tables (``python -m server_app.compare``) give the comparison view.

Times are seconds on the run's clock (virtual or wall); bytes are what was really serialized. Bandwidth puts a
task's ``bytes_down`` at its dispatch and its ``bytes_up`` at its completion, the two ends of the task the store
records.
"""

from __future__ import annotations

import argparse
import json
import math
import sqlite3
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

# DESIGN.md's contract: what a file must have to be read as a metrics store.
REQUIRED: dict[str, tuple[str, ...]] = {
    "runs": ("run_id", "started_at", "finished_at", "status", "strategy", "config_json"),
    "updates": ("run_id", "seq", "node_id", "dispatched_at", "completed_at", "base_version", "applied_version",
                "staleness", "bytes_up", "bytes_down", "compute_s", "comm_s", "status", "reason"),
    "evals": ("run_id", "t", "model_version", "updates_applied", "bytes_up_total", "bytes_down_total", "loss",
              "accuracy"),
}
STATUSES = ("applied", "buffered", "dropped", "rejected", "restarted", "failed")
BUSY_TIMEOUT_S = 1.0      # a reader waits at most this long for a lock (WAL readers normally never wait)
MAX_BUCKETS = 120         # time buckets of the bandwidth and staleness-over-time series
MAX_EVAL_POINTS = 2000    # evaluations per run drawn (every k-th kept beyond that, the last one always)
TIMELINE_LIMIT = 1500     # tasks drawn in the per-node timeline (the most recent ones)
# A ``running`` run whose process wrote nothing (no row, no heartbeat) for this long is shown as not live: its
# process beats every 10 s (server_app/lifecycle.py, HEARTBEAT_S), so this is six beats missed in a row: a killed
# or hung process, not a busy machine. A store without heartbeats (an older writer) has only its rows to go by.
STALE_AFTER_S = 60.0


class StoreError(Exception):
    """The file cannot be read as a metrics store; ``kind`` says why, the message says it to a person."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # missing | empty | locked | foreign | unreadable


@dataclass(frozen=True)
class Schema:
    """Columns of each table of the store (only the tables that exist)."""

    columns: dict[str, frozenset[str]]

    def has(self, table: str, column: str | None = None) -> bool:
        """Whether ``table`` (and ``column`` in it) exists."""
        cols = self.columns.get(table)
        return cols is not None and (column is None or column in cols)


# ------------------------------------------------------------------------------------------------ connection
def default_db(argv: list[str] | None = None) -> str:
    """``--db PATH`` after ``--`` on the command line, else the default metrics store of the runners."""
    parser = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    parser.add_argument("--db", nargs="?", default="")
    try:
        args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
        db = args.db or ""
    except argparse.ArgumentError:
        db = ""
    if db:
        return db
    from strategies.config import default_metrics_path  # $STALEFLOWER_METRICS_DB, else ~/.staleflower/metrics.db

    return str(default_metrics_path())


def connect(path: str | Path, timeout: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """A read-only connection to the store at ``path``; ``StoreError`` if it is missing or empty."""
    p = Path(path).expanduser()
    if not p.exists():
        raise StoreError("missing", f"No metrics store at {p}: no run has written there yet. Start one "
                                    "(`make run`, or `python -m server_app.simulate --set metrics-db=...`) "
                                    "or pick another file.")
    if p.is_dir():
        raise StoreError("foreign", f"{p} is a directory, not a metrics store (an SQLite file).")
    if p.stat().st_size == 0:
        raise StoreError("empty", f"The metrics store {p} is empty (0 bytes): no run has written to it yet.")
    uri = p.resolve().as_uri() + "?mode=ro"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=timeout, isolation_level=None)
        db.execute("PRAGMA temp_store=MEMORY")  # the staged aggregates (temp tables: the store stays read-only)
        db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    except sqlite3.Error as exc:
        raise _translate(exc, p) from exc
    return db


@contextmanager
def snapshot(path: str | Path, timeout: float = BUSY_TIMEOUT_S) -> Iterator[tuple[sqlite3.Connection, Schema]]:
    """One short read transaction: every query inside sees the same committed state of the store."""
    p = Path(path).expanduser()
    db = connect(p, timeout)
    try:
        try:
            db.execute("BEGIN")
            schema = read_schema(db, p)
        except sqlite3.Error as exc:
            raise _translate(exc, p) from exc
        try:
            yield db, schema
        except sqlite3.Error as exc:
            raise _translate(exc, p) from exc
        finally:
            if db.in_transaction:
                db.execute("COMMIT")
    finally:
        db.close()


def read_schema(db: sqlite3.Connection, path: Path | str = "") -> Schema:
    """The store's tables and columns; ``StoreError('foreign')`` if DESIGN.md's tables or columns are missing."""
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    columns = {t: frozenset(r[1] for r in db.execute(f'PRAGMA table_info("{t}")')) for t in tables}
    if not columns:
        raise StoreError("empty", f"The metrics store {path} has no tables yet: no run has written to it.")
    missing = [f"{t}" if t not in columns else f"{t}.{c}"
               for t, cols in REQUIRED.items() for c in (cols if t in columns else cols[:1])
               if t not in columns or c not in columns[t]]
    if missing:
        shown = ", ".join(dict.fromkeys(m if "." in m else f"table {m}" for m in missing))
        raise StoreError("foreign", f"{path} is an SQLite file but not a staleflower metrics store "
                                    f"(missing {shown}; see docs/design.md for the schema).")
    return Schema(columns)


def _translate(exc: sqlite3.Error, path: Path) -> StoreError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return StoreError("locked", f"The metrics store {path} is locked by another process ({text}); "
                                    "it is retried at the next refresh.")
    if "not a database" in text or "malformed" in text or "encrypted" in text:
        return StoreError("foreign", f"{path} is not an SQLite metrics store ({text}).")
    return StoreError("unreadable", f"Cannot read the metrics store {path}: {text}.")


def _frame(db: sqlite3.Connection, sql: str, params: dict[str, Any] | None = None) -> pd.DataFrame:
    cur = db.execute(sql, params or {})
    return pd.DataFrame.from_records(cur.fetchall(), columns=[d[0] for d in cur.description])


def _ids(run_ids: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """``:r0,:r1,...`` and their values, for ``run_id IN (...)`` with named parameters."""
    names = [f"r{i}" for i in range(len(run_ids))]
    return ",".join(f":{n}" for n in names) or "NULL", dict(zip(names, run_ids, strict=True))


# ------------------------------------------------------------------------------------------------ the queries
RUN_CHOICES = 200         # runs the picker offers at once: the newest (matching its filter), plus the selected
MAX_NODES = 40            # nodes drawn in the per-node views (the slowest or the busiest when a run has more)


def list_runs(db: sqlite3.Connection, schema: Schema, limit: int | None = RUN_CHOICES, search: str = "",
              include: Sequence[str] = ()) -> pd.DataFrame:
    """The picker's runs, newest first: counts, the config's stop conditions, a human label.

    The newest ``limit`` runs (all when ``None``) whose id, strategy or config contains ``search``, plus the runs
    of ``include`` wherever they are.

    Bounded by ``limit``, not by the store: a store of 50,000 runs costs one top-N pass over ``runs`` (no join
    with ``updates``), then index lookups for each listed run's counts (BENCHMARKS.md, "Dashboard load time").
    ``last_write_at`` (Unix time) is the latest sign of life of the run's process the store holds: its start, its
    heartbeat, its checkpoint, and on the wall clock its newest row (a virtual-clock row's time says nothing of
    the wall clock). ``with_activity`` turns it into "live" or "no writes for ..." at the moment the page draws.
    """
    error = "r.error" if schema.has("runs", "error") else "NULL"
    heartbeat = "r.heartbeat_at" if schema.has("runs", "heartbeat_at") else "NULL"
    has_ckpt = schema.has("checkpoints", "taken_at")
    ckpt = "(SELECT MAX(c.taken_at) FROM checkpoints c WHERE c.run_id = r.run_id)" if has_ckpt else "NULL"
    cfg = "CASE WHEN json_valid(r.config_json) THEN json_extract(r.config_json, '$.{}') END"
    ids, params = _ids(include)
    where = ("r.run_id || ' ' || COALESCE(r.strategy, '') || ' ' || COALESCE(r.config_json, '') LIKE :q "
             "ESCAPE '\\'" if search else "1")
    picked = f"""SELECT run_id FROM (SELECT run_id FROM runs r WHERE {where}
                                     ORDER BY r.started_at DESC, r.run_id LIMIT :limit)
                 UNION SELECT run_id FROM runs WHERE run_id IN ({ids})"""
    df = _frame(db, f"""
        SELECT r.run_id, r.started_at, r.finished_at, r.status, r.strategy, {error} AS error,
               {cfg.format('codec')} AS codec, {cfg.format('clock')} AS clock,
               {cfg.format('"target-accuracy"')} AS target_accuracy, {cfg.format('"max-updates"')} AS max_updates,
               {cfg.format('"max-time"')} AS max_time,
               (SELECT COUNT(*) FROM updates u WHERE u.run_id = r.run_id) AS tasks,
               (SELECT MAX(completed_at) FROM updates u WHERE u.run_id = r.run_id) AS clock_s,
               (SELECT COUNT(*) FROM evals e WHERE e.run_id = r.run_id) AS evals,
               (SELECT MAX(t) FROM evals e WHERE e.run_id = r.run_id) AS eval_t,
               {heartbeat} AS heartbeat_at, {ckpt} AS checkpoint_at
        FROM runs r WHERE r.run_id IN ({picked})
        ORDER BY r.started_at DESC, r.run_id
    """, {**params, "limit": -1 if limit is None else limit, "q": f"%{_like(search)}%"})
    return _labelled(df)


def _like(text: str) -> str:
    r"""``text`` for a ``LIKE ... ESCAPE '\'`` pattern: its own ``%`` and ``_`` match themselves."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _labelled(df: pd.DataFrame) -> pd.DataFrame:
    """The run list with ``last_write_at`` and ``label`` (vectorized: a few hundred rows at most)."""
    df["run_id"] = df["run_id"].astype(str)
    wall = df["clock"].eq("wall")
    newest_row = df[["clock_s", "eval_t"]].max(axis=1).fillna(0)
    df["last_write_at"] = pd.concat([df["started_at"], df["heartbeat_at"], df["checkpoint_at"],
                                     (df["started_at"] + newest_row).where(wall)], axis=1).max(axis=1).fillna(0)
    df["tasks"] = df["tasks"].fillna(0).astype(int)
    df["evals"] = df["evals"].fillna(0).astype(int)
    local = datetime.now().astimezone().tzinfo
    started = (pd.to_datetime(df["started_at"], unit="s", utc=True, errors="coerce").dt.tz_convert(local)
               .dt.strftime("%m-%d %H:%M:%S"))
    codec = df["codec"].fillna("none").astype(str)
    suffix = pd.Series(" + " + codec, index=df.index).where(~codec.isin(["", "none"]), "")
    df["label"] = (df["strategy"].fillna("?").astype(str) + suffix + " · " + df["run_id"].str[-6:] + " · "
                   + started.fillna("?"))
    return df.drop(columns=["heartbeat_at", "checkpoint_at", "eval_t"])


def count_runs(db: sqlite3.Connection) -> tuple[int, str | None]:
    """How many runs the store holds, and the newest one's id (``None`` when none)."""
    total = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    newest = db.execute("SELECT run_id FROM runs ORDER BY started_at DESC, run_id LIMIT 1").fetchone()
    return int(total), (str(newest[0]) if newest else None)


def comparison_run_ids(db: sqlite3.Connection, schema: Schema, comparison_id: str,
                       tuning: bool = False) -> list[str]:
    """The runs of one comparison, by method and seed: its evaluation runs, and its tuning runs if ``tuning``."""
    if not has_comparisons(schema):
        return []
    roles = "('eval', 'tune')" if tuning else "('eval')"
    rows = db.execute(f"""
        SELECT c.run_id FROM comparison_runs c JOIN runs r USING (run_id)
        WHERE c.comparison_id = :cid AND c.role IN {roles}
        ORDER BY c.role, c.method, c.seed, c.trial, r.started_at
    """, {"cid": comparison_id}).fetchall()
    return [str(r[0]) for r in rows]


def with_activity(runs: pd.DataFrame, now: float, stale_after_s: float = STALE_AFTER_S) -> pd.DataFrame:
    """``runs`` with ``activity`` ("live", "no writes for 5 min", "" for a finished run) and ``shown_status``.

    Computed when the page draws, not in the cached query: a dead run's store no longer changes, so a result
    cached by the store's state would call it live forever. ``now`` is a Unix time (``time.time()``).
    """
    age = now - pd.to_numeric(runs["last_write_at"], errors="coerce")
    running = runs["status"] == "running"
    stale = running & ~(age <= stale_after_s)  # no time at all is no sign of life either
    activity = pd.Series("", index=runs.index, dtype=object)
    activity[running] = "live"
    activity[stale] = age[stale].map(lambda a: f"no writes for {_duration(a)}")
    status = runs["status"].fillna("?").astype(str)
    shown = status.where(activity == "", status + " · " + activity)
    return runs.assign(activity=activity, shown_status=shown)


def _duration(seconds: float) -> str:
    """A rough age a person reads at a glance: ``75 s``, ``5 min``, ``3 h``, ``2 days``."""
    if pd.isna(seconds):
        return "a while"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _per_run(db: sqlite3.Connection, sql: str, run_ids: Sequence[str], **params: Any) -> pd.DataFrame:
    """``sql`` (with ``:run``) once per run, concatenated: each is an index range scan of one run's rows."""
    frames = [_frame(db, sql, {**params, "run": run}) for run in run_ids]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else _frame(db, sql, {**params, "run": None})


# What the nodes hold (server_app/localscores.py): keys of ``evals.metrics_json`` the decentralized strategies
# write at every evaluation, beside the accuracy of the average model, which no node holds. The column each goes
# to, and the range outside which a stored value is not read as one (an accuracy is a fraction).
LOCAL_SCORES = {"local_mean": ("local-acc-mean", 0, 1), "local_min": ("local-acc-min", 0, 1),
                "local_nodes": ("local-acc-nodes", 1, 1_000_000_000)}


def _json_number(key: str, low: float, high: float, column: str = "metrics_json") -> str:
    """SQL for the number stored at ``key`` of the JSON object in ``column``: NULL unless it is one in [low, high].

    Everything in the store may be hostile, and one bad row must not fail the page's query: a value that is not
    text (a blob is JSONB to a newer SQLite, which raises on a malformed one), not valid JSON, not an object, whose
    key is missing or holds a string, an object or a number out of range (``1e999`` reads as infinity) is NULL,
    drawn as no point. The WHENs run in order, so ``json_type`` and ``json_extract`` only ever see valid JSON.
    """
    path = f"'$.\"{key}\"'"
    return (f"CASE WHEN typeof({column}) IS NOT 'text' OR NOT json_valid({column}) THEN NULL "
            f"WHEN json_type({column}, {path}) NOT IN ('integer', 'real') THEN NULL "
            f"WHEN json_extract({column}, {path}) BETWEEN {low} AND {high} THEN json_extract({column}, {path}) END")


# Which accuracy a target reads (run-config ``target-score``, the comparison harness's ``--score``): the key of
# ``evals.metrics_json`` each choice reads, None for the published model's ``accuracy``; and how the page names it.
# The same as server_app/localscores.py's SCORE_KEYS and SCORE_LABELS (tested), kept here so that the dashboard
# does not import the strategies and Flower.
SCORES: dict[str, str | None] = {"local-mean": "local-acc-mean", "local-min": "local-acc-min", "average": None}
SCORE_NAMES = {"local-mean": "node models' mean", "local-min": "worst node model"}


def _scored(score: str, schema: Schema, column: str = "metrics_json") -> str:
    """SQL for an ``evals`` row's accuracy as ``score`` reads it, with the harness's fallback, guarded.

    The local score ``score`` names where the row holds one; the published model's ``accuracy`` where it holds none
    (no ``metrics_json``, or no such key, or a JSON null there: the harness's ``COALESCE(json_extract(...),
    accuracy)``, ``server_app/compare_report.py``), so a star strategy's row reads its accuracy whatever the
    choice. Where the row holds something that cannot be read (not text, not JSON, a key holding a string, an
    object or a number outside [0, 1]) it is NULL: no point, never the average model's accuracy in its place, and
    never an error (the harness reads only the rows it wrote; everything in the store may be hostile).
    """
    key = SCORES[score]
    if key is None or not schema.has("evals", column):
        return "accuracy"
    path = f"'$.\"{key}\"'"
    return (f"CASE WHEN {column} IS NULL THEN accuracy "
            f"WHEN typeof({column}) IS NOT 'text' OR NOT json_valid({column}) THEN NULL "
            f"WHEN json_type({column}, {path}) IS NULL OR json_type({column}, {path}) = 'null' THEN accuracy "
            f"ELSE {_json_number(key, 0, 1, column)} END")


def _local_scores(schema: Schema) -> dict[str, str]:
    """Column name to SQL for each of ``LOCAL_SCORES`` (NULL in a store without ``evals.metrics_json``)."""
    if not schema.has("evals", "metrics_json"):
        return dict.fromkeys(LOCAL_SCORES, "NULL")
    return {name: _json_number(key, low, high) for name, (key, low, high) in LOCAL_SCORES.items()}


def evals(db: sqlite3.Connection, schema: Schema, run_ids: Sequence[str],
          max_points: int = MAX_EVAL_POINTS) -> pd.DataFrame:
    """Evaluations of the runs in time order (every k-th beyond ``max_points`` per run, the last always kept).

    The ``evals_run`` index ``(run_id, t)`` gives the order, so the numbering needs no sort. ``local_mean``,
    ``local_min`` and ``local_nodes`` are the node models' scores (``LOCAL_SCORES``), read from
    ``metrics_json`` by SQLite for the rows kept only; ``local_of``, the most nodes any kept row scored, names the
    run's "worst of N" line.
    """
    consensus = "consensus_distance" if schema.has("evals", "consensus_distance") else "NULL"
    local = _local_scores(schema)
    return _per_run(db, f"""
        WITH n AS (SELECT COUNT(*) AS n FROM evals WHERE run_id = :run)
        SELECT run_id, t, model_version, updates_applied, bytes_up_total, bytes_down_total,
               bytes_up_total + bytes_down_total AS bytes_total, loss, accuracy, {consensus} AS consensus_distance,
               {local["local_mean"]} AS local_mean, {local["local_min"]} AS local_min,
               {local["local_nodes"]} AS local_nodes, MAX({local["local_nodes"]}) OVER () AS local_of
        FROM (SELECT *, ROW_NUMBER() OVER (ORDER BY t, rowid) AS i FROM evals WHERE run_id = :run), n
        WHERE n.n <= :m OR i = n.n OR (i - 1) % ((n.n + :m - 1) / :m) = 0
        ORDER BY i
    """, run_ids, m=max_points)


def last_evals(db: sqlite3.Connection, schema: Schema, run_ids: Sequence[str]) -> pd.DataFrame:
    """Per run, its latest evaluation (clock time, applied updates, loss, accuracy) and its best scores so far.

    With the node models' scores of that evaluation (``LOCAL_SCORES``; NULL when it has none): the tiles show
    them beside the accuracy, which for a decentralized strategy scores a model no node holds. ``best_accuracy``
    is the best published model's accuracy so far; ``best_local_mean`` and ``best_local_min`` the best of each row's
    score as ``target-score = local-mean`` (``local-min``) reads it (``_scored``: the local score, else the row's
    accuracy), NULL when no evaluation of the run holds a readable local score: the progress toward the run's
    ``target-accuracy`` reads the one its ``target-score`` names (``dashboard/stops.py``). Those two are read for a
    ``running`` run only, the one that shows a progress bar: they parse every evaluation's JSON (about 0.1 s for
    20,000 evaluations), where the best accuracy is read from the index.
    """
    local = _local_scores(schema)
    mean, low = _scored("local-mean", schema), _scored("local-min", schema)
    return _per_run(db, f"""
        WITH best AS (
            SELECT CASE WHEN COUNT({local["local_mean"]}) > 0 THEN MAX({mean}) END AS best_local_mean,
                   CASE WHEN COUNT({local["local_min"]}) > 0 THEN MAX({low}) END AS best_local_min
            FROM evals WHERE run_id = :run
                         AND EXISTS (SELECT 1 FROM runs WHERE run_id = :run AND status = 'running'))
        SELECT run_id, t AS eval_t, updates_applied AS eval_updates, loss, accuracy,
               {local["local_mean"]} AS local_mean, {local["local_min"]} AS local_min,
               {local["local_nodes"]} AS local_nodes,
               (SELECT MAX(accuracy) FROM evals WHERE run_id = :run) AS best_accuracy,
               best.best_local_mean, best.best_local_min
        FROM evals, best WHERE run_id = :run ORDER BY t DESC, rowid DESC LIMIT 1
    """, run_ids)


def first_reaching(db: sqlite3.Connection, run_ids: Sequence[str], target: float) -> pd.DataFrame:
    """Per run, the first evaluation with accuracy >= ``target``: its clock time, updates and bytes."""
    return _per_run(db, """
        SELECT run_id, t, updates_applied, bytes_up_total, bytes_down_total,
               bytes_up_total + bytes_down_total AS bytes_total, accuracy
        FROM evals WHERE run_id = :run AND accuracy >= :target ORDER BY t, rowid LIMIT 1
    """, run_ids, target=target)


def bucket_width(span_s: float | None, buckets: int = MAX_BUCKETS) -> float:
    """A round bucket width (1, 2 or 5 times a power of ten) giving at most ``buckets`` buckets over ``span_s``."""
    if span_s is None or not math.isfinite(span_s) or span_s <= 0:
        return 1.0
    raw = span_s / buckets
    base = 10.0 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= raw * (1 - 1e-9))


def clock_span(db: sqlite3.Connection, run_ids: Sequence[str]) -> float | None:
    """The latest completion among the runs' tasks, in seconds on their clocks (``None`` before the first one).

    Read from the ``(run_id, completed_at)`` index.
    """
    ids, params = _ids(run_ids)
    return db.execute(f"SELECT MAX(completed_at) FROM updates WHERE run_id IN ({ids})", params).fetchone()[0]


def _source(db: sqlite3.Connection, run_ids: Sequence[str]) -> str:
    """How to scan the runs' tasks: the table directly, or through its ``(run_id, ...)`` indexes.

    Directly when the runs hold a third of its rows or more (cheaper than a lookup per row through the primary
    key), through the index otherwise.
    """
    ids, params = _ids(run_ids)
    selected = db.execute(f"SELECT COUNT(*) FROM updates WHERE run_id IN ({ids})", params).fetchone()[0]
    total = db.execute("SELECT COALESCE(MAX(rowid), 0) FROM updates").fetchone()[0]
    return "updates NOT INDEXED" if selected * 3 >= total else "updates"


def stage(db: sqlite3.Connection, run_ids: Sequence[str], width: float) -> int:
    """Two grouped passes over each run's tasks into temporary tables, which every per-run view then reads.

    ``temp.dash_tasks``: one row per (run, completion bucket, dispatch bucket, staleness, status) with its task
    count and bytes each way: a few thousand rows whatever the number of tasks or nodes, so that the views after it
    cost next to nothing. ``temp.dash_node_totals``: one row per (run, node) with its tasks and their total time,
    what ``pick_nodes`` chooses from and the runs' node counts. Nodes stay out of the first table and everything but
    the two numbers out of the second, and each run is grouped on its own, on integer keys first: SQLite groups by
    sorting, and with 100,000 nodes a row per (node, bucket, ...) was a row per task, re-read by every view.
    Returns the number of rows of ``dash_tasks``.
    """
    db.execute("DROP TABLE IF EXISTS temp.dash_tasks")
    db.execute("CREATE TEMP TABLE dash_tasks(run_id, bc, bd, staleness, status, n, up, down, down_when_up)")
    db.execute("DROP TABLE IF EXISTS temp.dash_node_totals")
    db.execute("CREATE TEMP TABLE dash_node_totals(run_id, node_id, tasks, task_s)")
    for run in run_ids:
        source = _source(db, [run])
        db.execute(f"""
            INSERT INTO temp.dash_tasks
            SELECT :run, CAST(completed_at / :w AS INTEGER) AS bc, CAST(dispatched_at / :w AS INTEGER) AS bd,
                   staleness, status, COUNT(*), SUM(bytes_up), SUM(bytes_down),
                   SUM(CASE WHEN bytes_up > 0 THEN bytes_down END)
            FROM {source} WHERE run_id = :run
            GROUP BY bc, bd, staleness, status
        """, {"run": run, "w": width})
        db.execute(f"""
            INSERT INTO temp.dash_node_totals
            SELECT :run, node_id, COUNT(*), SUM(completed_at - dispatched_at) FROM {source} WHERE run_id = :run
            GROUP BY node_id
        """, {"run": run})
    return db.execute("SELECT COUNT(*) FROM temp.dash_tasks").fetchone()[0]


def summary(db: sqlite3.Connection) -> pd.DataFrame:
    """Per staged run: tasks by status, bytes each way, the measured compression ratio, staleness, nodes.

    ``compression`` is bytes down per byte up over the tasks that uploaded: what a node received (the model,
    dense unless ``codec-downlink`` compresses it) over what it sent back, both as really serialized.
    """
    counts = ", ".join(f"SUM(CASE WHEN status = '{s}' THEN n ELSE 0 END) AS {s}" for s in STATUSES)
    return _frame(db, f"""
        SELECT run_id, SUM(n) AS tasks, {counts},
               (SELECT COUNT(*) FROM temp.dash_node_totals d WHERE d.run_id = g.run_id) AS nodes,
               COALESCE(SUM(up), 0) AS bytes_up, COALESCE(SUM(down), 0) AS bytes_down,
               SUM(down_when_up) * 1.0 / NULLIF(SUM(up), 0) AS compression,
               SUM(CASE WHEN status = 'applied' THEN staleness * n END) * 1.0
                   / NULLIF(SUM(CASE WHEN status = 'applied' AND staleness IS NOT NULL THEN n END), 0)
                   AS mean_staleness,
               MAX(CASE WHEN status = 'applied' THEN staleness END) AS max_staleness
        FROM temp.dash_tasks g GROUP BY run_id
    """)


def staleness_histogram(db: sqlite3.Connection) -> pd.DataFrame:
    """Tasks per (run, staleness, status) of the staged runs; failed tasks have no staleness and are left out."""
    return _frame(db, """
        SELECT run_id, staleness, status, SUM(n) AS tasks FROM temp.dash_tasks WHERE staleness IS NOT NULL
        GROUP BY run_id, staleness, status ORDER BY run_id, staleness, status
    """)


def staleness_over_time(db: sqlite3.Connection, width: float) -> pd.DataFrame:
    """Mean and max staleness of the updates applied in each completion bucket of the staged runs."""
    return _frame(db, """
        SELECT run_id, bc * :w AS t, SUM(staleness * n) * 1.0 / SUM(n) AS mean_staleness,
               MAX(staleness) AS max_staleness, SUM(n) AS applied
        FROM temp.dash_tasks WHERE status = 'applied' AND staleness IS NOT NULL
        GROUP BY run_id, bc ORDER BY run_id, bc
    """, {"w": width})


def bandwidth(db: sqlite3.Connection, width: float) -> pd.DataFrame:
    """Per staged run and time bucket: bytes/s up and down, and cumulative bytes at the bucket's end (no gaps)."""
    return _frame(db, """
        WITH RECURSIVE
        span AS (SELECT run_id, MAX(MAX(bc), MAX(bd)) AS last FROM temp.dash_tasks GROUP BY run_id),
        b(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM b WHERE i < (SELECT MAX(last) FROM span)),
        up AS (SELECT run_id, bc AS i, SUM(up) AS v FROM temp.dash_tasks GROUP BY 1, 2),
        down AS (SELECT run_id, bd AS i, SUM(down) AS v FROM temp.dash_tasks GROUP BY 1, 2)
        SELECT span.run_id, b.i * :w AS t, (b.i + 1) * :w AS t_end,
               COALESCE(up.v, 0) / :w AS up_bps, COALESCE(down.v, 0) / :w AS down_bps,
               SUM(COALESCE(up.v, 0)) OVER c AS up_cum, SUM(COALESCE(down.v, 0)) OVER c AS down_cum
        FROM span JOIN b ON b.i <= span.last
        LEFT JOIN up ON up.run_id = span.run_id AND up.i = b.i
        LEFT JOIN down ON down.run_id = span.run_id AND down.i = b.i
        WINDOW c AS (PARTITION BY span.run_id ORDER BY b.i)
        ORDER BY span.run_id, b.i
    """, {"w": width})


def _nodes_join(schema: Schema, alias: str = "u") -> tuple[str, str, str]:
    """(JOIN clause, label, sort key) naming a task's node by index, device and network when ``nodes`` exists.

    The store keeps Flower's unsigned node ids as signed integers; without a ``nodes`` row a node is shown by that
    stored id.
    """
    if not schema.has("nodes") or not {"run_id", "node_id", "idx", "device", "network"} <= schema.columns["nodes"]:
        return "", f"'node ' || {alias}.node_id", f"{alias}.node_id"
    join = ("LEFT JOIN (SELECT node_id, MIN(idx) AS idx, MIN(device) AS device, MIN(network) AS network "
            "FROM nodes WHERE run_id = :run AND node_id IN (SELECT node_id FROM temp.dash_nodes) GROUP BY node_id) n "
            f"ON n.node_id = {alias}.node_id")
    label = (f"CASE WHEN n.idx IS NULL THEN 'node ' || {alias}.node_id "
             "ELSE printf('n%02d %s/%s', n.idx, COALESCE(n.device, '?'), COALESCE(n.network, '?')) END")
    return join, label, "COALESCE(n.idx, 1e18)"


NODE_ORDERS = {"slowest": "mean_task_s DESC", "busiest": "tasks DESC"}  # which nodes a large run shows


def pick_nodes(db: sqlite3.Connection, run_id: str, width: float, limit: int = MAX_NODES,
               order: str = "slowest") -> int:
    """The nodes of one staged run the per-node views draw, and their tasks; the run's number of nodes.

    Every node when the run has at most ``limit``; else the ``limit`` slowest (longest mean task) or busiest (most
    tasks): a chart of 100,000 node rows is neither readable nor fast to build (Altair, Streamlit and the browser
    each handle every row). Their ids go to ``temp.dash_nodes``, and their tasks, grouped per (node, status,
    staleness, completion bucket, dispatch bucket), to ``temp.dash_picked``, which the per-node views read.
    """
    db.execute("DROP TABLE IF EXISTS temp.dash_nodes")
    db.execute(f"""
        CREATE TEMP TABLE dash_nodes AS
        SELECT node_id, COUNT(*) OVER () AS total
        FROM (SELECT node_id, tasks, task_s / tasks AS mean_task_s FROM temp.dash_node_totals WHERE run_id = :run)
        ORDER BY {NODE_ORDERS[order]}, node_id LIMIT :limit
    """, {"run": run_id, "limit": limit})
    total = int(db.execute("SELECT MAX(total) FROM temp.dash_nodes").fetchone()[0] or 0)
    picked = "" if total <= limit else "AND node_id IN (SELECT node_id FROM temp.dash_nodes)"
    db.execute("DROP TABLE IF EXISTS temp.dash_picked")
    db.execute(f"""
        CREATE TEMP TABLE dash_picked AS
        SELECT node_id, status, staleness,
               CAST(completed_at / :w AS INTEGER) AS bc, CAST(dispatched_at / :w AS INTEGER) AS bd,
               COUNT(*) AS n, SUM(bytes_up) AS up, SUM(bytes_down) AS down,
               SUM(CASE WHEN bytes_up > 0 THEN bytes_down END) AS down_when_up,
               SUM(completed_at - dispatched_at) AS task_s, SUM(compute_s) AS compute_s, SUM(comm_s) AS comm_s
        FROM {_source(db, [run_id])} WHERE run_id = :run {picked}
        GROUP BY node_id, bc, bd, staleness, status
    """, {"run": run_id, "w": width})
    return total


def node_stats(db: sqlite3.Connection, schema: Schema, run_id: str) -> pd.DataFrame:
    """Per picked node (``pick_nodes``) of one run: tasks by status, mean times, staleness, bytes."""
    join, label, key = _nodes_join(schema, "g")
    counts = ", ".join(f"SUM(CASE WHEN g.status = '{s}' THEN g.n ELSE 0 END) AS {s}" for s in STATUSES)
    return _frame(db, f"""
        SELECT {label} AS node, MIN({key}) AS node_order, SUM(g.n) AS tasks, {counts},
               SUM(g.task_s) / SUM(g.n) AS mean_task_s, SUM(g.compute_s) / SUM(g.n) AS mean_compute_s,
               SUM(g.comm_s) / SUM(g.n) AS mean_comm_s,
               SUM(CASE WHEN g.status = 'applied' THEN g.staleness * g.n END) * 1.0
                   / NULLIF(SUM(CASE WHEN g.status = 'applied' AND g.staleness IS NOT NULL THEN g.n END), 0)
                   AS mean_staleness,
               SUM(g.up) AS bytes_up, SUM(g.down) AS bytes_down,
               SUM(g.down_when_up) * 1.0 / NULLIF(SUM(g.up), 0) AS compression
        FROM temp.dash_picked g {join}
        GROUP BY g.node_id ORDER BY node_order, g.node_id
    """, {"run": run_id})


def node_bandwidth(db: sqlite3.Connection, schema: Schema, run_id: str, width: float) -> pd.DataFrame:
    """Per picked node of one run and time bucket: bytes/s up and down (buckets without traffic are zero)."""
    join, label, _ = _nodes_join(schema, "g")
    return _frame(db, f"""
        WITH RECURSIVE
        span AS (SELECT MAX(MAX(bc), MAX(bd)) AS last FROM temp.dash_tasks WHERE run_id = :run),
        b(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM b WHERE i < (SELECT last FROM span)),
        nd AS (SELECT g.node_id, {label} AS node FROM temp.dash_nodes g {join}),
        up AS (SELECT node_id, bc AS i, SUM(up) AS v FROM temp.dash_picked GROUP BY 1, 2),
        down AS (SELECT node_id, bd AS i, SUM(down) AS v FROM temp.dash_picked GROUP BY 1, 2)
        SELECT nd.node, b.i * :w AS t, COALESCE(up.v, 0) / :w AS up_bps, COALESCE(down.v, 0) / :w AS down_bps
        FROM nd JOIN b
        LEFT JOIN up ON up.node_id = nd.node_id AND up.i = b.i
        LEFT JOIN down ON down.node_id = nd.node_id AND down.i = b.i
        ORDER BY nd.node, b.i
    """, {"run": run_id, "w": width})


def timeline(db: sqlite3.Connection, schema: Schema, run_id: str, limit: int = TIMELINE_LIMIT,
             every_node: bool = True) -> pd.DataFrame:
    """The ``limit`` most recently completed tasks of the picked nodes of one run.

    When every node is picked (``every_node``), read through the ``(run_id, completed_at)`` index, newest first,
    until ``limit`` are found; when only some are, their tasks are a small share of the run's, and one scan of the
    run's rows finds them sooner than a walk of the whole index.
    """
    join, label, key = _nodes_join(schema)
    source = "updates" if every_node else _source(db, [run_id])
    return _frame(db, f"""
        SELECT {label} AS node, {key} AS node_order,
               u.seq, u.dispatched_at, u.completed_at, u.status, u.staleness, u.reason
        FROM (SELECT * FROM {source} WHERE run_id = :run AND node_id IN (SELECT node_id FROM temp.dash_nodes)
              ORDER BY completed_at DESC LIMIT :limit) u {join}
        ORDER BY u.completed_at
    """, {"run": run_id, "limit": limit})


def configs(db: sqlite3.Connection, schema: Schema, run_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each run's config (parsed ``config_json``), and the strategy's state at its last evaluation if stored."""
    ids, params = _ids(run_ids)
    state = ("(SELECT metrics_json FROM evals e WHERE e.run_id = r.run_id ORDER BY t DESC, rowid DESC LIMIT 1)"
             if schema.has("evals", "metrics_json") else "NULL")
    rows = db.execute(f"SELECT run_id, config_json, {state} FROM runs r WHERE run_id IN ({ids})", params).fetchall()
    return {str(run_id): {"config": parse_config(cfg), "state": parse_config(st) if st else {}}
            for run_id, cfg, st in rows}


def parse_config(raw: str | None) -> dict[str, Any]:
    """A JSON object stored as text; an unreadable one becomes ``{'unparsed': raw}``."""
    try:
        value = json.loads(raw or "{}")
    except (TypeError, ValueError, RecursionError):  # RecursionError: nested deeper than Python's parser goes
        return {"unparsed": raw}
    return value if isinstance(value, dict) else {"unparsed": raw}


# ------------------------------------------------------------------------------------------------ comparisons
WASTED = "'restarted', 'failed', 'rejected', 'dropped'"  # statuses whose compute never reached the model


def has_comparisons(schema: Schema) -> bool:
    """Whether the store has the comparison harness's tables."""
    return schema.has("comparisons", "spec_json") and schema.has("comparison_runs", "role")


# The comparison's ``--score`` as its ``spec_json`` records it (``server_app.compare``): ``score_kind`` is
# 'unreadable' (not text, not JSON), 'absent' (no ``score``: a comparison stored before the harness recorded it,
# which read the published model's accuracy) or the JSON type of the recorded value; ``score_text`` the value when
# it is a string. The WHENs run in order, so ``json_type`` and ``json_extract`` only ever see valid JSON.
_UNREADABLE_SPEC = "typeof(m.spec_json) IS NOT 'text' OR NOT json_valid(m.spec_json)"
_SPEC_SCORE = f"""
    CASE WHEN {_UNREADABLE_SPEC} THEN 'unreadable' ELSE COALESCE(json_type(m.spec_json, '$.score'), 'absent') END
        AS score_kind,
    CASE WHEN {_UNREADABLE_SPEC} THEN NULL
         WHEN json_type(m.spec_json, '$.score') = 'text' THEN json_extract(m.spec_json, '$.score') END AS score_text"""


def comparison_score(kind: object, text: object) -> tuple[str, str]:
    """The score a comparison's view reads, from what its spec records (``_SPEC_SCORE``), and why that one.

    ``(score, how)``: how is "recorded" (a score of ``SCORES``), "before" (none recorded: the comparison was stored
    before the harness recorded it, and read the published model's accuracy, which is what is read) or
    "unreadable" (the published model's accuracy is read, and the page says that it is not the recorded one).
    """
    if kind == "absent":
        return "average", "before"
    if kind == "text" and text in SCORES:
        return str(text), "recorded"
    return "average", "unreadable"


def _strings(value: object) -> list[str]:
    """A stored JSON list of names as strings (anything else: none)."""
    return [str(v) for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _fractions(value: object) -> list[float]:
    """A stored JSON list of targets as accuracies in [0, 1] (anything else: none)."""
    ok = (int, float)
    return ([float(v) for v in value if isinstance(v, ok) and not isinstance(v, bool) and 0 <= v <= 1]
            if isinstance(value, list) else [])


def list_comparisons(db: sqlite3.Connection, schema: Schema) -> pd.DataFrame:
    """Every comparison, newest first: status, methods, targets, score, runs per role, and a label.

    ``score`` is the accuracy its view reads and ``score_how`` why (``comparison_score``).
    """
    if not has_comparisons(schema):
        return pd.DataFrame(columns=["comparison_id", "label", "methods", "targets", "status", "score", "score_how"])
    df = _frame(db, f"""
        SELECT m.comparison_id, m.started_at, m.finished_at, m.status, m.spec_json, {_SPEC_SCORE},
               (SELECT COUNT(*) FROM comparison_runs c WHERE c.comparison_id = m.comparison_id
                                                        AND c.role = 'tune') AS tune_runs,
               (SELECT COUNT(*) FROM comparison_runs c WHERE c.comparison_id = m.comparison_id
                                                        AND c.role = 'eval') AS eval_runs
        FROM comparisons m ORDER BY m.started_at DESC, m.comparison_id
    """)
    specs = [parse_config(raw) for raw in df["spec_json"]]
    df["methods"] = [_strings(s.get("methods")) for s in specs]
    df["targets"] = [_fractions(s.get("targets")) for s in specs]
    scores = [comparison_score(k, t) for k, t in zip(df["score_kind"], df["score_text"], strict=True)]
    df["score"] = [s for s, _ in scores]
    df["score_how"] = [h for _, h in scores]
    local = datetime.now().astimezone().tzinfo
    started = (pd.to_datetime(df["started_at"], unit="s", utc=True, errors="coerce").dt.tz_convert(local)
               .dt.strftime("%m-%d %H:%M:%S"))
    df["label"] = [f"{cid} · {', '.join(m)} · {when} ({status})" for cid, m, when, status
                   in zip(df["comparison_id"], df["methods"], started.fillna("?"), df["status"].fillna("?"),
                          strict=True)]
    return df.drop(columns=["spec_json", "score_kind", "score_text"])


def comparison_evals(db: sqlite3.Connection, schema: Schema, comparison_id: str,
                     score: str = "average") -> pd.DataFrame:
    """Every evaluation of the comparison's evaluation runs, with the run's method and seed.

    ``score`` is each row's accuracy as ``score`` reads it (``_scored``: the harness's), ``accuracy`` the published
    model's.
    """
    return _frame(db, f"""
        SELECT c.method, c.seed, e.run_id, e.t, {_scored(score, schema)} AS score, e.accuracy, e.loss,
               e.updates_applied, e.bytes_up_total + e.bytes_down_total AS bytes_total
        FROM comparison_runs c JOIN evals e ON e.run_id = c.run_id
        WHERE c.comparison_id = :cid AND c.role = 'eval'
        ORDER BY c.method, c.seed, e.t, e.rowid
    """, {"cid": comparison_id})


def _eval_runs(schema: Schema, score: str) -> str:
    """SQL: one row per evaluation run of comparison :cid, as the harness's report defines it (``read_outcome``).

    The first evaluation whose accuracy as ``score`` reads it (``_scored``) reaches :target, the last evaluation's
    such accuracy, the bytes of every task row, the compute of the tasks that never reached the model.
    """
    scored = _scored(score, schema)
    return f"""
    SELECT c.method, c.seed, c.run_id, r.status,
           (SELECT MIN(t) FROM evals e WHERE e.run_id = c.run_id AND ({scored}) >= :target) AS time_to_target,
           (SELECT {scored} FROM evals e WHERE e.run_id = c.run_id ORDER BY t DESC, rowid DESC LIMIT 1)
               AS final_accuracy,
           u.bytes_up, u.bytes_down, COALESCE(u.wasted_compute, 0) AS wasted_compute
    FROM comparison_runs c
    LEFT JOIN runs r ON r.run_id = c.run_id
    LEFT JOIN (SELECT run_id, SUM(bytes_up) AS bytes_up, SUM(bytes_down) AS bytes_down,
                      SUM(CASE WHEN status IN ({WASTED}) THEN compute_s ELSE 0 END) AS wasted_compute
               FROM updates WHERE run_id IN (SELECT run_id FROM comparison_runs
                                             WHERE comparison_id = :cid AND role = 'eval')
               GROUP BY run_id) u ON u.run_id = c.run_id
    WHERE c.comparison_id = :cid AND c.role = 'eval'
"""


def comparison_runs(db: sqlite3.Connection, schema: Schema, comparison_id: str, target: float,
                    score: str = "average") -> pd.DataFrame:
    """One row per evaluation run: time to ``target`` (NULL if never), final accuracy, bytes, wasted compute.

    Its accuracy is the one ``score`` names, with the harness's fallback (``_scored``).
    """
    return _frame(db, f"{_eval_runs(schema, score)} ORDER BY c.method, c.seed",
                  {"cid": comparison_id, "target": target})


def comparison_summary(db: sqlite3.Connection, schema: Schema, comparison_id: str, target: float,
                       methods: Sequence[str] = (), score: str = "average") -> pd.DataFrame:
    """Per method (in ``methods`` order): evaluation runs, and how many reached ``target``.

    The mean time to the target is over the runs that reached it; final accuracy, MB up and down and wasted compute
    are averaged over every run. The accuracy is the one ``score`` names (``comparison_runs``).
    """
    df = _frame(db, f"""
        SELECT method, COUNT(*) AS runs, COUNT(time_to_target) AS reached,
               AVG(time_to_target) AS mean_time_to_target, AVG(final_accuracy) AS final_accuracy,
               AVG(bytes_up) / 1e6 AS mb_up, AVG(bytes_down) / 1e6 AS mb_down, AVG(wasted_compute) AS wasted_compute
        FROM ({_eval_runs(schema, score)}) GROUP BY method
    """, {"cid": comparison_id, "target": target})
    rank = {m: i for i, m in enumerate(methods)}
    return df.sort_values("method", key=lambda col: col.map(lambda m: (rank.get(m, len(rank)), m)),
                          ignore_index=True)


@dataclass
class ComparisonData:
    """The comparison view of one refresh: the evaluation runs' curves, one row per run, one per method."""

    comparison_id: str
    methods: list[str]
    target: float
    evals: pd.DataFrame
    runs: pd.DataFrame
    summary: pd.DataFrame
    score: str = "average"    # the accuracy read (``SCORES``): the comparison's recorded --score
    score_how: str = "before"  # recorded, before (none recorded) or unreadable: ``comparison_score``


def load_comparisons(path: str | Path) -> pd.DataFrame:
    """The comparison list alone (empty when the store has none), in its own short transaction."""
    with snapshot(path) as (db, schema):
        return list_comparisons(db, schema)


def load_comparison(path: str | Path, comparison_id: str, target: float) -> ComparisonData:
    """Everything the comparison view draws, in one read transaction, read on the comparison's recorded score."""
    with snapshot(path) as (db, schema):
        listed = list_comparisons(db, schema)
        row = listed[listed["comparison_id"] == comparison_id]
        methods = list(row["methods"].iloc[0]) if len(row) else []
        if not has_comparisons(schema):
            return ComparisonData(comparison_id, methods, target, pd.DataFrame(), pd.DataFrame(), pd.DataFrame())
        score, how = (str(row["score"].iloc[0]), str(row["score_how"].iloc[0])) if len(row) else ("average", "before")
        return ComparisonData(comparison_id, methods, target, comparison_evals(db, schema, comparison_id, score),
                              comparison_runs(db, schema, comparison_id, target, score),
                              comparison_summary(db, schema, comparison_id, target, methods, score), score, how)


# ------------------------------------------------------------------------------------------------ one page load
@dataclass
class PageData:
    """Everything one refresh of the page draws, read in one snapshot of the store."""

    runs: pd.DataFrame
    selected: list[str]
    focus: str | None
    width: float = 1.0
    evals: pd.DataFrame = field(default_factory=pd.DataFrame)
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    staleness: pd.DataFrame = field(default_factory=pd.DataFrame)
    staleness_time: pd.DataFrame = field(default_factory=pd.DataFrame)
    bandwidth: pd.DataFrame = field(default_factory=pd.DataFrame)
    nodes: pd.DataFrame = field(default_factory=pd.DataFrame)
    node_bandwidth: pd.DataFrame = field(default_factory=pd.DataFrame)
    timeline: pd.DataFrame = field(default_factory=pd.DataFrame)
    targets: pd.DataFrame = field(default_factory=pd.DataFrame)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    timeline_limit: int = TIMELINE_LIMIT
    last: pd.DataFrame = field(default_factory=pd.DataFrame)
    node_total: int = 0  # nodes of the focus run that did a task (``nodes`` holds at most MAX_NODES of them)

    def labels(self) -> dict[str, str]:
        """Run id to label, for the selected runs in selection order."""
        names = dict(zip(self.runs["run_id"], self.runs["label"], strict=True))
        return {r: names[r] for r in self.selected}

    def labelled(self, df: pd.DataFrame) -> pd.DataFrame:
        """``df`` with a ``run`` column holding each row's run label."""
        return df.assign(run=df["run_id"].map(self.labels())) if "run_id" in df else df

    def overview(self) -> pd.DataFrame:
        """One row per selected run: status, clock, tasks by outcome, latest evaluation, bytes, compression.

        The latest evaluation's columns are ``last_evals``'s: accuracy, loss, the node models' scores.
        """
        base = self.runs.set_index("run_id").loc[self.selected, ["label", "status", "strategy", "clock", "clock_s",
                                                                 "last_write_at"]]
        out = base.join(self.summary.set_index("run_id"), how="left") if len(self.summary) else base
        if len(self.last):
            out = out.join(self.last.set_index("run_id"), how="left")
        return out.reset_index()


def load_runs(path: str | Path, limit: int | None = RUN_CHOICES, search: str = "",
              include: Sequence[str] = ()) -> pd.DataFrame:
    """The run list alone (the picker: ``list_runs``), in its own short transaction."""
    with snapshot(path) as (db, schema):
        return list_runs(db, schema, limit, search, include)


def load_head(path: str | Path) -> tuple[int, str | None]:
    """How many runs the store holds and the newest one's id (``count_runs``), in its own short transaction."""
    with snapshot(path) as (db, _):
        return count_runs(db)


def load_comparison_run_ids(path: str | Path, comparison_id: str, tuning: bool = False) -> list[str]:
    """``comparison_run_ids``, in its own short transaction."""
    with snapshot(path) as (db, schema):
        return comparison_run_ids(db, schema, comparison_id, tuning)


def load_page(path: str | Path, selected: Sequence[str] | None = None, focus: str | None = None,
              target: float = 0.0, timeline_limit: int = TIMELINE_LIMIT, node_order: str = "slowest",
              max_nodes: int = MAX_NODES) -> PageData:
    """Read everything the page shows for the ``selected`` runs (default: the newest) in one read transaction.

    ``focus`` is the run of the per-node views (default: the first selected), which draw at most ``max_nodes`` of
    its nodes (``pick_nodes``: the slowest or the busiest by ``node_order``); ``target`` the accuracy of the
    time-to-target and bytes-to-target tiles (0: no tiles).
    """
    with snapshot(path) as (db, schema):
        runs = list_runs(db, schema, limit=0, include=selected) if selected is not None else list_runs(db, schema, 1)
        known = set(runs["run_id"])
        chosen = list(dict.fromkeys(r for r in (selected if selected is not None else runs["run_id"]) if r in known))
        focus = focus if focus in chosen else (chosen[0] if chosen else None)
        page = PageData(runs=runs, selected=chosen, focus=focus, timeline_limit=timeline_limit)
        if not chosen:
            return page
        page.evals = evals(db, schema, chosen)
        page.last = last_evals(db, schema, chosen)
        page.configs = configs(db, schema, chosen)
        if target > 0:
            page.targets = first_reaching(db, chosen, target)
        page.width = bucket_width(clock_span(db, chosen))
        stage(db, chosen, page.width)
        page.summary = summary(db)
        page.staleness = staleness_histogram(db)
        page.staleness_time = staleness_over_time(db, page.width)
        page.bandwidth = bandwidth(db, page.width)
        if focus is not None:
            page.node_total = pick_nodes(db, focus, page.width, max_nodes, node_order)
            page.nodes = node_stats(db, schema, focus)
            page.node_bandwidth = node_bandwidth(db, schema, focus, page.width)
            page.timeline = timeline(db, schema, focus, timeline_limit, every_node=page.node_total <= max_nodes)
        return page
