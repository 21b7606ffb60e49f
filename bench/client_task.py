"""A ClientApp training task's own CPU cost: real tasks of a run, replayed through the ClientApp one by one.

    python -m bench.client_task [--model logreg] [--tasks 200] [--repeats 15] [--profile N]
        [--json results/client_task.json] [--markdown results/client_task.md]

Why: every executor pays this per update (a client thread, a client process, a SuperNode's ClientApp on a phone),
and in the runner's scale benchmark the clients' CPU is most of the CPU per update. A short in-process run
(FedBuff, 200 nodes, 2 local steps, the runner's defaults) records its first ``--tasks`` training messages with
their nodes' Contexts; each is then handed to ``run_client`` (what both executors call: the ClientApp, and the
check that its reply can travel) ``--repeats`` times over. Reported: CPU microseconds per task, the minimum over
the repeats (the least disturbed by other processes), and the median. No pipe, no engine: only the client's side.
``--profile N`` prints cProfile's N most expensive functions of one more pass (cProfile inflates Python-heavy
rows; compare within a row). ``--against-autograd`` alternates each pass with one that trains through autograd
(``client_app/dense.py`` switched off), in turn first and second, and adds the median of the paired ratios: on a
shared machine whose speed drifts, pairs of passes a second apart compare where separate runs cannot.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/client_task.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_report  # noqa: E402


def record_tasks(model: str, count: int, nodes: int = 200) -> list[tuple[Any, Any]]:
    """The first ``count`` training messages of a short run, each with its node's Context."""
    from client_app.app import app
    from server_app.simulate import merge_config, run_local

    seen: list[tuple[Any, Any]] = []

    def recording(msg: Any, context: Any) -> Any:
        reply = app(msg, context)
        if msg.metadata.message_type.startswith("train") and len(seen) < count:
            seen.append((msg, context))
        return reply

    with tempfile.TemporaryDirectory() as tmp:
        values = merge_config(overrides={
            "strategy": "fedbuff", "model": model, "local-steps": 2, "max-updates": count + 100, "concurrency": 20,
            "eval-every": count + 100, "metrics-db": f"{tmp}/metrics.db", "min-nodes": nodes})
        run_local(values, nodes=nodes, workers=1, executor="thread", clientapp=recording)
    return seen


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["logreg", "mlp"], default="logreg")
    parser.add_argument("--tasks", type=int, default=200, help="training tasks recorded and replayed")
    parser.add_argument("--repeats", type=int, default=15, help="passes over the tasks (the minimum is reported)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print cProfile's N costliest rows")
    parser.add_argument("--against-autograd", action="store_true",
                        help="alternate passes with local steps through autograd; report the paired ratio")
    parser.add_argument("--json", default="results/client_task.json")
    parser.add_argument("--markdown", default="results/client_task.md")
    args = parser.parse_args(argv)
    if args.tasks < 1 or args.repeats < 1:
        parser.error("--tasks and --repeats must be >= 1")

    import torch

    from client_app.app import app
    from server_app.client_processes import run_client

    torch.set_num_threads(1)
    tasks = record_tasks(args.model, args.tasks)
    for msg, context in tasks:  # warm-up: caches, first-call costs
        run_client(app, msg, context)
    import client_app.trainer as trainer

    dense_step = trainer.dense_step

    def one_pass(dense: bool = True) -> float:
        trainer.dense_step = dense_step if dense else (lambda *args: None)
        try:
            start = time.process_time()
            for msg, context in tasks:
                run_client(app, msg, context)
            return (time.process_time() - start) / len(tasks) * 1e6
        finally:
            trainer.dense_step = dense_step

    passes, autograd = [], []
    for rep in range(args.repeats):
        if args.against_autograd and rep % 2:
            autograd.append(one_pass(dense=False))
        passes.append(one_pass())
        if args.against_autograd and not rep % 2:
            autograd.append(one_pass(dense=False))
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for msg, context in tasks:
            run_client(app, msg, context)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumtime").print_stats(args.profile)
        print(text.getvalue(), file=sys.stderr)
    report = {"model": args.model, "tasks": len(tasks), "repeats": args.repeats, "local_steps": 2,
              "us_per_task_min": min(passes), "us_per_task_median": statistics.median(passes), "passes_us": passes}
    least, median = min(passes), statistics.median(passes)
    table = ("| model | tasks | repeats | CPU us per task (min) | median |\n|---|---:|---:|---:|---:|\n"
             f"| {args.model} | {len(tasks)} | {args.repeats} | {least:,.0f} | {median:,.0f} |")
    if autograd:
        ratio = statistics.median(a / d for a, d in zip(autograd, passes, strict=True))
        report.update(autograd_us_per_task_min=min(autograd), autograd_us_per_task_median=statistics.median(autograd),
                      autograd_passes_us=autograd, autograd_over_dense_paired_median=ratio)
        table += (f"\n| {args.model}, local steps through autograd | {len(tasks)} | {args.repeats} | "
                  f"{min(autograd):,.0f} | {statistics.median(autograd):,.0f} |\n\nAutograd over the dense step, "
                  f"median of {len(autograd)} paired passes: {ratio:.3f}x")
    write_report(report, table, args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
