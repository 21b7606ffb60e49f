"""Engine overhead: applied updates per second of our engine versus Flower's own ``FedAvg.start``.

Both engines drive the same fake Grid (``server_app.local_grid.LocalGrid``, 2 worker threads) over the same
no-op ClientApp (it sends the received ``arrays`` back unchanged with ``num-examples = 1``) and the same model,
so the client side costs (almost) nothing and what is timed is the server: dispatching, collecting and
aggregating updates.

    python -m bench.engine_overhead [--nodes 100] [--rounds 5] [--model bench.models:Big]
                                    [--repeats 3] [--set KEY=VALUE ...] [--json OUT] [--profile OUT.prof | --timers]

Rows:
    ``flower-fedavg``       ``flwr.serverapp.strategy.FedAvg(fraction_train=1, fraction_evaluate=0,
                            min_available_nodes=N, min_train_nodes=N).start(grid, arrays, num_rounds=R)``;
                            updates = R * N (all train replies are aggregated; checked against the client count).
    ``staleflower-fedavg``  ``run_local`` (our real ServerApp) with ``strategy = "fedavg"``, ``max-updates = R*N``,
                            ``clock = "virtual"``, ``eval-every = 0``; updates = the run summary's ``applied``.
    ``staleflower-fedbuff`` the same with ``strategy = "fedbuff"``, ``buffer-size = 10``.

Our rows time the whole ServerApp, and so include work Flower's row does not do: loading the dataset and building
the model twice (weights + evaluator), a node-discovery round (``query.describe``, answered with an error by this
ClientApp), two server-side evaluations (start and end), one SQLite row per update (committed in groups), and
measuring each message's serialized size. Flower's row times ``start()`` only (its INFO logging silenced).

Every engine first does one untimed warm-up run (1 round), then the timed runs are repeated ``--repeats`` times
in rotating order (interleaved) and the median is reported. ``ratio_vs_flower_fedavg`` is our FedAvg's median
updates/s over Flower's (goal: >= 1.5; FedBuff's own ratio, in its row: >= 1.0).

``--set KEY=VALUE`` (repeatable) changes a run-config key of our rows (``update-filter=none``: what the update
filter costs); the benchmark's own keys above win. ``--timers``, instead of benchmarking, wraps the engine's
phases (dispatching, reading a reply, the update filter's norm, the weighted sum, ...) in ``time.perf_counter``
timers over ``--repeats`` runs of the first of ``--engines`` (ours) after a warm-up, and prints each one's calls,
median and mean microseconds per call and seconds per run: the breakdown of an update without a profiler's
overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

import torch  # noqa: E402
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from server_app.local_grid import LocalGrid  # noqa: E402
from server_app.simulate import load_object, merge_config, run_local  # noqa: E402
from strategies.config import ConfigError  # noqa: E402

FLOWER = "flower-fedavg"
OURS = "staleflower-fedavg"
OURS_BUFF = "staleflower-fedbuff"
ENGINES = (FLOWER, OURS, OURS_BUFF)
WORKERS = 2
BUFFER_SIZE = 10

# ------------------------------------------------------------------------------------------ the no-op ClientApp
app = ClientApp()
_train_calls = [0]  # train replies sent (to check that Flower's run aggregated every update)
_train_lock = threading.Lock()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower-quickstart-style train handler that trains nothing: the received arrays go back unchanged."""
    with _train_lock:
        _train_calls[0] += 1
    arrays = msg.content["arrays"]
    metrics = MetricRecord({"num-examples": 1})
    content = RecordDict({"arrays": arrays, "metrics": metrics})
    return Message(content=content, reply_to=msg)


def _train_count() -> int:
    """Train calls so far."""
    with _train_lock:
        return _train_calls[0]


