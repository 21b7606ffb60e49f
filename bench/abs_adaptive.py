"""ABS's closed loop (``abs-mode = "adaptive"``) against its open-loop clock schedule (``"clock"``), one preset.

    python -m bench.abs_adaptive [--seeds 0 1 2 3 4] [--local-steps U] [--out results/abs_adaptive]

The ABS preset (configs/abs.toml: 16 nodes on digits, 1 + Exp(1) per local step, two stragglers 5x slower, 4
local steps or ``--local-steps``, k = 2, restarts free) run once per seed in each mode, to 95% test accuracy (at
most 6000 updates).
``clock`` is the preset as it stands (K doubling every 0.2 s, bound 4); ``adaptive`` changes only ``abs-mode``,
with the closed loop's default knobs (no tuning on either side). Reports the virtual time to 90% and to 95% (the
first evaluation at or above it), applied updates, restarted tasks, wasted compute (``compute_s`` of restarted,
dropped, failed and rejected tasks, and its share of all compute), the mean K and tau the strategy logged at its
evaluations and the nodes it treated as persistent stragglers at the end.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics

from bench.abs_restart import wasted
from bench.common import prepare, run_with_curve
from server_app.simulate import run_config_layers

MODES = ("clock", "adaptive")


def first_at(curve: list, target: float) -> float | None:
    """Virtual time of the first evaluation at or above ``target`` (None: never)."""
    return next((t for t, acc, _ in curve if acc is not None and acc >= target), None)


def logged(db: str, run_id: str) -> list[dict[str, float]]:
    """The strategy's state summaries at the run's evaluations."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT metrics_json FROM evals WHERE run_id=? ORDER BY t, rowid", (run_id,)).fetchall()
    return [json.loads(r[0] or "{}") for r in rows]


def main(argv: list[str] | None = None) -> int:
    """Run both modes per seed; print and write a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--local-steps", type=int, default=None, help="U (default: the preset's, 4)")
    p.add_argument("--out", default="results/abs_adaptive")
    args = p.parse_args(argv)
    out, db = prepare(args.out)
    (preset,) = run_config_layers("configs/abs.toml")
    if args.local_steps is not None:
        preset["local-steps"] = args.local_steps
    rows = []
    for seed in args.seeds:
        for mode in MODES:
            r = run_with_curve({**preset, "seed": seed, "abs-mode": mode, "target-accuracy": 0.95}, nodes=16, db=db)
            waste, total, restarts = wasted(str(db), r["run_id"])
            summaries = logged(str(db), r["run_id"])
            rows.append({"mode": mode, "seed": seed, "t90": first_at(r["curve"], 0.90),
                         "t95": first_at(r["curve"], 0.95), "applied": r["applied"], "restarts": restarts,
                         "wasted_s": waste, "wasted_share": waste / total if total else 0.0,
                         "k": statistics.fmean(s.get("k", 0.0) for s in summaries) if summaries else 0.0,
                         "tau": statistics.fmean(s.get("tau", 0.0) for s in summaries) if summaries else 0.0,
                         "stragglers": summaries[-1].get("stragglers", 0.0) if summaries else 0.0})
            print(rows[-1], flush=True)
    lines = ["| abs-mode | reached 90% | time to 90% (s) | reached 95% | time to 95% (s) | applied updates "
             "| restarted tasks | wasted share | mean K | mean tau | stragglers at the end |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode in MODES:
        rs = [r for r in rows if r["mode"] == mode]

        def cell(key: str, fmt: str, rs: list[dict] = rs) -> str:
            vals = [r[key] for r in rs if r[key] is not None]
            if not vals:
                return "-"
            return f"{statistics.mean(vals):{fmt}} ({min(vals):{fmt}}-{max(vals):{fmt}})"

        lines.append(f"| {mode} | {sum(r['t90'] is not None for r in rs)}/{len(rs)} | {cell('t90', '.3f')} "
                     f"| {sum(r['t95'] is not None for r in rs)}/{len(rs)} | {cell('t95', '.3f')} "
                     f"| {cell('applied', '.0f')} | {cell('restarts', '.0f')} | {cell('wasted_share', '.1%')} "
                     f"| {cell('k', '.1f')} | {cell('tau', '.1f')} | {cell('stragglers', '.0f')} |")
    table = "\n".join(lines)
    head = f"ABS, configs/abs.toml, local-steps {preset['local-steps']}, 16 nodes, seeds {args.seeds}"
    out.with_suffix(".md").write_text(f"{head}\n\n{table}\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
