"""Dashboard load time: the page's data load and full refresh, on long runs, on many runs, on a large fleet.

    python -m bench.dashboard_load [--sizes 1000,10000,100000] [--repeats 7] [--quick] [--runs 50000]
                                   [--nodes 100000 --node-updates 200000] [--refreshes 5]
                                   [--json results/dashboard_load.json] [--markdown results/dashboard_load.md]

Scale stores (``many_runs``, ``many_nodes``): 50,000 runs of 20 tasks each, and one run of 200,000 tasks over
100,000 nodes, both seeded from the same real run. For each, the data load as the app asks for it (``app_load``)
and the full refresh (``time_refresh``: Streamlit's AppTest running dashboard/app.py, caches cleared), medians.

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
from server_app.store import SCHEMA, UPDATE_COLUMNS

SIZES = (1_000, 10_000, 100_000)
APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"
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


def _copy_seed(con: sqlite3.Connection, run_id: str) -> None:
    """The real seed run's rows, as they are, into the store being built (``t`` is the attached template)."""
    for table in ("runs", "updates", "evals", "nodes"):
        shared = [c for c in (r[1] for r in con.execute(f"PRAGMA t.table_info({table})"))
                  if c in {r[1] for r in con.execute(f"PRAGMA main.table_info({table})")}]
        names = ",".join(shared)
        con.execute(f"INSERT INTO main.{table}({names}) SELECT {names} FROM t.{table} WHERE run_id = ?", (run_id,))


