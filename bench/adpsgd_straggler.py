"""Reproduction for issue 5: AD-PSGD against D-PSGD, AllReduce-SGD and async-SGD with one slow worker.

    python -m bench.adpsgd_straggler [--seeds 0 1] [--slowdowns 1 2 10 100] [--out results/adpsgd_straggler]

16 nodes on digits (MLP), one local SGD step of 32 examples per task (the paper's iteration: one gradient),
laptops on ethernet so that computation dominates, and one node slowed down 1x, 2x, 10x or 100x. Every method
processes the same number of gradients (``--epochs`` passes over the training set) and the store's evaluations
give loss and accuracy against epochs and against virtual time. AD-PSGD gossips on the bipartite exponential
graph, D-PSGD on the same graph; node-to-node traffic is timed on both nodes' links (``server_app/links.py``).
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
from pathlib import Path

from bench.common import prepare, pyplot, run_with_curve, write_outputs

METHODS = {
    "ad-psgd": {"strategy": "ad-psgd", "topology": "bipartite-exponential"},
    "d-psgd": {"strategy": "d-psgd", "topology": "ring"},  # Lian et al. 2017's graph
    "allreduce-sgd": {"strategy": "allreduce-sgd"},
    "async-sgd": {"strategy": "async-sgd", "lr": 0.05},  # 0.3 diverges with 15 stale workers
}
NODES = 16
TARGET = 0.9
BASE = {"dataset": "digits", "model": "mlp", "profiles": "laptop/ethernet=1", "local-steps": 1, "batch-size": 32,
        "lr": 0.3, "straggler-fraction": 1 / NODES, "eval-every": 32, "compute-dist": "lognormal",
        "compute-jitter": 0.25}


def train_size(seed: int) -> int:
    """Examples in the training split (epochs are counted in passes over it)."""
    from client_app.data import load_dataset

    return len(load_dataset("digits", seed=seed, test_fraction=0.2).y_train)


def curve(db: Path, run_id: str) -> list[tuple[float, int, float, float]]:
    """(t, updates applied, loss, accuracy) at every evaluation."""
    with sqlite3.connect(db) as con:
        return con.execute("SELECT t, updates_applied, loss, accuracy FROM evals WHERE run_id=? ORDER BY t, rowid",
                           (run_id,)).fetchall()


def first_reaching(points: list[tuple[float, int, float, float]], target: float) -> tuple[float, int] | None:
    """Virtual time and updates of the first evaluation at or above the target accuracy."""
    return next(((t, n) for t, n, _, acc in points if acc >= target), None)


def one_run(method: str, slowdown: float, seed: int, epochs: float, db: Path) -> dict:
    """One method, one slowdown, one seed, a fixed number of gradients."""
    per_epoch = train_size(seed) / BASE["batch-size"]
    updates = int(round(epochs * per_epoch / NODES)) * NODES  # whole synchronous rounds
    settings = {**BASE, **METHODS[method], "seed": seed, "straggler-slowdown": float(slowdown),
                "max-updates": updates}
    r = run_with_curve(settings, nodes=NODES, db=db)
    points = curve(db, r["run_id"])
    hit = first_reaching(points, TARGET)
    return {"method": method, "slowdown": slowdown, "seed": seed, "updates": updates, "per_epoch": per_epoch,
            "time": r["time"], "accuracy": r["accuracy"], "loss": r["loss"], "mb": (r["bytes_up"]) / 1e6,
            "time_to_target": hit[0] if hit else None, "epochs_to_target": hit[1] / per_epoch if hit else None,
            "curve": [[t, n / per_epoch, loss, acc] for t, n, loss, acc in points]}


def mean_or_none(values: list[float | None]) -> float | None:
    """Mean over seeds, or None if any seed missed."""
    return None if any(v is None for v in values) else statistics.mean(values)  # type: ignore[arg-type]


def table(rows: list[dict], slowdowns: list[float]) -> str:
    """Markdown: per slowdown and method, time and epochs to the target, final accuracy, speed-up."""
    out = ["| slow node | method | virtual time to 90% (s) | epochs to 90% | accuracy at the end | final loss "
           "| time per epoch (s) | AD-PSGD speed-up to 90% |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for s in slowdowns:
        ref = mean_or_none([r["time_to_target"] for r in rows if r["slowdown"] == s and r["method"] == "ad-psgd"])
        for m in METHODS:
            rs = [r for r in rows if r["slowdown"] == s and r["method"] == m]
            if not rs:
                continue
            tt = mean_or_none([r["time_to_target"] for r in rs])
            ep = mean_or_none([r["epochs_to_target"] for r in rs])
            per_epoch = statistics.mean(r["time"] / (r["updates"] / r["per_epoch"]) for r in rs)
            speed = f"{tt / ref:.1f}x" if tt and ref and m != "ad-psgd" else "-"
            acc, loss = (statistics.mean(r[k] for r in rs) for k in ("accuracy", "loss"))
            out.append(f"| {s:g}x | {m} | {_fmt(tt, '.1f')} | {_fmt(ep, '.1f')} | {acc:.3f} | {loss:.3f} "
                       f"| {per_epoch:.2f} | {speed} |")
    return "\n".join(out)


def _fmt(v: float | None, spec: str) -> str:
    return "not reached" if v is None else f"{v:{spec}}"


def plot(rows: list[dict], path: Path) -> None:
    """Loss against epochs (top) and against virtual time (bottom), one column per slowdown, first seed."""
    plt = pyplot()

    slowdowns = sorted({r["slowdown"] for r in rows})
    seed = min(r["seed"] for r in rows)
    fig, axes = plt.subplots(2, len(slowdowns), figsize=(4.5 * len(slowdowns), 7), squeeze=False)
    for col, s in enumerate(slowdowns):
        for m in METHODS:
            r = next((x for x in rows if x["method"] == m and x["slowdown"] == s and x["seed"] == seed), None)
            if r is None:
                continue
            t, ep, loss = zip(*[(p[0], p[1], p[2]) for p in r["curve"]], strict=True)
            axes[0][col].plot(ep, loss, label=m)
            axes[1][col].plot(t, loss, label=m)
        axes[0][col].set(title=f"one node {s:g}x slower", xlabel="epochs", ylabel="test loss")
        axes[1][col].set(xlabel="virtual time (s)", ylabel="test loss", xscale="log")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep and write OUT.json, OUT.md and OUT.png."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--slowdowns", type=float, nargs="+", default=[1, 2, 10, 100])
    ap.add_argument("--epochs", type=float, default=15.0)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--out", default="results/adpsgd_straggler")
    args = ap.parse_args(argv)
    out, db = prepare(args.out)
    rows = []
    for s in args.slowdowns:
        for m in args.methods:
            for seed in args.seeds:
                rows.append(one_run(m, s, seed, args.epochs, db))
                r = rows[-1]
                print(f"{m} slow={s:g}x seed={seed}: t={r['time']:.1f}s acc={r['accuracy']:.3f} "
                      f"to90={r['time_to_target']}", flush=True)
    parts = [f"--seeds {' '.join(map(str, args.seeds))}", f"--slowdowns {' '.join(f'{s:g}' for s in args.slowdowns)}",
             f"--epochs {args.epochs:g}"]
    if args.methods != list(METHODS):
        parts.append("--methods " + " ".join(args.methods))
    cmd = "python -m bench.adpsgd_straggler " + " ".join(parts)
    md = (f"{NODES} nodes, digits, MLP, one SGD step of 32 examples per task, laptops on ethernet, "
          f"{args.epochs:g} epochs, mean over seeds {args.seeds}. Command: `{cmd}`\n\n" + table(rows, args.slowdowns))
    write_outputs(out, rows, md, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