# --------------------------------------------------------------------------------------------------- engines
def run_flower(nodes: int, rounds: int, model: str) -> tuple[int, float]:
    """Flower's FedAvg.start on a LocalGrid; returns (updates, seconds of start())."""
    net = load_object(model)()
    initial = ArrayRecord(net.state_dict())
    grid = LocalGrid(app, nodes, {}, workers=WORKERS)
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=nodes, min_train_nodes=nodes,
                      min_evaluate_nodes=0)
    before = _train_count()
    try:
        t0 = time.perf_counter()
        result = strategy.start(grid, initial, num_rounds=rounds)
        seconds = time.perf_counter() - t0
    finally:
        grid.close()
    calls = _train_count() - before
    if calls != rounds * nodes or result.arrays is None or len(result.train_metrics_clientapp) != rounds:
        raise RuntimeError(f"Flower run incomplete: {calls} train replies, expected {rounds * nodes}")
    return rounds * nodes, seconds


def run_ours(nodes: int, rounds: int, model: str, strategy: str, sets: list[str] | None = None) -> tuple[int, float]:
    """Our ServerApp via run_local on a LocalGrid; returns (applied updates, seconds of run_local()).

    ``sets``: ``KEY=VALUE`` run-config settings, under the benchmark's own keys.
    """
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        overrides: dict[str, Any] = {
            "strategy": strategy, "model": model, "max-updates": rounds * nodes, "eval-every": 0,
            "metrics-db": str(Path(tmp) / "metrics.db"), "min-nodes": nodes, "clock": "virtual",
            "checkpoint-every": 0,  # Flower's FedAvg keeps no checkpoints: compare the loops, not crash safety
        }
        if strategy == "fedbuff":
            overrides["buffer-size"] = BUFFER_SIZE
        values = merge_config(sets=sets, overrides=overrides)
        with contextlib.redirect_stdout(io.StringIO()):  # the ServerApp prints its summary
            t0 = time.perf_counter()
            summary = run_local(values, nodes=nodes, clientapp=app, workers=WORKERS)
            seconds = time.perf_counter() - t0
    if summary.stop_reason != "max-updates" or summary.applied < rounds * nodes:
        raise RuntimeError(f"our {strategy} run stopped on {summary.stop_reason!r} after {summary.applied} updates")
    return summary.applied, seconds


def _runner(engine: str, sets: list[str] | None = None) -> Callable[[int, int, str], tuple[int, float]]:
    if engine == FLOWER:
        return run_flower
    strategy = "fedavg" if engine == OURS else "fedbuff"
    return lambda nodes, rounds, model: run_ours(nodes, rounds, model, strategy, sets)


