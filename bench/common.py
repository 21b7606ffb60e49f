"""What the reproduction scripts share: one in-process run and its accuracy curve from the metrics store."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

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
