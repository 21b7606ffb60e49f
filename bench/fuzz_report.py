"""Fuzz report: random malformed inputs per target, counted; crashes must be 0.

    python -m bench.fuzz_report [--n 2000] [--seed 0] [--quick]
                                [--json results/fuzz_report.json] [--markdown results/fuzz_report.md]

Targets, each tried ``--n`` times with mutations drawn by a seeded generator (``tests/hostile.py`` defines the
13 mutation classes; the class is drawn uniformly among those that apply to the target):

- ``decode <codec>`` for each of the 7 codecs: a valid reply whose delta is encoded with that codec (a 300 x 256
  matrix, two top-k blocks, and a 10-vector), one tensor broken by an array-level class, through the guard's
  pre-decoding check and ``server_app.wire.validate_reply`` (``read_reply`` without its backstop that turns an
  unforeseen exception into a rejection, so such an exception is counted here as a crash);
- ``reply records``: record-level breakage (no or a renamed delta record, missing, extra or renamed tensors, bad
  ``num-examples``, a ConfigRecord in place of the ArrayRecord) of replies of any codec, our form or Flower's
  (trained weights under ``arrays``);
- ``guard: size, version``: oversized replies (an extra record of junk) and replies echoing another task's
  ``model-version`` / ``task-seq``;
- ``engine (hostile run)``: a whole in-process FedBuff run (6 nodes, logreg on digits, ``update-filter =
  reject``) whose ClientApp corrupts every other task with each class in turn (``byte-flip`` included): tried is
  the corrupted tasks the run completed, crashes is 1 if the run did not complete.

"rejected" means ``RejectedUpdate`` with a non-empty reason; "accepted-valid" means the input decoded to finite
arrays of the model's shapes and dtypes (only ``byte-flip`` can produce one: flipping value bytes of a float
often leaves a valid float); "crashes" is any other exception. The report also runs the norm filter's example:
a ClientApp that multiplies one delta in five by 1e3, under ``update-filter`` none, reject and clip.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write_report
from server_app.intake import UpdateGuard
from server_app.testing import simulate
from server_app.wire import RejectedUpdate, message_sizes, validate_reply
from strategies.codecs import CODECS
from strategies.config import RunConfig
from tests.hostile import (
    APPLICABLE,
    ARRAY_KINDS,
    KINDS,
    NAMES,
    HostileClient,
    RngSource,
    ScalingClient,
    model,
    mutate,
    reply,
    valid_content,
)

COLUMNS = ("tried", "rejected", "accepted_valid", "crashes")


def classify(msg: Any, base: list[np.ndarray], guard: UpdateGuard) -> tuple[str, str]:
    """``(outcome, detail)`` of one input: rejected / accepted_valid / crashes."""
    try:
        guard.admit(msg, message_sizes(msg)[1], 7, 3)
        values, _, _, _ = validate_reply(msg, NAMES, base)
    except RejectedUpdate as exc:
        return ("rejected", str(exc)) if str(exc) else ("crashes", "RejectedUpdate without a reason")
    except Exception as exc:  # noqa: BLE001 - what we count
        return "crashes", "".join(traceback.format_exception_only(exc)).strip()
    ok = [v.shape for v in values] == [b.shape for b in base] and all(
        v.dtype == b.dtype and np.isfinite(v).all() for v, b in zip(values, base, strict=True))
    return ("accepted_valid", "") if ok else ("crashes", "accepted an invalid update")


def fuzz_target(name: str, n: int, rng: np.random.Generator, draw: Any) -> dict[str, Any]:
    """``n`` inputs from ``draw(rng) -> (kind, message)``; counts overall and per class, first crash details."""
    base, guard = model(), UpdateGuard(RunConfig(), model())
    totals: Counter[str] = Counter()
    by_class: dict[str, Counter[str]] = {}
    crashes: list[str] = []
    t0 = time.perf_counter()
    for _ in range(n):
        kind, msg = draw(rng)
        result, detail = classify(msg, base, guard)
        totals["tried"] += 1
        totals[result] += 1
        counts = by_class.setdefault(kind, Counter())
        counts["tried"] += 1
        counts[result] += 1
        if result == "crashes" and len(crashes) < 5:
            crashes.append(f"{kind}: {detail}")
    return {"target": name, **{c: totals[c] for c in COLUMNS}, "seconds": round(time.perf_counter() - t0, 2),
            "by_class": {k: {c: v[c] for c in COLUMNS} for k, v in sorted(by_class.items())}, "crash_examples": crashes}


def codec_draw(codec: str, contents: list) -> Any:
    """Array-level mutations of valid replies encoded with ``codec``."""
    kinds = [k for k in APPLICABLE[codec] if k in ARRAY_KINDS]

    def draw(rng: np.random.Generator) -> tuple[str, Any]:
        kind = kinds[int(rng.integers(len(kinds)))]
        content = contents[int(rng.integers(len(contents)))]
        return kind, reply(mutate(content, kind, RngSource(rng)))

    return draw


def reply_draw(kinds: tuple[str, ...], contents: list) -> Any:
    """Reply-level mutations of valid replies of any codec, our form or Flower's."""
    def draw(rng: np.random.Generator) -> tuple[str, Any]:
        kind = kinds[int(rng.integers(len(kinds)))]
        content = contents[int(rng.integers(len(contents)))]
        return kind, reply(mutate(content, kind, RngSource(rng)))

    return draw


