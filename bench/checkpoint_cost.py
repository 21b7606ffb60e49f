"""What checkpoints cost: the same run with checkpoint-every = 0 (off), 100, 10 and 1, in one process.

    python -m bench.checkpoint_cost [--updates 600] [--repeats 3] [--out results/checkpoint_cost.md]

FedBuff on digits (MLP), 16 nodes, virtual clock. Reports the wall time of each setting relative to the run
without checkpoints (median of the repeats, settings interleaved so machine load hits all alike), the size of
one checkpoint, and the checkpoints written.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from server_app.simulate import merge_config, run_local

SETTINGS = (0, 100, 10, 1)


def one(every: int, updates: int, db: Path) -> tuple[float, int]:
    """Wall seconds of one run, and the size in bytes of its final checkpoint (0 without)."""
    values = merge_config(overrides={"strategy": "fedbuff", "model": "mlp", "max-updates": updates, "eval-every": 0,
                                     "checkpoint-every": every, "metrics-db": str(db)})
    t0 = time.perf_counter()
    summary = run_local(values, nodes=16)
    seconds = time.perf_counter() - t0
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT LENGTH(state) FROM checkpoints WHERE run_id=?", (summary.run_id,)).fetchone()
    return seconds, row[0] if row else 0


def main(argv: list[str] | None = None) -> int:
    """Run every setting ``--repeats`` times, interleaved; print and write the table."""
    import torch

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results/checkpoint_cost.md")
    args = ap.parse_args(argv)
    times: dict[int, list[float]] = {e: [] for e in SETTINGS}
    size = 0
    with tempfile.TemporaryDirectory() as tmp:
        one(0, 20, Path(tmp) / "warm-up.db")  # imports, data loading and caches, outside the timings
        for r in range(args.repeats):
            for every in SETTINGS:
                seconds, nbytes = one(every, args.updates, Path(tmp) / f"{every}-{r}.db")
                times[every].append(seconds)
                size = max(size, nbytes)
    base = statistics.median(times[0])
    lines = [f"FedBuff, digits MLP, 16 nodes, {args.updates} applied updates, median of {args.repeats}. Command: "
             f"`python -m bench.checkpoint_cost --updates {args.updates} --repeats {args.repeats}`\n",
             f"One checkpoint: {size / 1e3:.0f} kB.\n",
             "| checkpoint-every | checkpoints | wall time (s) | relative to no checkpoints |", "|---:|---:|---:|---:|"]
    for every in SETTINGS:
        med = statistics.median(times[every])
        count = args.updates // every + 1 if every else 0
        lines.append(f"| {every or 'off'} | {count} | {med:.2f} | {med / base:.2f}x |")
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
