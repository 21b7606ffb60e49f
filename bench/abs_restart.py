"""What restarts cost: ABS with ``restart = "finish"`` (what Flower does) against ``"interrupt"`` (restarts free).

    python -m bench.abs_restart [--seeds 0 1 2] [--out results/abs_restart]

The ABS preset (configs/abs.toml: 16 nodes on digits, 1 + Exp(1) per local step, two stragglers 5x slower, 4
local steps, K from 2 doubling every 0.2 s, bound 4, to 90% test accuracy) run twice per seed, once with each
``restart``. Reports the virtual time to 90%, applied updates, wasted compute (``compute_s`` of the restarted,
dropped, failed and rejected tasks, in seconds and as a share of all compute) and the bytes down and up.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics

from bench.common import prepare, run_with_curve
from server_app.compare_report import WASTED_STATUSES
from server_app.simulate import run_config_layers

MODES = ("interrupt", "finish")


def wasted(db: str, run_id: str) -> tuple[float, float, int]:
    """Wasted compute seconds, all compute seconds, and the number of restarted tasks of a run."""
    marks = ",".join("?" * len(WASTED_STATUSES))
    with sqlite3.connect(db) as con:
        waste, total, restarts = con.execute(
            f"SELECT SUM(CASE WHEN status IN ({marks}) THEN compute_s ELSE 0 END), SUM(compute_s), "
            "SUM(status = 'restarted') FROM updates WHERE run_id=?", (*WASTED_STATUSES, run_id)).fetchone()
    return waste or 0.0, total or 0.0, restarts or 0


def main(argv: list[str] | None = None) -> int:
    """Run both modes per seed; print and write a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="results/abs_restart")
    args = p.parse_args(argv)
    out, db = prepare(args.out)
    (preset,) = run_config_layers("configs/abs.toml")
    rows = []
    for seed in args.seeds:
        for mode in MODES:
            r = run_with_curve({**preset, "seed": seed, "restart": mode}, nodes=16, db=db)
            waste, total, restarts = wasted(str(db), r["run_id"])
            rows.append({"mode": mode, "seed": seed, "reached": r["stop"] == "target-accuracy", "time": r["time"],
                         "applied": r["applied"], "restarts": restarts, "wasted_s": waste,
                         "wasted_share": waste / total if total else 0.0, "mb_down": r["bytes_down"] / 1e6,
                         "mb_up": r["bytes_up"] / 1e6})
            print(rows[-1], flush=True)
    lines = ["| restart | reached 90% | virtual time to 90% (s) | applied updates | restarted tasks "
             "| wasted compute (s) | wasted share | MB down | MB up |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        rs = [r for r in rows if r["mode"] == mode]

        def cell(key: str, fmt: str, rs: list[dict] = rs) -> str:
            vals = [r[key] for r in rs]
            return f"{statistics.mean(vals):{fmt}} ({min(vals):{fmt}}-{max(vals):{fmt}})"

        lines.append(f"| {mode} | {sum(r['reached'] for r in rs)}/{len(rs)} | {cell('time', '.3f')} "
                     f"| {cell('applied', '.0f')} | {cell('restarts', '.0f')} | {cell('wasted_s', '.1f')} "
                     f"| {cell('wasted_share', '.1%')} | {cell('mb_down', '.1f')} | {cell('mb_up', '.1f')} |")
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(f"ABS, configs/abs.toml, 16 nodes, seeds {args.seeds}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
