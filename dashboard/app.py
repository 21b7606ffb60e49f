"""The live dashboard: ``make dashboard``, or the command of dashboard/README.md.

``streamlit run dashboard/app.py --server.address 127.0.0.1 --browser.gatherUsageStats false [-- --db PATH]``

Layout only: the data comes from ``dashboard.queries`` (read-only SQL over the metrics store, one short read
transaction per refresh) and the charts from ``dashboard.charts``. Without ``--db`` it opens the store runs write
by default (``$STALEFLOWER_METRICS_DB``, else ``~/.staleflower/metrics.db``). While "Live" is on, the body is a
fragment that reruns every ``REFRESH_S`` seconds; a refresh costs nothing when the store has not changed (results
are cached by the store's and its WAL's size and modification time). A store that ``python -m server_app.compare``
wrote also gets, above the run picker, a view of one comparison's evaluation runs overlaid.

The page opens stores under one folder only, and every string it did not write (run labels, stored errors, the
typed path) goes through ``safe.md`` before a Markdown-rendering element: ``dashboard/safe.py`` says why.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # Streamlit puts the script's folder (dashboard/), not the repository, on the path
    sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import streamlit as st  # noqa: E402

from dashboard import charts, queries, safe, stops  # noqa: E402
from dashboard.queries import StoreError  # noqa: E402
from dashboard.safe import md  # noqa: E402

REFRESH_S = 2.0
log = logging.getLogger("staleflower.dashboard")


def store_token(path: str) -> tuple[tuple[int, int] | None, ...]:
    """Changes whenever a commit lands: size and mtime of the store and of its WAL."""
    p = Path(path).expanduser()
    out = []
    for f in (p, p.with_name(p.name + "-wal")):
        try:
            s = os.stat(f)
            out.append((s.st_mtime_ns, s.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


@st.cache_data(ttl=600, max_entries=16, show_spinner=False)
def cached_head(path: str, token: tuple) -> tuple[int, str | None]:
    """How many runs, and the newest one's id, re-read only when the store changed."""
    return queries.load_head(path)


@st.cache_data(ttl=600, max_entries=32, show_spinner=False)
def cached_runs(path: str, limit: int | None, search: str, include: tuple[str, ...], token: tuple) -> pd.DataFrame:
    """The picker's run list (``queries.list_runs``), re-read only when the store changed."""
    return queries.load_runs(path, limit, search, include)


@st.cache_data(ttl=600, max_entries=16, show_spinner=False)
def cached_comparison_runs(path: str, comparison_id: str, tuning: bool, token: tuple) -> list[str]:
    """One comparison's run ids, re-read only when the store changed."""
    return queries.load_comparison_run_ids(path, comparison_id, tuning)


@st.cache_data(ttl=600, max_entries=32, show_spinner=False)
def cached_page(path: str, selected: tuple[str, ...], focus: str | None, target: float, limit: int,
                node_order: str, token: tuple) -> queries.PageData:
    """Everything the page draws, re-read only when the store changed."""
    return queries.load_page(path, list(selected), focus, target, limit, node_order)


@st.cache_data(ttl=600, max_entries=16, show_spinner=False)
def cached_comparisons(path: str, token: tuple) -> pd.DataFrame:
    """The comparison list, re-read only when the store changed."""
    return queries.load_comparisons(path)


@st.cache_data(ttl=600, max_entries=32, show_spinner=False)
def cached_comparison(path: str, comparison_id: str, target: float, token: tuple) -> queries.ComparisonData:
    """One comparison's view, re-read only when the store changed."""
    return queries.load_comparison(path, comparison_id, target)


def show_store_error(exc: StoreError) -> None:
    """A store that cannot be read is a message in the page, never a stack trace."""
    if exc.kind in ("missing", "empty"):
        st.info(md(exc))
    else:
        st.error(md(exc))


def mb(x: float | None) -> str:
    """Bytes as MB."""
    return "–" if x is None or pd.isna(x) else f"{x / 1e6:,.2f} MB"


