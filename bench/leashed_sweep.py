"""Leashed-SGD's sweeps on the native executor: threads, persistence, step size (BENCHMARKS.md, Leashed-SGD sweep).

    python bench/leashed_sweep.py --json OUT [--markdown OUT.md] [--plot OUT.png] [--threads 1,2] [--repeats 2]
                                  [--steps 1000] [--quick]

The Leashed-SGD paper's MLP (784 -> 128 x 3 -> 10, 151,306 parameters; ``bench/local_executors.py``) on the first
20,000 Fashion-MNIST training images (scikit-learn's digits when Fashion-MNIST is not installed), batch 64, no
momentum, seed 1337, all on the native C++ executors (``client_app/native``), the code the ClientApp runs for
``native-executor = "auto"``:

- threads m in {1, 2, 4, ...} up to the cores present (``--threads`` to choose others);
- persistence B in {0, 1, 4, infinity} for Leashed-SGD (infinity: B = steps, more retries than a run can fail);
  lock-based AsyncSGD and HOGWILD! once per (m, step size);
- step sizes over a decade (``--lrs``, default 0.03, 0.1, 0.3), each run ``--repeats`` times;
- and, at the middle step size, the Python executors (``client_app.executors``) beside the native ones.

Per configuration (medians over repeats; counts summed): updates/s; CPU milliseconds per update and cores used
(the process's CPU seconds over the run's wall-clock seconds: on a shared machine, what it really got); time to
the target loss (0.3 x the initial model's held-out loss, reached when the mean of the last 50 batch losses in
completion order falls below it); staleness mean / max and histogram (0 .. 7, 8+); compare-and-swap attempts per
gradient (histogram 1, 2, 3, 4+; a dropped gradient counts 1 + B); dropped gradients; peak live vectors;
divergences (runs whose final held-out loss is not finite or not below the initial loss). ``--plot``: one figure,
a panel per sweep (updates/s against m; time to target and dropped gradients against B; final loss against the
step size) and the staleness histograms at the largest m. torch's intra-op pool
is one thread per worker. Also the milliseconds per update of one thread at batch 1 and 64: the sequential
trainer, and the Python and native Leashed-SGD executors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/leashed_sweep.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import pyplot, write_report  # noqa: E402
from bench.local_executors import SEED, THRESHOLD_FRACTION, leashed_mlp, load, loss_of, time_to_threshold  # noqa: E402
from client_app import native  # noqa: E402
from client_app.executors import make_policy, run_executor  # noqa: E402
from client_app.trainer import LocalSGD  # noqa: E402

INF = "inf"
PERSISTENCE = (0, 1, 4, INF)
LRS = (0.03, 0.1, 0.3)
PAPER = {
    "time": "Leashed-SGD reaches a target loss about 20-80% (up to 4x) sooner than lock-based AsyncSGD and HOGWILD!",
    "persistence": "a small persistence bound (the leash) keeps staleness low and convergence stable as m grows",
    "memory": "at most 2m + 1 live parameter vectors, fewer in practice than the lock-based baseline's",
    "scaling": "the advantage grows with the number of cores contending for the shared vector",
}


def default_threads() -> tuple[int, ...]:
    """1, 2, 4, ... up to the cores present."""
    cores = os.cpu_count() or 1
    out, m = [], 1
    while m <= cores:
        out.append(m)
        m *= 2
    return tuple(out)


def one_run(impl: str, executor: str, m: int, b: int | str, lr: float, data: tuple, steps: int) -> dict[str, Any]:
    """One training run of ``executor`` (``impl`` native or python) with m threads, persistence b, step size lr."""
    _, x, y, xe, ye = data
    torch.manual_seed(SEED)
    model = leashed_mlp(tuple(x.shape[1:]))
    xe_t, ye_t = torch.tensor(xe), torch.tensor(ye)
    initial = loss_of(model, xe_t, ye_t)
    sgd = LocalSGD(steps=steps, batch_size=64, lr=lr, seed=SEED)
    persistence = steps if b in (INF, "-") else int(b)
    cpu = time.process_time()
    if impl == "native":
        report = native.run_native(executor, sgd, model, x, y, m, persistence)
    else:
        report = run_executor(make_policy(executor, lr, persistence), sgd, model, x, y, torch.device("cpu"), m)
    cpu = time.process_time() - cpu
    final = loss_of(model, xe_t, ye_t)
    if not report.attempts:  # the Python locked and HOGWILD! executors publish every gradient on the first try
        report.attempts = [1] * report.published
    stale = np.bincount(np.minimum(report.staleness, 8), minlength=9) if report.staleness else np.zeros(9, int)
    tries = np.bincount(np.minimum(report.attempts, 4), minlength=5)[1:] if report.attempts else np.zeros(4, int)
    return {
        "updates": report.published, "seconds": report.seconds,
        "updates_per_s": report.published / report.seconds if report.seconds else 0.0,
        "cpu_ms_per_update": 1e3 * cpu / max(report.published, 1),
        "cores_used": cpu / report.seconds if report.seconds else 0.0,
        "time_to_target_s": time_to_threshold(report.trace, THRESHOLD_FRACTION * initial),
        "staleness_mean": float(np.mean(report.staleness)) if report.staleness else 0.0,
        "staleness_max": int(max(report.staleness, default=0)),
        "staleness_hist": stale.tolist(), "attempts_hist": tries.tolist(),
        "failed_cas": report.failed_cas, "dropped": report.dropped, "peak_live": report.peak_live,
        "initial_loss": initial, "final_loss": final,
        "diverged": int(not np.isfinite(final) or final >= initial),
    }


def step_cost(data: tuple, batch: int, steps: int = 300, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per update with one thread at ``batch`` (medians of ``repeats`` runs).

    The sequential trainer, and the Python and native Leashed-SGD executors: the fixed per-step cost of Python.
    """
    _, x, y, _, _ = data
    out: dict[str, list[float]] = {"sequential": [], "leashed (Python)": [], "leashed (native)": []}
    for _ in range(repeats):
        for name in out:
            torch.manual_seed(SEED)
            model = leashed_mlp(tuple(x.shape[1:]))
            sgd = LocalSGD(steps=steps, batch_size=batch, lr=0.01, seed=SEED)
            start = time.perf_counter()
            if name == "sequential":
                sgd.run(model, x, y, torch.device("cpu"))
            elif name == "leashed (Python)":
                run_executor(make_policy("leashed", sgd.lr), sgd, model, x, y, torch.device("cpu"), 1)
            else:
                native.run_native("leashed", sgd, model, x, y, 1)
            out[name].append(1e3 * (time.perf_counter() - start) / steps)
    return {name: statistics.median(v) for name, v in out.items()}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the rates and times (time to target over the runs that reached it), sums of the counts."""
    reached = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
    return {
        "updates_per_s": statistics.median(r["updates_per_s"] for r in runs),
        "cpu_ms_per_update": statistics.median(r["cpu_ms_per_update"] for r in runs),
        "cores_used": statistics.median(r["cores_used"] for r in runs),
        "time_to_target_s": statistics.median(reached) if reached else None,
        "reached": len(reached), "runs": len(runs),
        "staleness_mean": statistics.median(r["staleness_mean"] for r in runs),
        "staleness_max": max(r["staleness_max"] for r in runs),
        "staleness_hist": np.sum([r["staleness_hist"] for r in runs], axis=0).tolist(),
        "attempts_hist": np.sum([r["attempts_hist"] for r in runs], axis=0).tolist(),
        "failed_cas": sum(r["failed_cas"] for r in runs), "dropped": sum(r["dropped"] for r in runs),
        "peak_live": max(r["peak_live"] for r in runs),
        "final_loss": statistics.median(r["final_loss"] for r in runs),
        "diverged": sum(r["diverged"] for r in runs),
    }


def configurations(threads: tuple[int, ...], lrs: tuple[float, ...]) -> list[tuple[str, str, int, Any, float]]:
    """The (impl, executor, m, B, lr) to run.

    Native Leashed-SGD at every B, native locked and HOGWILD!, and the Python executors (Leashed-SGD at
    B = infinity) at the middle step size.
    """
    mid = lrs[len(lrs) // 2]
    out: list[tuple[str, str, int, Any, float]] = []
    for m in threads:
        for lr in lrs:
            out += [("native", "leashed", m, b, lr) for b in PERSISTENCE]
            out += [("native", "locked", m, "-", lr), ("native", "hogwild", m, "-", lr)]
            if lr == mid:
                out += [("python", "leashed", m, INF, lr), ("python", "locked", m, "-", lr),
                        ("python", "hogwild", m, "-", lr)]
    return out


def fmt(v: float | None, digits: int = 2) -> str:
    """A table cell."""
    return "n/r" if v is None else f"{v:.{digits}f}"


def _label(r: dict[str, Any]) -> str:
    """A row's executor as the table and the plot name it: the Python ones marked."""
    return r["executor"] if r["impl"] == "native" else f"{r['executor']} (Python)"


