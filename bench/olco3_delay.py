"""Reproduction for issue 3: OLCO3 against its baselines as the communication delay D grows.

    python -m bench.olco3_delay [--dataset fashion-mnist|digits] [--nodes 8] [--periods 60] [--seeds 0 1]
                                [--delays 0 1 2 4] [--out results/olco3_delay]

Every method runs the same number of SGD steps per node on the `4g` network profile, so they do the same
computation; the table compares final test accuracy, uplink bytes (measured: the serialized messages) and virtual
time. Methods: local-sgd (blocking, uncompressed: the reference), cocod-sgd (D = 1, uncompressed),
overlap-local-sgd (pull toward a one-period-stale anchor, mixing 0.5, uncompressed), naive-overlap (restart from the
stale average, uncompressed), pipe-sgd (D-stale gradient averaging, top-k 1% with error feedback),
olco3-staleness-only (the ablation without compression compensation, top-k 1% with error feedback) and olco3 (both
compensations, top-k 1% with error feedback).

A period is `local-steps` (10) SGD steps, except for Pipe-SGD, which communicates every step: its period is one
step, so it runs 10 times as many periods (and sends 10 times as many messages) for the same computation, and its
D counts steps, not 10-step periods (D = 1 is the paper's pipeline of width 2).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.common import prepare, pyplot, run_with_curve, write_outputs

TOPK_EF = {"codec": "topk", "codec-ratio": 0.01, "error-feedback": True}
LOCAL_STEPS = 10  # SGD steps per period, for every method but Pipe-SGD (one step per period)
METHODS = {  # name -> (run-config, uses D); a "local-steps" here overrides LOCAL_STEPS (same steps in total)
    "local-sgd": ({"strategy": "local-sgd"}, False),
    "cocod-sgd": ({"strategy": "cocod-sgd"}, False),
    "overlap-local-sgd": ({"strategy": "overlap-local-sgd", "mixing": 0.5}, False),
    "naive-overlap": ({"strategy": "naive-overlap"}, True),
    "pipe-sgd + top-k 1% EF": ({"strategy": "pipe-sgd", "local-steps": 1, **TOPK_EF}, True),
    "olco3-staleness-only + top-k 1% EF": ({"strategy": "olco3-staleness-only", **TOPK_EF}, True),
    "olco3 + top-k 1% EF": ({"strategy": "olco3", **TOPK_EF}, True),
}


def budget(cfg: dict, periods: int, nodes: int) -> dict:
    """Local steps, stop condition and evaluation period of a row: ``periods`` periods of LOCAL_STEPS steps."""
    steps = int(cfg.get("local-steps", LOCAL_STEPS))
    scale = LOCAL_STEPS // steps  # periods of this method per LOCAL_STEPS-step period
    return {"local-steps": steps, "max-updates": periods * nodes * scale, "eval-every": 4 * nodes * scale}


def grid(delays: list[int]) -> list[tuple[str, int | None, dict]]:
    """(method, D or None, run-config) for every row of the experiment."""
    rows = []
    for name, (cfg, uses_d) in METHODS.items():
        for d in delays if uses_d else [None]:
            rows.append((name, d, cfg | ({"delay": d} if d is not None else {})))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: mean (min-max) over seeds, and ratios against local-sgd of the same seed."""
    ref = {r["seed"]: r for r in rows if r["method"] == "local-sgd"}
    out = ["| method | D | final accuracy | vs local-sgd (points) | uplink MB | uplink reduction | virtual time (s) "
           "| time vs local-sgd |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d, _ in grid(sorted({r["delay"] for r in rows if r["delay"] is not None})):
        rs = [r for r in rows if r["method"] == name and r["delay"] == d]
        if not rs:
            continue
        acc = [100 * r["accuracy"] for r in rs]
        gap = [100 * (r["accuracy"] - ref[r["seed"]]["accuracy"]) for r in rs]
        up = [r["bytes_up"] / 1e6 for r in rs]
        red = [ref[r["seed"]]["bytes_up"] / r["bytes_up"] for r in rs]
        tm = [r["time"] for r in rs]
        rel = [r["time"] / ref[r["seed"]]["time"] for r in rs]
        out.append(f"| {name} | {'-' if d is None else d} | {_cell(acc)} | {_cell(gap, '+.1f')} | {_cell(up, '.2f')} "
                   f"| {_cell(red, '.0f')}x | {_cell(tm)} | {_cell(rel, '.2f')}x |")
    return "\n".join(out)


def _cell(values: list[float], fmt: str = ".1f") -> str:
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ({min(values):{fmt}} to {max(values):{fmt}})"


def plot(rows: list[dict], path: Path) -> None:
    """Final accuracy against D per method (first seed), and accuracy against uplink bytes for the largest D."""
    plt = pyplot()

    seed = min(r["seed"] for r in rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    delays = sorted({r["delay"] for r in rows if r["delay"] is not None})
    for name, (_, uses_d) in METHODS.items():
        rs = sorted((r for r in rows if r["method"] == name and r["seed"] == seed), key=lambda r: r["delay"] or 0)
        if uses_d:
            left.plot([r["delay"] for r in rs], [r["accuracy"] for r in rs], marker="o", label=name)
        elif rs:
            left.axhline(rs[0]["accuracy"], ls="--", lw=1, label=name, color="grey" if name == "local-sgd" else "C7")
    left.set(xlabel="delay D (periods; Pipe-SGD: steps)", ylabel="final test accuracy",
             title=f"accuracy vs delay (seed {seed})", xticks=delays)
    left.legend(fontsize=8)
    big = max(delays)
    for r in rows:
        if r["seed"] == seed and r["delay"] in (big, None):
            _, acc, up = zip(*r["curve"], strict=True)
            right.plot([u / 1e6 for u in up], acc, label=f"{r['method']}" + (f" D={big}" if r["delay"] else ""))
    right.set(xscale="log", xlabel="cumulative uplink MB (log)", ylabel="test accuracy",
              title="accuracy vs bytes sent")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the grid; write JSON, markdown and a plot."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--periods", type=int, default=60)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--delays", type=int, nargs="+", default=[0, 1, 2, 4])
    p.add_argument("--out", default="results/olco3_delay")
    args = p.parse_args(argv)
    out, db = prepare(args.out)
    base = {"dataset": args.dataset, "model": "mlp", "profiles": "laptop/4g=1", "lr": 0.05, "batch-size": 32}
    rows = []
    for seed in args.seeds:
        for name, d, cfg in grid(args.delays):
            run = {**base, **cfg, **budget(cfg, args.periods, args.nodes), "seed": seed}
            r = run_with_curve(run, nodes=args.nodes, db=db)
            rows.append(r | {"method": name, "delay": d, "seed": seed})
            print(f"{name:24} D={d} seed {seed}: acc={r['accuracy']:.4f} up={r['bytes_up'] / 1e6:.2f}MB "
                  f"t={r['time']:.1f}s", flush=True)
    md = (f"{args.dataset}, {args.nodes} nodes, {args.periods} periods of {LOCAL_STEPS} SGD steps (Pipe-SGD: "
          f"{args.periods * LOCAL_STEPS} periods of one step)\n\n" + table(rows))
    write_outputs(out, rows, md, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
