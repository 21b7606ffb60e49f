"""The runs of a metrics store, without SQL: ``staleflower runs list | show | export`` (``server_app.cli``).

Reads only, through a read-only connection and one read transaction per command (a run writing the store is
never blocked, and every number of one command comes from the same committed state). A store that is missing,
is not SQLite or is not a metrics store, an unknown or ambiguous run id, and an unwritable output are a
``RunsError``: one line for a person, never a traceback.

A run is named by its full id or by its last digits (the dashboard's labels show the last six), as long as they
match one run only.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

#: What ``runs export --table`` offers, and the order its rows come in (the store's time order).
EXPORT_ORDER = {"updates": "seq", "evals": "t, rowid"}
EXPORT_FORMATS = ("csv", "parquet")
#: An SQLite column's declared type -> the Parquet (Arrow) type it exports as.
ARROW_TYPES = {"INTEGER": "int64", "REAL": "float64", "TEXT": "string", "BLOB": "binary"}
BUSY_TIMEOUT_S = 5.0


class RunsError(Exception):
    """A mistake of the command line or a store that cannot be read: the message is the whole story."""


@dataclass(frozen=True)
class RunRow:
    """One line of ``runs list``."""

    run_id: str
    strategy: str
    status: str
    started_at: float | None
    applied: int
    tasks: int
    accuracy: float | None

    def as_json(self) -> dict[str, object]:
        """The row as ``runs list --json`` prints it."""
        return {"run_id": self.run_id, "strategy": self.strategy, "status": self.status,
                "started_at": self.started_at, "updates_applied": self.applied, "tasks": self.tasks,
                "final_accuracy": self.accuracy}


# ------------------------------------------------------------------------------------------------ the store
@contextmanager
def open_store(path: str | Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the metrics store at ``path``, inside one read transaction."""
    p = Path(path).expanduser()
    if not p.exists():
        raise RunsError(f"no metrics store at {p} (runs write the one run-config key metrics-db names, else "
                        "$STALEFLOWER_METRICS_DB, else ~/.staleflower/metrics.db; pick another with --db PATH)")
    if not p.is_file():
        raise RunsError(f"{p} is not a file, so not a metrics store")
    try:
        db = sqlite3.connect(p.resolve().as_uri() + "?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S,
                             isolation_level=None)
    except sqlite3.Error as exc:
        raise RunsError(f"cannot open the metrics store {p}: {exc}") from None
    try:
        try:
            db.execute("BEGIN")
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.Error as exc:
            raise RunsError(f"cannot read {p} as a metrics store: {exc}") from None
        missing = sorted({"runs", "updates", "evals"} - tables)
        if missing:
            raise RunsError(f"{p} is not a staleflower metrics store (no table {', '.join(missing)})")
        try:
            yield db
        except sqlite3.Error as exc:
            raise RunsError(f"cannot read the metrics store {p}: {exc}") from None
    finally:
        db.close()