# ------------------------------------------------------------------------------------------------------ layout
def sidebar() -> tuple[bool, int]:
    """Store path, live switch, follow-newest switch, timeline size."""
    sb = st.sidebar
    sb.title("staleflower")
    sb.text_input("Metrics store (SQLite)", key="db",
                  help=f"the `metrics-db` of the runs, under {md(safe.store_root())} (`--stores` sets the folder); "
                       "`--db` sets the default")
    live = sb.toggle(f"Live: refresh every {REFRESH_S:g} s", value=True, key="live")
    sb.toggle("Follow the newest run", value=True, key="follow",
              help="a run that starts is added to the picker's selection")
    limit = sb.number_input("Timeline: latest tasks drawn", min_value=100, max_value=20000, value=1500, step=500,
                            key="timeline_limit")
    sb.caption("Reads the store only: read-only connection, one short transaction per refresh (WAL: the running "
               "ServerApp is never blocked). Times are seconds on each run's clock.")
    return live, int(limit)


PICK_MODES = {"pick": "picked", "last": "the last N", "comparison": "a comparison's"}
LAST_N_MAX = 50
URL_HELP = ("A link opens chosen runs: add `?run=ID&run=ID2` to the page's address. The address follows the "
            "selection, so it can be copied to share what is shown.")


def pick_runs(path: str, total: int, newest: str, with_comparisons: bool) -> tuple[list[str], pd.DataFrame]:
    """The run picker: the selected run ids in order, and the run list that holds them (labels, configs).

    Runs are picked by hand, as the newest N, or as the runs of the comparison chosen above. Whatever the store
    holds, the picker reads a few hundred runs at most (``queries.RUN_CHOICES``): a multiselect of 50,000 options
    costs seconds to send and to draw at every refresh.
    """
    modes = [m for m in PICK_MODES if m != "comparison" or with_comparisons]
    if st.session_state.get("pick_mode") not in modes:
        st.session_state["pick_mode"] = "pick"
    mode = st.radio("Runs", modes, horizontal=True, key="pick_mode", format_func=PICK_MODES.__getitem__,
                    help=URL_HELP)
    token = store_token(path)
    if mode == "last":
        n = int(st.number_input("Last N runs", 1, LAST_N_MAX, 5, key="last_n",
                                help="the newest N runs of the store, newest first; a run that starts joins them"))
        runs = cached_runs(path, n, "", (), token)
        return list(runs["run_id"]), runs
    if mode == "comparison":
        tuning = st.toggle("With its tuning runs", value=False, key="with_tuning",
                           help="every trial of the tuning, not only the evaluation runs of the chosen settings")
        cid = st.session_state.get("comparison")
        ids = cached_comparison_runs(path, str(cid), tuning, token) if cid else []
        return ids, cached_runs(path, 0, "", tuple(ids), token)
    return hand_picked(path, total, newest, token)


def hand_picked(path: str, total: int, newest: str, token: tuple) -> tuple[list[str], pd.DataFrame]:
    """Runs picked by hand among the newest few hundred (matching the filter), and the run list holding them.

    Keeps the selection valid when the store changes, and adds a new run when following.
    """
    search = st.text_input("Filter the list", key="run_filter", placeholder="strategy, codec, run id, config value",
                           help="lists the newest runs whose id, strategy or config contains this text").strip()
    first = "runs" not in st.session_state
    chosen = list(st.query_params.get_all("run")) if first else list(st.session_state.get("runs", []))
    previous = st.session_state.get("newest")
    if not first and st.session_state.get("follow", True) and previous and newest != previous:
        chosen = [newest] if chosen == [previous] else [newest, *chosen]
    runs = cached_runs(path, queries.RUN_CHOICES, search, tuple(dict.fromkeys([*chosen, newest])), token)
    known = set(runs["run_id"])
    chosen = list(dict.fromkeys(r for r in chosen if r in known)) or [newest]
    st.session_state["newest"] = newest
    st.session_state["runs"] = chosen
    shown = queries.with_activity(runs, time.time())["shown_status"]
    labels = dict(zip(runs["run_id"], runs["label"] + " (" + shown + ")", strict=True))
    st.caption(f"The list holds the newest {min(queries.RUN_CHOICES, total):,} of the store's {total:,} runs"
               + (" that match the filter" if search else "") + " and the selected ones; the filter finds others.")
    return st.multiselect("Runs (several are overlaid)", list(runs["run_id"]), format_func=labels.__getitem__,
                          key="runs", help=URL_HELP), runs


