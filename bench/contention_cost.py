"""What the contended network costs the engine: AD-PSGD's applied updates per second with it on and off, same run.

    python -m bench.contention_cost [--nodes 16] [--updates 1500] [--model logreg] [--repeats 3]
                                    [--json OUT.json] [--markdown OUT.md]

Both rows run our ServerApp and ClientApp in-process (``run_local``) on the virtual clock: AD-PSGD on the bipartite
exponential graph, laptops on ethernet, one SGD step per task, no evaluation. ``contention on`` is the current
model, every part of it at its default: an exchange holds both its nodes (``server_app/peerlocks.py``), its
communication is hidden behind the node's next compute (``overlap = true``, ``server_app/overlap.py``), star
transfers cross the server's link (10 Gbit/s; AD-PSGD's exchanges do not, but the look for the next result still
walks the link's queue). ``contention off`` is the model before them: ``overlap = false``, ``server-bandwidth = 0``,
and the model locks replaced by no-ops in this process (a what-if of this benchmark only: the run config has no
switch for them, a gossip exchange always holds its nodes). What is timed is the whole run, training included;
the ratio is the engine's added cost per update. One untimed warm-up per row, then ``--repeats`` runs of each in
alternating order; the median is reported, with the run's virtual duration.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import interleaved, onoff_main
from server_app.peerlocks import PeerLocks
from server_app.simulate import merge_config, run_local

ROWS = ("contention off", "contention on")


@contextlib.contextmanager
def no_locks() -> Iterator[None]:
    """Model locks that never make an exchange wait (the clock as it was before they existed)."""
    schedule, commit = PeerLocks.schedule, PeerLocks.commit
    PeerLocks.schedule = lambda self, flights: []  # type: ignore[method-assign,assignment,misc]
    PeerLocks.commit = lambda self, flights, at: None  # type: ignore[method-assign,assignment,misc]
    try:
        yield
    finally:
        PeerLocks.schedule, PeerLocks.commit = schedule, commit  # type: ignore[method-assign]


def run_once(row: str, nodes: int, updates: int, model: str) -> tuple[int, float, float]:
    """(applied updates, wall seconds, virtual seconds) of one run of ``row``."""
    on = row == "contention on"
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp:
        values = merge_config(overrides={
            "strategy": "ad-psgd", "topology": "bipartite-exponential", "model": model, "dataset": "digits",
            "profiles": "laptop/ethernet=1", "local-steps": 1, "batch-size": 32, "max-updates": updates,
            "eval-every": 0, "min-nodes": nodes, "clock": "virtual", "checkpoint-every": 0,
            "update-filter": "none", "overlap": on, "server-bandwidth": 10000.0 if on else 0.0,
            "metrics-db": str(Path(tmp) / "metrics.db")})
        with contextlib.redirect_stdout(io.StringIO()), (contextlib.nullcontext() if on else no_locks()):
            t0 = time.perf_counter()
            summary = run_local(values, nodes=nodes, workers=2)
            seconds = time.perf_counter() - t0
    if summary.applied < updates:
        raise RuntimeError(f"run stopped on {summary.stop_reason!r} after {summary.applied} updates")
    return summary.applied, seconds, summary.time


def benchmark(nodes: int, updates: int, model: str, repeats: int) -> dict[str, Any]:
    """Run every row ``repeats`` times (after a warm-up each) and return the JSON-able report."""
    results = interleaved(ROWS, lambda row, n: run_once(row, nodes, n, model), updates, min(updates, 4 * nodes),
                          repeats)
    return {"workload": {"nodes": nodes, "updates": updates, "strategy": "ad-psgd", "model": model,
                         "repeats": repeats, "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]},
            "results": results,
            "on_over_off": round(results[1]["updates_per_s"] / results[0]["updates_per_s"], 3)}


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table."""
    w = report["workload"]
    lines = [f"AD-PSGD, {w['nodes']} laptops on ethernet, {w['model']}, {w['updates']} updates per run, real "
             f"clients in-process, median of {w['repeats']} interleaved runs:", "",
             "| network model | updates/s | virtual duration (s) |", "|---|---:|---:|"]
    lines += [f"| {r['row']} | {r['updates_per_s']} | {r['virtual_s']} |" for r in report["results"]]
    lines += ["", f"contention on / off: {report['on_over_off']}x updates/s"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--nodes", type=int, default=16)
        p.add_argument("--updates", type=int, default=1500)
        p.add_argument("--model", default="logreg")

    return onoff_main("python -m bench.contention_cost", __doc__, argv, add,
                      lambda a: benchmark(a.nodes, a.updates, a.model, a.repeats), markdown)


if __name__ == "__main__":
    sys.exit(main())
