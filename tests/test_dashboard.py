"""The dashboard: its SQL aggregates against the rows of real short runs, and the app through Streamlit's AppTest.

The store is made by the real in-process runner (two short runs, FedBuff and FedAsync + top-k, in one file).
Bad input (missing, empty, locked, foreign or non-SQLite files, a run with no evaluation or no task yet) must be a
message in the page, never an exception.
"""

from __future__ import annotations

import collections
import html
import json
import re
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from dashboard import queries, safe, stops
from server_app.store import MetricsStore, UpdateRow
from server_app.testing import simulate

APP = str(Path(__file__).resolve().parents[1] / "dashboard" / "app.py")
VIEW_CHARTS = 11  # accuracy, loss, 2 staleness, 2 bandwidth, 2 per-node bandwidth, timeline, 2 per-node outcomes


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Two real short runs in one store: (path, [fedbuff run id, fedasync run id])."""
    db = tmp_path_factory.mktemp("dash") / "metrics.db"
    a = simulate("fedbuff", nodes=4, max_updates=24, eval_every=6, db=db)
    b = simulate("fedasync", nodes=4, max_updates=24, eval_every=6, codec="topk", db=db)
    return db, [a.summary.run_id, b.summary.run_id]


@pytest.fixture(autouse=True)
def _stores_in_the_temp_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page opens stores under one folder only (``dashboard/safe.py``): here, every test's temporary folder."""
    monkeypatch.setenv(safe.STORES_ENV, str(tmp_path_factory.getbasetemp()))


def _plain(text: str) -> str:
    """A Markdown-escaped message (``safe.md``) as it reads in the page."""
    return re.sub(r"\\(.)", r"\1", text)


def _rows(db: Path, sql: str, *params) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute(sql, params).fetchall()


