"""Altair charts of the dashboard, built from the DataFrames of ``dashboard.queries`` (no data work here).

Only reshaping: a frame becomes the series one chart draws (``node_series``), vectorized.

Every chart colours runs by their label with one shared domain (a run keeps its colour across charts) and task
statuses with one fixed palette.
"""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import numpy as np
import pandas as pd

STATUS_COLORS = {
    "applied": "#2ca02c", "buffered": "#9ecae9", "dropped": "#9e9e9e",
    "rejected": "#ff7f0e", "restarted": "#9467bd", "failed": "#d62728",
}
MB = 1e6
RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
              "#7f7f7f"]  # tableau10: neighbours stay distinguishable
X_AXES = {  # evals column, axis title
    "clock": ("t", "run clock (s)"),
    "updates": ("updates_applied", "applied updates"),
    "bytes": ("mb_total", "cumulative bytes on the wire, up + down (MB)"),
}


def _rows_height(rows: int, per_row: int, legend: bool = False) -> int:
    """Height of a chart with one band per node: Streamlit fits axes and a bottom legend inside it too."""
    return min(max(200, 60 + (50 if legend else 0) + per_row * rows), 1400)


LEGEND_ROW = 18  # pixels per run in a legend


def _runs(domain: Sequence[str]) -> alt.Color:
    """Colour by run label: one entry per run in a one-column legend below the chart, labels never cut.

    A horizontal legend below a half-width chart showed the first two or three runs and clipped the rest.
    """
    colors = (RUN_COLORS * (len(domain) // len(RUN_COLORS) + 1))[:max(len(domain), 1)]
    legend = alt.Legend(orient="bottom", direction="vertical", columns=1, labelLimit=0,
                        symbolLimit=max(len(domain), 1), title="run")
    return alt.Color("run:N", scale=alt.Scale(domain=list(domain), range=colors), legend=legend)


def _height(domain: Sequence[str], base: int = 260) -> int:
    """A chart's height with room for its run legend (Streamlit fits the legend inside the height)."""
    return base + LEGEND_ROW * (len(domain) + 1)


def _status(field: str = "status") -> alt.Color:
    return alt.Color(f"{field}:N", scale=alt.Scale(domain=list(STATUS_COLORS), range=list(STATUS_COLORS.values())),
                     legend=alt.Legend(orient="right"), title="status")


def metric(evals: pd.DataFrame, domain: Sequence[str], y: str, title: str, x: str = "clock") -> alt.Chart:
    """Accuracy, loss (or any evals column ``y``) of every run against the clock, updates or bytes."""
    col, x_title = X_AXES[x]
    data = evals.assign(mb_total=evals["bytes_total"] / MB)
    return alt.Chart(data).mark_line(point=alt.OverlayMarkDef(size=18)).encode(
        x=alt.X(f"{col}:Q", title=x_title),
        y=alt.Y(f"{y}:Q", title=title, scale=alt.Scale(zero=False)),
        color=_runs(domain),
        tooltip=["run:N", alt.Tooltip("t:Q", format=".3f", title="clock (s)"),
                 alt.Tooltip("updates_applied:Q", title="applied updates"),
                 alt.Tooltip("mb_total:Q", format=".2f", title="MB"), alt.Tooltip(f"{y}:Q", format=".4f", title=title)],
    ).properties(height=_height(domain))


# The accuracy chart's series for a run with node models' scores, and their line styles: the average model solid
# (as every run's accuracy is drawn), what the nodes hold dashed. A run without them draws "published model".
AVERAGE, PUBLISHED = "average model", "published model"
NODE_MEAN, NODE_WORST = "node models, mean", "node models, worst"
SERIES_DASH = {AVERAGE: [1, 0], PUBLISHED: [1, 0], NODE_MEAN: [6, 3], NODE_WORST: [2, 2]}


def has_node_scores(evals: pd.DataFrame) -> bool:
    """Whether any row of ``evals`` (evaluations, or the overview's latest ones) holds node models' scores."""
    return any(col in evals and bool(evals[col].notna().any()) for col in ("local_mean", "local_min"))


def node_series(evals: pd.DataFrame) -> pd.DataFrame:
    """``evals`` as one row per (evaluation, series) with ``series`` and ``value``: the accuracy chart's lines.

    Every evaluation gives the run's accuracy, named "average model" in a run with node models' scores (what it
    scores is the average of the node models) and "published model" in one without (a star strategy's nodes hold
    it); an evaluation with scores adds "node models, mean" and "node models, worst of N" (N: the nodes scored).
    """
    scored = evals[["local_mean", "local_min"]].notna().any(axis=1).groupby(evals["run_id"]).transform("any")
    average = evals.assign(series=np.where(scored, AVERAGE, PUBLISHED), value=evals["accuracy"])
    mean = evals[evals["local_mean"].notna()]
    mean = mean.assign(series=NODE_MEAN, value=mean["local_mean"])
    worst = evals[evals["local_min"].notna()]
    of = pd.to_numeric(worst["local_of"], errors="coerce").astype("Int64").astype(str)
    worst = worst.assign(series=(NODE_WORST + " of " + of).where(worst["local_of"].notna(), NODE_WORST),
                         value=worst["local_min"])
    return pd.concat([average, mean, worst], ignore_index=True)


def _series_dash(series: pd.Series) -> alt.StrokeDash:
    """Line style by series, in the order of ``SERIES_DASH`` (every "worst of N" dotted), listed below the chart.

    One entry per row beside the run legend, as the run legend does: in one row they ran past a half-width chart.
    """
    def kind(name: str) -> str:
        return name.split(" of ")[0]  # "node models, worst of 6" is drawn as "node models, worst"

    domain = sorted(set(series), key=lambda name: (list(SERIES_DASH).index(kind(name)), name))
    return alt.StrokeDash("series:N", scale=alt.Scale(domain=domain, range=[SERIES_DASH[kind(n)] for n in domain]),
                          legend=alt.Legend(orient="bottom", direction="vertical", columns=1, title=None,
                                            labelLimit=0, symbolSize=500))


def accuracy(evals: pd.DataFrame, domain: Sequence[str], x: str = "clock") -> alt.Chart | alt.LayerChart:
    """Accuracy of every run; beside it, for a run whose nodes hold models of their own, those models' scores.

    A decentralized strategy's accuracy scores the average of the node models, which no node holds, so its run
    also draws the node models' mean (dashed) and its worst node (dotted), in the run's colour. Without any such
    run the chart is ``metric``'s, unchanged. The points are a layer of their own: drawn on the lines (as
    ``metric``'s overlay is), they made every entry of the line-style legend the same dot.
    """
    if not has_node_scores(evals):
        return metric(evals, domain, "accuracy", "accuracy", x)
    col, x_title = X_AXES[x]
    data = node_series(evals.assign(mb_total=evals["bytes_total"] / MB))
    data = data[["run", "t", "updates_applied", "mb_total", "series", "value"]]  # what is drawn: 3 rows per eval
    base = alt.Chart(data).encode(
        x=alt.X(f"{col}:Q", title=x_title),
        y=alt.Y("value:Q", title="accuracy", scale=alt.Scale(zero=False)),
        color=_runs(domain),
        tooltip=["run:N", alt.Tooltip("series:N", title="of"), alt.Tooltip("t:Q", format=".3f", title="clock (s)"),
                 alt.Tooltip("updates_applied:Q", title="applied updates"),
                 alt.Tooltip("mb_total:Q", format=".2f", title="MB"), alt.Tooltip("value:Q", format=".4f",
                                                                               title="accuracy")],
    )
    lines = base.mark_line().encode(strokeDash=_series_dash(data["series"]))
    points = base.mark_point(filled=True, size=18, opacity=1)
    rows = max(len(domain), data["series"].nunique())  # the taller of the two legends, side by side below
    return (lines + points).properties(height=260 + LEGEND_ROW * (rows + 1))


def staleness_histogram(hist: pd.DataFrame, domain: Sequence[str]) -> alt.Chart:
    """Applied updates per staleness on a numeric axis, the runs' bars side by side within each value.

    Quantitative, not ordinal: a staleness no update had is an empty stretch of the axis, not a missing category
    (an ordinal axis drew 0, 1, 2, 7 evenly spaced). Run i of k draws its bar over [s - 0.4 + 0.8 i/k, s - 0.4 +
    0.8 (i+1)/k].
    """
    rank = {run: i for i, run in enumerate(domain)}
    k = max(len(domain), 1)
    slot = hist["run"].map(rank).fillna(0)
    data = hist.assign(x0=hist["staleness"] - 0.4 + 0.8 * slot / k, x1=hist["staleness"] - 0.4 + 0.8 * (slot + 1) / k)
    return alt.Chart(data).mark_bar().encode(
        x=alt.X("x0:Q", title="staleness (versions published between dispatch and apply)",
                axis=alt.Axis(tickMinStep=1, format="d")),
        x2="x1:Q",
        y=alt.Y("tasks:Q", title="applied updates"),
        color=_runs(domain),
        tooltip=["run:N", alt.Tooltip("staleness:Q", title="staleness"),
                 alt.Tooltip("tasks:Q", title="applied updates")],
    ).properties(height=_height(domain))


def staleness_over_time(df: pd.DataFrame, domain: Sequence[str]) -> alt.Chart:
    """Mean (solid) and max (dashed) staleness of the updates applied in each time bucket."""
    data = df.assign(mean=df["mean_staleness"], max=df["max_staleness"])
    return alt.Chart(data).transform_fold(["mean", "max"], as_=["measure", "staleness"]).mark_line(
        interpolate="step-after").encode(
        x=alt.X("t:Q", title="run clock (s)"),
        y=alt.Y("staleness:Q", title="staleness"),
        color=_runs(domain),
        strokeDash=alt.StrokeDash("measure:N", sort=["mean", "max"], legend=alt.Legend(orient="bottom", title=None)),
        tooltip=["run:N", alt.Tooltip("t:Q", format=".3f", title="clock (s)"), alt.Tooltip("measure:N", title="of"),
                 alt.Tooltip("staleness:Q", format=".2f", title="staleness")],
    ).properties(height=_height(domain))


def bandwidth(df: pd.DataFrame, domain: Sequence[str], cumulative: bool) -> alt.Chart:
    """Total bytes per second (or cumulative MB) up (solid) and down (dashed) of every run."""
    up, down = ("up_cum", "down_cum") if cumulative else ("up_bps", "down_bps")
    data = df.assign(up=df[up] / MB, down=df[down] / MB)
    return alt.Chart(data).transform_fold(["up", "down"], as_=["direction", "mb"]).mark_line(
        interpolate="linear" if cumulative else "step-after").encode(
        x=alt.X("t_end:Q" if cumulative else "t:Q", title="run clock (s)"),
        y=alt.Y("mb:Q", title="cumulative MB" if cumulative else "MB/s"),
        color=_runs(domain),
        strokeDash=alt.StrokeDash("direction:N", sort=["up", "down"], legend=alt.Legend(orient="bottom", title=None)),
        tooltip=["run:N", alt.Tooltip("t:Q", format=".3f", title="clock (s)"), "direction:N",
                 alt.Tooltip("mb:Q", format=".3f", title="cumulative MB" if cumulative else "MB/s")],
    ).properties(height=_height(domain))


def node_bandwidth(df: pd.DataFrame, direction: str) -> alt.Chart:
    """Bytes per second of each node of one run, stacked (``direction``: ``up_bps`` or ``down_bps``)."""
    data = df.assign(mbps=df[direction] / MB)
    return alt.Chart(data).mark_area(interpolate="step-after").encode(
        x=alt.X("t:Q", title="run clock (s)"),
        y=alt.Y("mbps:Q", title="MB/s", stack="zero"),
        color=alt.Color("node:N", legend=alt.Legend(orient="right", title="node")),
        tooltip=["node:N", alt.Tooltip("t:Q", format=".3f"), alt.Tooltip("mbps:Q", format=".3f", title="MB/s")],
    ).properties(height=260)


def node_bytes(nodes: pd.DataFrame) -> alt.Chart:
    """Cumulative MB up and down per node of one run."""
    data = nodes.assign(up=nodes["bytes_up"] / MB, down=nodes["bytes_down"] / MB)
    order = list(nodes.sort_values("node_order")["node"])
    return alt.Chart(data).transform_fold(["up", "down"], as_=["direction", "mb"]).mark_bar().encode(
        y=alt.Y("node:N", sort=order, title=None),
        x=alt.X("mb:Q", title="MB"),
        yOffset=alt.YOffset("direction:N", sort=["up", "down"]),
        color=alt.Color("direction:N", sort=["up", "down"], legend=alt.Legend(orient="bottom", title=None)),
        tooltip=["node:N", "direction:N", alt.Tooltip("mb:Q", format=".3f"),
                 alt.Tooltip("compression:Q", format=".2f", title="down/up")],
    ).properties(height=_rows_height(len(order), 30, legend=True))


def timeline(df: pd.DataFrame) -> alt.Chart:
    """One bar per task of one run, from dispatch to completion, on its node's row, coloured by status."""
    order = list(df.drop_duplicates("node").sort_values("node_order")["node"])
    return alt.Chart(df).mark_bar(height={"band": 0.8}).encode(
        x=alt.X("dispatched_at:Q", title="run clock (s)"),
        x2="completed_at:Q",
        y=alt.Y("node:N", sort=order, title=None),
        color=_status(),
        tooltip=["node:N", alt.Tooltip("seq:Q", title="task"), "status:N", "staleness:Q",
                 alt.Tooltip("dispatched_at:Q", format=".3f", title="dispatched (s)"),
                 alt.Tooltip("completed_at:Q", format=".3f", title="completed (s)"), "reason:N"],
    ).properties(height=_rows_height(len(order), 26))


def updates_per_node(nodes: pd.DataFrame) -> alt.Chart:
    """Tasks per node of one run by outcome: who contributes and who straggles."""
    order = list(nodes.sort_values("node_order")["node"])
    return alt.Chart(nodes).transform_fold(list(STATUS_COLORS), as_=["status", "tasks_n"]).mark_bar().encode(
        y=alt.Y("node:N", sort=order, title=None),
        x=alt.X("tasks_n:Q", title="tasks"),
        color=_status(),
        tooltip=["node:N", "status:N", alt.Tooltip("tasks_n:Q", title="tasks"),
                 alt.Tooltip("mean_task_s:Q", format=".3f", title="mean task (s)"),
                 alt.Tooltip("mean_staleness:Q", format=".2f", title="mean staleness")],
    ).properties(height=_rows_height(len(order), 26))


def task_time_per_node(nodes: pd.DataFrame) -> alt.Chart:
    """Mean compute and communication seconds per task, per node of one run (stacked: the task's length)."""
    order = list(nodes.sort_values("node_order")["node"])
    data = nodes.assign(compute=nodes["mean_compute_s"], communication=nodes["mean_comm_s"])
    return alt.Chart(data).transform_fold(["compute", "communication"], as_=["part", "s"]).mark_bar().encode(
        y=alt.Y("node:N", sort=order, title=None),
        x=alt.X("s:Q", title="mean seconds per task", stack="zero"),
        color=alt.Color("part:N", sort=["compute", "communication"], legend=alt.Legend(orient="right", title=None)),
        tooltip=["node:N", "part:N", alt.Tooltip("s:Q", format=".3f")],
    ).properties(height=_rows_height(len(order), 26))


def comparison(evals: pd.DataFrame, methods: Sequence[str], target: float, title: str = "accuracy") -> alt.Chart:
    """A comparison's evaluation runs overlaid: accuracy against the run clock, coloured by method.

    One line per run (one per evaluation seed), the target as a dotted rule. The accuracy is ``score``, the one the
    comparison reads (``queries.comparison_evals``), titled ``title``.
    """
    colors = (RUN_COLORS * (len(methods) // len(RUN_COLORS) + 1))[:max(len(methods), 1)]
    lines = alt.Chart(evals).mark_line(interpolate="step-after", opacity=0.75).encode(
        x=alt.X("t:Q", title="run clock (s)"),
        y=alt.Y("score:Q", title=title, scale=alt.Scale(zero=False)),
        color=alt.Color("method:N", scale=alt.Scale(domain=list(methods), range=colors),
                        legend=alt.Legend(orient="bottom", labelLimit=0, symbolLimit=max(len(methods), 1))),
        detail="run_id:N",
        tooltip=["method:N", "seed:Q", alt.Tooltip("t:Q", format=".3f", title="clock (s)"), "updates_applied:Q",
                 alt.Tooltip("score:Q", format=".4f", title=title)],
    )
    rule = alt.Chart(pd.DataFrame({"target": [target]})).mark_rule(strokeDash=[2, 3], color="#7f7f7f").encode(
        y="target:Q")
    return (lines + rule).properties(height=320)
