"""AD-PSGD against AllReduce-SGD on the virtual clock: virtual seconds per epoch, 16 nodes, no slow node.

    python -m bench.gossip_timing --updates 720 --seeds 0 1 2      # about 1 minute on 2 cores

The setup of ``bench/adpsgd_straggler.py`` (digits, the MLP, laptops on ethernet, one SGD step of 32 examples per
task, lr 0.3) without a slow node and without evaluations. Per run it prints the virtual seconds per epoch (a pass
over the 1437 training examples), the mean compute and communication time of an applied task, and the share of
AD-PSGD's exchanges that waited for their passive peer's model lock (``server_app/peerlocks.py``).
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
from pathlib import Path

from server_app.simulate import merge_config, run_local

NODES = 16
EXAMPLES, BATCH = 1437, 32
BASE = {"dataset": "digits", "model": "mlp", "profiles": "laptop/ethernet=1", "local-steps": 1, "batch-size": BATCH,
        "lr": 0.3, "eval-every": 0, "compute-dist": "lognormal", "compute-jitter": 0.25, "checkpoint-every": 0}
METHODS = {"ad-psgd": {"topology": "bipartite-exponential"}, "allreduce-sgd": {}}


def main(argv: list[str] | None = None) -> None:
    """Run each method once per seed and print one line per run."""
    import torch

    torch.set_num_threads(1)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=720)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    for seed in args.seeds:
        for strategy, extra in METHODS.items():
            db = Path(tempfile.mkdtemp(prefix="gossip-timing-")) / "metrics.db"
            cfg = {**BASE, **extra, "strategy": strategy, "seed": seed, "max-updates": args.updates,
                   "metrics-db": str(db)}
            s = run_local(merge_config(overrides=cfg), nodes=NODES)
            with sqlite3.connect(db) as con:
                rows = con.execute("SELECT comm_s, compute_s, peer_id FROM updates WHERE run_id=? AND "
                                   "status='applied'", (s.run_id,)).fetchall()
            exchanges = [r[0] for r in rows if r[2] is not None]
            waited = sum(c > min(exchanges) * 1.001 for c in exchanges) / len(exchanges) if exchanges else 0.0
            print(f"seed {seed} {strategy:14s} s/epoch {s.time / (s.applied * BATCH / EXAMPLES):.4f}  "
                  f"compute {1e3 * sum(r[1] for r in rows) / len(rows):.2f} ms  "
                  f"comm {1e3 * sum(r[0] for r in rows) / len(rows):.2f} ms  waited for a lock {waited:.0%}",
                  flush=True)


if __name__ == "__main__":
    main()
