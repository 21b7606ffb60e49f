"""What the reproduction scripts share: one in-process run and its accuracy curve from the metrics store."""

from __future__ import annotations

import argparse
import gc
import json
import sqlite3
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from server_app.simulate import merge_config, run_local


def run_with_curve(settings: dict, *, nodes: int, db: Path) -> dict:
    """Run ``settings`` (run-config keys) in-process; return the summary's numbers and the (t, accuracy) curve."""
    s = run_local(merge_config(overrides={**settings, "metrics-db": str(db)}), nodes=nodes)
    with sqlite3.connect(db) as con:
        curve = con.execute("SELECT t, accuracy, bytes_up_total FROM evals WHERE run_id=? ORDER BY t, rowid",
                            (s.run_id,)).fetchall()
    return {"run_id": s.run_id, "stop": s.stop_reason, "time": s.time, "applied": s.applied,
            "bytes_up": s.bytes_up, "bytes_down": s.bytes_down, "accuracy": s.accuracy, "loss": s.loss,
            "curve": curve}


def prepare(out: str) -> tuple[Path, Path]:
    """One intra-op thread (the runner's clients run on threads), the output folder, a fresh store beside it."""
    import torch

    torch.set_num_threads(1)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = path.with_suffix(".db")
    db.unlink(missing_ok=True)
    return path, db


def write_outputs(out: Path, rows: list[dict], markdown: str, plot: Callable[[list[dict], Path], None]) -> None:
    """``OUT.json`` (every row, curves included), ``OUT.md`` (the table) and ``OUT.png``; print the table."""
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(markdown + "\n")
    plot(rows, out.with_suffix(".png"))
    print(markdown)


def write_report(report: dict, table: str, json_path: str | None, markdown_path: str | None) -> None:
    """``report`` as JSON and ``table`` as Markdown, each where a path is given (folders made); print the table."""
    for path, text in ((json_path, json.dumps(report, indent=1)), (markdown_path, table + "\n")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
    print(table)


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the headless Agg backend, imported late: only the scripts writing PNGs need it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# One run of an on/off benchmark: (applied updates, wall seconds, virtual seconds).
RunOnce = Callable[[str, int], tuple[int, float, float]]


def interleaved(rows: Sequence[str], run_once: RunOnce, updates: int, warmup: int, repeats: int) -> list[dict]:
    """Each row once untimed (``warmup`` updates), then ``repeats`` times in alternating order; medians per row.

    Alternating the order spreads a busy machine's slow moments over both rows, so their ratio is fair even when
    single runs vary by tens of percent.
    """
    samples: dict[str, list[tuple[int, float, float]]] = {row: [] for row in rows}
    for row in rows:
        run_once(row, warmup)
    names = list(rows)
    for rep in range(repeats):
        for row in names[rep % 2:] + names[:rep % 2]:
            gc.collect()
            samples[row].append(run_once(row, updates))
            applied, seconds, virtual = samples[row][-1]
            print(f"run {rep + 1}/{repeats} {row}: {applied} updates in {seconds:.2f} s (virtual {virtual:.3f} s)",
                  file=sys.stderr)
    return [{"row": row, "updates_per_s": round(statistics.median(a / s for a, s, _ in samples[row]), 1),
             "virtual_s": round(statistics.median(v for *_, v in samples[row]), 4),
             "runs": [{"applied": a, "seconds": round(s, 3)} for a, s, _ in samples[row]]} for row in names]


def onoff_main(prog: str, doc: str | None, argv: list[str] | None, add: Callable[[argparse.ArgumentParser], None],
               bench: Callable[[argparse.Namespace], dict[str, Any]],
               table: Callable[[dict[str, Any]], str]) -> int:
    """An on/off benchmark's command line: its own options (``add``), then ``--repeats``, ``--json``, ``--markdown``.

    Runs with one intra-op thread (the in-process runner's clients run on threads), as ``server_app.simulate`` does.
    """
    p = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0])
    add(p)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    report = bench(args)
    write_report(report, table(report), args.json, args.markdown)
    return 0
