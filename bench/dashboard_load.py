"""Dashboard load time: the page's data load (``dashboard.queries.load_page``) on stores of 1k, 10k and 100k updates.

    python -m bench.dashboard_load [--sizes 1000,10000,100000] [--repeats 7] [--quick]
                                   [--json results/dashboard_load.json] [--markdown results/dashboard_load.md]

The stores are synthetic rows with the schema of a real store (``server_app.store.SCHEMA``), seeded from a real
short run's shape: one in-process run (``--seed-updates`` applied updates of FedBuff on digits, 10 nodes, the
default MLP) is made first, and each store of N updates repeats that run's ``updates`` and ``evals`` rows end to end
(tile k shifted by k times the run's clock span, versions, applied count and byte totals) with one bulk
``INSERT ... SELECT`` until it has N rows; its ``nodes`` and ``runs`` rows are the real run's. So the per-node
spread, task durations, staleness distribution, statuses, message sizes and evaluation period are those of a real
run, and only the length is synthetic. The real seed run stays in each store too, as a second run.

What is timed is what one refresh of the page reads, exactly as the app calls it: a new read-only connection,
one read transaction, the run list and every view of the selected run (accuracy and loss, summary, staleness
histogram and staleness over time, bandwidth per second and cumulative, per-node bandwidth, per-node outcomes,
the timeline's latest 1,500 tasks, time- and bytes-to-target, config). One untimed warm-up per store, then
``--repeats`` loads; the median is reported with the ratio to the 1k store's median, and the number of rows the
load returns (what goes to the charts: bounded by the SQL aggregation, whatever the size of the run).
``--quick`` seeds from a 20-update logreg run and times 3 loads per size (the smoke test's setting).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dashboard import queries
from server_app.simulate import merge_config, run_local
from server_app.store import SCHEMA

SIZES = (1_000, 10_000, 100_000)
TARGET = 0.8


def seed_run(db: Path, updates: int, quick: bool) -> str:
    """A real short in-process run into ``db``; its run id."""
    import torch

    torch.set_num_threads(1)
    settings: dict[str, Any] = {"strategy": "fedbuff", "max-updates": updates, "eval-every": 10, "seed": 0,
                                "metrics-db": str(db)}
    if quick:
        settings.update({"model": "logreg", "local-steps": 2})
    return run_local(merge_config(overrides=settings), nodes=10).run_id


def synthesize(template: Path, run_id: str, out: Path, size: int) -> str:
    """A store at ``out`` with the seed run plus a run of ``size`` updates tiled from it; the new run's id."""
    out.unlink(missing_ok=True)
    new = f"synthetic-{size}"
    con = sqlite3.connect(out, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(SCHEMA)
        cols = {r[1] for r in con.execute("PRAGMA table_info(evals)")}
        con.execute("ATTACH DATABASE ? AS t", (str(template),))
        con.execute("BEGIN")
        for table in ("runs", "updates", "evals", "nodes"):  # the real seed run, as it is
            shared = [c for c in (r[1] for r in con.execute(f"PRAGMA t.table_info({table})"))
                      if c in {r[1] for r in con.execute(f"PRAGMA main.table_info({table})")}]
            names = ",".join(shared)
            con.execute(f"INSERT INTO main.{table}({names}) SELECT {names} FROM t.{table} WHERE run_id = ?",
                        (run_id,))
        n, span, versions, applied, up, down = con.execute(
            "SELECT COUNT(*), MAX(completed_at), MAX(applied_version), SUM(status = 'applied'), SUM(bytes_up), "
            "SUM(bytes_down) FROM t.updates WHERE run_id = ?", (run_id,)).fetchone()
        tiles = -(-size // n)
        p = {"run": run_id, "new": new, "n": n, "size": size, "tiles": tiles, "span": span, "v": versions,
             "a": applied, "up": up, "down": down}
        for table in ("runs", "nodes"):  # the seed run's, under the new id
            names = [c for c in (r[1] for r in con.execute(f"PRAGMA main.table_info({table})")) if c != "run_id"]
            con.execute(f"INSERT INTO main.{table}(run_id, {','.join(names)}) "
                        f"SELECT :new, {','.join(names)} FROM t.{table} WHERE run_id = :run", p)
        con.execute("""
            INSERT INTO updates(run_id, seq, node_id, dispatched_at, completed_at, base_version, applied_version,
                                staleness, bytes_up, bytes_down, compute_s, comm_s, status, reason)
            WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k WHERE i + 1 < :tiles),
            u AS (SELECT *, ROW_NUMBER() OVER (ORDER BY seq) - 1 AS r FROM t.updates WHERE run_id = :run)
            SELECT :new, k.i * :n + u.r, u.node_id, u.dispatched_at + k.i * :span, u.completed_at + k.i * :span,
                   u.base_version + k.i * :v, u.applied_version + k.i * :v, u.staleness, u.bytes_up, u.bytes_down,
                   u.compute_s, u.comm_s, u.status, u.reason
            FROM k JOIN u WHERE k.i * :n + u.r < :size
        """, p)
        extra = ", metrics_json" if "metrics_json" in cols else ""
        con.execute(f"""
            INSERT INTO evals(run_id, t, model_version, updates_applied, bytes_up_total, bytes_down_total, loss,
                              accuracy{extra})
            WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k WHERE i + 1 < :tiles)
            SELECT :new, e.t + k.i * :span, e.model_version + k.i * :v, e.updates_applied + k.i * :a,
                   e.bytes_up_total + k.i * :up, e.bytes_down_total + k.i * :down, e.loss, e.accuracy{extra}
            FROM k JOIN t.evals e WHERE e.run_id = :run AND (k.i = 0 OR e.t > 0)
                 AND e.updates_applied + k.i * :a <= :size
            ORDER BY k.i, e.t
        """, p)
        con.execute("COMMIT")
        con.execute("DETACH DATABASE t")
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        con.close()
    return new


def time_loads(db: Path, run_id: str, repeats: int) -> dict[str, Any]:
    """Median (and min, max) ms of ``--repeats`` page loads after one warm-up; rows the load returns."""
    page = queries.load_page(db, [run_id], target=TARGET)  # warm-up (and the row count)
    frames = [page.runs, page.evals, page.summary, page.last, page.staleness, page.staleness_time, page.bandwidth,
              page.nodes, page.node_bandwidth, page.timeline, page.targets]
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        queries.load_page(db, [run_id], target=TARGET)
        samples.append((time.perf_counter() - start) * 1000)
    with sqlite3.connect(db) as con:
        n_updates, = con.execute("SELECT COUNT(*) FROM updates WHERE run_id = ?", (run_id,)).fetchone()
        n_evals, = con.execute("SELECT COUNT(*) FROM evals WHERE run_id = ?", (run_id,)).fetchone()
    return {"updates": n_updates, "evals": n_evals, "ms_median": statistics.median(samples),
            "ms_min": min(samples), "ms_max": max(samples), "samples_ms": samples,
            "rows_returned": sum(len(f) for f in frames), "store_mb": db.stat().st_size / 1e6}


def markdown(rows: list[dict[str, Any]]) -> str:
    """The BENCHMARKS.md table."""
    lines = ["| updates | evals | store MB | page data load, median ms (min-max) | vs 1k | rows returned |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['updates']:,} | {r['evals']:,} | {r['store_mb']:.1f} | {r['ms_median']:.1f} "
                     f"({r['ms_min']:.1f}-{r['ms_max']:.1f}) | {r['ratio_vs_first']:.2f}x | {r['rows_returned']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Seed, synthesize, time; print the table and write ``--json`` / ``--markdown``."""
    p = argparse.ArgumentParser(prog="python -m bench.dashboard_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="updates per store, comma-separated")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed-updates", type=int, default=200, help="applied updates of the real seed run")
    p.add_argument("--quick", action="store_true", help="tiny seed run (logreg, 20 updates), 3 repeats")
    p.add_argument("--dir", help="where the stores are written (default: a temporary folder, removed)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    repeats = 3 if args.quick else args.repeats
    seed_updates = 20 if args.quick else args.seed_updates
    with tempfile.TemporaryDirectory(prefix="dashboard-load-") as tmp:
        folder = Path(args.dir) if args.dir else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        template = folder / "seed.db"
        template.unlink(missing_ok=True)
        seed = seed_run(template, seed_updates, args.quick)
        rows = []
        for size in sizes:
            db = folder / f"store-{size}.db"
            new = synthesize(template, seed, db, size)
            rows.append({"size": size, **time_loads(db, new, repeats)})
        with sqlite3.connect(template) as con:
            seed_tasks, = con.execute("SELECT COUNT(*) FROM updates").fetchone()
    for r in rows:
        r["ratio_vs_first"] = r["ms_median"] / rows[0]["ms_median"]
    report = {
        "benchmark": "dashboard_load",
        "workload": {"sizes": sizes, "repeats": repeats, "seed_run": {"strategy": "fedbuff", "nodes": 10,
                     "applied_updates": seed_updates, "tasks": seed_tasks, "model": "logreg" if args.quick else "mlp"},
                     "timeline_limit": queries.TIMELINE_LIMIT, "target_accuracy": TARGET},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0],
                    "sqlite": sqlite3.sqlite_version},
        "results": rows,
    }
    table = markdown(rows)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table + "\n")
    return report


if __name__ == "__main__":
    main()