def find_run(db: sqlite3.Connection, run_id: str) -> str:
    """The stored id of the run named ``run_id``: the full id, else the only run whose id ends with it."""
    wanted = run_id.strip()
    if not wanted:
        raise RunsError("the run id is empty")
    if db.execute("SELECT 1 FROM runs WHERE run_id=?", (wanted,)).fetchone():
        return wanted
    ids = [str(r[0]) for r in db.execute("SELECT run_id FROM runs")]
    matches = [i for i in ids if i.endswith(wanted)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        held = f"{len(ids)} run{'' if len(ids) == 1 else 's'}"
        raise RunsError(f"no run {wanted!r} in the store ({held}: `staleflower runs list` shows them)")
    raise RunsError(f"run id {wanted!r} is ambiguous: {len(matches)} runs end with it; give more digits")


def list_runs(db: sqlite3.Connection) -> list[RunRow]:
    """Every run of the store, oldest first, with its applied updates, tasks and final accuracy."""
    rows = db.execute("""
        SELECT r.run_id, r.strategy, r.status, r.started_at, COALESCE(u.applied, 0), COALESCE(u.tasks, 0),
               (SELECT e.accuracy FROM evals e WHERE e.run_id = r.run_id ORDER BY e.t DESC, e.rowid DESC LIMIT 1)
        FROM runs r
        LEFT JOIN (SELECT run_id, SUM(status = 'applied') AS applied, COUNT(*) AS tasks FROM updates
                   GROUP BY run_id) u USING (run_id)
        ORDER BY r.started_at, r.run_id
    """).fetchall()
    return [RunRow(str(r[0]), str(r[1] or "?"), str(r[2] or "?"), _num(r[3]), int(r[4]), int(r[5]), _num(r[6]))
            for r in rows]


def show_run(db: sqlite3.Connection, run_id: str) -> dict[str, Any]:  # Any: JSON-shaped values
    """One run's record, summary and config (``run_id`` as ``find_run`` takes it)."""
    rid = find_run(db, run_id)
    cols = _columns(db, "runs")
    picked = [c for c in ("started_at", "finished_at", "status", "strategy", "config_json", "error") if c in cols]
    row = dict(zip(picked, db.execute(f"SELECT {', '.join(picked)} FROM runs WHERE run_id=?", (rid,)).fetchone(),
                   strict=True))
    statuses = dict(db.execute("SELECT status, COUNT(*) FROM updates WHERE run_id=? GROUP BY status "
                               "ORDER BY status", (rid,)).fetchall())
    sums = db.execute("SELECT COALESCE(SUM(bytes_up), 0), COALESCE(SUM(bytes_down), 0), MAX(completed_at) "
                      "FROM updates WHERE run_id=?", (rid,)).fetchone()
    n_evals, last_t = db.execute("SELECT COUNT(*), MAX(t) FROM evals WHERE run_id=?", (rid,)).fetchone()
    last = db.execute("SELECT t, accuracy, loss, model_version FROM evals WHERE run_id=? ORDER BY t DESC, "
                      "rowid DESC LIMIT 1", (rid,)).fetchone()
    nodes = None
    if "nodes" in _tables(db):
        nodes = db.execute("SELECT COUNT(*) FROM nodes WHERE run_id=?", (rid,)).fetchone()[0]
    comparison = None
    if "comparison_runs" in _tables(db):
        tag = db.execute("SELECT comparison_id, method, role, seed, trial FROM comparison_runs WHERE run_id=?",
                         (rid,)).fetchone()
        if tag:
            comparison = dict(zip(("comparison_id", "method", "role", "seed", "trial"), tag, strict=True))
    try:
        config = json.loads(row.get("config_json") or "{}")
    except ValueError:
        config = {}
    ends = [t for t in (sums[2], last_t) if t is not None]
    return {
        "run_id": rid, "strategy": row.get("strategy"), "status": row.get("status"), "error": row.get("error"),
        "started_at": _num(row.get("started_at")), "finished_at": _num(row.get("finished_at")),
        "clock": config.get("clock") if isinstance(config, dict) else None,
        "clock_end": max(ends) if ends else None, "nodes": nodes,
        "updates": {"applied": statuses.get("applied", 0), "tasks": sum(statuses.values()), "by_status": statuses},
        "bytes_up": int(sums[0]), "bytes_down": int(sums[1]), "evals": int(n_evals),
        "final": None if last is None else {"t": last[0], "accuracy": last[1], "loss": last[2],
                                            "model_version": last[3]},
        "comparison": comparison, "config": config if isinstance(config, dict) else {},
    }


def export_rows(db: sqlite3.Connection, run_id: str, table: str) -> tuple[list[str], list[str], list[tuple[Any, ...]]]:
    """The columns (names and declared types) and rows of ``table`` for one run, in the store's time order."""
    if table not in EXPORT_ORDER:
        raise RunsError(f"--table must be one of: {', '.join(EXPORT_ORDER)}; got {table!r}")
    rid = find_run(db, run_id)
    info = db.execute(f'PRAGMA table_info("{table}")').fetchall()
    names = [str(r[1]) for r in info]
    types = [str(r[2]).upper() for r in info]
    rows = db.execute(f"SELECT * FROM {table} WHERE run_id=? ORDER BY {EXPORT_ORDER[table]}", (rid,)).fetchall()
    return names, types, rows


# ------------------------------------------------------------------------------------------------ output
def write_export(names: Sequence[str], types: Sequence[str], rows: Sequence[tuple[Any, ...]], fmt: str,
                 out: str | None) -> None:
    """Write the rows as CSV (to ``out``, or stdout when ``out`` is None or ``-``) or Parquet (to ``out``).

    A file is written whole or not at all: to a temporary file beside it, renamed into place at the end.
    """
    if fmt not in EXPORT_FORMATS:
        raise RunsError(f"--format must be one of: {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    if out in (None, "-"):
        if fmt != "csv":
            raise RunsError("--format parquet writes a file: give -o FILE")
        _write_csv(sys.stdout, names, rows)
        return
    assert out is not None
    target = Path(out).expanduser()
    if target.is_dir():
        raise RunsError(f"-o {out} is a directory; give a file name")
    if not target.parent.is_dir():
        raise RunsError(f"-o {out}: no directory {target.parent}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise RunsError(f"cannot write -o {out}: {exc.strerror}") from None
    try:
        if fmt == "csv":
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
                _write_csv(fh, names, rows)
        else:
            os.close(fd)
            _write_parquet(Path(tmp), names, types, rows)
        os.replace(tmp, target)
    except OSError as exc:
        raise RunsError(f"cannot write -o {out}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_csv(fh: IO[str], names: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> None:
    """A header, then one line per row; NULL is an empty field, floats keep every digit (``repr``)."""
    writer = csv.writer(fh, lineterminator="\n")
    writer.writerow(names)
    writer.writerows(rows)


def _write_parquet(path: Path, names: Sequence[str], types: Sequence[str],
                   rows: Sequence[tuple[Any, ...]]) -> None:
    """The rows as one Parquet table, each column typed by its declared SQLite type."""
    try:
        import pyarrow as pa  # type: ignore[import-untyped]  # (no type information shipped)
        import pyarrow.parquet as pq  # type: ignore[import-untyped]
    except ImportError:
        raise RunsError("--format parquet needs pyarrow (`pip install pyarrow`, or the dashboard extra: "
                        "`pip install -e '.[dashboard]'`)") from None
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    arrays = [pa.array(list(values), type=getattr(pa, ARROW_TYPES.get(kind, "string"))())
              for values, kind in zip(columns, types, strict=True)]
    pq.write_table(pa.Table.from_arrays(arrays, names=list(names)), path)


def render_list(runs: Sequence[RunRow]) -> str:
    """``runs list`` as an aligned table, one run per line."""
    if not runs:
        return "no runs in this store yet"
    head = ("RUN ID", "STRATEGY", "STATUS", "STARTED", "UPDATES", "ACCURACY")
    body = [(r.run_id, r.strategy, r.status, _when(r.started_at), str(r.applied),
             "-" if r.accuracy is None else f"{r.accuracy:.4f}") for r in runs]
    widths = [max(len(row[i]) for row in (head, *body)) for i in range(len(head))]
    right = {4, 5}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths,
                                                                                             strict=True)))
             for row in (head, *body)]
    return "\n".join(line.rstrip() for line in lines)


