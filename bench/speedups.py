"""Speed-ups with confidence intervals, read from the comparison harness's JSON reports and stores.

    python -m bench.speedups gossip [--out results/compare/gossip-speedups.md]   # AD-PSGD against its baselines
    python -m bench.speedups abs [--out results/compare/abs-summary.md]          # ABS against the fastest other

A comparison report (``python -m server_app.compare --json``) gives, per method and evaluation seed, the clock
time to each target. Here, per scenario and target:

- ``gossip``: AD-PSGD's mean time and each baseline's speed-up factor ``mean(baseline) / mean(AD-PSGD)``;
- ``abs``: ABS's mean time against the fastest other method's, their ratio, whether ABS is within 5% of the
  fastest (the goal), and the aggregation rounds (model versions when the target was first reached, from the
  comparison's store) and wasted compute of ABS, async-SGD, K-async and AdaSync.

The 95% interval of a ratio of means is a percentile bootstrap: each method's reached times are resampled with
replacement, independently (the evaluation runs are independent draws), 10,000 times with a fixed seed, so the
interval is a function of the reports. Means are over the runs that reached the target, as in the harness's
tables; a method that reached it in fewer runs than the others says so (``k/5``), and then its mean is over
its faster runs only.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write_report
from bench.comparisons import COMPARISONS

OUT = Path("results/compare")
# The comparisons summarised: every one bench/comparisons.py defines for the family, in its order.
GOSSIP = [n for n in COMPARISONS if n.startswith("gossip-")]
ABS = [n for n in COMPARISONS if n.startswith("abs-")]
RESAMPLES = 10_000


def times(report: dict[str, Any], method: str, target: str) -> list[float]:
    """The evaluation runs' times to ``target`` (those that reached it)."""
    return [r["time_to"][target] for r in report["methods"][method]["eval"] if r["time_to"].get(target) is not None]


def ratio_ci(num: Sequence[float], den: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """``mean(num) / mean(den)`` and its 95% percentile-bootstrap interval."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(num, float), np.asarray(den, float)
    boot = (rng.choice(a, (RESAMPLES, a.size)).mean(1) / rng.choice(b, (RESAMPLES, b.size)).mean(1))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(a.mean() / b.mean()), float(lo), float(hi)


def _fmt_time(ts: Sequence[float], runs: int) -> str:
    if not ts:
        return f"not reached (0/{runs})"
    mark = "" if len(ts) == runs else f" ({len(ts)}/{runs})"
    return f"{statistics.fmean(ts):.3g}{mark}"


def _fmt_ratio(num: Sequence[float], den: Sequence[float], runs: int) -> str:
    if not num or not den:
        return "-"
    r, lo, hi = ratio_ci(num, den)
    mark = "" if len(num) == runs else f" ({len(num)}/{runs})"
    return f"{r:.2f}x [{lo:.2f}, {hi:.2f}]{mark}"


def load(name: str) -> dict[str, Any] | None:
    """A comparison's JSON report, or None if it has not been run."""
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _reports(names: Sequence[str], lines: list[str]) -> Iterator[tuple[str, dict[str, Any], int]]:
    """(name, report, evaluation runs) of each comparison that has been run; a "not run" row for the others."""
    columns = lines[0].count("|") - 1
    for name in names:
        report = load(name)
        if report is None:
            lines.append("| " + " | ".join([name, "", "not run", *[""] * (columns - 3)]) + " |")
        else:
            yield name, report, len(report["eval_seeds"])


def gossip_table(names: Sequence[str]) -> str:
    """AD-PSGD's time and each baseline's speed-up factor, per scenario and target."""
    lines = ["| scenario | target | AD-PSGD (s) | D-PSGD | AllReduce-SGD | async-SGD |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, report, runs in _reports(names, lines):
        for target in (f"{t:g}" for t in report["targets"]):
            ad = times(report, "ad-psgd", target)
            cells = [_fmt_ratio(times(report, m, target), ad, runs) if ad else _fmt_time(times(report, m, target), runs)
                     for m in ("d-psgd", "allreduce-sgd", "async-sgd")]
            lines.append(f"| {name.removeprefix('gossip-')} | {target} | {_fmt_time(ad, runs)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def rounds(name: str, method: str, target: float) -> float | None:
    """Mean model version at the first evaluation reaching ``target``, over the evaluation runs that did."""
    db = OUT / f"{name}.db"
    if not db.is_file():
        return None
    with sqlite3.connect(f"file:{db.resolve()}?mode=ro", uri=True) as con:
        versions = [v for (v,) in con.execute(
            "SELECT (SELECT model_version FROM evals e WHERE e.run_id = c.run_id AND e.accuracy >= ? "
            "ORDER BY e.t, e.model_version LIMIT 1) FROM comparison_runs c WHERE c.role = 'eval' AND c.method = ?",
            (target, method)) if v is not None]
    return statistics.fmean(versions) if versions else None


def waste(report: dict[str, Any], method: str) -> float:
    """Mean wasted compute (seconds) of the method's evaluation runs."""
    return statistics.fmean(r["wasted_compute"] for r in report["methods"][method]["eval"])


def abs_table(names: Sequence[str]) -> str:
    """ABS against the fastest other method, per scenario and target; rounds and waste beside."""
    lines = ["| scenario | target | ABS (s) | fastest other (s) | ABS / fastest | within 5% | rounds: ABS, async-SGD, "
             "K-async | wasted compute (s): ABS, AdaSync |", "|---|---:|---:|---|---:|---|---|---|"]
    for name, report, runs in _reports(names, lines):
        for t in report["targets"]:
            target = f"{t:g}"
            mine = times(report, "abs", target)
            others = {m: times(report, m, target) for m in report["methods"] if m != "abs"}
            full = {m: ts for m, ts in others.items() if len(ts) == runs} or {m: ts for m, ts in others.items() if ts}
            best = min(full, key=lambda m: statistics.fmean(full[m])) if full else None
            if best is None or not mine:
                verdict = "no" if best and not mine else "-"
                ratio = "-"
            else:
                r, lo, hi = ratio_ci(mine, full[best])
                ratio = f"{r:.2f} [{lo:.2f}, {hi:.2f}]" + ("" if len(mine) == runs else f" ({len(mine)}/{runs})")
                verdict = "yes" if r <= 1.05 and len(mine) >= len(full[best]) else "no"
            versions = [rounds(name, m, t) for m in ("abs", "async-sgd", "k-async")]
            wasted = [waste(report, m) for m in ("abs", "adasync")]
            best_cell = f"{best} {_fmt_time(full[best], runs)}" if best else "none reached"
            lines.append(f"| {name.removeprefix('abs-')} | {target} | {_fmt_time(mine, runs)} | {best_cell} | "
                         f"{ratio} | {verdict} | {', '.join('-' if v is None else f'{v:.0f}' for v in versions)} | "
                         f"{', '.join(f'{w:.2f}' for w in wasted)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m bench.speedups", description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=("gossip", "abs"))
    p.add_argument("--out", help="write the Markdown table here")
    args = p.parse_args(argv)
    table = gossip_table(GOSSIP) if args.family == "gossip" else abs_table(ABS)
    write_report({}, table, None, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
