"""Codec throughput: encode + decode MB/s of float32 input for each codec, beside a plain ``np.copy``.

    python -m bench.codec_throughput [--size 10000000] [--repeats 5] [--codecs topk,sign] [--json OUT]

The input is one float32 update of ``--size`` parameters (N(0, 1e-3) entries), shaped as the most square
n x m matrix with n * m = size so that PowerSGD compresses it (a prime size degrades PowerSGD to ``none``).
Every codec uses ``CodecSpec``'s defaults (ratio 0.01, 16 levels, rank 2).

``np.copy`` of the same array is the memory-bandwidth limit: it reads the input once and writes a fresh output
(page faults included), which is the least any decode into a new array can cost. Each repeat times the copy and
then every codec (encode, then decode of that payload) once, so copy and codecs see the same machine state.
Each row reports its best repeat (the minimum filters out interference from other processes on a shared
machine, for the copy and the codecs alike; ``encode_ms``/``decode_ms`` are those of the best repeat), and
``ratio_vs_copy`` = codec MB/s / copy MB/s from the same run.
Goal (the issue): topk and sign at >= 0.25 of copy throughput.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from strategies.codecs import CODECS, CodecSpec, decode, encode

GOAL = {"topk": 0.25, "sign": 0.25}


def matrix_shape(size: int) -> tuple[int, int]:
    rows = math.isqrt(size)
    while rows > 1 and size % rows:
        rows -= 1
    return max(rows, 1), size // max(rows, 1)


def time_once(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def measure(x: np.ndarray, codecs: list[str], repeats: int) -> dict[str, dict[str, list[float] | int]]:
    samples: dict[str, dict[str, Any]] = {"copy": {"total": [], "wire": x.nbytes}}
    states = {name: {} for name in codecs}
    for name in codecs:  # warm-up: first-call costs (imports, PowerSGD's Q init) are not what we measure
        decode(encode(CodecSpec(name), x, seed=0, state=states[name]), shape=x.shape, dtype=x.dtype)
        samples[name] = {"encode": [], "decode": [], "total": [], "wire": 0}
    for rep in range(repeats):
        samples["copy"]["total"].append(time_once(lambda: np.copy(x))[0])
        for name in codecs:
            spec, state, seed = CodecSpec(name), states[name], rep + 1
            t_enc, arr = time_once(lambda spec=spec, state=state, seed=seed: encode(spec, x, seed=seed, state=state))
            t_dec, _ = time_once(lambda arr=arr: decode(arr, shape=x.shape, dtype=x.dtype))
            row = samples[name]
            row["encode"].append(t_enc)
            row["decode"].append(t_dec)
            row["total"].append(t_enc + t_dec)
            row["wire"] = len(arr.data)
    return samples


def summarise(x: np.ndarray, samples: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    megabytes = x.nbytes / 1e6
    copy_s = min(samples["copy"]["total"])
    rows = []
    for name, row in samples.items():
        best = min(range(len(row["total"])), key=row["total"].__getitem__)
        total = row["total"][best]
        rows.append(
            {
                "codec": name,
                "encode_ms": round(row["encode"][best] * 1e3, 3) if "encode" in row else None,
                "decode_ms": round(row["decode"][best] * 1e3, 3) if "decode" in row else None,
                "total_ms": round(total * 1e3, 3),
                "mb_per_s": round(megabytes / total, 1),
                "ratio_vs_copy": round(copy_s / total, 3),
                "wire_bytes": row["wire"],
                "compression": round(x.nbytes / max(row["wire"], 1), 1),
            }
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    w = report["workload"]
    lines = [
        f"Codec throughput: float32 update of {w['size']:,} parameters as {w['shape'][0]} x {w['shape'][1]}, "
        f"best of {w['repeats']} (numpy {report['env']['numpy']}, {report['env']['cpus']} CPUs)",
        "",
        "| codec | encode ms | decode ms | total ms | MB/s | ratio_vs_copy | wire bytes | compression |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        enc = "" if r["encode_ms"] is None else f"{r['encode_ms']:.2f}"
        dec = "" if r["decode_ms"] is None else f"{r['decode_ms']:.2f}"
        lines.append(
            f"| {r['codec']} | {enc} | {dec} | {r['total_ms']:.2f} | {r['mb_per_s']:.0f} | "
            f"{r['ratio_vs_copy']:.3f} | {r['wire_bytes']:,} | {r['compression']:.1f}x |"
        )
    goals = ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in report["goal_met"].items())
    lines += ["", f"Goal ratio_vs_copy >= 0.25: {goals}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000_000, help="parameters in the update")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated subset of " + ",".join(CODECS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    codecs = [c for c in args.codecs.split(",") if c]
    unknown = sorted(set(codecs) - set(CODECS))
    if unknown or args.size < 1 or args.repeats < 1:
        parser.error(f"need --size >= 1, --repeats >= 1 and known codecs (unknown: {unknown})")
    shape = matrix_shape(args.size)
    x = (np.random.default_rng(args.seed).standard_normal(shape, dtype=np.float32) * 1e-3).astype(np.float32)
    results = summarise(x, measure(x, codecs, args.repeats))
    ratios = {r["codec"]: r["ratio_vs_copy"] for r in results}
    report = {
        "workload": {"size": args.size, "shape": list(shape), "dtype": "float32", "repeats": args.repeats},
        "env": {
            "numpy": np.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "results": results,
        "goal": GOAL,
        "goal_met": {name: ratios[name] >= need for name, need in GOAL.items() if name in ratios},
    }
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
