"""Record golden traces: one small in-process run per registered strategy, plus codec/filter/restart variants.

    python -m tests.golden.record            # (re)write tests/golden/<case>.json and <case>.npz for every case
    python -m tests.golden.record CASE ...   # only these cases
    python -m tests.golden.record --check    # also re-run each case twice more (once with reply reordering)
                                             # and fail unless the traces and weights are identical

The traces were recorded from the engine as it was before the rewrite of ``server_app/engine.py`` (commit
5c4153f): ``tests/test_golden.py`` re-runs every case and asserts that the new code makes the same decisions.
Do not re-record to make that test pass; a difference is a behaviour change to explain. The cases with restarts
(k-sync, adasync, abs) pin ``restart = "interrupt"``, the engine's only behaviour when they were recorded (the key
was added to their stored settings and config by hand, nothing re-recorded); ``abs-finish`` was recorded later,
for the default ``restart = "finish"`` (``RECORDED_FROM``). ``abs`` and ``abs-finish`` pin ABS's open-loop
``abs-mode = "clock"`` the same way (added by hand when the closed loop became ABS's default);
``abs-adaptive`` was recorded for the closed loop.

What a case's JSON holds:

- ``settings``: the keyword arguments given to ``server_app.testing.simulate`` (strategy, nodes, run_id and
  run-config keys as Python names), and ``config``: the full run config the run stored (``runs.config_json``),
  so a later change of a default in pyproject.toml or in ``simulate``'s ``FAST_DEFAULTS`` cannot change the case;
  the test re-runs from ``config``.
- ``trace``: every row of ``updates`` in seq order as ``[node, base_version, applied_version, staleness, status,
  peer]`` with node and peer as the index of the ``nodes`` table (Flower's node ids are random in deployment;
  the in-process ones happen to be fixed, but the index is what the contract promises).
- ``reasons``: each row's reason with every number replaced by ``#`` (a clip reason prints two norms).
- ``times``: each row's ``[dispatched_at, completed_at]`` on the virtual clock; ``bytes``: ``[bytes_up,
  bytes_down]`` (these include the run id's varint, hence the fixed ``run_id``).
- ``evals``: ``[model_version, updates_applied]`` of every evaluation.
- ``summary``: applied, version, stop_reason and the per-status counts.

The final weights go to ``<case>.npz`` (arrays ``w0``, ``w1``, ...).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
RUN_ID = 2**62 + 7  # fixed: bytes on the wire include the run id's varint (see tests/test_engine.py)

# A fleet where order and staleness are not trivial: the default wifi/4g/3g mix, a quarter of the nodes five
# times slower, and heavy compute jitter. Few local steps on logreg/digits: each run takes well under a second.
FLEET: dict[str, Any] = {
    "model": "logreg", "dataset": "digits", "local_steps": 2, "batch_size": 16, "eval_every": 10, "min_nodes": 1,
    "profiles": "wifi=0.5,4g=0.3,3g=0.2", "compute_dist": "lognormal", "compute_jitter": 0.6,
    "network_jitter": 0.3, "straggler_fraction": 0.25, "straggler_slowdown": 5.0, "clock": "virtual",
    "device": "cpu",  # "auto" would pick a GPU where there is one, and another arithmetic
    "server_bandwidth": 0.0,  # no server link: the cases were recorded before it existed (see run_config)
}

# case -> (strategy, nodes, seed, settings beyond FLEET)
CASES: dict[str, tuple[str, int, int, dict[str, Any]]] = {
    # the FedAvg / FedAsync / FedBuff family
    "fedavg": ("fedavg", 6, 1, {"max_updates": 24}),
    "fedasync": ("fedasync", 6, 2, {"max_updates": 30, "concurrency": 4, "dropout": 0.1, "mixing": 0.6,
                                    "staleness_fn": "polynomial"}),
    "fedbuff": ("fedbuff", 6, 3, {"max_updates": 30, "buffer_size": 3, "staleness_fn": "hinge"}),
    "fedbuff-topk": ("fedbuff", 6, 4, {"max_updates": 30, "buffer_size": 3, "codec": "topk", "codec_ratio": 0.1,
                                       "error_feedback": True}),
    "fedasync-downlink": ("fedasync", 5, 5, {"max_updates": 30, "codec_downlink": "topk", "codec_ratio": 0.2}),
    "fedbuff-clip": ("fedbuff", 6, 6, {"max_updates": 40, "buffer_size": 2, "update_filter": "clip",
                                       "norm_multiplier": 1.1, "norm_window": 10}),
    # the delay-tolerant local-SGD family (every node every period; delay D)
    "local-sgd": ("local-sgd", 4, 7, {"max_updates": 24}),
    "olco3": ("olco3", 4, 8, {"max_updates": 24, "delay": 2, "codec": "topk", "codec_ratio": 0.1,
                              "error_feedback": True}),
    "olco3-staleness-only": ("olco3-staleness-only", 4, 23, {"max_updates": 24, "delay": 2, "codec": "topk",
                                                             "codec_ratio": 0.1, "error_feedback": True}),
    "naive-overlap": ("naive-overlap", 4, 9, {"max_updates": 24, "delay": 1}),
    "pipe-sgd": ("pipe-sgd", 4, 10, {"max_updates": 24, "delay": 1, "local_steps": 1}),
    "cocod-sgd": ("cocod-sgd", 4, 11, {"max_updates": 24}),
    "overlap-local-sgd": ("overlap-local-sgd", 4, 12, {"max_updates": 24, "mixing": 0.5}),
    # bounded staleness / K families
    "async-sgd": ("async-sgd", 6, 13, {"max_updates": 30}),
    "k-batch-async": ("k-batch-async", 6, 14, {"max_updates": 30, "k": 3}),
    "k-async": ("k-async", 6, 15, {"max_updates": 30, "k": 3}),
    "k-sync": ("k-sync", 8, 16, {"max_updates": 30, "k": 3, "compute_dist": "shifted-exp",
                                 "compute_jitter": 1.0, "restart": "interrupt"}),
    "adasync": ("adasync", 6, 17, {"max_updates": 30, "k": 2, "k_double_every": 0.1, "restart": "interrupt"}),
    "ssp": ("ssp", 6, 18, {"max_updates": 30, "staleness_bound": 2}),
    "abs": ("abs", 8, 19, {"max_updates": 40, "k": 2, "staleness_bound": 1, "k_double_every": 0.0,
                           "compute_dist": "shifted-exp", "compute_jitter": 1.0, "restart": "interrupt",
                           "abs_mode": "clock"}),
    # restarts as Flower runs them (restart = "finish"), with a bound that shrinks between updates
    "abs-finish": ("abs", 8, 24, {"max_updates": 40, "k": 2, "staleness_bound": 4, "k_double_every": 0.02,
                                  "compute_dist": "shifted-exp", "compute_jitter": 1.0, "restart": "finish",
                                  "abs_mode": "clock"}),
    # ABS's closed loop (abs-mode = "adaptive", its default): K and tau from measured durations, loss, staleness
    "abs-adaptive": ("abs", 8, 25, {"max_updates": 40, "k": 2, "compute_dist": "shifted-exp",
                                    "compute_jitter": 1.0, "restart": "finish"}),
    # decentralized (AD-PSGD needs a bipartite graph: an even node count on ring / bipartite-exponential)
    "ad-psgd": ("ad-psgd", 6, 20, {"max_updates": 30, "topology": "bipartite-exponential"}),
    "d-psgd": ("d-psgd", 6, 21, {"max_updates": 30, "topology": "ring"}),
    "allreduce-sgd": ("allreduce-sgd", 4, 22, {"max_updates": 24}),
}

# What must show up somewhere, or the cases would not exercise what they are meant to.
REQUIRED_STATUSES = {"k-sync": "restarted", "abs": "restarted", "abs-finish": "restarted", "fedasync": "failed"}
# Cases added after the engine's rewrite: recorded from the code that introduced what they exercise.
RECORDED_FROM = {"abs-finish": "restart = finish (abandoned tasks run to their end), recorded when it was added",
                 "abs-adaptive": "abs-mode = adaptive (ABS's closed loop), recorded when it was added"}
REQUIRED_REASON = {"fedbuff-clip": "clipped"}


def settings_of(case: str) -> dict[str, Any]:
    """The ``simulate`` keyword arguments of a case."""
    strategy, nodes, seed, extra = CASES[case]
    return {"strategy": strategy, "nodes": nodes, "run_id": RUN_ID, "seed": seed, **FLEET, **extra}


def run_config(settings: dict[str, Any], config: dict[str, Any] | None, **kwargs: Any):
    """Run a case: from the stored full ``config`` when given, else from ``settings``; returns the SimRun."""
    from server_app.testing import simulate

    if config is None:
        values = {k: v for k, v in settings.items() if k not in ("strategy", "nodes", "run_id")}
    else:
        values = {k: v for k, v in config.items() if k not in ("strategy", "metrics-db")}
        # A case recorded before the server's link existed ran with an unlimited one (server-bandwidth = 0): its
        # stored config says nothing of it, and the key's default (a finite link) would move every time by a few
        # microseconds and, where two completions were that close, swap them (async-sgd).
        values.setdefault("server-bandwidth", 0.0)
        # Likewise before a strategy's declared overlap of communication and computation was charged.
        values.setdefault("overlap", False)
    return simulate(settings["strategy"], nodes=settings["nodes"], run_id=settings["run_id"], **values, **kwargs)


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def trace_of(run) -> dict[str, Any]:
    """The recorded form of a finished run (see the module docstring)."""
    index = {r["node_id"]: r["idx"] for r in run.rows("SELECT node_id, idx FROM nodes WHERE run_id=?",
                                                        run.summary.run_id)}
    rows = run.updates()
    assert [r["seq"] for r in rows] == sorted(r["seq"] for r in rows)
    s = run.summary
    return {
        "trace": [[index[r["node_id"]], r["base_version"], r["applied_version"], r["staleness"], r["status"],
                   None if r["peer_id"] is None else index[r["peer_id"]]] for r in rows],
        "reasons": [_NUMBER.sub("#", r["reason"] or "") for r in rows],
        "times": [[r["dispatched_at"], r["completed_at"]] for r in rows],
        "bytes": [[r["bytes_up"], r["bytes_down"]] for r in rows],
        "evals": [[e["model_version"], e["updates_applied"]] for e in run.evals()],
        "summary": {"applied": s.applied, "version": s.version, "stop_reason": s.stop_reason,
                    "statuses": dict(sorted(s.statuses.items()))},
    }


def stored_config(run) -> dict[str, Any]:
    """The full run config the run stored."""
    return json.loads(run.run_row()["config_json"])


def record(case: str, check: bool = False) -> dict[str, Any]:
    """Run ``case``, write its JSON and npz, and return what was written."""
    settings = settings_of(case)
    run = run_config(settings, None)
    out = {"case": case, "recorded_from": RECORDED_FROM.get(case, "5c4153f (pre-rewrite engine)"),
           "settings": settings, "config": stored_config(run), **trace_of(run)}
    statuses = {t[4] for t in out["trace"]}
    if case in REQUIRED_STATUSES and REQUIRED_STATUSES[case] not in statuses:
        raise SystemExit(f"{case}: no {REQUIRED_STATUSES[case]!r} row; change its settings")
    if case in REQUIRED_REASON and not any(REQUIRED_REASON[case] in r for r in out["reasons"]):
        raise SystemExit(f"{case}: no reason with {REQUIRED_REASON[case]!r}; change its settings")
    if check:  # the same run again, from the stored config, with and without shuffled reply arrival
        for reorder in (None, 3):
            again = run_config(settings, out["config"], reorder_seed=reorder)
            got = trace_of(again)
            for key in ("trace", "reasons", "times", "bytes", "evals", "summary"):
                if got[key] != out[key]:
                    raise SystemExit(f"{case}: {key} differs on a re-run (reorder_seed={reorder})")
            for a, b in zip(again.summary.weights, run.summary.weights, strict=True):
                np.testing.assert_array_equal(a, b, err_msg=f"{case}: weights differ (reorder_seed={reorder})")
    (HERE / f"{case}.json").write_text(json.dumps(out, indent=1) + "\n")
    np.savez(HERE / f"{case}.npz", **{f"w{i}": w for i, w in enumerate(run.summary.weights)})
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m tests.golden.record", description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="*", help=f"cases to record (default: all): {', '.join(CASES)}")
    p.add_argument("--check", action="store_true", help="re-run each case and require an identical result")
    args = p.parse_args(argv)
    import logging

    import torch

    from strategies.registry import names as registered_names

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    missing = set(registered_names()) - {strategy for strategy, *_ in CASES.values()}
    if missing:
        raise SystemExit(f"no golden case for: {', '.join(sorted(missing))}")
    for case in args.cases or CASES:
        if case not in CASES:
            raise SystemExit(f"unknown case {case!r}")
        out = record(case, check=args.check)
        s = out["summary"]
        print(f"{case:20s} rows={len(out['trace']):3d} applied={s['applied']} version={s['version']} "
              f"stop={s['stop_reason']} statuses={s['statuses']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
