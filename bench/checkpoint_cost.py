"""What checkpoints cost: the same run with checkpoint-every = 0 (off), 100, 10 and 1, in one process.

    python -m bench.checkpoint_cost [--updates 600] [--repeats 3] [--settings 0,100,10,1]
                                    [--out results/checkpoint_cost.md]

FedBuff on digits (MLP), 16 nodes, virtual clock. Reports the wall time of each setting relative to the run
without checkpoints (median of the repeats, settings interleaved so machine load hits all alike), the size of
one checkpoint, and the checkpoints written. ``--settings 0,100`` times only the default against no checkpoints
(0, the baseline, is always run): more repeats in the same time on a busy machine.
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from server_app.simulate import merge_config, run_local
from server_app.store import MetricsStore

SETTINGS = (0, 100, 10, 1)


SAVING = [0.0]  # seconds spent in MetricsStore.save_checkpoint since the last reset (see timed_saves)


def timed_saves() -> Callable[[], None]:
    """Time every ``MetricsStore.save_checkpoint`` (pickle, seal, SQLite write) into ``SAVING``; returns the undo.

    The checkpoints' own cost, which, unlike the difference of two runs' wall times, a busy machine's noise does
    not swamp.
    """
    save = MetricsStore.save_checkpoint

    def timed(store: MetricsStore, applied: int, seal: Callable[[str], bytes]) -> None:
        t0 = time.perf_counter()
        try:
            save(store, applied, seal)
        finally:
            SAVING[0] += time.perf_counter() - t0

    MetricsStore.save_checkpoint = timed  # type: ignore[method-assign]

    def undo() -> None:
        MetricsStore.save_checkpoint = save  # type: ignore[method-assign]

    return undo


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
    ap.add_argument("--settings", default=",".join(map(str, SETTINGS)), help="checkpoint-every values, 0 = off")
    ap.add_argument("--out", default="results/checkpoint_cost.md")
    args = ap.parse_args(argv)
    settings = (0, *sorted({int(e) for e in args.settings.split(",") if int(e)}, reverse=True))
    times: dict[int, list[float]] = {e: [] for e in settings}
    saving: dict[int, list[float]] = {e: [] for e in settings}  # of which in save_checkpoint
    size = 0
    undo = timed_saves()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            one(0, 20, Path(tmp) / "warm-up.db")  # imports, data loading and caches, outside the timings
            for r in range(args.repeats):
                for every in settings:
                    SAVING[0] = 0.0
                    seconds, nbytes = one(every, args.updates, Path(tmp) / f"{every}-{r}.db")
                    times[every].append(seconds)
                    saving[every].append(SAVING[0])
                    size = max(size, nbytes)
    finally:
        undo()
    base = statistics.median(times[0])
    lines = [f"FedBuff, digits MLP, 16 nodes, {args.updates} applied updates, median of {args.repeats}. Command: "
             f"`python -m bench.checkpoint_cost --updates {args.updates} --repeats {args.repeats}"
             f"{'' if settings == SETTINGS else ' --settings ' + ','.join(map(str, settings))}`\n",
             f"One checkpoint: {size / 1e3:.0f} kB.\n",
             "| checkpoint-every | checkpoints | wall time (s) | relative to no checkpoints | paired ratio, median "
             "(range) | time in checkpoints |", "|---:|---:|---:|---:|---:|---:|"]
    for every in settings:
        med = statistics.median(times[every])
        count = args.updates // every + 1 if every else 0
        # Each repeat's run against the baseline run right before it: less exposed to slow drifts of the load.
        pairs = [t / b for t, b in zip(times[every], times[0], strict=True)]
        share = statistics.median(c / t for c, t in zip(saving[every], times[every], strict=True))
        lines.append(f"| {every or 'off'} | {count} | {med:.2f} | {med / base:.3f}x | {statistics.median(pairs):.3f}x "
                     f"({min(pairs):.3f}-{max(pairs):.3f}) | "
                     f"{100 * share:.2f}% |")
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
