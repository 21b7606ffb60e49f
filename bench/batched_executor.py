"""Batched local training (``local-executor = "batched"``): updates/s of vmapped fleets against node-by-node SGD.

    python bench/batched_executor.py --json results/batched_executor.json --markdown results/batched_executor.md
        [--nodes 100 1000 10000] [--models logreg mlp] [--lanes 64] [--per-node-cap 1000] [--repeats 2]
        [--e2e-nodes 100] [--e2e-updates 400] [--e2e-steps 10 50] [--quick]

Local training alone. Each node holds ``--samples`` (64) images drawn (seeded) from scikit-learn's digits, the
runner's default dataset (1x8x8, 10 classes), and trains the runner's defaults: 10 steps of batch 32, lr 0.05,
no momentum, from its own start weights. ``per-node`` is ``LocalSGD.run`` on one model in a loop over the nodes
(what one client thread does per task, minus decoding); ``batched`` is ``client_app.batched.train_many`` on all
of them (chunks of at most ``--lanes`` nodes, unpadded on CPU). ``updates_per_s`` is nodes trained per second.
Per-node runs over the first ``--per-node-cap`` nodes only (its rate does not depend on the fleet's size; the cap
keeps 10,000 nodes short).
The two run back to back ``--repeats`` times, in alternating order; medians are reported and the speed-up is the
median of the ratios within a repeat, so both saw about the same load.

End to end. ``run_local`` (the in-process runner, the real ServerApp and ClientApp) with ``--e2e-nodes`` nodes and
as many client threads (``--workers``), ``local-executor`` sequential against batched, for FedAvg (a round
dispatches every node at once) and FedBuff (concurrency = all nodes; the engine replaces each finished task), at
each of ``--e2e-steps`` local steps (the more steps, the larger local training's share of a task).
``updates_per_s`` is applied updates per wall second; ``mean_batch`` is the batcher's mean batch size;
``compute_s_sum`` is the tasks' ``compute-s`` summed, what the wall clock would charge: per node, each task's
wall time in ``LocalSGD.run`` (with 100 client threads on a few cores, mostly waiting for a core, so the sum far
exceeds the run's wall time); batched, each node's share of its chunk's wall time.

torch uses one intra-op thread (as the runner does), so both sides use one core for the arithmetic. The machine's
``os.getloadavg()`` before and after is recorded: on a shared 2-core machine other processes take cores too.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/batched_executor.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import write_report  # noqa: E402
from client_app.batched import BATCHER, LANES, NodeJob, train_many  # noqa: E402
from client_app.data import load_dataset  # noqa: E402
from client_app.models import build_model  # noqa: E402
from client_app.trainer import LocalSGD  # noqa: E402
from strategies import taskkeys as keys  # noqa: E402

SEED = 7
STEPS, BATCH, LR = 10, 32, 0.05


def fleet(model_name: str, nodes: int, samples: int) -> tuple[torch.nn.Module, list[NodeJob]]:
    """``nodes`` jobs on digits: each its own seeded sample of images and start weights near the model's."""
    data = load_dataset("digits", seed=SEED)
    model = build_model(model_name, data.input_shape, data.num_classes, seed=SEED)
    base = [t.detach().numpy() for t in model.state_dict().values()]
    rng = np.random.default_rng(SEED)
    jobs = []
    for k in range(nodes):
        rows = rng.integers(0, len(data.y_train), samples)
        start = [(w + rng.normal(0, 0.01, w.shape)).astype(np.float32) for w in base]
        jobs.append(NodeJob(start, data.x_train[rows], data.y_train[rows], LocalSGD(STEPS, BATCH, LR, seed=k)))
    return model, jobs


def per_node(model: torch.nn.Module, jobs: list[NodeJob]) -> float:
    """Seconds to train ``jobs`` one after the other with ``LocalSGD.run`` on one model."""
    names = list(model.state_dict())
    cpu = torch.device("cpu")
    start = time.perf_counter()
    for job in jobs:
        model.load_state_dict({n: torch.from_numpy(w) for n, w in zip(names, job.start, strict=True)})
        job.sgd.run(model, job.x, job.y, cpu)
    return time.perf_counter() - start


def batched(model: torch.nn.Module, jobs: list[NodeJob], lanes: int) -> float:
    """Seconds to train ``jobs`` with ``train_many``."""
    start = time.perf_counter()
    train_many(model, jobs, torch.device("cpu"), lanes=lanes)
    return time.perf_counter() - start


