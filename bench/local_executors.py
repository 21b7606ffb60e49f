"""Local executors: Leashed-SGD against lock-based AsyncSGD, HOGWILD! and sequential SGD on one client.

    python bench/local_executors.py --json OUT [--quick] [--repeats 3] [--markdown OUT.md]

For each model (the MLP and the CNN of the Leashed-SGD paper, §4.3: 784 -> 128 x 3 -> 10, and
conv3x3 1->4, pool, conv3x3 4->8, pool, FC 200->128->10) and each executor with m in {1, 2, 4, 8} threads
(``sequential`` with m = 1 only), one run of ``--steps`` SGD steps on Fashion-MNIST (the first 20,000 training
images; scikit-learn's digits when Fashion-MNIST is not installed) through ``client_app.executors.run_executor``,
the code the ClientApp runs. Each run reports, under keys named after them:

- ``updates_per_s``: published updates per second of the run;
- ``time_to_loss_threshold_s``: seconds until the training loss, averaged over the last 50 gradients in completion
  order, first falls below ``threshold_fraction`` (0.3) x the initial model's loss on 2,000 held-out training
  images (``null`` when never reached);
- ``staleness_mean``, ``staleness_max``: updates published between a gradient's read and its update;
- ``failed_swaps``, ``dropped_gradients``: failed compare-and-swaps and gradients dropped after ``persistence``;
- ``peak_live_vectors`` (and ``peak_vector_mb``): most parameter vectors alive at once;
- ``final_loss``: loss of the final model on the held-out images.

For each model and m the executors run back to back, ``--repeats`` times in an order rotated from repeat to
repeat; the median of each number over repeats is reported (``repeats`` keeps every run, with ``cpu_seconds``,
the process's CPU time, beside the wall-clock ``seconds``; ``cpu_ms_per_update`` is the executor's cost per
published update, which other processes' load hardly moves), and the ratios between executors are medians of
ratios within a repeat, so that the runs compared saw about the same load. torch's intra-op pool is set to one
thread, so m workers use at most m cores and the sequential baseline one core, as in the paper's per-thread
execution. The machine's core count, device and ``os.getloadavg()`` before and after are recorded: on a shared
2-core machine other processes take cores too. SGD without momentum, lr 0.05, batch 64, torch's default
initialisation with seed 1337, persistence 200 (the reference code's default). On CUDA (when torch sees one)
every worker runs on its own stream.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/local_executors.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.common import write_report  # noqa: E402
from client_app.data import DatasetMissingError, load_dataset  # noqa: E402
from client_app.executors import make_policy, run_executor  # noqa: E402
from client_app.trainer import LocalSGD, pick_device  # noqa: E402

EXECUTOR_ORDER = ("sequential", "leashed", "locked", "hogwild")
THREADS = (1, 2, 4, 8)
THRESHOLD_FRACTION = 0.3
WINDOW = 50
TRAIN_SAMPLES = 20_000
EVAL_SAMPLES = 2_000
SEED = 1337
PAPER_CLAIM = ("Leashed-SGD: wall-clock time to convergence about 20-80% (up to 4x) better than lock-based "
               "AsyncSGD and HOGWILD!, with less memory (IPDPS 2021)")


def leashed_mlp(shape: tuple[int, int, int]) -> nn.Module:
    """§4.3's MLP: input -> 128, three hidden 128 -> 128 layers, -> 10; ReLU (784 inputs on Fashion-MNIST)."""
    c, h, w = shape
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(c * h * w, 128), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Linear(128, 128), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(128, 10))


def leashed_cnn(shape: tuple[int, int, int]) -> nn.Module:
    """§4.3's CNN: conv3x3 1->4, pool, conv3x3 4->8, pool, FC -> 128 -> 10 (FC 200 on 28x28; padded on 8x8)."""
    c, h, _ = shape
    pad = 0 if h >= 16 else 1  # 28x28: 26, 13, 11, 5 -> 8 * 5 * 5 = 200 features; 8x8 needs padding
    features = nn.Sequential(nn.Conv2d(c, 4, 3, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, 8, 3, padding=pad), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
    with torch.no_grad():
        flat = features(torch.zeros(1, *shape)).shape[1]
    return nn.Sequential(*features, nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, 10))


MODELS = {"mlp": leashed_mlp, "cnn": leashed_cnn}


