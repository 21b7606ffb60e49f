"""Scale: the in-process runner with 1,000 nodes, 100 concurrent, on the virtual clock.

    python -m bench.scale [--nodes 1000] [--concurrency 100] [--updates 5000,20000] [--workers 2] [--quick]
                          [--executor thread,process] [--client staleflower|noop] [--model logreg|mlp]
                          [--local-executor sequential|batched] [--dataset digits|fashion-mnist]
                          [--json results/scale.json] [--markdown results/scale.md]

Each run (FedBuff, logreg (``--model``) on digits, 2 local steps, every node its own partition of the 1,437
training images) goes in a fresh child process, so its peak RSS is its own. The child wraps ``Engine._evaluate``
(an evaluation every 1/40 of the run, ``--samples``) to sample, after a ``gc.collect()``, the resident set size
(``/proc/self/statm``) and the number of objects the garbage collector tracks, together with the applied-update
count and the wall time. The table reports RSS at 25 %, 50 % and 100 % of the run, the growth from 25 % to
100 %, the peak RSS (``ru_maxrss``), and applied updates per second of wall time between the first and the last
evaluation: start-up and node discovery excluded, the evaluations included (a run's own work; clients keep
training meanwhile), the sampling excluded, with the client processes stopped (SIGSTOP) while it lasts so that
they do no work off the clock. Memory that did not depend on run length would show the same RSS at 25 % and
100 %, and the same peak for a run four times longer.

``--executor`` runs each length once per executor (``LocalGrid``'s ``thread`` pool or ``process`` workers, both
``--workers`` wide). With processes, each sample also sums the memory of the child's descendants (the forkserver
and the workers): their RSS, which counts the pages they share with each other (torch, the forkserver's imports)
once per process, and their PSS (``/proc/PID/smaps_rollup``), which splits shared pages between the sharers.
The process rows also time the workers' start-up, before the run: the first start (the forkserver imports torch,
Flower and the ClientApp, then forks the workers), a second one (forks only), and ``spawn`` workers for
comparison (each imports everything itself). ``--client noop`` replaces staleflower's ClientApp by
``bench.noop_client`` (a delta of zeros, no training): the engine alone. Every row also gives the CPU time per
applied update over the same span as updates/s (user + system, the sampling left out): of the runner's
process (with threads, clients included) and, with processes, of the workers together. On a shared machine
updates/s depends on what else runs; CPU per update much less, and it says what an idle machine would need.
``--model`` trains the runner's ``mlp`` instead of ``logreg``, ``--dataset fashion-mnist`` on Fashion-MNIST's 60,000
training images (enough for 10,000 nodes; digits has 1,437); ``--local-executor batched`` trains the nodes of
concurrent tasks as one vmapped computation (``client_app/batched.py``; give it ``--workers`` as large as the
concurrency, so that the tasks in flight are on client threads at once).

``--quick`` (the smoke test): 20 nodes, 5 concurrent, 60 and 120 updates, 8 samples each. The machine's load
average before and after is recorded: on a shared 2-core machine other processes take cores too, so updates/s
is a floor.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import write_report

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def rss_mb() -> float:
    """Resident set size now, in MiB."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


def descendants() -> list[int]:
    """Pids of this process's children, their children, and so on (the forkserver and its workers)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    found, frontier = [], [os.getpid()]
    while frontier:
        frontier = [pid for pid, ppid in parent.items() if ppid in set(frontier)]
        found.extend(frontier)
    return found


@contextlib.contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """``pids`` stopped (SIGSTOP) for the block, continued (SIGCONT) after it, even when it raises.

    While the benchmark samples memory its clock is stopped; client processes left running would meanwhile train
    the tasks queued for them (up to ``--concurrency``), work the clock never sees, and updates/s would count it
    for free. (Client threads need no stopping: ``gc.collect`` and the object count hold the interpreter lock.)
    """
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def descendants_usage() -> tuple[float, float, float, int]:
    """``(RSS, PSS, CPU seconds, processes)`` of this process's descendants, memory in MiB."""
    rss = pss = cpu = 0.0
    pids = descendants()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                rss += int(fh.read().split()[1]) * PAGE / 2**20
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                pss += sum(int(line.split()[1]) for line in fh if line.startswith("Pss:")) / 1024
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
        except (OSError, IndexError, ValueError):
            continue
    return rss, pss, cpu, len(pids)