def body(limit: int) -> None:
    """Everything below the sidebar; a fragment that reruns on the live timer."""
    try:
        path = str(safe.allowed_store(str(st.session_state["db"]), safe.store_root()))
        total, newest = cached_head(path, store_token(path))
    except StoreError as exc:
        show_store_error(exc)
        return
    if not total or newest is None:
        st.info(f"The metrics store {md(path)} has no run yet. Start one and it appears here.")
        return
    with_comparisons = comparison_view(path)
    selected, runs = pick_runs(path, total, newest, with_comparisons)
    if not selected:
        st.info("Pick one or more runs above.")
        return
    st.query_params["run"] = selected
    labels = dict(zip(runs["run_id"], runs["label"], strict=True))
    c1, c2, c3 = st.columns([2, 2, 1])
    focus = c1.selectbox("Per-node views for", selected, format_func=labels.__getitem__, key="focus")
    x_axis = c2.radio("Accuracy and loss against", list(charts.X_AXES), horizontal=True, key="x_axis",
                      format_func={"clock": "run clock", "updates": "applied updates",
                                   "bytes": "cumulative bytes"}.__getitem__)
    cfg_target = pd.to_numeric(runs.set_index("run_id").loc[selected, "target_accuracy"], errors="coerce").max()
    target = c3.number_input("Target accuracy", 0.0, 1.0, float(cfg_target) if cfg_target > 0 else 0.8, 0.05,
                             key="target", format="%.2f")
    node_order = st.session_state.get("node_order", "slowest")
    try:
        page = cached_page(path, tuple(selected), focus, float(target), limit, node_order, store_token(path))
    except StoreError as exc:
        show_store_error(exc)
        return
    draw(page, x_axis, float(target))


def draw(page: queries.PageData, x_axis: str, target: float) -> None:
    """The views of the selected runs."""
    labels = page.labels()
    domain = list(labels.values())
    overview = queries.with_activity(page.overview(), time.time())  # now, not when the store was last read
    live = overview[overview["activity"] == "live"]
    tasks = int(page.summary["tasks"].sum()) if len(page.summary) else 0
    st.caption(f"refreshed {datetime.now():%H:%M:%S} · {len(live)} of {len(overview)} selected runs live · "
               f"{tasks:,} tasks stored · time bucket {page.width:g} s")
    for row in overview[(overview["status"] == "running") & (overview["activity"] != "live")].itertuples():
        st.warning(f"Run {md(row.label)} is marked running but its process wrote nothing (no row, no heartbeat) "
                   f"for over {queries.STALE_AFTER_S:g} s ({row.activity}): it was probably killed, or is hung.")
    for row in overview[overview["status"] == "failed"].itertuples():
        err = page.runs.set_index("run_id").at[row.run_id, "error"]
        st.error(f"Run {md(row.label)} failed: {md(err) if err else 'no reason stored'}")

    tiles(page, overview, target)
    overview_table(overview)

    st.subheader("Accuracy and loss")
    ev = page.labelled(page.evals)
    without = [labels[r] for r in page.selected if r not in set(page.evals["run_id"])]
    if without:
        st.info("No evaluation yet for " + ", ".join(map(md, without)) + ": accuracy and loss appear after the first "
                "one (the engine evaluates at the start and every `eval-every` applied updates).")
    if len(ev):
        a, b = st.columns(2)
        a.altair_chart(charts.accuracy(ev, domain, x_axis), width="stretch")
        if charts.has_node_scores(ev):
            a.caption(NODE_MODELS_HELP)
        b.altair_chart(charts.metric(ev, domain, "loss", "loss", x_axis), width="stretch")
        consensus = ev.dropna(subset=["consensus_distance"])
        if len(consensus):
            st.altair_chart(charts.metric(consensus, domain, "consensus_distance", "consensus distance", x_axis),
                            width="stretch")

    if page.summary.empty:
        st.info("No task has completed yet in the selected runs: staleness, bandwidth and the per-node views "
                "appear with the first one.")
        return
    st.subheader("Staleness")
    a, b = st.columns(2)
    hist = page.labelled(page.staleness)
    a.altair_chart(charts.staleness_histogram(hist[hist["status"] == "applied"], domain), width="stretch")
    b.altair_chart(charts.staleness_over_time(page.labelled(page.staleness_time), domain), width="stretch")

    st.subheader("Bandwidth")
    a, b = st.columns(2)
    bw = page.labelled(page.bandwidth)
    a.altair_chart(charts.bandwidth(bw, domain, cumulative=False), width="stretch")
    b.altair_chart(charts.bandwidth(bw, domain, cumulative=True), width="stretch")

    per_node(page, labels)
    configs(page, labels)