def load(quick: bool) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and held-out arrays from the training split: Fashion-MNIST, or digits when it is missing."""
    try:
        data = load_dataset("fashion-mnist", seed=0)
    except DatasetMissingError:
        data = load_dataset("digits", seed=0)
    n_train = 2_000 if quick else TRAIN_SAMPLES
    n_eval = min(EVAL_SAMPLES, len(data.y_train) // 4)
    n_train = min(n_train, len(data.y_train) - n_eval)
    x, y = data.x_train, data.y_train
    return (data.name, np.ascontiguousarray(x[:n_train]), np.ascontiguousarray(y[:n_train]),
            np.ascontiguousarray(x[-n_eval:]), np.ascontiguousarray(y[-n_eval:]))


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Cross-entropy of ``model`` on (x, y)."""
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


def time_to_threshold(trace: list[tuple[float, float]], threshold: float) -> float | None:
    """First time the mean of the last ``WINDOW`` batch losses (completion order) is below ``threshold``."""
    if len(trace) < WINDOW:
        return None
    times = np.array([t for t, _ in trace])
    losses = np.array([loss for _, loss in trace])
    rolling = np.convolve(losses, np.ones(WINDOW) / WINDOW, mode="valid")  # rolling[i] ends at i + WINDOW - 1
    below = np.flatnonzero(rolling < threshold)
    return float(times[below[0] + WINDOW - 1]) if below.size else None


def one_run(model_name: str, executor: str, threads: int, data: tuple, steps: int, device: torch.device) -> dict:
    """One training run; the numbers of the module docstring."""
    _, x, y, xe, ye = data
    torch.manual_seed(SEED)
    model = MODELS[model_name](tuple(x.shape[1:])).to(device)
    xe_t, ye_t = torch.tensor(xe, device=device), torch.tensor(ye, device=device)
    initial = loss_of(model, xe_t, ye_t)
    sgd = LocalSGD(steps=steps, batch_size=64, lr=0.05, seed=SEED)
    cpu = time.process_time()
    report = run_executor(make_policy(executor, sgd.lr, 200), sgd, model, x, y, device, threads)
    cpu = time.process_time() - cpu
    params = sum(p.numel() for p in model.parameters())
    return {
        "updates": report.published,
        "seconds": report.seconds,
        "cpu_seconds": cpu,
        "cpu_ms_per_update": 1e3 * cpu / max(report.published, 1),
        "updates_per_s": report.published / report.seconds,
        "initial_loss": initial,
        "loss_threshold": THRESHOLD_FRACTION * initial,
        "time_to_loss_threshold_s": time_to_threshold(report.trace, THRESHOLD_FRACTION * initial),
        "staleness_mean": float(np.mean(report.staleness)) if report.staleness else 0.0,
        "staleness_max": int(max(report.staleness, default=0)),
        "failed_swaps": report.failed_cas,
        "dropped_gradients": report.dropped,
        "peak_live_vectors": report.peak_live,
        "peak_vector_mb": report.peak_live * params * 4 / 1e6,
        "final_loss": loss_of(model, xe_t, ye_t),
        "params": params,
    }


def median_row(runs: list[dict]) -> dict:
    """Median of each number over repeats; time to threshold counts only runs that reached it."""
    row: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.median(values) if values else None
    row["reached"] = sum(r["time_to_loss_threshold_s"] is not None for r in runs)
    return row


def configurations(threads: tuple[int, ...]) -> list[tuple[str, int]]:
    """(executor, m) pairs: sequential once, the others at every m."""
    return [("sequential", 1)] + [(e, m) for e in EXECUTOR_ORDER[1:] for m in threads]


def ratio(a: float | None, b: float | None) -> float | None:
    """The quotient a / b, or None when either is missing."""
    return a / b if a is not None and b else None


def comparisons(rows: list[dict]) -> list[dict]:
    """Per model and m, ratios between executors, paired by repeat (one repeat's runs ran back to back).

    Medians over repeats of locked's and HOGWILD!'s time to the threshold over Leashed-SGD's (> 1: Leashed-SGD
    faster), and of the updates/s and peak-memory ratios.
    """
    by = {(r["model"], r["executor"], r["threads"]): r["repeats"] for r in rows}

    def paired(a: list[dict] | None, b: list[dict] | None, key: str) -> float | None:
        if a is None or b is None:
            return None
        values = [v for v in (ratio(x[key], y[key]) for x, y in zip(a, b, strict=True)) if v is not None]
        return statistics.median(values) if values else None

    out = []
    for (model, executor, m), leashed in by.items():
        if executor != "leashed":
            continue
        locked, hog = by.get((model, "locked", m)), by.get((model, "hogwild", m))
        t = "time_to_loss_threshold_s"
        out.append({
            "model": model, "threads": m,
            "time_ratio_locked_over_leashed": paired(locked, leashed, t),
            "time_ratio_hogwild_over_leashed": paired(hog, leashed, t),
            "updates_per_s_ratio_leashed_over_locked": paired(leashed, locked, "updates_per_s"),
            "updates_per_s_ratio_leashed_over_hogwild": paired(leashed, hog, "updates_per_s"),
            "memory_ratio_leashed_over_locked": paired(leashed, locked, "peak_live_vectors"),
        })
    return out


