"""What the server's link costs the engine: applied updates per second with it on and off, the same run otherwise.

    python -m bench.server_link_cost [--nodes 200] [--updates 2000] [--strategy fedbuff] [--model logreg]
                                     [--repeats 3] [--json OUT.json] [--markdown OUT.md]

Both rows run our ServerApp in-process (``run_local``) on the virtual clock over ``bench.engine_overhead``'s no-op
ClientApp (it returns the received arrays), every node busy at once, so what is timed is the engine: dispatching,
ordering (with the link, each look for the next result sorts the uploads in flight by ready time and walks the
queue), applying, one SQLite row per update. ``link off`` is ``server-bandwidth = 0``; ``link on`` the default,
10 Gbit/s. One untimed warm-up per row, then ``--repeats`` runs of each in alternating order; the median is
reported, with the run's virtual duration (which the link lengthens: the figure it exists for).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import interleaved, onoff_main
from bench.engine_overhead import app
from server_app.simulate import merge_config, run_local

ROWS = {"link off": 0.0, "link on": 10000.0}  # server-bandwidth, Mbit/s


def run_once(nodes: int, updates: int, strategy: str, model: str, bandwidth: float) -> tuple[int, float, float]:
    """(applied updates, wall seconds, virtual seconds) of one run."""
    with tempfile.TemporaryDirectory(prefix="bench-link-") as tmp:
        values = merge_config(overrides={
            "strategy": strategy, "model": model, "max-updates": updates, "eval-every": 0, "min-nodes": nodes,
            "clock": "virtual", "checkpoint-every": 0, "server-bandwidth": bandwidth,
            "metrics-db": str(Path(tmp) / "metrics.db")})
        with contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            summary = run_local(values, nodes=nodes, clientapp=app, workers=2)
            seconds = time.perf_counter() - t0
    if summary.applied < updates:
        raise RuntimeError(f"run stopped on {summary.stop_reason!r} after {summary.applied} updates")
    return summary.applied, seconds, summary.time


def benchmark(nodes: int, updates: int, strategy: str, model: str, repeats: int) -> dict[str, Any]:
    """Run every row ``repeats`` times (after a warm-up each) and return the JSON-able report."""
    results = interleaved(list(ROWS), lambda row, n: run_once(nodes, n, strategy, model, ROWS[row]), updates,
                          min(updates, nodes), repeats)
    for r in results:
        r["server_bandwidth_mbps"] = ROWS[r["row"]]
    ratio = round(results[1]["updates_per_s"] / results[0]["updates_per_s"], 3)
    return {"workload": {"nodes": nodes, "updates": updates, "strategy": strategy, "model": model,
                         "repeats": repeats, "client": "no-op (bench.engine_overhead)", "cpus": os.cpu_count(),
                         "load_before": os.getloadavg()[0]},
            "results": results, "on_over_off": ratio}


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table."""
    w = report["workload"]
    lines = [f"{w['strategy']}, {w['nodes']} nodes all busy, {w['model']}, {w['updates']} updates per run, no-op "
             f"clients, median of {w['repeats']} interleaved runs:", "",
             "| server link | updates/s | virtual duration (s) |", "|---|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['row']} (`server-bandwidth = {r['server_bandwidth_mbps']}`) | {r['updates_per_s']} | "
                     f"{r['virtual_s']} |")
    lines.append("")
    lines.append(f"link on / link off: {report['on_over_off']}x updates/s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--nodes", type=int, default=200)
        p.add_argument("--updates", type=int, default=2000)
        p.add_argument("--strategy", default="fedbuff")
        p.add_argument("--model", default="logreg")

    return onoff_main("python -m bench.server_link_cost", __doc__, argv, add,
                      lambda a: benchmark(a.nodes, a.updates, a.strategy, a.model, a.repeats), markdown)


if __name__ == "__main__":
    sys.exit(main())