def comparison_view(path: str) -> bool:
    """One comparison's evaluation runs overlaid, and its table per method; whether the store has comparisons."""
    comps = cached_comparisons(path, store_token(path))
    if comps.empty:
        return False
    with st.expander("Comparison (`python -m server_app.compare`): its evaluation runs overlaid", expanded=True):
        labels = dict(zip(comps["comparison_id"], comps["label"], strict=True))
        a, b = st.columns([4, 1])
        cid = a.selectbox("Comparison", list(comps["comparison_id"]), format_func=labels.__getitem__,
                          key="comparison")
        targets = list(comps.set_index("comparison_id").at[cid, "targets"]) or [0.8]
        target = b.number_input("Target accuracy", 0.0, 1.0, float(targets[(len(targets) - 1) // 2]), 0.05,
                                key="comparison_target", format="%.2f")
        data = cached_comparison(path, cid, float(target), store_token(path))
        if data.evals.empty:
            st.info("No evaluation run of this comparison has evaluated yet: the harness evaluates each method's "
                    "chosen setting after its tuning trials.")
            return True
        methods = data.methods or list(dict.fromkeys(data.evals["method"]))
        st.caption(comparison_score_line(data.score, data.score_how))
        st.altair_chart(charts.comparison(data.evals, methods, float(target), score_title(data.score)),
                        width="stretch")
        cols = {"method": "method", "reached": "reached", "runs": "runs",
                "mean_time_to_target": f"mean time to {target:.2f} (s)", "final_accuracy": "final accuracy",
                "mb_up": "MB up", "mb_down": "MB down", "wasted_compute": "wasted compute (s)"}
        st.dataframe(data.summary[list(cols)].rename(columns=cols), hide_index=True, width="stretch",
                     column_config={c: st.column_config.NumberColumn(format="%.3f") for c in list(cols.values())[3:]})
        st.caption("One line per evaluation run (one per evaluation seed) of each method's chosen setting; the mean "
                   "time to the target is over the runs that reached it. Tuning runs are in the store too, tagged "
                   "`tune`. Every view below shows this comparison's runs when \"Runs\" is set to \"a comparison's\".")
    return True


def score_title(score: str) -> str:
    """The comparison chart's accuracy axis: ``accuracy`` and, where it is not the published model's, which."""
    name = queries.SCORE_NAMES.get(score)
    return f"accuracy ({name})" if name else "accuracy"


def comparison_score_line(score: str, how: str) -> str:
    """The one line that says which accuracy the comparison view reads, as the harness's report did."""
    if how == "unreadable":
        return ("Accuracy: the published model's. This comparison's recorded score (`--score`) cannot be read, so "
                "these may not be the numbers of its report.")
    if how == "before":
        return ("Accuracy: the published model's, as this comparison's report read it (it was stored before the "
                "harness recorded `--score`); for a decentralized strategy, the average of its node models.")
    if score == "average":
        return ("Accuracy: the published model's (`--score average`), as in the harness's report; for a "
                "decentralized strategy, the average of its node models, which no node holds.")
    return (f"Accuracy: the {queries.SCORE_NAMES[score]} (`--score {score}`), as in the harness's report; a run "
            "without node models' scores (a star strategy) is read on its published model.")


NODE_MODELS_HELP = ("A decentralized strategy's accuracy scores the average of its node models, which no node "
                    "holds (AllReduce-SGD aside, whose nodes all hold it); the node models' mean and worst node "
                    "score what the nodes do hold.")


def tiles(page: queries.PageData, overview: pd.DataFrame, target: float) -> None:
    """One row of tiles per run: time and bytes to the target accuracy, measured compression, latest accuracy.

    When a selected run stored its node models' scores, every row gets a tile for them (the rows stay aligned).
    """
    reached = page.targets.set_index("run_id") if len(page.targets) else pd.DataFrame()
    first = page.selected[0]
    base = reached.loc[first] if first in reached.index else None
    scored = charts.has_node_scores(overview)
    for row in overview.itertuples():
        box = st.container(border=True)
        widths = [3, 2, 2, 2, 2] + ([2] if scored else [])
        name, t_col, b_col, c_col, a_col, *n_col = box.columns(widths, vertical_alignment="center")
        config = page.configs.get(row.run_id, {}).get("config", {})
        name.markdown(f"**{md(row.label)}**  \n{md(row.shown_status)}")
        name.caption(stops.describe(config))
        hit = reached.loc[row.run_id] if row.run_id in reached.index else None
        dt = db = None
        if hit is not None and base is not None and row.run_id != first:
            dt = f"{hit.t - base.t:+.3f} s vs first"
            db = f"{(hit.bytes_total - base.bytes_total) / 1e6:+,.2f} MB vs first"
        t_col.metric(f"time to {target:.0%}", f"{hit.t:.3f} s" if hit is not None else "not yet", delta=dt,
                     delta_color="inverse", help="run clock at the first evaluation reaching the target")
        b_col.metric(f"bytes to {target:.0%}", mb(hit.bytes_total) if hit is not None else "not yet",
                     delta=db, delta_color="inverse", help="bytes up + down until that evaluation")
        ratio = getattr(row, "compression", None)
        c_col.metric("compression", "–" if ratio is None or pd.isna(ratio) else f"{ratio:.1f}x",
                     help="measured: bytes each task received over bytes it sent back, both as serialized "
                          "(the uplink compression when the downlink carries the dense model)")
        acc = getattr(row, "accuracy", None)
        a_col.metric("accuracy (latest)", "–" if acc is None or pd.isna(acc) else f"{acc:.3f}")
        if n_col:
            node_models_tile(n_col[0], row)
        if row.status == "running":
            progress_bar(box, config, row)


def _number(row: Any, name: str) -> float | None:
    """``row.name`` as a float, ``None`` when absent or NaN."""
    x = getattr(row, name, None)
    return None if x is None or pd.isna(x) else float(x)


def node_models_tile(col: Any, row: Any) -> None:
    """The node models' mean and worst accuracy at the run's latest evaluation, beside the average model's."""
    mean, worst, nodes = _number(row, "local_mean"), _number(row, "local_min"), _number(row, "local_nodes")
    if mean is None and worst is None:
        col.metric("node models (latest)", "–", help="No node models' scores at the run's latest evaluation: a "
                   "star strategy's nodes hold the published model, and federated evaluation scores none.")
        return
    of = f" of {nodes:.0f}" if nodes is not None else ""
    shown = " · ".join("–" if x is None else f"{x:.3f}" for x in (mean, worst))
    col.metric(f"node models: mean · worst{of}", shown, help=NODE_MODELS_HELP)


def progress_bar(box: Any, config: dict[str, Any], row: Any) -> None:
    """A running run's progress toward its nearest stop condition (nothing when none is set)."""
    best = {"local-mean": _number(row, "best_local_mean"), "local-min": _number(row, "best_local_min")}
    done = stops.progress(config, _number(row, "applied"), _number(row, "clock_s"), _number(row, "best_accuracy"),
                          best)
    if done is not None:
        box.progress(done.fraction, text=f"toward its stop: {done.text}")


def overview_table(overview: pd.DataFrame) -> None:
    """The selected runs side by side: outcomes, bytes, staleness."""
    cols = {"label": "run", "shown_status": "status", "clock_s": "clock (s)", "tasks": "tasks", "applied": "applied",
            "buffered": "buffered", "dropped": "dropped", "rejected": "rejected", "restarted": "restarted",
            "failed": "failed", "nodes": "nodes", "mb_up": "MB up", "mb_down": "MB down",
            "compression": "down/up", "mean_staleness": "mean staleness", "max_staleness": "max staleness",
            "accuracy": "accuracy", "local_mean": "node models, mean", "local_min": "node models, worst",
            "loss": "loss"}
    if not charts.has_node_scores(overview):  # a table of star runs stays as it was
        cols = {k: v for k, v in cols.items() if k not in ("local_mean", "local_min")}
    table = overview.assign(mb_up=overview.get("bytes_up", pd.Series(dtype=float)) / 1e6,
                            mb_down=overview.get("bytes_down", pd.Series(dtype=float)) / 1e6)
    table = table[[c for c in cols if c in table]].rename(columns=cols)
    fmt = {c: st.column_config.NumberColumn(format="%.3f") for c in ("clock (s)", "MB up", "MB down", "accuracy",
                                                                       "loss", "node models, mean",
                                                                       "node models, worst")}
    fmt.update({c: st.column_config.NumberColumn(format="%.2f") for c in ("down/up", "mean staleness")})
    st.dataframe(table, hide_index=True, width="stretch", column_config=fmt)


def per_node(page: queries.PageData, labels: dict[str, str]) -> None:
    """Bandwidth, timeline and outcomes per node of the focus run."""
    if page.focus is None or page.nodes.empty:
        return
    st.subheader(f"Per node: {md(labels[page.focus])}")
    if page.node_total > len(page.nodes):
        order = st.radio("Nodes drawn", list(queries.NODE_ORDERS), horizontal=True, key="node_order",
                         format_func={"slowest": "the slowest (longest mean task)",
                                      "busiest": "the busiest (most tasks)"}.__getitem__)
        st.caption(f"The {len(page.nodes):,} {order} of the run's {page.node_total:,} nodes (every view below): "
                   "a chart of every node of a large fleet is neither readable nor quick to draw.")
    a, b = st.columns(2)
    direction = a.radio("Bandwidth per node", ["up_bps", "down_bps"], horizontal=True, key="node_direction",
                        format_func={"up_bps": "up", "down_bps": "down"}.__getitem__)
    a.altair_chart(charts.node_bandwidth(page.node_bandwidth, direction), width="stretch")
    b.altair_chart(charts.node_bytes(page.nodes), width="stretch")
    total = int(page.nodes["tasks"].sum())
    shown = len(page.timeline)
    st.markdown("**Timeline** (dispatch to completion)" + (f": the latest {shown:,} of {total:,} tasks"
                                                            if shown < total else ""))
    st.altair_chart(charts.timeline(page.timeline), width="stretch")
    a, b = st.columns(2)
    a.markdown("**Tasks per node** (who straggles)")
    a.altair_chart(charts.updates_per_node(page.nodes), width="stretch")
    b.markdown("**Mean task time per node**")
    b.altair_chart(charts.task_time_per_node(page.nodes), width="stretch")


def configs(page: queries.PageData, labels: dict[str, str]) -> None:
    """The runs' configs side by side, and each strategy's state at its last evaluation."""
    st.subheader("Config")
    table = pd.DataFrame({labels[r]: pd.Series(c["config"], dtype=object) for r, c in page.configs.items()})
    table = table.astype(str)
    if len(table.columns) > 1 and st.toggle("Only keys that differ", value=False, key="cfg_diff"):
        table = table[table.nunique(axis=1) > 1]
    st.dataframe(table, width="stretch")
    states = {labels[r]: c["state"] for r, c in page.configs.items() if c["state"]}
    if states:
        with st.expander("Strategy state at the last evaluation"):
            st.json(states)


def main() -> None:
    """The page."""
    st.set_page_config(page_title="staleflower dashboard", layout="wide")
    st.session_state.setdefault("db", queries.default_db())
    live, limit = sidebar()
    run_every = REFRESH_S if live else None
    st.fragment(run_every=run_every)(guarded)(limit)


def guarded(limit: int) -> None:
    """``body``, with any unexpected failure shown as a message (the traceback goes to the server's log)."""
    try:
        body(limit)
    except StoreError as exc:
        show_store_error(exc)
    except Exception as exc:  # never a stack trace in the page
        log.exception("dashboard failed")
        st.error(f"The dashboard could not draw this store: {type(exc).__name__}: {md(exc)}")


main()