def render_show(run: Mapping[str, Any], defaults: Mapping[str, object], full_config: bool = False) -> str:
    """``runs show``: the summary, then the config (the keys that differ from ``defaults``, or every key)."""
    upd = run["updates"]
    lines = [f"run        {run['run_id']}", f"strategy   {run['strategy']}", f"status     {run['status']}"]
    if run.get("error"):
        lines.append(f"error      {run['error']}")
    lines.append(f"started    {_when(run['started_at'])}")
    if run.get("finished_at") is not None:
        wall = run["finished_at"] - run["started_at"] if run.get("started_at") is not None else None
        lines.append(f"finished   {_when(run['finished_at'])}" + ("" if wall is None else f" ({wall:.1f} s wall)"))
    if run.get("clock_end") is not None:
        lines.append(f"clock      {run.get('clock') or '?'}, last event at t = {run['clock_end']:.2f} s")
    if run.get("nodes") is not None:
        lines.append(f"nodes      {run['nodes']}")
    by = ", ".join(f"{n} {s}" for s, n in upd["by_status"].items()) or "none"
    lines.append(f"updates    {upd['applied']} applied of {upd['tasks']} tasks ({by})")
    lines.append(f"bytes      {_mb(run['bytes_up'])} up, {_mb(run['bytes_down'])} down")
    final = run.get("final")
    if final:
        acc = "-" if final["accuracy"] is None else f"{final['accuracy']:.4f}"
        loss = "-" if final["loss"] is None else f"{final['loss']:.4f}"
        lines.append(f"evals      {run['evals']}; final accuracy {acc}, loss {loss} (t = {final['t']:.2f} s)")
    else:
        lines.append("evals      none")
    if run.get("comparison"):
        c = run["comparison"]
        lines.append(f"comparison {c['comparison_id']}: method {c['method']}, {c['role']} run, seed {c['seed']}"
                     + ("" if c["trial"] is None else f", trial {c['trial']}"))
    config: Mapping[str, object] = run["config"]
    shown = {k: v for k, v in sorted(config.items()) if full_config or k not in defaults or defaults[k] != v}
    title = "config" if full_config else "config (keys that differ from the defaults; --full-config: all)"
    lines.append(f"{title}:" + ("" if shown else " none"))
    width = max((len(k) for k in shown), default=0)
    lines.extend(f"  {k.ljust(width)} = {json.dumps(v)}" for k, v in shown.items())
    return "\n".join(lines)


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _num(value: object) -> float | None:
    """A stored number, or None for NULL, a non-number or NaN."""
    if isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value):
        return float(value)
    return None


def _tables(db: sqlite3.Connection) -> set[str]:
    return {str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {str(r[1]) for r in db.execute(f'PRAGMA table_info("{table}")')}