def _app(db: Path | str, **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["db"] = str(db)
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


def _charts(at: AppTest) -> int:
    return len(at.get("vega_lite_chart"))


def _messages(at: AppTest) -> str:
    return " ".join(str(e.value) for e in [*at.error, *at.info, *at.warning])


# ------------------------------------------------------------------------------------------------ the queries
def test_aggregates_match_the_rows(store) -> None:
    db, (a, b) = store
    page = queries.load_page(db, [a, b], focus=b, target=0.0)
    assert page.selected == [a, b] and page.focus == b
    ups = _rows(db, "SELECT run_id, node_id, dispatched_at, completed_at, staleness, bytes_up, bytes_down, status "
                    "FROM updates")
    for run in (a, b):
        mine = [r for r in ups if str(r[0]) == run]
        s = page.summary.set_index("run_id").loc[run]
        assert s.tasks == len(mine)
        assert s.applied == sum(r[7] == "applied" for r in mine)
        assert s.bytes_up == sum(r[5] for r in mine) and s.bytes_down == sum(r[6] for r in mine)
        uploaded = [r for r in mine if r[5] > 0]
        assert s.compression == pytest.approx(sum(r[6] for r in uploaded) / sum(r[5] for r in uploaded))
        hist = page.staleness[page.staleness.run_id == run]
        expect = collections.Counter((r[4], r[7]) for r in mine if r[4] is not None)
        assert dict(zip(zip(hist.staleness, hist.status, strict=True), hist.tasks, strict=True)) == expect
        bw = page.bandwidth[page.bandwidth.run_id == run]
        assert bw.up_cum.iloc[-1] == sum(r[5] for r in mine)
        assert bw.down_cum.iloc[-1] == sum(r[6] for r in mine)
        assert (bw.up_bps * page.width).sum() == pytest.approx(sum(r[5] for r in mine))
        assert bw.t.diff().dropna().round(9).eq(round(page.width, 9)).all()  # no gaps
        n_evals = _rows(db, "SELECT COUNT(*) FROM evals WHERE run_id=?", run)[0][0]
        assert (page.evals.run_id == run).sum() == n_evals
    # per node of the focus run
    mine = [r for r in ups if str(r[0]) == b]
    assert page.nodes.tasks.sum() == len(mine)
    assert page.nodes.bytes_up.sum() == sum(r[5] for r in mine)
    assert list(page.nodes.node) == sorted(page.nodes.node)  # n00, n01, ... from the nodes table
    assert page.node_bandwidth.groupby("node").size().nunique() == 1  # every node has every bucket
    assert (page.node_bandwidth.up_bps * page.width).sum() == pytest.approx(sum(r[5] for r in mine))
    assert len(page.timeline) == len(mine) and set(page.timeline.status) <= set(queries.STATUSES)
    assert page.configs[b]["config"]["codec"] == "topk" and page.configs[a]["config"]["strategy"] == "fedbuff"
    assert page.runs.set_index("run_id").loc[b, "label"].startswith("fedasync + topk")


def test_time_and_bytes_to_target(store) -> None:
    db, (a, b) = store
    evals = _rows(db, "SELECT run_id, t, accuracy, bytes_up_total + bytes_down_total FROM evals ORDER BY t, rowid")
    target = sorted(e[2] for e in evals if str(e[0]) == a)[1]  # reached, but not at the first evaluation
    page = queries.load_page(db, [a, b], target=target)
    first = next(e for e in evals if str(e[0]) == a and e[2] >= target)
    hit = page.targets.set_index("run_id").loc[a]
    assert (hit.t, hit.bytes_total) == (first[1], first[3])
    unreachable = queries.load_page(db, [a, b], target=1.01)
    assert unreachable.targets.empty


def test_thinned_evaluations_keep_the_last(store) -> None:
    db, (a, _) = store
    with queries.snapshot(db) as (con, schema):
        every = queries.evals(con, schema, [a])
        thin = queries.evals(con, schema, [a], max_points=2)
    assert len(thin) <= 3 and thin.t.iloc[-1] == every.t.iloc[-1] and thin.t.iloc[0] == every.t.iloc[0]


def test_bucket_width_is_round_and_bounded() -> None:
    for span in (0.0, 0.37, 1.0, 9.99, 123.4, 86_400.0):
        w = queries.bucket_width(span)
        assert w > 0 and (span == 0 or span / w <= queries.MAX_BUCKETS)
        mantissa = w / 10 ** __import__("math").floor(__import__("math").log10(w))
        assert round(mantissa, 6) in (1.0, 2.0, 5.0)
    assert queries.bucket_width(float("nan")) == 1.0


def test_reader_never_blocks_the_writer(tmp_path: Path) -> None:
    """WAL: a reader inside its snapshot neither waits for nor holds up the writer's commits."""
    db = tmp_path / "m.db"
    writer = MetricsStore(db)
    writer.start_run("r1", "fedbuff", {"strategy": "fedbuff"})

    def row(seq: int) -> UpdateRow:
        return UpdateRow(seq, 7, seq * 0.1, seq * 0.1 + 0.05, 0, 1, 0, 100, 200, 0.01, 0.04, "applied")

    writer.record_update(row(0))
    writer.commit()  # task outcomes are committed in groups (server_app/store.py); here one commit per row

    def tasks(con: sqlite3.Connection) -> int:
        queries.stage(con, ["r1"], 1.0)
        return int(queries.summary(con).tasks.iloc[0])

    with queries.snapshot(db) as (con, _):
        before = tasks(con)
        t0 = time.monotonic()
        for seq in range(1, 51):  # commits while the reader's transaction is open
            writer.record_update(row(seq))
            writer.commit()
        assert time.monotonic() - t0 < 5.0
        assert tasks(con) == before == 1  # the reader's snapshot is stable
    # and a reader while the writer holds an open write transaction is not blocked either
    writer.db.execute("BEGIN IMMEDIATE")
    writer.db.execute("UPDATE runs SET status='completed'")
    t0 = time.monotonic()
    assert queries.load_page(db, ["r1"]).summary.tasks.iloc[0] == 51
    assert time.monotonic() - t0 < queries.BUSY_TIMEOUT_S
    writer.db.execute("COMMIT")
    writer.close()


def test_a_live_run_is_read_while_it_writes(tmp_path: Path) -> None:
    """Page loads in a loop while a real run writes: they see a growing, consistent store and never fail."""
    db = tmp_path / "live.db"
    seen: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                runs = queries.load_runs(db)
                if len(runs):
                    page = queries.load_page(db)
                    if len(page.summary):
                        s = page.summary.iloc[0]
                        assert s.tasks == page.nodes.tasks.sum() == len(page.timeline)
                        seen.append(int(s.tasks))
            except queries.StoreError as exc:
                if exc.kind not in ("missing", "empty"):
                    errors.append(exc)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            time.sleep(0.02)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        simulate("fedbuff", nodes=4, max_updates=40, eval_every=5, db=db)
    finally:
        done.set()
        reader.join(timeout=30)
    assert not errors, errors
    assert seen and seen == sorted(seen)


# ------------------------------------------------------------------------------------------------ the app
def test_app_draws_every_view_of_a_real_run(store) -> None:
    db, (a, b) = store
    at = _app(db)
    assert not at.exception and not at.error
    assert [m.value for m in at.multiselect] == [[b]]  # the newest run
    assert _charts(at) == VIEW_CHARTS
    labels = [m.label for m in at.metric]
    assert any(lbl.startswith("time to") for lbl in labels) and any(lbl.startswith("bytes to") for lbl in labels)
    compression = next(m.value for m in at.metric if m.label == "compression")
    assert float(compression.rstrip("x")) > 2  # top-k of a small logreg: measured from the stored bytes
    headers = [h.value for h in at.subheader]
    assert headers[:3] == ["Accuracy and loss", "Staleness", "Bandwidth"] and "Config" in headers
    assert any(h.startswith("Per node:") for h in headers)


def test_app_overlays_runs_and_switches_views(store) -> None:
    db, (a, b) = store
    at = _app(db)
    at.multiselect(key="runs").set_value([a, b]).run()
    assert not at.exception and not at.error
    assert len(at.dataframe[0].value) == 2  # overview: one row per run
    assert len([m for m in at.metric if m.label == "compression"]) == 2
    for axis in ("updates", "bytes", "clock"):
        at.radio(key="x_axis").set_value(axis).run()
        assert not at.exception and _charts(at) == VIEW_CHARTS
    at.selectbox(key="focus").set_value(a).run()
    assert any(h.value.startswith("Per node: fedbuff") for h in at.subheader)
    at.radio(key="node_direction").set_value("down_bps").run()
    at.toggle(key="cfg_diff").set_value(True).run()
    config = at.dataframe[-1].value
    assert "codec" in config.index and "batch-size" not in config.index  # only keys that differ
    at.number_input(key="target").set_value(0.05).run()
    assert not at.exception and not at.error
    assert [m.value for m in at.metric if m.label.startswith("time to")][0].endswith(" s")


def test_app_follows_a_new_run(store, tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    shutil.copy(store[0], db)
    at = _app(db)
    first = at.multiselect(key="runs").value
    new = simulate("fedavg", nodes=3, max_updates=6, eval_every=3, db=db)
    at.run()
    assert at.multiselect(key="runs").value == [new.summary.run_id]  # it followed the newest run
    assert first != [new.summary.run_id] and not at.exception


def test_app_reads_run_ids_from_the_url(store) -> None:
    db, (a, b) = store
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["db"] = str(db)
    at.query_params["run"] = [a, b]
    at.run()
    assert at.multiselect(key="runs").value == [a, b] and not at.exception


def test_app_shows_consensus_distance_when_stored(store, tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    shutil.copy(store[0], db)
    with sqlite3.connect(db) as con:
        cols = {r[1] for r in con.execute("PRAGMA table_info(evals)")}
        if "consensus_distance" not in cols:
            con.execute("ALTER TABLE evals ADD COLUMN consensus_distance REAL")
        con.execute("UPDATE evals SET consensus_distance = 1.0 / (1 + updates_applied) WHERE run_id = ?",
                    (store[1][1],))
    at = _app(db)
    assert not at.exception and _charts(at) == VIEW_CHARTS + 1


def test_app_on_a_store_with_only_the_contract_columns(tmp_path: Path) -> None:
    """DESIGN.md's tables and columns only: no nodes table, no runs.error, no evals.metrics_json."""
    db = tmp_path / "bare.db"
    with sqlite3.connect(db) as con:
        con.executescript("""
            CREATE TABLE runs(run_id TEXT PRIMARY KEY, started_at REAL, finished_at REAL, status TEXT,
                              strategy TEXT, config_json TEXT);
            CREATE TABLE updates(run_id TEXT, seq INTEGER, node_id INTEGER, dispatched_at REAL, completed_at REAL,
                base_version INTEGER, applied_version INTEGER, staleness INTEGER, bytes_up INTEGER,
                bytes_down INTEGER, compute_s REAL, comm_s REAL, status TEXT, reason TEXT);
            CREATE TABLE evals(run_id TEXT, t REAL, model_version INTEGER, updates_applied INTEGER,
                bytes_up_total INTEGER, bytes_down_total INTEGER, loss REAL, accuracy REAL);
            INSERT INTO runs VALUES ('x', 1.7e9, NULL, 'failed', 'fedasync', 'not json');
            INSERT INTO updates VALUES ('x', 0, -5, 0.0, 1.5, 0, 1, 0, 10, 40, 1.0, 0.5, 'applied', ''),
                                       ('x', 1, 9, 0.0, 2.0, 0, NULL, NULL, 0, 40, 0, 0, 'failed', 'lost'),
                                       ('x', 2, 9, 2.0, 3.0, 1, NULL, 1, 10, 40, 1, 0, 'rejected', 'NaN');
            INSERT INTO evals VALUES ('x', 0.0, 0, 0, 0, 0, 2.3, 0.1), ('x', 1.5, 1, 1, 10, 40, 2.0, 0.3);
        """)
    at = _app(db)
    assert not at.exception
    assert "failed" in _messages(at)  # the run failed: said in the page (no error column: no reason stored)
    assert _charts(at) == VIEW_CHARTS
    assert "unparsed" in str(at.dataframe[-1].value.index.tolist())


# ------------------------------------------------------------------------------------------- comparing many runs
def _clone_runs(db: Path, run_id: str, n: int) -> list[str]:
    """``n`` copies of ``run_id`` (every row of every table), each started a second later: their ids, newest first."""
    ids = [f"clone-{i}" for i in range(n)]
    with sqlite3.connect(db) as con:
        for i, new in enumerate(ids):
            for table in ("runs", "updates", "evals", "nodes"):
                cols = [r[1] for r in con.execute(f"PRAGMA table_info({table})") if r[1] != "run_id"]
                started = [c if c != "started_at" else f"started_at + {i + 1}" for c in cols]
                con.execute(f"INSERT INTO {table}(run_id, {','.join(cols)}) SELECT ?, {','.join(started)} "
                            f"FROM {table} WHERE run_id = ?", (new, run_id))
    return ids[::-1]


def _specs(at: AppTest) -> list[dict]:
    """Every chart's Vega-Lite spec, a layered chart's layers as charts of their own."""
    specs = [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]
    return [layer for spec in specs for layer in [spec, *spec.get("layer", [])] if "encoding" in layer]


def _run_domains(at: AppTest) -> list[list[str]]:
    """The run colour domain of every chart coloured by run, after checking its legend shows every run in full."""
    out = []
    for spec in _specs(at):
        color = spec["encoding"].get("color", {})
        if color.get("field") == "run":
            domain, legend = color["scale"]["domain"], color["legend"]
            assert legend["labelLimit"] == 0 and legend["symbolLimit"] >= len(domain) and legend["columns"] == 1
            out.append(domain)
    return out


def test_app_compares_several_runs_the_last_n_and_a_comparisons(store, tmp_path: Path) -> None:
    """Several picked runs, the last N, a comparison's runs: each run in every legend, under its label; axes and
    legends in words, staleness on a numeric axis."""
    db = tmp_path / "m.db"
    shutil.copy(store[0], db)
    a, b = store[1]
    clones = _clone_runs(db, b, 3)
    with sqlite3.connect(db) as con:  # a comparison of two runs, as server_app.compare tags them
        con.execute("INSERT INTO comparisons VALUES ('c1', 1.7e9, NULL, 'completed', '{\"methods\": [\"x\"]}', NULL)")
        con.executemany("INSERT INTO comparison_runs VALUES (?, 'c1', 'x', 'eval', ?, 0)", [(a, 0), (clones[0], 1)])
    labels = queries.load_runs(db).set_index("run_id")["label"]
    picked = [a, *clones]
    at = _app(db, runs=picked)
    assert not at.exception and not at.error and at.multiselect(key="runs").value == picked
    assert "?run=ID&run=ID2" in at.multiselect(key="runs").help  # the link form is said in the page
    domains = _run_domains(at)
    assert len(domains) == 6 and all(d == [labels[r] for r in picked] for d in domains)  # accuracy ... bandwidth
    _words_and_numeric_staleness(at)
    at.radio(key="pick_mode").set_value("last").run()
    at.number_input(key="last_n").set_value(3).run()
    assert not at.exception and not at.error
    assert all(d == [labels[r] for r in clones] for d in _run_domains(at))  # the newest three
    assert at.query_params["run"] == clones  # the address follows the selection
    at.radio(key="pick_mode").set_value("comparison").run()
    assert not at.exception and not at.error
    assert all(d == [labels[a], labels[clones[0]]] for d in _run_domains(at))


def _words_and_numeric_staleness(at: AppTest) -> None:
    """No raw column name in an axis, legend or folded series; the staleness histogram's axis is quantitative."""
    raw = re.compile(r"^[a-z]+(_[a-z]+)+$")  # bytes_up_cum, mean_staleness, ...
    for spec in _specs(at):
        for fold in (t["fold"] for t in spec.get("transform", []) if "fold" in t):
            assert not [f for f in fold if raw.match(f)], fold
        for channel in ("x", "y", "color", "strokeDash"):
            enc = spec["encoding"].get(channel)
            if enc and "field" in enc:
                title = enc.get("title", enc.get("legend", {}).get("title", enc["field"]))
                assert title is None or not raw.match(str(title)), (channel, enc)
    hist = next(s for s in _specs(at) if s["encoding"]["y"].get("title") == "applied updates"
                and "x2" in s["encoding"])
    assert hist["encoding"]["x"]["type"] == "quantitative" and hist["encoding"]["x"]["title"].startswith("staleness")


def test_a_running_run_shows_its_progress_toward_its_stop(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    w = MetricsStore(db)
    w.start_run("live", "fedbuff", {"strategy": "fedbuff", "max-updates": 8, "target-accuracy": 0.9})
    w.heartbeat()
    for seq in range(2):
        w.record_update(UpdateRow(seq, 3, 0.0, 0.4 + seq, 0, 1, 0, 100, 300, 0.1, 0.3, "applied"))
    w.db.execute("INSERT INTO evals(run_id, t, model_version, updates_applied, bytes_up_total, bytes_down_total, "
                 "loss, accuracy) VALUES ('live', 1.4, 2, 2, 200, 600, 1.0, 0.45)")
    w.commit()
    at = _app(db)
    assert not at.exception and not at.error
    bar = at.get("progress")[0]
    assert bar.value == 50  # best accuracy 0.45 of 0.90 is nearer than 2 of 8 updates
    assert "0.450 of the target 0.90" in bar.proto.text
    captions = " ".join(c.value for c in at.caption)
    assert "stops at 8 applied updates or 0.90 accuracy, whichever comes first" in captions
    w.finish_run("completed")
    w.close()
    at.run()
    assert not at.get("progress") and "stops at 8 applied updates" in " ".join(c.value for c in at.caption)


def test_stop_conditions_and_progress() -> None:
    assert stops.describe({"max-updates": 200, "max-time": 0.0, "target-accuracy": 0.0}) == \
        "stops at 200 applied updates"
    assert stops.describe({"max-time": 60, "target-accuracy": "x"}) == "stops at 60 s on its clock"
    assert stops.describe({}) == "no stop condition set" and stops.progress({}, 5, 5, 0.5) is None
    cfg = {"max-updates": 200, "max-time": 60, "target-accuracy": 0.9}
    assert stops.progress(cfg, 50, 45, 0.3).fraction == pytest.approx(0.75)  # the clock is nearest
    assert stops.progress(cfg, 250, None, None).fraction == 1.0 and "250 of 200" in stops.progress(cfg, 250, 0, 0).text


def test_queries_stay_bounded_whatever_the_store_holds(store, tmp_path: Path) -> None:
    """The run list is LIMITed (plus the runs asked for), and the per-node views draw at most ``max_nodes`` nodes."""
    db = tmp_path / "m.db"
    shutil.copy(store[0], db)
    a, b = store[1]
    clones = _clone_runs(db, b, 3)
    listed = queries.load_runs(db, limit=2, include=[a])
    assert list(listed["run_id"]) == [*clones[:2], a]  # the newest two, and the one asked for
    assert list(queries.load_runs(db, limit=10, search="topk")["run_id"]) == [*clones, b]  # a config value
    assert queries.load_runs(db, limit=10, search="%").empty  # LIKE's wildcards match themselves
    assert queries.load_head(db) == (5, clones[0])
    page = queries.load_page(db, [b], max_nodes=2, node_order="busiest")
    nodes = _rows(db, "SELECT node_id, COUNT(*) FROM updates WHERE run_id = ? GROUP BY node_id", b)
    assert page.node_total == len(nodes) > 2 and len(page.nodes) == 2
    assert sorted(page.nodes["tasks"]) == sorted(n for _, n in nodes)[-2:]  # the busiest two
    assert set(page.node_bandwidth["node"]) == set(page.timeline["node"]) == set(page.nodes["node"])
    assert page.summary.set_index("run_id").at[b, "nodes"] == len(nodes)


# ------------------------------------------------------------------------------------------- what the nodes hold
@pytest.fixture(scope="module")
def gossip(store, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """The star runs' store plus a real AD-PSGD run, which stores its node models' scores at every evaluation:
    (path, AD-PSGD run id, FedBuff run id)."""
    db = tmp_path_factory.mktemp("gossip") / "metrics.db"
    shutil.copy(store[0], db)
    run = simulate("ad-psgd", nodes=4, max_updates=24, eval_every=3, db=db)
    return db, run.summary.run_id, store[1][0]


def _accuracy_chart(at: AppTest) -> tuple[dict, pd.DataFrame]:
    """The accuracy chart's encoding (of its lines, when layered) and the rows it draws (sent as Arrow)."""
    for chart in at.get("vega_lite_chart"):
        spec = json.loads(chart.proto.spec)
        encodings = [layer["encoding"] for layer in [spec, *spec.get("layer", [])] if "encoding" in layer]
        if encodings and encodings[0]["y"]["title"] == "accuracy":
            enc = next((e for e in encodings if "strokeDash" in e), encodings[0])
            return enc, pa.ipc.open_stream(chart.proto.datasets[0].data.data).read_pandas()
    raise AssertionError("no accuracy chart")


def _stored_scores(db: Path, run_id: str) -> list[tuple[float, dict]]:
    """Each evaluation's accuracy and parsed metrics_json, in time order: what the dashboard must show."""
    return [(acc, json.loads(m)) for acc, m in
            _rows(db, "SELECT accuracy, metrics_json FROM evals WHERE run_id = ? ORDER BY t, rowid", run_id)]


def test_a_gossip_run_shows_what_its_nodes_hold(gossip) -> None:
    """Beside AD-PSGD's accuracy (the average model): its node models' mean and worst, in the chart, the tiles and
    the table; the FedBuff run beside it is drawn as its published model alone."""
    db, g, star = gossip
    at = _app(db, runs=[g, star])
    assert not at.exception and not at.error
    labels = queries.load_runs(db).set_index("run_id")["label"]
    stored = _stored_scores(db, g)
    assert len(stored) > 2 and {"local-acc-mean", "local-acc-min", "local-acc-nodes"} <= set(stored[-1][1])
    nodes = stored[-1][1]["local-acc-nodes"]
    assert nodes == 4
    enc, rows = _accuracy_chart(at)
    worst = f"node models, worst of {nodes}"
    assert enc["strokeDash"]["scale"]["domain"] == ["average model", "published model", "node models, mean", worst]
    dashes = enc["strokeDash"]["scale"]["range"]
    assert len({json.dumps(d) for d in dashes[1:]}) == 3 and dashes[0] == dashes[1] == [1, 0]  # distinct styles
    assert enc["color"]["scale"]["domain"] == [labels[g], labels[star]]  # the run, as in every other view

    def drawn(run: str, series: str) -> list[float]:
        return rows[(rows["run"] == labels[run]) & (rows["series"] == series)]["value"].tolist()

    assert drawn(g, "average model") == pytest.approx([acc for acc, _ in stored])
    assert drawn(g, "node models, mean") == pytest.approx([m["local-acc-mean"] for _, m in stored])
    assert drawn(g, worst) == pytest.approx([m["local-acc-min"] for _, m in stored])
    star_acc = [r[0] for r in _rows(db, "SELECT accuracy FROM evals WHERE run_id = ? ORDER BY t, rowid", star)]
    assert drawn(star, "published model") == pytest.approx(star_acc)
    assert set(rows[rows["run"] == labels[star]]["series"]) == {"published model"}

    last = stored[-1][1]
    tiles = {m.label: m for m in at.metric if m.label.startswith("node models")}
    tile = tiles[f"node models: mean · worst of {nodes}"]
    assert tile.value == f"{last['local-acc-mean']:.3f} · {last['local-acc-min']:.3f}"
    assert "no node holds" in tile.help and "no node holds" in " ".join(c.value for c in at.caption)
    assert tiles["node models (latest)"].value == "–"  # the FedBuff run's row, aligned with it
    table = at.dataframe[0].value.set_index("run")
    assert table.at[labels[g], "node models, mean"] == pytest.approx(last["local-acc-mean"])
    assert table.at[labels[g], "node models, worst"] == pytest.approx(last["local-acc-min"])
    assert pd.isna(table.at[labels[star], "node models, mean"])


def test_star_runs_show_no_node_models(store) -> None:
    """FedBuff and FedAsync store no node models' scores: their accuracy chart, tiles and table are as before."""
    db, runs = store
    at = _app(db, runs=runs)
    assert not at.exception and not at.error
    enc, rows = _accuracy_chart(at)
    assert "strokeDash" not in enc and enc["y"]["field"] == "accuracy" and "series" not in rows
    assert rows["local_mean"].isna().all() and len(rows) == sum(
        _rows(db, "SELECT COUNT(*) FROM evals WHERE run_id = ?", r)[0][0] for r in runs)
    assert not [m for m in at.metric if m.label.startswith("node models")]
    assert [m.label for m in at.metric].count("accuracy (latest)") == 2
    assert not [c for c in at.dataframe[0].value.columns if c.startswith("node models")]
    assert "no node holds" not in " ".join(c.value for c in at.caption)


MALFORMED = ["not json {", "[0.5, 0.6]", '"local-acc-mean"', '{"local-acc-mean": "0.5", "local-acc-min": {"x": 1}}',
             '{"local-acc-mean": 1e999, "local-acc-min": -3, "local-acc-nodes": "eight"}', "[" * 5000 + "]" * 5000,
             None, b"\x00\xff{"]


def test_malformed_node_scores_still_render(gossip, tmp_path: Path) -> None:
    """Hostile metrics_json (not JSON, not an object, strings, objects, infinity, out of range, nested too deep, a
    blob, NULL): those evaluations draw no node-model point, the others do, and the page draws every view."""
    db = tmp_path / "m.db"
    shutil.copy(gossip[0], db)
    _, g, star = gossip
    stored = _stored_scores(db, g)
    with sqlite3.connect(db) as con:
        rowids = [r[0] for r in con.execute("SELECT rowid FROM evals WHERE run_id = ? ORDER BY t, rowid", (g,))]
        keep = rowids[1]  # one evaluation keeps its scores
        bad = [r for r in rowids if r != keep]
        assert len(bad) >= len(MALFORMED)
        for rowid, value in zip(bad[-len(MALFORMED):], MALFORMED, strict=True):  # the latest: a blob
            con.execute("UPDATE evals SET metrics_json = ? WHERE rowid = ?", (value, rowid))
        for rowid in bad[:-len(MALFORMED)]:
            con.execute("UPDATE evals SET metrics_json = ? WHERE rowid = ?", (MALFORMED[0], rowid))
        con.execute("UPDATE evals SET metrics_json = ? WHERE run_id = ?", (MALFORMED[0], star))
    at = _app(db, runs=[g, star])
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert _charts(at) == VIEW_CHARTS + 1  # and the consensus distance of AD-PSGD
    enc, rows = _accuracy_chart(at)
    labels = queries.load_runs(db).set_index("run_id")["label"]
    mine = rows[rows["run"] == labels[g]]
    assert mine[mine["series"] == "node models, mean"]["value"].tolist() == pytest.approx(
        [stored[1][1]["local-acc-mean"]])
    assert mine[mine["series"] == "node models, worst of 4"]["value"].tolist() == pytest.approx(
        [stored[1][1]["local-acc-min"]])
    assert len(mine[mine["series"] == "average model"]) == len(stored)
    # the tiles show the latest evaluation, whose scores are unreadable in both runs: no tile, no table column
    assert not [m for m in at.metric if m.label.startswith("node models")]
    assert not [c for c in at.dataframe[0].value.columns if c.startswith("node models")]


# --------------------------------------------------------------------------------- which accuracy a target reads
def test_the_score_names_are_the_runners() -> None:
    """The dashboard's copy of which key each target-score reads, and how it names it, is server_app's."""
    from server_app.localscores import SCORE_KEYS, SCORE_LABELS
    from strategies.config import TARGET_SCORES

    assert queries.SCORES == SCORE_KEYS and tuple(queries.SCORES) == TARGET_SCORES
    assert queries.SCORE_NAMES == stops.SCORE_NAMES == SCORE_LABELS


EVAL_COLS = ("run_id, t, model_version, updates_applied, bytes_up_total, bytes_down_total, loss, accuracy, "
             "metrics_json")
# Per evaluation: (the average model's accuracy, the node models' mean, their worst). The gossip method's node models
# trail its average, so every score gives it other times to the targets and another final accuracy.
GOSSIP = [(0.10, 0.05, 0.02), (0.35, 0.15, 0.10), (0.45, 0.25, 0.20), (0.55, 0.32, 0.26), (0.60, 0.41, 0.31)]
STAR = [0.10, 0.25, 0.33, 0.42, 0.50]


def _comparison(db: Path, cid: str, spec: object, started: float, seeds: tuple[int, ...] = (10, 11)) -> list[str]:
    """A comparison of ad-psgd (with node models' scores) and fedbuff (without), as ``server_app.compare`` stores
    one: its spec (``spec_json``, written as given when a string), one evaluation run per method and seed with a
    few tasks and five evaluations. The run ids, ad-psgd's first."""
    w = MetricsStore(db)
    w.db.execute("INSERT INTO comparisons VALUES (?, ?, ?, 'completed', ?, NULL)",
                 (cid, started, started + 60, spec if isinstance(spec, str | bytes) else json.dumps(spec)))
    ids = []
    for method in ("ad-psgd", "fedbuff"):
        for k, seed in enumerate(seeds):
            run = f"{cid}-{method}-{seed}"
            ids.append(run)
            w.tag_run(run, cid, method, "eval", seed)
            w.start_run(run, method, {"strategy": method, "seed": seed, "target-score": "local-mean"})
            for seq in range(3):
                w.record_update(UpdateRow(seq, 3, seq, seq + 0.5, 0, 1, 0, 1000 * (k + 1), 4000, 0.2, 0.3,
                                          "applied" if seq else "dropped"))
            for i in range(5):
                shift = 0.02 * k  # the seeds differ a little
                if method == "ad-psgd":
                    acc, mean, low = (x + shift for x in GOSSIP[i])
                    metrics = {"consensus-distance": 0.1, "local-acc-mean": mean, "local-acc-min": low,
                               "local-acc-nodes": 6}
                else:
                    acc, metrics = STAR[i] + shift, {"buffered": 2}
                w.db.execute(f"INSERT INTO evals({EVAL_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                             (run, float(i), i, 4 * i, 100 * i, 400 * i, 2.0 - acc, acc, json.dumps(metrics)))
            w.finish_run("completed")
    w.db.commit()
    w.close()
    return ids


def _harness(db: Path, cid: str, score: str, targets: list[float]) -> dict[str, dict]:
    """What ``server_app.compare``'s report says of the comparison's methods, read the harness's own way."""
    from server_app.compare_report import read_outcome, summarise

    by_method: dict[str, list] = collections.defaultdict(list)
    for method, seed, run in _rows(db, "SELECT method, seed, run_id FROM comparison_runs WHERE comparison_id = ? "
                                       "AND role = 'eval' ORDER BY method, seed", cid):
        by_method[method].append(read_outcome(db, run, targets, score).entry(seed))
    return {m: summarise(entries, targets) for m, entries in by_method.items()}


def _comparison_view(at: AppTest) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The comparison view: its table (by method), the rows its chart draws, and its captions."""
    frames = [pa.ipc.open_stream(d.data.data).read_pandas() for c in at.get("vega_lite_chart")
              for d in c.proto.datasets]
    drawn = next(f for f in frames if {"method", "score"} <= set(f.columns))  # the comparison chart's lines
    return at.dataframe[0].value.set_index("method"), drawn, " ".join(c.value for c in at.caption)


def _table_is_the_harness(table: pd.DataFrame, harness: dict[str, dict], target: float) -> None:
    for method, summary in harness.items():
        row, hit = table.loc[method], summary["targets"][repr(target)]
        assert row["runs"] == summary["runs"] and row["reached"] == hit["reached"]
        mean = row[f"mean time to {target:.2f} (s)"]
        assert (None if pd.isna(mean) else mean) == pytest.approx(hit["time_mean"])
        assert row["final accuracy"] == pytest.approx(summary["final_accuracy"]["mean"])
        assert row["MB up"] == pytest.approx(summary["mb_up"]["mean"])
        assert row["wasted compute (s)"] == pytest.approx(summary["wasted_compute"]["mean"])


def test_a_comparison_reads_its_recorded_score(tmp_path: Path) -> None:
    """The comparison view's table and chart read the accuracy the comparison's --score named, with the harness's
    fallback to the published model's for the star method: the harness's report's numbers, whatever the score. A
    comparison stored before the score was recorded read the average, and so does its view."""
    db = tmp_path / "m.db"
    targets = [0.2, 0.3, 0.4]
    spec = {"methods": ["ad-psgd", "fedbuff"], "targets": targets}
    _comparison(db, "old", spec, 1.7e9)
    _comparison(db, "worst", {**spec, "score": "local-min"}, 1.7e9 + 1)
    _comparison(db, "mean", {**spec, "score": "local-mean"}, 1.7e9 + 2)
    at = _app(db)
    assert not at.exception and not at.error and at.selectbox(key="comparison").value == "mean"  # the newest
    assert at.number_input(key="comparison_target").value == pytest.approx(0.3)
    seen = {}
    for cid, score in (("mean", "local-mean"), ("worst", "local-min"), ("old", "average")):
        at.selectbox(key="comparison").set_value(cid).run()
        assert not at.exception and not at.error
        for target in targets:
            at.number_input(key="comparison_target").set_value(target).run()
            table, drawn, captions = _comparison_view(at)
            _table_is_the_harness(table, _harness(db, cid, score, targets), target)
            seen[cid, target] = table
        column = {"average": 0, "local-mean": 1, "local-min": 2}[score]
        first = drawn[drawn["run_id"] == f"{cid}-ad-psgd-10"]
        assert first["score"].tolist() == pytest.approx([e[column] for e in GOSSIP])  # the chart draws it too
        star = drawn[drawn["run_id"] == f"{cid}-fedbuff-10"]
        assert star["score"].tolist() == pytest.approx(STAR)  # the star method: its published model, always
        line = {"local-mean": "Accuracy: the node models' mean (`--score local-mean`), as in the harness's report",
                "local-min": "Accuracy: the worst node model (`--score local-min`), as in the harness's report",
                "average": "stored before the harness recorded `--score`"}[score]
        assert _plain(line) in _plain(captions)
    # the scores disagree on the gossip method (the test can tell them apart), never on the star one
    for target in targets:
        gossip = {cid: seen[cid, target].loc["ad-psgd"] for cid in ("mean", "worst", "old")}
        assert gossip["mean"]["final accuracy"] != gossip["old"]["final accuracy"] != gossip["worst"]["final accuracy"]
        star = {cid: seen[cid, target].loc["fedbuff"].tolist() for cid in ("mean", "worst", "old")}
        assert star["mean"] == star["worst"] == star["old"]
    mean_time = seen["mean", 0.3].loc["ad-psgd"]["mean time to 0.30 (s)"]
    assert mean_time == pytest.approx(3.0) and seen["old", 0.3].loc["ad-psgd"]["mean time to 0.30 (s)"] == 1.0


def test_a_comparison_with_hostile_scores_still_renders(tmp_path: Path) -> None:
    """Unreadable node scores in a comparison's evaluations are no point (a NULL or a key-less JSON value reads
    the accuracy, as the harness does); an unreadable recorded score reads the average, and the view says it is
    not the recorded one; hostile methods and targets are ignored."""
    db = tmp_path / "m.db"
    spec = {"methods": ["ad-psgd", "fedbuff"], "targets": [0.2, 0.3, 0.4], "score": "local-mean"}
    runs = _comparison(db, "hostile-rows", spec, 1.7e9, seeds=(10,))
    values = ["not json {", None, "[0.5, 0.6]", '"local-acc-mean"', '{"local-acc-mean": "0.5"}',
              '{"local-acc-mean": 1e999}', '{"local-acc-mean": -3}', "[" * 5000 + "]" * 5000, b"\x00\xff{",
              '{"local-acc-mean": null}']
    accuracy = {}
    with sqlite3.connect(db) as con:
        for i, value in enumerate(values):
            con.execute(f"INSERT INTO evals({EVAL_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                        (runs[0], 10.0 + i, 9, 50, 900, 3600, 1.0, 0.5 + i / 100, value))
            accuracy[10.0 + i] = 0.5 + i / 100
    for n, bad in enumerate(['{"score": {"local-mean": 1}, "methods": "abc", "targets": ["x", 0.5, true, 2]}',
                             '{"score": "bogus"}', "not json", "[" * 5000 + "]" * 5000, b"\x00{"]):
        _comparison(db, f"hostile-spec-{n}", bad, 1.7e9 + 1 + n, seeds=(10,))
    at = _app(db, comparison="hostile-rows")
    assert not at.exception and not at.error, [e.value for e in at.error]
    _, drawn, _ = _comparison_view(at)
    mine = drawn[(drawn["run_id"] == runs[0]) & (drawn["t"] >= 10)].set_index("t")["score"]
    fallback = {None, "[0.5, 0.6]", '"local-acc-mean"', '{"local-acc-mean": null}'}  # no such key: the accuracy
    for i, value in enumerate(values):
        got = mine.loc[10.0 + i]
        assert (got == pytest.approx(accuracy[10.0 + i])) if value in fallback else pd.isna(got), (value, got)
    for n in range(5):
        at.selectbox(key="comparison").set_value(f"hostile-spec-{n}").run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        table, _, captions = _comparison_view(at)
        assert "recorded score (`--score`) cannot be read" in _plain(captions)
        target = at.number_input(key="comparison_target").value  # the widget keeps its value across comparisons
        _table_is_the_harness(table, _harness(db, f"hostile-spec-{n}", "average", [target]), target)
    listed = queries.load_comparisons(db).set_index("comparison_id")
    assert listed.at["hostile-spec-0", "methods"] == [] and listed.at["hostile-spec-0", "targets"] == [0.5]


def test_progress_toward_the_target_reads_the_runs_target_score(tmp_path: Path) -> None:
    """A running gossip run's progress toward target-accuracy reads its target-score (the node models' mean, or the
    worst), and says so; a run stored before target-score existed read the average, and a run without node models'
    scores (a star strategy) its published model, whatever its target-score."""
    db = tmp_path / "m.db"
    w = MetricsStore(db)
    # per evaluation: (accuracy, metrics_json): the average reached 0.80, the node models' mean 0.45 at best
    gossip = [(0.80, {"local-acc-mean": 0.45, "local-acc-min": 0.30, "local-acc-nodes": 6}),
              (0.70, {"local-acc-mean": 0.40, "local-acc-min": 0.35, "local-acc-nodes": 6}),
              (0.42, None)]  # an evaluation without node scores reads its accuracy (as the engine's stop does)
    cases = {"mean": ("ad-psgd", {"target-score": "local-mean"}, gossip),
             "worst": ("ad-psgd", {"target-score": "local-min"}, gossip),
             "average": ("ad-psgd", {"target-score": "average"}, gossip),
             "before": ("ad-psgd", {}, gossip),  # stored before the key existed
             "star": ("fedbuff", {"target-score": "local-mean"}, [(0.60, {"buffered": 2}), (0.50, None)])}
    for run, (strategy, score, evals) in cases.items():
        w.start_run(run, strategy, {"strategy": strategy, "max-updates": 100, "target-accuracy": 0.9, **score})
        w.heartbeat()
        w.record_update(UpdateRow(0, 3, 0.0, 0.4, 0, 1, 0, 100, 300, 0.1, 0.3, "applied"))
        for i, (acc, metrics) in enumerate(evals):
            w.db.execute(f"INSERT INTO evals({EVAL_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                         (run, float(i), i, i, 0, 0, 1.0, acc, None if metrics is None else json.dumps(metrics)))
    w.db.commit()
    at = _app(db, runs=list(cases))
    assert not at.exception and not at.error
    bars = [(b.value, b.proto.text) for b in at.get("progress")]
    assert bars == [(50, "toward its stop: best node models' mean 0.450 of the target 0.90 (50%)"),
                    (46, "toward its stop: best worst node model 0.420 of the target 0.90 (47%)"),
                    (88, "toward its stop: best accuracy 0.800 of the target 0.90 (89%)"),
                    (88, "toward its stop: best accuracy 0.800 of the target 0.90 (89%)"),
                    (66, "toward its stop: best accuracy 0.600 of the target 0.90 (67%)")], bars
    w.close()


def test_progress_reads_the_named_score() -> None:
    cfg = {"max-updates": 100, "target-accuracy": 0.8}
    best = {"local-mean": 0.4, "local-min": 0.2}
    assert stops.target_score(cfg) == "average"  # stored before target-score existed
    assert stops.progress(cfg, 0, 0, 0.6, best).text == "best accuracy 0.600 of the target 0.80 (75%)"
    mean = {**cfg, "target-score": "local-mean"}
    assert stops.progress(mean, 0, 0, 0.6, best).text == "best node models' mean 0.400 of the target 0.80 (50%)"
    low = {**cfg, "target-score": "local-min"}
    assert stops.progress(low, 0, 0, 0.6, best).fraction == pytest.approx(0.25)
    for none in ({"local-mean": None}, {"local-mean": float("nan")}, None):  # no node scores stored: the accuracy
        assert stops.progress(mean, 0, 0, 0.6, none).text == "best accuracy 0.600 of the target 0.80 (75%)"
    for bad in ("x", 3, None, ["local-mean"]):
        assert stops.target_score({"target-score": bad}) == "average"


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_store(tmp_path: Path) -> None:
    at = _app(tmp_path / "nope.db")
    assert not at.exception and not at.error
    assert "No metrics store" in at.info[0].value


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.db").touch()
    at = _app(tmp_path / "empty.db")
    assert not at.exception and "empty" in at.info[0].value


def test_store_with_no_table_yet(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "fresh.db") as con:
        con.execute("PRAGMA user_version=1")
    at = _app(tmp_path / "fresh.db")
    assert not at.exception and "no tables" in at.info[0].value


def test_store_with_tables_but_no_run(tmp_path: Path) -> None:
    MetricsStore(tmp_path / "m.db").close()
    at = _app(tmp_path / "m.db")
    assert not at.exception and "has no run yet" in at.info[0].value


def test_foreign_sqlite_file(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "other.db") as con:
        con.execute("CREATE TABLE runs(id INTEGER, name TEXT)")
        con.execute("CREATE TABLE photos(id INTEGER)")
    at = _app(tmp_path / "other.db")
    assert not at.exception
    msg = _plain(at.error[0].value)
    assert "not a staleflower metrics store" in msg and "table updates" in msg and "runs.run_id" in msg


def test_not_an_sqlite_file(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"this is not an SQLite database\n" * 100)
    at = _app(tmp_path / "junk.db")
    assert not at.exception and "not an SQLite metrics store" in at.error[0].value


def test_a_directory(tmp_path: Path) -> None:
    at = _app(tmp_path)
    assert not at.exception and "directory" in at.error[0].value


def test_locked_store(store, tmp_path: Path) -> None:
    db = tmp_path / "locked.db"
    shutil.copy(store[0], db)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("PRAGMA locking_mode=EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    try:
        at = _app(db)
        assert not at.exception
        assert "locked" in at.error[0].value and "retried" in at.error[0].value
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    at.run()  # the next refresh reads it
    assert not at.exception and not at.error and _charts(at) == VIEW_CHARTS


def test_run_with_no_evaluation_and_no_task_yet(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    w = MetricsStore(db)
    w.start_run("fresh", "fedbuff", {"strategy": "fedbuff", "target-accuracy": 0.0})
    at = _app(db)
    assert not at.exception and not at.error
    text = _messages(at)
    assert "No evaluation yet" in text and "No task has completed yet" in text
    w.record_update(UpdateRow(0, 3, 0.0, 0.4, 0, 1, 0, 100, 300, 0.1, 0.3, "applied"))
    w.commit()
    at.run()
    assert not at.exception and not at.error
    assert "No evaluation yet" in _messages(at) and "No task has completed yet" not in _messages(at)
    assert _charts(at) == VIEW_CHARTS - 2  # everything but accuracy and loss
    w.close()


def test_default_store_is_the_runners_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STALEFLOWER_METRICS_DB", str(tmp_path / "env.db"))
    assert queries.default_db([]) == str((tmp_path / "env.db").resolve())
    assert queries.default_db(["--db"]) == str((tmp_path / "env.db").resolve())  # `make dashboard DB=`
    assert queries.default_db(["--db", "x.db"]) == queries.default_db(["--db=x.db"]) == "x.db"
    monkeypatch.delenv("STALEFLOWER_METRICS_DB")
    assert queries.default_db([]) == str(Path("~/.staleflower/metrics.db").expanduser().resolve())


# ------------------------------------------------------------------------------------------ runs that went quiet
def _age(db: Path, run_id: str, seconds: float) -> None:
    """Move a run's start (and heartbeat) ``seconds`` into the past: its process went quiet that long ago."""
    with sqlite3.connect(db) as con:
        con.execute("UPDATE runs SET started_at = started_at - ?, heartbeat_at = heartbeat_at - ? WHERE run_id=?",
                    (seconds, seconds, run_id))


def test_a_running_run_without_writes_is_not_live(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    w = MetricsStore(db)
    for run_id, clock in (("ghost", "virtual"), ("quiet", "virtual"), ("wall", "wall"), ("done", "virtual")):
        w.start_run(run_id, "fedbuff", {"strategy": "fedbuff", "clock": clock})
        w.heartbeat()
        w.record_update(UpdateRow(0, 3, 0.0, 0.4, 0, 1, 0, 100, 300, 0.1, 0.3, "applied"))
    w.finish_run("completed")  # "done"
    for run_id in ("ghost", "quiet", "wall", "done"):
        _age(db, run_id, 300)
    w.run_id = "quiet"
    w.heartbeat()  # alive, though it wrote no row for 5 min
    w.run_id = "wall"  # a wall-clock run's newest row is a sign of life: started 5 min ago, a task done just now
    w.record_update(UpdateRow(1, 3, 299.0, 299.5, 0, 1, 0, 100, 300, 0.1, 0.3, "applied"))
    w.close()
    with queries.snapshot(db) as (con, schema):
        runs = queries.list_runs(con, schema)
    shown = queries.with_activity(runs, time.time()).set_index("run_id")
    assert shown.at["ghost", "shown_status"] == "running · no writes for 5 min"
    assert shown.at["quiet", "shown_status"] == shown.at["wall", "shown_status"] == "running · live"
    assert shown.at["done", "shown_status"] == "completed" and shown.at["done", "activity"] == ""
    later = queries.with_activity(runs, time.time() + queries.STALE_AFTER_S + 1).set_index("run_id")
    assert later.at["quiet", "activity"].startswith("no writes for")  # one minute without a beat: stale too

    at = _app(db, runs=["ghost", "quiet"])
    assert not at.exception and not at.error
    assert "marked running but its process wrote nothing" in _messages(at) and "no writes for 5 min" in _messages(at)
    tiles = " ".join(str(m.value) for m in at.markdown)
    assert "running · no writes for 5 min" in tiles and "running · live" in tiles


# ------------------------------------------------------------------------------------------------ hostile input
EVIL = "![x](http://example.invalid/x.png) **bold**"
# What renders Markdown in the page: st.markdown, st.caption, alerts and headers (bodies); metrics and widgets
# (labels and help). Tables, JSON, option lists and chart legends draw plain text.
BODIES = ("markdown", "caption", "info", "warning", "error", "success", "title", "header", "subheader")
LABELLED = ("metric", "multiselect", "selectbox", "radio", "toggle", "number_input", "text_input", "expander")
MD = MarkdownIt("commonmark").enable(["table", "strikethrough"])


def _markdown_sources(at: AppTest) -> list[str]:
    out = [str(e.value) for kind in BODIES for e in at.get(kind)]
    for kind in LABELLED:
        for e in at.get(kind):
            out += [str(getattr(e, attr)) for attr in ("label", "help") if getattr(e, attr, None)]
    return out


def test_markdown_in_stored_strings_is_shown_as_text(tmp_path: Path) -> None:
    """A strategy name and an error with Markdown in them: shown literally, no image, link or bold made of them."""
    db = tmp_path / "m.db"
    w = MetricsStore(db)
    w.start_run("evil-run", EVIL, {"strategy": EVIL})
    w.record_update(UpdateRow(0, 3, 0.0, 0.4, 0, 1, 0, 100, 300, 0.1, 0.3, "applied"))
    w.finish_run("failed", f"client said {EVIL}")
    w.close()
    at = _app(db)
    assert not at.exception and _charts(at) == VIEW_CHARTS - 2  # no evaluation
    sources = _markdown_sources(at)
    for source in sources:
        rendered = MD.render(source)
        assert "<img" not in rendered and "<a " not in rendered and "<strong>bold" not in rendered, source
    # where the label is shown, it reads exactly as stored: the tile, the failure, "No evaluation yet", the
    # per-node header
    shown = [html.unescape(re.sub(r"<[^>]+>", "", MD.render(s))) for s in sources if "example" in s]
    assert len(shown) >= 4 and all(EVIL in text for text in shown), shown
    assert any(f"failed: client said {EVIL}" in text for text in shown)
    assert [o for o in at.multiselect(key="runs").options if o.startswith(EVIL)]  # plain text in the picker


def test_markdown_escape_round_trips() -> None:
    for text in (EVIL, "a_b*c `d` <e> [f](g) $h$ :red[i] # j | k ~l~ \\ m & n", "plain · text 0.25"):
        assert html.unescape(re.sub(r"<[^>]+>", "", MD.render(safe.md(text)))).strip() == text
        assert "<" not in re.sub(r"</?p>", "", MD.render(safe.md(text)))  # no markup at all


def test_only_stores_under_the_allowed_folder_are_opened(store, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A real store outside the folder (directly, through .., through a link) is refused; one inside is drawn."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    shutil.copy(store[0], allowed / "metrics.db")
    shutil.copy(store[0], outside / "metrics.db")
    (allowed / "link.db").symlink_to(outside / "metrics.db")
    (allowed / "sub").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv(safe.STORES_ENV, str(allowed))
    for path in (outside / "metrics.db", f"{allowed}/../outside/metrics.db", allowed / "link.db",
                 allowed / "sub" / "metrics.db", outside / "missing.db", "/etc/passwd", "~"):
        at = _app(path)
        assert not at.exception and _charts(at) == 0 and not at.multiselect and not at.info
        msg = _plain(at.error[0].value)
        assert msg.startswith(f"Refused: {path} is not under {allowed.resolve()}") and "--stores" in msg, msg
    at = _app(allowed / "metrics.db")
    assert not at.exception and not at.error and _charts(at) == VIEW_CHARTS
    at = _app(f"{allowed}/./metrics.db")
    assert not at.exception and not at.error


def test_the_allowed_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(safe.STORES_ENV)
    monkeypatch.setenv("STALEFLOWER_METRICS_DB", str(tmp_path / "runs" / "m.db"))
    assert safe.store_root([]) == (tmp_path / "runs").resolve()  # the runners' default store's folder
    assert safe.store_root(["--db", "results/metrics.db"]) == Path("results").resolve()  # make dashboard
    monkeypatch.setenv(safe.STORES_ENV, str(tmp_path / "env"))
    assert safe.store_root(["--db", "results/metrics.db"]) == (tmp_path / "env").resolve()
    assert safe.store_root(["--stores", str(tmp_path / "flag")]) == (tmp_path / "flag").resolve()
    assert safe.allowed_store(tmp_path / "env" / "a.db", safe.store_root()) == (tmp_path / "env" / "a.db").resolve()
    with pytest.raises(queries.StoreError) as refused:
        safe.allowed_store(tmp_path / "envy.db", tmp_path / "env")  # a sibling whose name starts the same
    assert refused.value.kind == "refused"