def markdown(report: dict[str, Any]) -> str:
    """The BENCHMARKS.md table."""
    lines = ["| m | lr | executor | B | updates/s | CPU ms / update | cores used | time to target (s), reached "
             "| staleness mean / max | staleness hist 0..7, 8+ | CAS attempts 1, 2, 3, 4+ | dropped | peak live "
             "| diverged |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(
            f"| {r['threads']} | {r['lr']} | {_label(r)} | {r['persistence']} | {r['updates_per_s']:.0f} "
            f"| {r['cpu_ms_per_update']:.2f} | {r['cores_used']:.2f} "
            f"| {fmt(r['time_to_target_s'])}, {r['reached']}/{r['runs']} "
            f"| {r['staleness_mean']:.2f} / {r['staleness_max']} | {' '.join(map(str, r['staleness_hist']))} "
            f"| {' '.join(map(str, r['attempts_hist']))} | {r['dropped']} | {r['peak_live']} "
            f"| {r['diverged']}/{r['runs']} |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """The sweeps as four panels: threads, persistence, step size, staleness (see the module docstring)."""
    plt = pyplot()
    rows = report["results"]
    lrs = sorted({r["lr"] for r in rows})
    mid, top = lrs[len(lrs) // 2], max(r["threads"] for r in rows)
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.5))
    # Threads: updates/s per executor at the middle step size (Leashed-SGD at B = infinity).
    for name in dict.fromkeys(_label(r) for r in rows):
        pts = sorted((r["threads"], r["updates_per_s"]) for r in rows if _label(r) == name and r["lr"] == mid
                     and r["persistence"] in ("-", INF))
        ax[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ms = sorted({r["threads"] for r in rows})
    ax[0].set(xlabel="threads m", ylabel="updates/s", title=f"threads (lr {mid})")
    ax[0].set_xscale("log", base=2)
    ax[0].set_xticks(ms, labels=[str(m) for m in ms])
    # Persistence: native Leashed-SGD's time to target and dropped gradients against B, one line per m.
    order = [str(b) for b in PERSISTENCE]
    for m in ms:
        pts = [r for r in rows if r["impl"] == "native" and r["executor"] == "leashed" and r["threads"] == m
               and r["lr"] == mid]
        pts.sort(key=lambda r: order.index(str(r["persistence"])))
        xs = [order.index(str(r["persistence"])) for r in pts]
        ax[1].plot(xs, [r["time_to_target_s"] or float("nan") for r in pts], marker="o", label=f"m = {m}")
        for x, r in zip(xs, pts, strict=True):
            ax[1].annotate(f"{r['dropped']} dropped", (x, r["time_to_target_s"] or 0), fontsize=7)
    ax[1].set_xticks(range(len(order)), labels=order)
    ax[1].set(xlabel="persistence B", ylabel="time to target (s)", title=f"persistence (Leashed-SGD, lr {mid})")
    # Step size: final held-out loss per executor at the largest m; crosses mark divergences.
    for name in dict.fromkeys(_label(r) for r in rows if r["impl"] == "native"):
        pts = sorted((r["lr"], r["final_loss"], r["diverged"]) for r in rows if _label(r) == name
                     and r["threads"] == top and r["persistence"] in ("-", INF))
        ax[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax[2].scatter([p[0] for p in pts if p[2]], [p[1] for p in pts if p[2]], marker="x", color="red", s=80)
    ax[2].set(xlabel="step size", ylabel="final held-out loss", title=f"step size (m = {top}; x: diverged)",
              xscale="log")
    ax[2].set_xticks(lrs, labels=[f"{v:g}" for v in lrs])
    ax[2].minorticks_off()
    # Staleness at the largest m, middle step size.
    for r in rows:
        if r["threads"] == top and r["lr"] == mid and r["persistence"] in ("-", INF):
            hist = np.asarray(r["staleness_hist"], float)
            ax[3].plot(range(len(hist)), hist / max(hist.sum(), 1), marker="o", label=_label(r))
    ax[3].set_xticks(range(9), labels=[*map(str, range(8)), "8+"])
    ax[3].set(xlabel="staleness", ylabel="share of updates", title=f"staleness (m = {top}, lr {mid})")
    for a in ax:
        a.legend(fontsize=7)
    fig.suptitle(f"Leashed-SGD sweep, native executors ({report['machine']['cores']} cores, "
                 f"{report['settings']['steps']} steps, {report['settings']['repeats']} repeats)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the sweep; write ``--json`` (and ``--markdown``); print the table; return the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="output JSON file")
    parser.add_argument("--markdown", default="", help="also write the table here")
    parser.add_argument("--plot", default="", help="also draw the sweeps into this PNG")
    parser.add_argument("--threads", default="", help="comma-separated m (default 1, 2, 4, ... up to the cores)")
    parser.add_argument("--lrs", default=",".join(map(str, LRS)), help="comma-separated step sizes")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration (default 2)")
    parser.add_argument("--steps", type=int, default=1000, help="SGD steps per run (default 1000)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 40 steps, 2,000 images, one repeat")
    args = parser.parse_args(argv)
    native.load()  # fail now, not mid-sweep, when the extension cannot be built
    torch.set_num_threads(1)
    threads = tuple(int(t) for t in args.threads.split(",")) if args.threads else default_threads()
    lrs = tuple(float(v) for v in args.lrs.split(","))
    steps, repeats = (40, 1) if args.quick else (args.steps, args.repeats)
    data = load(args.quick)
    load_before = os.getloadavg()
    started = time.time()
    configs = configurations(threads, lrs)
    runs: dict[tuple, list[dict[str, Any]]] = {c: [] for c in configs}
    for rep in range(repeats):  # whole sweeps back to back: each configuration sees the machine's load changes
        for cfg in configs if rep % 2 == 0 else configs[::-1]:
            runs[cfg].append(one_run(*cfg, data=data, steps=steps))
            print(f"[{rep + 1}/{repeats}] {cfg}: {runs[cfg][-1]['updates_per_s']:.0f} updates/s",
                  file=sys.stderr, flush=True)
    overhead = {f"batch {b}": step_cost(data, b, *((20, 1) if args.quick else (300, 3))) for b in (1, 64)}
    print(f"ms per update, one thread: {overhead}", file=sys.stderr, flush=True)
    results = [{"impl": c[0], "executor": c[1], "threads": c[2], "persistence": c[3], "lr": c[4],
                **summarise(runs[c]), "repeats": runs[c]} for c in configs]
    report = {
        "command": "python bench/leashed_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cores": os.cpu_count(), "loadavg_before": list(load_before),
                    "loadavg_after": list(os.getloadavg()), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform()},
        "settings": {"dataset": data[0], "train_samples": len(data[2]), "eval_samples": len(data[4]),
                     "steps": steps, "batch_size": 64, "momentum": 0.0, "repeats": repeats, "threads": threads,
                     "persistence": PERSISTENCE, "lrs": lrs, "threshold_fraction": THRESHOLD_FRACTION,
                     "seed": SEED},
        "paper_claims": PAPER,
        "seconds": time.time() - started,
        "ms_per_update_one_thread": overhead,
        "results": results,
    }
    table = markdown(report) + "\n\nms per update, one thread: " + json.dumps(overhead)
    write_report(report, table, args.json, args.markdown)
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
    raise SystemExit(0)