def _new_store(template: Path, out: Path) -> sqlite3.Connection:
    """An empty store at ``out`` with the real schema, the template attached as ``t``, a write transaction open."""
    out.unlink(missing_ok=True)
    con = sqlite3.connect(out, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(SCHEMA)
    con.execute("ATTACH DATABASE ? AS t", (str(template),))
    con.execute("BEGIN")
    return con


def _close_store(con: sqlite3.Connection) -> None:
    con.execute("COMMIT")
    con.execute("DETACH DATABASE t")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def many_runs(template: Path, run_id: str, out: Path, runs: int, tasks: int = 20) -> str:
    """A store of ``runs`` runs plus the seed run; the newest one's id.

    Each run is the seed run's first ``tasks`` tasks, its evaluations up to them and its nodes, one minute apart,
    with ``lr`` cycling through ten values; the newest is ``running``.

    What a store that served a long tuning campaign or a year of nightly runs looks like to the run picker.
    """
    con = _new_store(template, out)
    try:
        _copy_seed(con, run_id)
        p = {"run": run_id, "runs": runs, "tasks": tasks}
        con.execute("CREATE TEMP TABLE k AS WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k "
                    "WHERE i + 1 < :runs) SELECT i, printf('many-%06d', i) AS id FROM k", p)
        con.execute("""
            INSERT INTO runs(run_id, started_at, finished_at, status, strategy, config_json, heartbeat_at)
            SELECT k.id, r.started_at - (:runs - k.i) * 60.0, r.finished_at - (:runs - k.i) * 60.0,
                   CASE WHEN k.i = :runs - 1 THEN 'running' ELSE 'completed' END, r.strategy,
                   json_set(r.config_json, '$.lr', 0.01 * (1 + k.i % 10)), r.heartbeat_at
            FROM temp.k k JOIN t.runs r WHERE r.run_id = :run
        """, p)
        cols = [c for c in UPDATE_COLUMNS if c != "run_id"]
        con.execute(f"""
            INSERT INTO updates(run_id, {",".join(cols)})
            SELECT k.id, {",".join("u." + c for c in cols)}
            FROM temp.k k JOIN (SELECT * FROM t.updates WHERE run_id = :run AND seq < :tasks) u
        """, p)
        last = con.execute("SELECT MAX(completed_at) FROM t.updates WHERE run_id = :run AND seq < :tasks",
                           p).fetchone()[0]
        con.execute("""
            INSERT INTO evals(run_id, t, model_version, updates_applied, bytes_up_total, bytes_down_total, loss,
                              accuracy)
            SELECT k.id, e.t, e.model_version, e.updates_applied, e.bytes_up_total, e.bytes_down_total, e.loss,
                   e.accuracy
            FROM temp.k k JOIN (SELECT * FROM t.evals WHERE run_id = :run AND t <= :last) e
        """, {**p, "last": last})
        names = [c for c in (r[1] for r in con.execute("PRAGMA main.table_info(nodes)")) if c != "run_id"]
        con.execute(f"INSERT INTO nodes(run_id, {','.join(names)}) SELECT k.id, {','.join('n.' + c for c in names)} "
                    "FROM temp.k k JOIN t.nodes n WHERE n.run_id = :run", p)
        con.execute("DROP TABLE temp.k")
    finally:
        _close_store(con)
    return f"many-{runs - 1:06d}"


def many_nodes(template: Path, run_id: str, out: Path, nodes: int, updates: int) -> str:
    """A store with the seed run plus one run of ``nodes`` nodes and ``updates`` tasks spread over them; its id.

    The tasks are the seed run's tiled end to end (as ``synthesize``), the k-th going to node k mod ``nodes``; the
    nodes' devices and networks cycle through the seed run's fleet. The run is the newest.
    """
    new = f"nodes-{nodes}"
    con = _new_store(template, out)
    try:
        _copy_seed(con, run_id)
        n, span, versions = con.execute("SELECT COUNT(*), MAX(completed_at), MAX(applied_version) FROM t.updates "
                                        "WHERE run_id = ?", (run_id,)).fetchone()
        p = {"run": run_id, "new": new, "n": n, "size": updates, "tiles": -(-updates // n), "span": span,
             "v": versions, "nodes": nodes}
        con.execute("""
            INSERT INTO runs(run_id, started_at, finished_at, status, strategy, config_json, heartbeat_at)
            SELECT :new, started_at + 1, finished_at + 1, status, strategy, config_json, heartbeat_at
            FROM t.runs WHERE run_id = :run
        """, p)
        con.execute("""
            INSERT INTO nodes(run_id, node_id, idx, partition_id, device, network, slowdown, dropout, torch_device)
            WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k WHERE i + 1 < :nodes),
            f AS (SELECT *, ROW_NUMBER() OVER (ORDER BY idx) - 1 AS r, COUNT(*) OVER () AS m
                  FROM t.nodes WHERE run_id = :run)
            SELECT :new, k.i + 1, k.i, k.i, f.device, f.network, f.slowdown, f.dropout, f.torch_device
            FROM k JOIN f ON f.r = k.i % f.m
        """, p)
        con.execute("""
            INSERT INTO updates(run_id, seq, node_id, dispatched_at, completed_at, base_version, applied_version,
                                staleness, bytes_up, bytes_down, compute_s, comm_s, status, reason)
            WITH RECURSIVE k(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM k WHERE i + 1 < :tiles),
            u AS (SELECT *, ROW_NUMBER() OVER (ORDER BY seq) - 1 AS r FROM t.updates WHERE run_id = :run)
            SELECT :new, k.i * :n + u.r, (k.i * :n + u.r) % :nodes + 1, u.dispatched_at + k.i * :span,
                   u.completed_at + k.i * :span, u.base_version + k.i * :v, u.applied_version + k.i * :v,
                   u.staleness, u.bytes_up, u.bytes_down, u.compute_s, u.comm_s, u.status, u.reason
            FROM k JOIN u WHERE k.i * :n + u.r < :size
        """, p)
        con.execute("""
            INSERT INTO evals(run_id, t, model_version, updates_applied, bytes_up_total, bytes_down_total, loss,
                              accuracy)
            SELECT :new, t, model_version, updates_applied, bytes_up_total, bytes_down_total, loss, accuracy
            FROM t.evals WHERE run_id = :run
        """, p)
    finally:
        _close_store(con)
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


def app_load(db: Path, run_id: str) -> None:
    """What one refresh of the page reads, as the app calls it.

    The run count and newest run, the comparisons, the picker's run list, the page's data.
    """
    _, newest = queries.load_head(db)
    queries.load_comparisons(db)
    queries.load_runs(db, queries.RUN_CHOICES, "", tuple(dict.fromkeys([run_id, newest])))
    queries.load_page(db, [run_id], target=TARGET)


def time_refresh(db: Path, run_id: str, repeats: int) -> dict[str, Any]:
    """Median (min, max) ms of ``repeats`` full refreshes of the page, after one untimed warm-up.

    Streamlit's ``AppTest`` runs dashboard/app.py on the store with ``?run=run_id``, every cache cleared first
    (what a commit to the store does to the page), so the SQL, the DataFrames, the Altair specs and Streamlit's
    serialization are all timed.
    """
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    from dashboard import safe

    os.environ[safe.STORES_ENV] = str(db.parent)
    at = AppTest.from_file(str(APP), default_timeout=600)
    at.session_state["db"] = str(db)
    at.query_params["run"] = [run_id]
    at.run()  # warm-up: imports, the script's compilation
    errors = [str(e.value) for e in at.error] + [str(e.value) for e in at.exception]
    samples = []
    for _ in range(repeats):
        st.cache_data.clear()
        start = time.perf_counter()
        at.run()
        samples.append((time.perf_counter() - start) * 1000)
        errors += [str(e.value) for e in at.error] + [str(e.value) for e in at.exception]
    charts = len(at.get("vega_lite_chart"))
    return {"refresh_ms_median": statistics.median(samples), "refresh_ms_min": min(samples),
            "refresh_ms_max": max(samples), "refresh_samples_ms": samples, "charts": charts, "errors": errors}


def time_scenario(db: Path, run_id: str, repeats: int, refreshes: int) -> dict[str, Any]:
    """The data load alone (``app_load``, one warm-up then ``repeats``) and the full refresh (``refreshes``)."""
    app_load(db, run_id)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        app_load(db, run_id)
        samples.append((time.perf_counter() - start) * 1000)
    with sqlite3.connect(db) as con:
        counts = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("runs", "updates", "nodes")}
    out = {**counts, "load_ms_median": statistics.median(samples), "load_ms_min": min(samples),
           "load_ms_max": max(samples), "load_samples_ms": samples, "store_mb": db.stat().st_size / 1e6}
    if refreshes:
        out.update(time_refresh(db, run_id, refreshes))
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    """The BENCHMARKS.md table."""
    lines = ["| updates | evals | store MB | page data load, median ms (min-max) | vs 1k | rows returned |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['updates']:,} | {r['evals']:,} | {r['store_mb']:.1f} | {r['ms_median']:.1f} "
                     f"({r['ms_min']:.1f}-{r['ms_max']:.1f}) | {r['ratio_vs_first']:.2f}x | {r['rows_returned']:,} |")
    return "\n".join(lines)


def scale_markdown(rows: list[dict[str, Any]]) -> str:
    """The BENCHMARKS.md table of the scale stores: data load and full refresh, medians."""
    lines = ["| scenario | runs | updates | nodes | store MB | data load, median ms | full refresh, median ms "
             "(min-max) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        refresh = (f"{r['refresh_ms_median']:,.0f} ({r['refresh_ms_min']:,.0f}-{r['refresh_ms_max']:,.0f})"
                   if "refresh_ms_median" in r else "not timed")
        lines.append(f"| {r['scenario']} | {r['runs']:,} | {r['updates']:,} | {r['nodes']:,} | {r['store_mb']:.0f} "
                     f"| {r['load_ms_median']:,.0f} | {refresh} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Seed, synthesize, time; print the table and write ``--json`` / ``--markdown``."""
    p = argparse.ArgumentParser(prog="python -m bench.dashboard_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="updates per store, comma-separated")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seed-updates", type=int, default=200, help="applied updates of the real seed run")
    p.add_argument("--quick", action="store_true", help="tiny seed run (logreg, 20 updates), 3 repeats")
    p.add_argument("--runs", type=int, default=50_000, help="runs of the many-runs store (0: no such store)")
    p.add_argument("--nodes", type=int, default=100_000, help="nodes of the many-nodes run (0: no such store)")
    p.add_argument("--node-updates", type=int, default=200_000, help="tasks of the many-nodes run")
    p.add_argument("--refreshes", type=int, default=5, help="full page refreshes timed per scale store")
    p.add_argument("--dir", help="where the stores are written (default: a temporary folder, removed)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    repeats = 3 if args.quick else args.repeats
    seed_updates = 20 if args.quick else args.seed_updates
    if args.quick:
        args.runs, args.nodes, args.node_updates, args.refreshes = min(args.runs, 300), min(args.nodes, 2000), \
            min(args.node_updates, 4000), 0
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
        scale = []
        if args.runs:
            db = folder / f"store-runs-{args.runs}.db"
            new = many_runs(template, seed, db, args.runs)
            scale.append({"scenario": f"{args.runs:,} runs in the store", **time_scenario(db, new, repeats,
                                                                                         args.refreshes)})
        if args.nodes:
            db = folder / f"store-nodes-{args.nodes}.db"
            new = many_nodes(template, seed, db, args.nodes, args.node_updates)
            scale.append({"scenario": f"one run of {args.nodes:,} nodes", **time_scenario(db, new, repeats,
                                                                                         args.refreshes)})
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
        "scale": scale,
    }
    table = markdown(rows) + ("\n\n" + scale_markdown(scale) if scale else "")
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