# ----------------------------------------------------------------------------------------------------- main
def benchmark(nodes: int, rounds: int, model: str, repeats: int, engines: tuple[str, ...] = ENGINES,
              warmup: bool = True, log: Callable[[str], None] = print, sets: list[str] | None = None
              ) -> dict[str, Any]:
    """Run the benchmark and return the JSON-able report."""
    if repeats < 1 or rounds < 1 or nodes < 1:
        raise ValueError("nodes, rounds and repeats must be >= 1")
    num_params = sum(p.numel() for p in load_object(model)().state_dict().values())
    samples: dict[str, list[tuple[int, float]]] = {e: [] for e in engines}
    if warmup:
        for engine in engines:
            _runner(engine, sets)(nodes, 1, model)
            log(f"warm-up {engine}: done")
    for rep in range(repeats):
        order = engines[rep % len(engines):] + engines[: rep % len(engines)]
        for engine in order:
            gc.collect()
            updates, seconds = _runner(engine, sets)(nodes, rounds, model)
            samples[engine].append((updates, seconds))
            log(f"run {rep + 1}/{repeats} {engine}: {updates} updates in {seconds:.2f} s")
    results = []
    for engine in engines:
        rates = [u / s for u, s in samples[engine]]
        med = statistics.median(rates)
        updates, seconds = min(samples[engine], key=lambda us: abs(us[0] / us[1] - med))
        results.append({
            "engine": engine, "updates": updates, "seconds": round(seconds, 4), "updates_per_s": round(med, 2),
            "runs": [{"updates": u, "seconds": round(s, 4)} for u, s in samples[engine]],
        })
    by_name = {r["engine"]: r for r in results}
    ratio = None
    if FLOWER in by_name and OURS in by_name:
        ratio = round(by_name[OURS]["updates_per_s"] / by_name[FLOWER]["updates_per_s"], 4)
    for r in results:
        if FLOWER in by_name:
            r["ratio_vs_flower_fedavg"] = round(r["updates_per_s"] / by_name[FLOWER]["updates_per_s"], 4)
    return {
        "workload": {
            "nodes": nodes, "rounds": rounds, "updates_per_run": rounds * nodes, "model": model,
            "num_params": int(num_params), "client": "no-op (returns the received arrays, num-examples = 1)",
            "grid": f"server_app.local_grid.LocalGrid(workers={WORKERS})", "fedbuff_buffer_size": BUFFER_SIZE,
            "repeats": repeats, "aggregate": "median updates/s over interleaved repeats (rotating order)",
            "warmup": "one untimed 1-round run per engine" if warmup else "none",
            "torch_threads": torch.get_num_threads(),
            "ours_includes": "dataset load + 2 model builds, query.describe discovery, 2 server evaluations "
                             "(start, end), one SQLite row per update (committed in groups), wire-size measurement",
            "flower_includes": "FedAvg.start() only (INFO logging silenced)", "ours_settings": list(sets or []),
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        },
        "results": results,
        "ratio_vs_flower_fedavg": ratio,
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown table."""
    w = report["workload"]
    lines = [
        f"Engine overhead: {w['nodes']} nodes, {w['model']} ({w['num_params']:,} params), {w['rounds']} rounds "
        f"= {w['updates_per_run']} updates per run, no-op clients, {w['aggregate']}.",
        "",
        "| engine | updates | seconds | updates/s | vs flower-fedavg |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        rel = r.get("ratio_vs_flower_fedavg")
        lines.append(f"| {r['engine']} | {r['updates']} | {r['seconds']:.2f} | {r['updates_per_s']:.1f} | "
                     f"{'' if rel is None else f'{rel:.2f}x'} |")
    goals = {OURS: 1.5, OURS_BUFF: 1.0}
    met = [f"{r['engine']} {r['ratio_vs_flower_fedavg']:.2f}x (goal >= {goals[r['engine']]}: "
           f"{'met' if r['ratio_vs_flower_fedavg'] >= goals[r['engine']] else 'not met'})"
           for r in report["results"] if r["engine"] in goals and r.get("ratio_vs_flower_fedavg") is not None]
    lines += ["", f"ratio_vs_flower_fedavg = {report['ratio_vs_flower_fedavg']}; " + "; ".join(met),
              f"Our rows include: {w['ours_includes']}. Flower's row: {w['flower_includes']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the report."""
    p = argparse.ArgumentParser(prog="python -m bench.engine_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=100, help="nodes on the LocalGrid (default 100)")
    p.add_argument("--rounds", type=int, default=5, help="FedAvg rounds; each run applies rounds*nodes updates")
    p.add_argument("--model", default="bench.models:Big", help="MODULE:CLASS torch model (default bench.models:Big)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine; the median is reported")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs")
    p.add_argument("--json", metavar="OUT", help="write the report as JSON here")
    p.add_argument("--markdown", metavar="OUT", help="also write the markdown table here")
    p.add_argument("--profile", metavar="OUT", help="instead of benchmarking, cProfile one run of the first of "
                                                    "--engines (after a warm-up) into OUT; print the top functions")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run-config setting of our rows, e.g. update-filter=none (repeatable)")
    p.add_argument("--timers", action="store_true", help="instead of benchmarking, time the engine's phases over "
                                                         "--repeats runs of the first of --engines (ours)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    flwr_log, level, threads = logging.getLogger("flwr"), logging.getLogger("flwr").level, torch.get_num_threads()
    flwr_log.setLevel(logging.WARNING)
    torch.set_num_threads(1)  # as server_app.simulate does: client threads each get one intra-op thread
    try:
        return _main(p, args)
    finally:  # leave the process as it was (the smoke test runs inside pytest)
        flwr_log.setLevel(level)
        torch.set_num_threads(threads)


def _main(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    engines = tuple(e.strip() for e in args.engines.split(",") if e.strip())
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown or not engines:
        p.error(f"unknown engine(s) {unknown}; choose from {list(ENGINES)}")
    try:
        merge_config(sets=args.set)
    except ConfigError as exc:
        p.error(str(exc))
    if args.timers:
        if engines[0] == FLOWER:
            p.error("--timers times our engine: put staleflower-fedavg or staleflower-fedbuff first in --engines")
        return timers(engines[0], args.nodes, args.rounds, args.model, args.repeats, args.set)
    if args.profile:
        return profile(engines[0], args.nodes, args.rounds, args.model, args.profile)
    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    report = benchmark(args.nodes, args.rounds, args.model, args.repeats, engines, not args.no_warmup, log, args.set)
    table = markdown(report)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return report


def profile(engine: str, nodes: int, rounds: int, model: str, out: str) -> dict[str, Any]:
    """Profile one run with cProfile (main thread only); write the stats file, print the top 30 (cumulative, self)."""
    import pstats

    run = _runner(engine)
    run(nodes, 1, model)
    prof = cProfile.Profile()
    prof.enable()
    updates, seconds = run(nodes, rounds, model)
    prof.disable()
    prof.dump_stats(out)
    stats = pstats.Stats(prof)
    print(f"profiled {engine}: {updates} updates in {seconds:.2f} s (under cProfile)")
    for key in ("cumulative", "tottime"):
        stats.sort_stats(key).print_stats(30)
    return {"engine": engine, "updates": updates, "seconds": seconds, "profile": out}


def _phases() -> list[tuple[object, str, str]]:
    """(owner, attribute, label) of what ``--timers`` wraps; module functions where their callers look them up."""
    from server_app import engine, intake, mailbox, outbox, state
    from strategies import fedbuff, robust, sums

    return [
        (engine.Engine, "_dispatch", "dispatch a task"), (outbox.Outbox, "content", "  its content"),
        (engine, "message_sizes", "  size its message"), (mailbox.Mailbox, "send", "  send it"),
        (engine.Engine, "_next", "wait for and pull the next result"),
        (engine.Engine, "_complete", "complete a task"), (intake.Intake, "read", "  read its reply"),
        (intake, "_diff_tensor_norm", "    the filter's norm of a tensor"),
        (robust, "weighted_sum", "  a round's weighted sum"),
        (sums.Accumulator, "add_update_delta", "  add it to a running sum"),
        (sums.Accumulator, "result", "  a running sum's result, bases folded"),
        (fedbuff, "step", "  step the model (FedBuff)"),
        (intake.UpdateGuard, "screen", "  screen it"),
        (state, "to_record", "serialize a new model version"),
    ]


def timers(engine: str, nodes: int, rounds: int, model: str, repeats: int, sets: list[str]) -> dict[str, Any]:
    """Time the engine's phases with ``time.perf_counter`` over ``repeats`` runs (after a warm-up); print them."""
    run = _runner(engine, sets)
    run(nodes, 1, model)
    spent: dict[str, list[float]] = {}
    originals = [(owner, name, getattr(owner, name), label) for owner, name, label in _phases()]

    def timed(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        calls = spent.setdefault(label, [])

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                calls.append(time.perf_counter() - start)
        return wrapper

    for owner, name, fn, label in originals:
        setattr(owner, name, timed(fn, label))
    try:
        seconds = [run(nodes, rounds, model)[1] for _ in range(repeats)]
    finally:
        for owner, name, fn, _ in originals:
            setattr(owner, name, fn)
    print(f"{engine}: {repeats} runs of {rounds * nodes} updates, {statistics.median(seconds):.3f} s median "
          f"({', '.join(f'{s:.3f}' for s in seconds)}); settings {sets or 'default'}")
    print(f"{'phase':40s} {'calls/run':>10s} {'median us':>10s} {'mean us':>10s} {'s/run':>8s}")
    rows = {}
    for label, calls in spent.items():
        if calls:
            rows[label] = {"calls_per_run": len(calls) / repeats, "median_us": statistics.median(calls) * 1e6,
                           "mean_us": sum(calls) / len(calls) * 1e6, "seconds_per_run": sum(calls) / repeats}
            r = rows[label]
            print(f"{label:40s} {r['calls_per_run']:10.0f} {r['median_us']:10.1f} {r['mean_us']:10.1f} "
                  f"{r['seconds_per_run']:8.3f}")
    return {"engine": engine, "seconds": seconds, "phases": rows}


if __name__ == "__main__":
    main()
