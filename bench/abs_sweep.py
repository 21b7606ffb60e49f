"""The sweep behind ABS's defaults: initial K, how fast K doubles, and the initial staleness bound.

    python -m bench.abs_sweep [--seed 0] [--out results/abs_sweep.md]

Same fleet as bench/abs_stragglers.py (16 nodes, 1 + Exp(1) per local step, two stragglers 5x slower); for
U in {1, 4}, k in {2, 4}, k-double-every in {0.1, 0.2, 0.5, 0 (fixed)} and staleness-bound in {2, 4}, the virtual
time to 90% test accuracy, the applied updates and the share of computation wasted on restarts.
"""

from __future__ import annotations

import argparse
import itertools

from bench.abs_stragglers import BASE, staleness_and_waste
from bench.common import prepare, run_with_curve


def main(argv: list[str] | None = None) -> int:
    """Run the grid and write a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/abs_sweep.md")
    args = p.parse_args(argv)
    out, db = prepare(args.out)
    lines = ["| U | k | k-double-every (s) | staleness-bound | time to 90% (s) | applied updates | wasted compute |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for steps, k, every, bound in itertools.product((1, 4), (2, 4), (0.1, 0.2, 0.5, 0.0), (2, 4)):
        r = run_with_curve({**BASE, "strategy": "abs", "abs-mode": "clock", "k": k, "k-double-every": every,
                            "staleness-bound": bound, "local-steps": steps, "seed": args.seed}, nodes=16, db=db)
        _, _, share = staleness_and_waste(db, r["run_id"])
        reached = "" if r["stop"] == "target-accuracy" else " (not reached)"
        lines.append(f"| {steps} | {k} | {every} | {bound} | {r['time']:.3f}{reached} | {r['applied']} | {share:.1%} |")
        print(lines[-1], flush=True)
    out.write_text(f"ABS sweep, seed {args.seed}\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
