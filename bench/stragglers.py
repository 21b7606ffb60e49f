"""Reproduction for issue 2: FedBuff / FedAsync / FedAvg on digits, 10 clients, with and without stragglers.

    python -m bench.stragglers [--seeds 0 1 2] [--out results/stragglers] [--markdown RESULTS-section.md]

For every seed and strategy it runs the in-process runner (virtual clock) until 90% test accuracy (or the update
budget) on three fleets: ten Wi-Fi laptops; the same with 2 of the 10 nodes computing 10x slower; and a Wi-Fi /
4G / 3G mix with the same stragglers. It reports virtual time to the target, applied client updates and bytes on
the wire, and plots accuracy against virtual time.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench.common import prepare, pyplot, run_with_curve, write_outputs

STRATEGIES = ("fedavg", "fedasync", "fedbuff")
STRAGGLERS = {"straggler-fraction": 0.2, "straggler-slowdown": 10.0}
FLEETS = {
    "Wi-Fi laptops": {"profiles": "laptop/wifi=1"},
    "Wi-Fi laptops, 2 stragglers 10x": {"profiles": "laptop/wifi=1", **STRAGGLERS},
    "Wi-Fi/4G/3G mix, 2 stragglers 10x": {"profiles": "wifi=0.5,4g=0.3,3g=0.2", **STRAGGLERS},
}
BASE = {"dataset": "digits", "model": "mlp", "target-accuracy": 0.9, "max-updates": 3000, "eval-every": 10,
        "local-steps": 10, "lr": 0.05, "buffer-size": 5}


def run_one(strategy: str, fleet: dict, seed: int, db: Path) -> dict:
    """One run; returns its summary and its accuracy curve from the store."""
    r = run_with_curve({**BASE, **fleet, "strategy": strategy, "seed": seed}, nodes=10, db=db)
    return r | {"strategy": strategy, "seed": seed, "reached": r["stop"] == "target-accuracy"}


def table(rows: list[dict]) -> str:
    """Markdown: mean (min-max) over seeds per fleet and strategy."""
    out = ["| fleet (10 nodes, digits, MLP) | strategy | reached 90% | virtual time to 90% (s) | client updates "
           "| uplink MB | downlink MB |",
           "|---|---|---|---:|---:|---:|---:|"]
    for fleet in FLEETS:
        for strategy in STRATEGIES:
            rs = [r for r in rows if r["fleet"] == fleet and r["strategy"] == strategy]
            if not rs:
                continue

            def cell(key: str, scale: float = 1.0, fmt: str = ".1f", rs: list[dict] = rs) -> str:
                vals = [r[key] / scale for r in rs]
                return f"{statistics.mean(vals):{fmt}} ({min(vals):{fmt}}-{max(vals):{fmt}})"

            reached = sum(r["reached"] for r in rs)
            out.append(f"| {fleet} | {strategy} | {reached}/{len(rs)} | {cell('time')} | {cell('applied', fmt='.0f')}"
                       f" | {cell('bytes_up', 1e6)} | {cell('bytes_down', 1e6)} |")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against virtual time, one panel per fleet, first seed."""
    plt = pyplot()
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(FLEETS), figsize=(15, 4), sharey=True)
    seed = min(r["seed"] for r in rows)
    for ax, fleet in zip(axes, FLEETS, strict=True):
        for r in rows:
            if r["fleet"] == fleet and r["seed"] == seed:
                t, acc, _ = zip(*r["curve"], strict=True)
                ax.plot(t, acc, label=r["strategy"])
        ax.axhline(0.9, color="grey", lw=0.8, ls="--")
        ax.set(title=f"{fleet} (seed {seed})", xlabel="virtual time (s)", xscale="log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # after set_xscale, which resets it
        ax.legend()
    axes[0].set_ylabel("test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the grid of experiments and write JSON, markdown and a plot."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="results/stragglers", help="prefix of the .json/.md/.png outputs")
    args = p.parse_args(argv)
    out, db = prepare(args.out)
    rows = []
    for fleet, settings in FLEETS.items():
        for seed in args.seeds:
            for strategy in STRATEGIES:
                r = run_one(strategy, settings, seed, db) | {"fleet": fleet}
                print(f"{fleet:18} {strategy:9} seed {seed}: t={r['time']:.1f}s applied={r['applied']} "
                      f"acc={r['accuracy']:.3f}", flush=True)
                rows.append(r)
    md = table(rows)
    write_outputs(out, rows, md, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