def fmt(value: float | None, digits: int = 2) -> str:
    """A table cell."""
    return "n/r" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """The table of BENCHMARKS.md's issue-6 section."""
    lines = ["| model | executor | m | updates/s | CPU ms / update | time to loss threshold (s) | staleness mean / max "
             "| failed swaps | dropped | peak live vectors | final loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(
            f"| {r['model']} | {r['executor']} | {r['threads']} | {r['updates_per_s']:.0f} "
            f"| {fmt(r['cpu_ms_per_update'])} "
            f"| {fmt(r['time_to_loss_threshold_s'])} | {r['staleness_mean']:.2f} / {r['staleness_max']:.0f} "
            f"| {r['failed_swaps']:.0f} | {r['dropped_gradients']:.0f} | {r['peak_live_vectors']:.0f} "
            f"| {r['final_loss']:.3f} |")
    lines += ["", "| model | m | locked / leashed time | hogwild / leashed time | leashed / locked updates/s "
              "| leashed / hogwild updates/s | leashed / locked memory |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in report["comparisons"]:
        lines.append(f"| {c['model']} | {c['threads']} | {fmt(c['time_ratio_locked_over_leashed'])} "
                     f"| {fmt(c['time_ratio_hogwild_over_leashed'])} "
                     f"| {fmt(c['updates_per_s_ratio_leashed_over_locked'])} "
                     f"| {fmt(c['updates_per_s_ratio_leashed_over_hogwild'])} "
                     f"| {fmt(c['memory_ratio_leashed_over_locked'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; write ``--json`` (and ``--markdown``); print the table; return the report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="output JSON file")
    parser.add_argument("--markdown", default="", help="also write the table here")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny runs, m in {1, 2}, one repeat")
    parser.add_argument("--repeats", type=int, default=None, help="runs per configuration (default 3; quick 1)")
    parser.add_argument("--mlp-steps", type=int, default=None, help="SGD steps per MLP run (default 2500)")
    parser.add_argument("--cnn-steps", type=int, default=None, help="SGD steps per CNN run (default 1500)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    device = pick_device("auto")
    repeats = args.repeats or (1 if args.quick else 3)
    threads = (1, 2) if args.quick else THREADS
    steps = {"mlp": args.mlp_steps or (60 if args.quick else 2500),
             "cnn": args.cnn_steps or (40 if args.quick else 1500)}
    data = load(args.quick)
    load_before = os.getloadavg()
    started = time.time()
    configs = [(m, e, t) for m in MODELS for e, t in configurations(threads)]
    runs: dict[tuple, list[dict]] = {c: [] for c in configs}
    # One group per (model, m): its executors run back to back, in an order rotated from repeat to repeat, so
    # the runs compared with one another saw about the same load from the machine's other processes.
    groups = [[c for c in configs if c[0] == model and c[2] == m] for model in MODELS for m in threads]
    for group in groups:
        for rep in range(repeats):
            shift = rep % len(group)
            for cfg in group[shift:] + group[:shift]:
                model, executor, m = cfg
                runs[cfg].append(one_run(model, executor, m, data, steps[model], device))
                print(f"[{rep + 1}/{repeats}] {model} {executor} m={m}: "
                      f"{runs[cfg][-1]['updates_per_s']:.0f} updates/s", file=sys.stderr, flush=True)
    rows = [{"model": m, "executor": e, "threads": t, **median_row(runs[(m, e, t)]), "repeats": runs[(m, e, t)]}
            for m, e, t in configs]
    report = {
        "command": "python bench/local_executors.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {
            "cores": os.cpu_count(), "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg()),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "intra_op_threads": torch.get_num_threads(),
        },
        "settings": {
            "dataset": data[0], "train_samples": len(data[2]), "eval_samples": len(data[4]), "steps": steps,
            "batch_size": 64, "lr": 0.05, "momentum": 0.0, "persistence": 200, "repeats": repeats,
            "threshold_fraction": THRESHOLD_FRACTION, "loss_window": WINDOW, "seed": SEED,
        },
        "paper_claim": PAPER_CLAIM,
        "seconds": time.time() - started,
        "results": rows,
        "comparisons": comparisons(rows),
    }
    write_report(report, markdown(report), args.json, args.markdown)
    return report


if __name__ == "__main__":
    main()
    raise SystemExit(0)
