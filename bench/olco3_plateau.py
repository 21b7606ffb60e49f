"""Final accuracy at an equal update budget, with no accuracy stop: does OLCO3 keep the accuracy of local SGD.

    python -m bench.olco3_plateau [--seeds 10 11 12 13 14] [--out results/olco3_plateau.md]

The tuned comparisons (``bench/comparisons.py``) stop every run at 93%, so they measure speed, not the accuracy a
method ends at. This runs the OLCO3 comparison's scenario (digits MLP, 8 laptops on 4G, 10 local steps, D = 2) to
its whole update budget (800 updates IID, 1,600 Dirichlet(0.3): the same SGD steps for every method) for local SGD,
OLCO3 and OLCO3 two-way at the learning rate their tuning chose (0.1347 for all three), on the evaluation seeds.
It reports the final accuracy (mean and Student-t 95% interval) and how much each run gained over its last 20% of
updates, the plateau check.
"""

from __future__ import annotations

import argparse
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.comparisons import COMPARISONS
from bench.comparisons import TOPK as TOPK_SETTINGS
from server_app.compare_report import mean_ci

ROOT = Path(__file__).resolve().parent.parent
TOPK = TOPK_SETTINGS.split(";")  # the compression the comparisons fix for OLCO3
METHODS = {"local-sgd": ["strategy='local-sgd'"], "olco3": ["strategy='olco3'", *TOPK],
           "olco3-two-way": ["strategy='olco3'", *TOPK, "codec-downlink='topk'"]}
PARTITIONS = ("iid", "dirichlet")
LR = 0.1346941509642705  # what each method's tuning chose in results/compare/olco3-{iid,dirichlet}.json


def final_and_gain(db: Path) -> tuple[float, float]:
    """The last evaluation's accuracy, and what it gained over the evaluation at 80% of the updates."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT updates_applied, accuracy FROM evals ORDER BY t, rowid").fetchall()
    last = rows[-1]
    at80 = [r for r in rows if r[0] <= 0.8 * last[0]][-1]
    return float(last[1]), float(last[1] - at80[1])


def scenario(partition: str) -> list[str]:
    """The ``--set`` values of the tuned comparison ``olco3-<partition>``, without its accuracy and time stops."""
    argv = COMPARISONS[f"olco3-{partition}"]
    sets = [argv[i + 1] for i, word in enumerate(argv) if word == "--set"]
    return [*sets, "target-accuracy=0", "max-time=10000"]  # later --set values win


def run(method: str, partition: str, seed: int, db: Path) -> tuple[float, float]:
    """One run of the scenario to its update budget."""
    settings = [*METHODS[method], *scenario(partition), f"lr={LR}", f"seed={seed}", f"metrics-db='{db}'",
                "checkpoint-every=0"]
    args = [sys.executable, "-m", "server_app.simulate", "--quiet", "--nodes", "8", "--workers", "1"]
    for s in settings:
        args += ["--set", s]
    subprocess.run(args, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return final_and_gain(db)


def main(argv: list[str] | None = None) -> int:
    """Run every method, partition and seed; print and write the Markdown table."""
    p = argparse.ArgumentParser(prog="python -m bench.olco3_plateau", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12, 13, 14])
    p.add_argument("--out", default="results/olco3_plateau.md")
    args = p.parse_args(argv)
    lines = ["| partition | method | final accuracy, mean ± 95% CI | gain over the last 20% (points), mean / max |",
             "|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="olco3-plateau-") as tmp:
        for partition in PARTITIONS:
            for method in METHODS:
                out = [run(method, partition, s, Path(tmp) / f"{partition}-{method}-{s}.db") for s in args.seeds]
                mean, ci = mean_ci([f for f, _ in out])
                gains = [100 * g for _, g in out]
                lines.append(f"| {partition} | `{method}` | {mean:.4f} ± {ci or 0:.4f} | "
                             f"{sum(gains) / len(gains):.2f} / {max(gains):.2f} |")
                print(lines[-1], flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