CLIENTS = {"staleflower": "client_app.app:app", "noop": "bench.noop_client:app"}


def startup(clientapp: str, nodes: int, workers: int) -> dict[str, float]:
    """Seconds until ``workers`` client processes have imported the ClientApp: first, again, and with spawn."""
    from server_app.client_processes import ClientProcesses

    out: dict[str, float] = {}
    for key, method in (("startup_cold_s", "forkserver"), ("startup_warm_s", "forkserver"),
                        ("startup_spawn_s", "spawn")):
        processes = ClientProcesses(clientapp, nodes, {}, run_id=1, workers=workers, start_method=method)
        try:
            out[key] = round(processes.wait_ready(timeout=300), 2)
        finally:
            processes.close()
    return out


def child(nodes: int, concurrency: int, updates: int, workers: int, db: str, samples_per_run: int = 40,
          executor: str = "thread", client: str = "staleflower", model: str = "logreg",
          local_executor: str = "sequential", dataset: str = "digits") -> dict[str, Any]:
    """One run in this process; returns its samples and figures."""
    import torch

    torch.set_num_threads(1)
    from server_app import engine as engine_module
    from server_app.simulate import merge_config, run_local

    clientapp = CLIENTS[client]
    starts = startup(clientapp, nodes, workers) if executor == "process" else {}
    samples: list[dict[str, float]] = []
    original = engine_module.Engine._evaluate

    clients: list[int] = []  # the forkserver and the client processes, found at the first sample

    def sampled(self: Any) -> tuple[float, float]:
        result = original(self)  # the evaluation is the run's own work: on the clock, clients training meanwhile
        t, cpu0 = time.perf_counter(), time.process_time()
        if executor == "process" and not clients:
            clients.extend(descendants())
        with stopped(clients):  # what the benchmark itself does is off the clock: so is every client process
            gc.collect()
            sample = {"applied": self.state.totals.applied, "wall_s": t, "rss_mb": rss_mb(), "cpu_s": cpu0,
                      "gc_objects": len(gc.get_objects()), "flights": len(self.state.flights),
                      "versions": len(self.state.versions), "accuracy": result[1]}
            if executor == "process":
                (sample["workers_rss_mb"], sample["workers_pss_mb"], sample["workers_cpu_s"],
                 sample["processes"]) = descendants_usage()
            sample["sampling_s"] = time.perf_counter() - t  # sampling: not counted as run time
            sample["sampling_cpu_s"] = time.process_time() - cpu0
        samples.append(sample)
        return result

    engine_module.Engine._evaluate = sampled  # type: ignore[method-assign]
    values = merge_config(overrides={
        "strategy": "fedbuff", "dataset": dataset, "model": model, "local-steps": 2, "max-updates": updates,
        "concurrency": concurrency, "eval-every": max(updates // samples_per_run, 1), "metrics-db": db,
        "min-nodes": nodes, "local-executor": local_executor,
    })
    t0 = time.perf_counter()
    summary = run_local(values, nodes=nodes, workers=workers, executor=executor, clientapp=clientapp)  # type: ignore[arg-type]
    total = time.perf_counter() - t0
    first, last = samples[0], samples[-1]

    def at(fraction: float) -> dict[str, float]:
        return min(samples, key=lambda s: abs(s["applied"] - fraction * updates))

    engine_s = last["wall_s"] - first["wall_s"] - sum(s["sampling_s"] for s in samples[:-1])
    done = last["applied"] - first["applied"]
    # CPU per applied update between the first and the last sample, the sampling excluded as for
    # updates/s: what a machine with nothing else to do would have to give. With threads the runner's figure
    # includes the clients; with processes the workers' is theirs (and the forkserver's, which idles).
    main_cpu = last["cpu_s"] - first["cpu_s"] - sum(s["sampling_cpu_s"] for s in samples[:-1])
    cpu = {"main_cpu_ms_per_update": round(main_cpu / done * 1e3, 2)}
    if executor == "process":
        cpu["workers_cpu_ms_per_update"] = round((last["workers_cpu_s"] - first["workers_cpu_s"]) / done * 1e3, 2)
    workers_mem = {} if executor != "process" else {
        **{f"workers_{kind}_mb_{p}": round(at(p / 100)[f"workers_{kind}_mb"], 1)
           for kind in ("rss", "pss") for p in (25, 100)},
        "worker_processes": int(last["processes"]),  # the forkserver and the workers
    }
    return {
        "executor": executor, "client": client, "model": model, "local_executor": local_executor, "dataset": dataset,
        **starts, **workers_mem, **cpu,
        "startup_to_first_eval_s": round(first["wall_s"] - t0, 2),
        "nodes": nodes, "concurrency": concurrency, "workers": workers, "updates": updates,
        "applied": summary.applied, "tasks": sum(summary.statuses.values()), "statuses": summary.statuses,
        "accuracy": round(summary.accuracy, 4), "virtual_time_s": round(summary.time, 2),
        "wall_s": round(total, 1), "engine_wall_s": round(engine_s, 1),
        "updates_per_s": round((last["applied"] - first["applied"]) / engine_s, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        **{f"rss_mb_{p}": round(at(p / 100)["rss_mb"], 1) for p in (25, 50, 100)},
        **{f"gc_objects_{p}": at(p / 100)["gc_objects"] for p in (25, 50, 100)},
        "rss_growth_25_to_100_mb": round(at(1.0)["rss_mb"] - at(0.25)["rss_mb"], 1),
        "store_mb": round(Path(db).stat().st_size / 2**20, 1),
        "samples": [{k: round(v, 3) if isinstance(v, float) else v for k, v in s.items() if k != "wall_s"}
                    | {"t_s": round(s["wall_s"] - first["wall_s"], 2)} for s in samples],
    }


def _model(row: dict[str, Any]) -> str:
    """A row's model, with its dataset when it is not digits."""
    dataset = row.get("dataset", "digits")
    return row.get("model", "logreg") + ("" if dataset == "digits" else f" ({dataset})")


def markdown(report: dict[str, Any]) -> str:
    """The table of BENCHMARKS.md."""
    lines = ["| executor | client | model | nodes | concurrent | applied updates | tasks | wall s | updates/s "
             "| CPU ms/update: runner (workers) | RSS 25 % "
             "| RSS 50 % | RSS 100 % | growth 25→100 % | peak RSS | workers' RSS (PSS) 25 % → 100 % "
             "| tracked objects 25 % → 100 % | accuracy |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        workers = "–" if "workers_rss_mb_25" not in r else (
            f"{r['workers_rss_mb_25']:.0f} ({r['workers_pss_mb_25']:.0f}) → {r['workers_rss_mb_100']:.0f} "
            f"({r['workers_pss_mb_100']:.0f}) MiB")
        cpu = f"{r['main_cpu_ms_per_update']:.2f}" if "main_cpu_ms_per_update" in r else "–"
        if "workers_cpu_ms_per_update" in r:
            cpu += f" ({r['workers_cpu_ms_per_update']:.2f})"
        executor = r.get("executor", "thread")
        if r.get("local_executor", "sequential") != "sequential":
            executor += f" + {r['local_executor']} ({r['workers']} threads)"
        lines.append(
            f"| {executor} | {r.get('client', 'staleflower')} | {_model(r)} | {r['nodes']:,} | "
            f"{r['concurrency']} | {r['applied']:,} | {r['tasks']:,} | {r['wall_s']:.0f} | "
            f"{r['updates_per_s']:.1f} | {cpu} | {r['rss_mb_25']:.0f} MiB | {r['rss_mb_50']:.0f} MiB | "
            f"{r['rss_mb_100']:.0f} MiB | {r['rss_growth_25_to_100_mb']:+.1f} MiB | {r['peak_rss_mb']:.0f} MiB | "
            f"{workers} | {r['gc_objects_25']:,} → {r['gc_objects_100']:,} | {r['accuracy']:.3f} |")
    starts = [r for r in report["results"] if "startup_cold_s" in r]
    if starts:
        lines += ["", "| client | workers | first start (forkserver + forks) s | again (forks) s | spawn s |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['client']} | {r['workers']} | {r['startup_cold_s']:.2f} | {r['startup_warm_s']:.2f} | "
                  f"{r['startup_spawn_s']:.2f} |" for r in starts]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run each length in its own process; write the JSON and the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--updates", default="5000,20000", help="comma-separated run lengths (applied updates)")
    parser.add_argument("--workers", type=int, default=2, help="client threads (or processes) of the in-process Grid")
    parser.add_argument("--executor", default="thread", help="comma-separated: thread, process (rows for each)")
    parser.add_argument("--client", choices=sorted(CLIENTS), default="staleflower",
                        help="staleflower's ClientApp, or noop (a delta of zeros: the engine alone)")
    parser.add_argument("--model", choices=["logreg", "mlp"], default="logreg", help="the runner's model to train")
    parser.add_argument("--local-executor", choices=["sequential", "batched"], default="sequential",
                        help="how staleflower's ClientApp runs its local steps (batched: client_app/batched.py)")
    parser.add_argument("--dataset", choices=["digits", "fashion-mnist"], default="digits")
    parser.add_argument("--samples", type=int, default=40, help="evaluations (memory samples) per run")
    parser.add_argument("--quick", action="store_true", help="20 nodes, 5 concurrent, 60 and 120 updates")
    parser.add_argument("--json", default="results/scale.json")
    parser.add_argument("--markdown", default="results/scale.md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    executors = [e.strip() for e in args.executor.split(",") if e.strip()]
    if not executors or any(e not in ("thread", "process") for e in executors):
        parser.error(f"--executor takes thread, process or both (comma-separated), got {args.executor!r}")
    if args.child:
        result = child(args.nodes, args.concurrency, int(args.updates), args.workers, args.db, args.samples,
                       executors[0], args.client, args.model, args.local_executor, args.dataset)
        Path(args.json).write_text(json.dumps(result))
        return result
    if args.quick:
        args.nodes, args.concurrency, args.updates, args.samples = 20, 5, "60,120", 8
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        for updates, executor in ((int(u), e) for u in args.updates.split(",") for e in executors):
            out, db = Path(tmp) / f"{updates}-{executor}.json", Path(tmp) / f"{updates}-{executor}.db"
            cmd = [sys.executable, "-m", "bench.scale", "--child", "--nodes", str(args.nodes), "--concurrency",
                   str(args.concurrency), "--updates", str(updates), "--workers", str(args.workers),
                   "--samples", str(args.samples), "--executor", executor, "--client", args.client,
                   "--model", args.model, "--local-executor", args.local_executor, "--dataset", args.dataset,
                   "--json", str(out), "--db", str(db)]
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
            results.append(json.loads(out.read_text()))
    report = {
        "command": "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "workload": f"fedbuff (buffer 5), {args.model} on {args.dataset}, 2 local steps ({args.local_executor}), "
                    "virtual clock, default fleet mix"
                    + (" (no-op clients: a delta of zeros, no training)" if args.client == "noop" else ""),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())},
        "results": results,
    }
    write_report(report, markdown(report), args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