def local_rows(models: list[str], sizes: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (model, fleet size): per-node and batched updates/s and their ratio."""
    rows = []
    for name in models:
        for n in sizes:
            model, jobs = fleet(name, n, args.samples)
            sample = jobs[: args.per_node_cap]
            batched(model, jobs[:8], args.lanes)  # warm-up: the first vmapped call sets up torch.func
            per_node(model, jobs[:8])
            per, bat, ratios = [], [], []
            for rep in range(args.repeats):
                if rep % 2:
                    b = len(jobs) / batched(model, jobs, args.lanes)
                    p = len(sample) / per_node(model, sample)
                else:
                    p = len(sample) / per_node(model, sample)
                    b = len(jobs) / batched(model, jobs, args.lanes)
                per.append(p)
                bat.append(b)
                ratios.append(b / p)
                print(f"[{rep + 1}/{args.repeats}] {name} {n} nodes: per-node {p:.0f}/s, batched {b:.0f}/s",
                      file=sys.stderr, flush=True)
            rows.append({"model": name, "nodes": n, "per_node_timed": len(sample), "lanes": args.lanes,
                         "per_node_updates_per_s": statistics.median(per),
                         "batched_updates_per_s": statistics.median(bat), "speedup": statistics.median(ratios),
                         "repeats": {"per_node": per, "batched": bat}})
    return rows


@contextlib.contextmanager
def compute_seconds() -> Iterator[list[float]]:
    """The ``compute-s`` of every local training the ClientApp runs meanwhile (its ``train_local``, wrapped)."""
    from client_app import app

    seen: list[float] = []
    original = app.train_local

    def timed(*args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = original(*args, **kwargs)
        seen.append(metrics[keys.COMPUTE_S])
        return metrics

    app.train_local = timed  # type: ignore[assignment]
    try:
        yield seen
    finally:
        app.train_local = original  # type: ignore[assignment]


def e2e_rows(nodes: int, updates: int, model: str, steps: list[int]) -> list[dict[str, Any]]:
    """``run_local`` with ``nodes`` client threads, sequential against batched, FedAvg and FedBuff."""
    from server_app.simulate import merge_config, run_local

    rows = []
    for strategy, local_steps, executor in itertools.product(("fedavg", "fedbuff"), steps, ("sequential", "batched")):
        with tempfile.TemporaryDirectory() as tmp:
            values = merge_config(overrides={
                "strategy": strategy, "model": model, "local-executor": executor, "max-updates": updates,
                "local-steps": local_steps, "eval-every": 0, "concurrency": nodes, "min-nodes": 1,
                "checkpoint-every": 0, "metrics-db": str(Path(tmp) / "metrics.db")})
            before = len(BATCHER.sizes)
            with compute_seconds() as compute:
                start = time.perf_counter()
                summary = run_local(values, nodes=nodes, workers=nodes)
                seconds = time.perf_counter() - start
        sizes = BATCHER.sizes[before:]
        rows.append({"strategy": strategy, "local_steps": local_steps, "executor": executor, "nodes": nodes,
                     "workers": nodes, "model": model, "applied": summary.applied, "seconds": seconds,
                     "updates_per_s": summary.applied / seconds, "compute_s_sum": sum(compute),
                     "mean_batch": statistics.fmean(sizes) if sizes else None, "batches": len(sizes)})
        print(f"e2e {strategy} {local_steps} steps {executor}: {rows[-1]['updates_per_s']:.1f} updates/s",
              file=sys.stderr, flush=True)
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The two tables, with the load beside them."""
    load = report["machine"]
    lines = [f"Load average before/after: {load['loadavg_before'][0]:.2f} / {load['loadavg_after'][0]:.2f} "
             f"on {load['cores']} cores (shared machine); torch intra-op threads: 1; chunks of at most "
             f"{report['lanes']} nodes.", "",
             "| model | nodes | per-node updates/s | batched updates/s | speed-up |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in report["local"]:
        lines.append(f"| {r['model']} | {r['nodes']:,} | {r['per_node_updates_per_s']:,.0f} | "
                     f"{r['batched_updates_per_s']:,.0f} | {r['speedup']:.1f}x |")
    if report["e2e"]:
        lines += ["", "| run_local | local steps | executor | nodes = workers | applied | wall s | updates/s | "
                  "mean batch | sum of the tasks' compute-s |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in report["e2e"]:
            batch = f"{r['mean_batch']:.1f}" if r["mean_batch"] else "-"
            lines.append(f"| {r['strategy']} | {r['local_steps']} | {r['executor']} | {r['nodes']} | "
                         f"{r['applied']} | "
                         f"{r['seconds']:.1f} | {r['updates_per_s']:.1f} | {batch} | {r['compute_s_sum']:.1f} |")
        lines += ["", "compute-s is what the wall clock charges a task: per node, the wall time of its training, "
                  "which with 100 client threads on a few cores is mostly waiting for a core; batched, the node's "
                  "share of its chunk's wall time."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; write the JSON and Markdown where asked; return the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--models", nargs="+", default=["logreg", "mlp"])
    parser.add_argument("--samples", type=int, default=64, help="images per node")
    parser.add_argument("--lanes", type=int, default=LANES)
    parser.add_argument("--per-node-cap", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--e2e-nodes", type=int, default=100, help="0: no end-to-end rows")
    parser.add_argument("--e2e-updates", type=int, default=400)
    parser.add_argument("--e2e-model", default="mlp")
    parser.add_argument("--e2e-steps", type=int, nargs="+", default=[10, 50], help="local steps of the e2e runs")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 nodes, one repeat, a tiny e2e")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.repeats, args.per_node_cap, args.e2e_nodes, args.e2e_updates = [40], 1, 40, 4, 8
        args.e2e_steps = [10]
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    started = time.time()
    local = local_rows(args.models, args.nodes, args)
    e2e = e2e_rows(args.e2e_nodes, args.e2e_updates, args.e2e_model, args.e2e_steps) if args.e2e_nodes else []
    report = {
        "command": "python bench/batched_executor.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cores": os.cpu_count(), "loadavg_before": list(load_before),
                    "loadavg_after": list(os.getloadavg()), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform()},
        "settings": {"dataset": "digits", "samples_per_node": args.samples, "steps": STEPS, "batch_size": BATCH,
                     "lr": LR, "repeats": args.repeats, "per_node_cap": args.per_node_cap},
        "lanes": args.lanes,
        "seconds": time.time() - started,
        "local": local,
        "e2e": e2e,
    }
    write_report(report, markdown(report), args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
    raise SystemExit(0)