def hostile_run(updates: int, db: Path) -> dict[str, Any]:
    """The engine target: a run whose ClientApp corrupts every other task, each class in turn."""
    hostile = HostileClient(every=2, offset=1, kinds=KINDS)
    t0 = time.perf_counter()
    try:
        run = simulate("fedbuff", nodes=6, max_updates=updates, local_steps=5, eval_every=max(updates // 10, 1),
                       update_filter="reject", clientapp=hostile.app, db=db)
    except Exception as exc:  # noqa: BLE001 - a crash of the run is what this target counts
        return {"target": "engine (hostile run)", "tried": 0, "rejected": 0, "accepted_valid": 0, "crashes": 1,
                "seconds": round(time.perf_counter() - t0, 2), "crash_examples": [f"{type(exc).__name__}: {exc}"]}
    rows = run.updates()
    corrupted = [r for r in rows if hostile.plan(r["seq"]) is not None]
    by_class: dict[str, Counter[str]] = {}
    for r in corrupted:
        counts = by_class.setdefault(hostile.plan(r["seq"])[0], Counter())  # type: ignore[index]
        counts["tried"] += 1
        counts["rejected" if r["status"] == "rejected" and r["reason"] else
               "accepted_valid" if r["status"] in ("applied", "buffered") else "crashes"] += 1
    totals = sum(by_class.values(), Counter())
    finite = all(np.isfinite(w).all() for w in run.summary.weights)
    return {"target": "engine (hostile run)", **{c: totals[c] for c in COLUMNS},
            "crashes": totals["crashes"] + (0 if finite and run.run_row()["status"] == "completed" else 1),
            "seconds": round(time.perf_counter() - t0, 2),
            "by_class": {k: {c: v[c] for c in COLUMNS} for k, v in sorted(by_class.items())},
            "run": {"updates_applied": run.summary.applied, "tasks": len(rows), "accuracy": run.summary.accuracy,
                    "weights_finite": finite, "status": run.run_row()["status"],
                    "honest_rejected": sum(1 for r in rows if hostile.plan(r["seq"]) is None
                                           and r["status"] == "rejected")},
            "crash_examples": []}


def norm_example(updates: int, folder: Path) -> list[dict[str, Any]]:
    """FedBuff, 6 nodes, logreg on digits; one delta in five (from task 20 on) multiplied by 1e3."""
    scaling = ScalingClient(factor=1e3)
    rows = []
    for mode in ("clean", "none", "reject", "clip"):
        app = None if mode == "clean" else scaling.app
        run = simulate("fedbuff", nodes=6, max_updates=updates, local_steps=5, eval_every=max(updates // 5, 1),
                       update_filter="none" if mode == "clean" else mode, clientapp=app, db=folder / f"{mode}.db")
        tasks = run.updates()
        scaled = [r for r in tasks if scaling.scaled(r["seq"]) and mode != "clean"]
        rows.append({
            "update_filter": "none (honest clients only)" if mode == "clean" else mode,
            "scaled_tasks": len(scaled),
            "scaled_rejected": sum(r["status"] == "rejected" for r in scaled),
            "scaled_clipped": sum(r["reason"].startswith("clipped from") for r in scaled),
            "scaled_applied_as_sent": sum(r["status"] == "applied" and not r["reason"] for r in scaled),
            "honest_rejected_or_clipped": sum(r["status"] == "rejected" or r["reason"].startswith("clipped")
                                              for r in tasks if not scaling.scaled(r["seq"])),
            "accuracy": round(run.summary.accuracy, 4), "loss": round(run.summary.loss, 4),
            "example_reason": next((r["reason"] for r in scaled if r["reason"]), ""),
        })
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The two tables."""
    lines = ["| target | tried | rejected | accepted-valid | crashes |", "|---|---:|---:|---:|---:|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['tried']:,} | {t['rejected']:,} | {t['accepted_valid']:,} | "
                     f"{t['crashes']} |")
    total = {c: sum(t[c] for t in report["targets"]) for c in COLUMNS}
    lines.append(f"| **all** | **{total['tried']:,}** | **{total['rejected']:,}** | **{total['accepted_valid']:,}** "
                 f"| **{total['crashes']}** |")
    if report.get("norm_filter"):
        lines += ["", "| update-filter | scaled tasks | rejected | clipped | applied as sent | honest rejected/clipped"
                  " | final accuracy |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in report["norm_filter"]:
            lines.append(f"| {r['update_filter']} | {r['scaled_tasks']} | {r['scaled_rejected']} | "
                         f"{r['scaled_clipped']} | {r['scaled_applied_as_sent']} | {r['honest_rejected_or_clipped']} "
                         f"| {r['accuracy']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every target; write the JSON and the markdown table; exit status 1 if anything crashed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="inputs per target (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="50 inputs per target, short runs (the smoke test)")
    parser.add_argument("--json", default="results/fuzz_report.json")
    parser.add_argument("--markdown", default="results/fuzz_report.md")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    n = 50 if args.quick else args.n
    rng = np.random.default_rng(args.seed)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    contents = {codec: [valid_content(codec, seed) for seed in range(4)] for codec in CODECS}
    everything = [c for cs in contents.values() for c in cs] + [valid_content("none", s, weights=True)
                                                                 for s in range(4)]
    targets = [fuzz_target(f"decode {codec}", n, rng, codec_draw(codec, contents[codec])) for codec in CODECS]
    targets.append(fuzz_target("reply records", n, rng, reply_draw(("record-level",), everything)))
    targets.append(fuzz_target("guard: size, version", n, rng, reply_draw(("oversized", "wrong-version"), everything)))
    with tempfile.TemporaryDirectory(prefix="fuzz-report-") as tmp:
        targets.append(hostile_run(n if not args.quick else 40, Path(tmp) / "hostile.db"))
        norm = norm_example(40 if args.quick else 100, Path(tmp))
    report = {
        "command": "python -m bench.fuzz_report " + " ".join(argv if argv is not None else sys.argv[1:]),
        "n_per_target": n, "seed": args.seed, "seconds": round(time.perf_counter() - t0, 1),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "loadavg_before": list(load_before),
                    "loadavg_after": list(os.getloadavg())},
        "targets": targets, "norm_filter": norm,
    }
    write_report(report, markdown(report), args.json, args.markdown)
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any(t["crashes"] for t in result["targets"]) else 0)
