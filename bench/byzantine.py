"""Byzantine benchmark (RELIABILITY.md's table): final accuracy of FedAvg, FedBuff, FedAsync when 2 of 10 nodes attack.

    python -m bench.byzantine [--quick] [--seeds 0,1,2] [--strategies fedavg,...] [--attacks honest,...]
                              [--defences default,...] [--max-updates N]
                              [--json results/byzantine.json] [--markdown results/byzantine.md]

Every run is in-process on the virtual clock (``server_app.simulate.run_local``): digits, the MLP, 10 nodes, IID
partitions, the default Wi-Fi/4G/3G fleet, ``SCENARIO``'s settings plus each strategy's preset
(``configs/<strategy>-digits.toml``), a fixed budget of ``max-updates`` accepted-or-not updates, and one evaluation
(on the server's test split) at the end. The nodes of partitions 0 and 1 (``bench.attacks.attackers``) attack
from their first task (``ATTACKS``); each defence (``DEFENCES``: run-config keys added to the scenario) is run
under every attack and seed.

A cell is the mean final accuracy over the seeds, with the half-width of its Student-t 95% interval when there
is more than one seed. It "holds" when no seed's run collapsed (``COLLAPSED``: the engine stopped it because the
model became non-finite, or because every client's training of the model failed, 100 tasks in a row)
and its mean is at most 3 points below both the honest run under the same defence and the honest run under the
default configuration (no keys set) of the same strategy. The honest column holds when it is within 3 points of
the honest default (what the defence costs without attack).

``examples-cap=1 + best`` (FedAvg only) adds ``examples-cap = 1`` to the best of the strategy's other rows: the
one under which the most attacks hold, ties broken by the higher worst-case mean accuracy.

``--quick``: seed 0 and a budget of 40 updates (the smoke test, ``tests/test_bench_byzantine.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import re
import secrets
import sqlite3
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.attacks import FRACTION, Attack, ByzantineClient, attackers
from bench.common import write_report
from server_app.compare_report import mean_ci
from server_app.simulate import merge_config, run_local
from strategies.base import ModelNotFinite
from strategies.config import ConfigValue

NODES = 10
#: What every run shares. lr 0.3 with 10 local steps brings every strategy's honest run to its plateau (about 95%
#: on digits) within 150 updates (FedAvg: 15 rounds of 10), so a 315-run table fits in about 15 minutes on 2 cores;
#: the presets' lr 0.05 needs 300+ updates. Evaluation only at the end; no checkpoints (they cost time, not accuracy).
SCENARIO: dict[str, ConfigValue] = {
    "dataset": "digits", "model": "mlp", "partition": "iid", "local-steps": 10, "batch-size": 32, "lr": 0.3,
    "codec": "none", "max-updates": 150, "eval-every": 0, "checkpoint-every": 0,
}
QUICK_UPDATES = 40
#: Each strategy's own keys, from its preset (configs/fedbuff-digits.toml, configs/fedasync-digits.toml).
STRATEGIES: dict[str, dict[str, ConfigValue]] = {
    "fedavg": {"strategy": "fedavg"},
    "fedbuff": {"strategy": "fedbuff", "buffer-size": 5, "staleness-fn": "polynomial", "staleness-a": 0.5},
    "fedasync": {"strategy": "fedasync", "mixing": 0.6, "staleness-fn": "hinge", "staleness-a": 10.0,
                 "staleness-b": 4.0},
}
#: Column key -> (heading, what the attackers send).
ATTACKS: dict[str, tuple[str, Attack]] = {
    "honest": ("honest", Attack()),
    "sign-flip-x1": ("sign-flip x1", Attack(factor=-1.0)),
    "sign-flip-x8": ("sign-flip x8", Attack(factor=-8.0)),
    "scaled-x1e6": ("scaled x1e6", Attack(factor=1e6)),
    "claim-2^53": ("2^53 claim (sign-flipped)", Attack(factor=-1.0, claim=2**53)),
}
#: Resolved per strategy to the settings of its best other row (see the module docstring).
BEST = "best"
#: Row key -> run-config keys added to the scenario. Add rows here ("recommended", ...).
DEFENCES: dict[str, dict[str, ConfigValue]] = {
    "default": {},
    "update-filter=none": {"update-filter": "none"},
    "update-filter=reject": {"update-filter": "reject"},
    "median": {"aggregation": "median"},
    "trimmed-mean": {"aggregation": "trimmed-mean"},
    "krum": {"aggregation": "krum"},
    "multi-krum": {"aggregation": "multi-krum"},
    "examples-cap=1 + best": {"examples-cap": 1.0, "aggregation": BEST},
    "recommended": {},  # RECOMMENDED[strategy]
}
#: The setting RELIABILITY.md recommends per strategy against hostile devices (the row "recommended"): the median
#: of each set (sign flips, lying example counts) with the filter rejecting, not clipping, what exceeds 3 x the median
#: norm (scaled and amplified deltas); FedAsync has no set to take a median of (the rule is refused there), so only
#: the filter's rejection is left to it. Chosen from the single-defence rows of the full table.
RECOMMENDED: dict[str, dict[str, ConfigValue]] = {
    "fedavg": {"aggregation": "median", "update-filter": "reject"},
    "fedbuff": {"aggregation": "median", "update-filter": "reject"},
    "fedasync": {"update-filter": "reject"},
}
#: Rows run for some strategies only (others: every strategy). FedAsync refuses every rule but the mean.
SETS = ("fedavg", "fedbuff")
ONLY: dict[str, tuple[str, ...]] = {"examples-cap=1 + best": ("fedavg",), "median": SETS, "trimmed-mean": SETS,
                                    "krum": SETS, "multi-krum": SETS}
#: What the engine's error says when it stops a run whose every task failed (server_app/engine.py).
COLLAPSED = "consecutive failed tasks and no success"
#: Points (of accuracy) an attacked cell may lose and still hold.
TOLERANCE = 0.03

log = logging.getLogger("staleflower")


# ------------------------------------------------------------------------------------------------------ one run
def run_one(strategy: str, settings: Mapping[str, ConfigValue], attack: Attack, seed: int, *, db: Path,
            max_updates: int) -> dict[str, Any]:
    """One in-process run; its final accuracy and what the store says of the attackers' tasks."""
    values = {**SCENARIO, **STRATEGIES[strategy], **settings, "seed": seed, "max-updates": max_updates,
              "metrics-db": str(db)}
    client = ByzantineClient(attack)
    run_id = 2**62 + secrets.randbits(62)  # server_app.simulate.random_run_id: known before the run, for a failed one
    out: dict[str, Any] = {"run_id": str(run_id), "seed": seed, "collapsed": "", "error": ""}
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the runner's one-line summary, 300 times
            s = run_local(merge_config(overrides=values), nodes=NODES, clientapp=client.app, run_id=run_id)
        out.update(accuracy=s.accuracy, loss=s.loss, applied=s.applied, stop=s.stop_reason, virtual_s=s.time,
                   statuses=s.statuses)
    except ModelNotFinite as exc:  # the engine refuses a non-finite model and stops the run
        out.update(accuracy=None, collapsed="non-finite model", error=str(exc)[:300])
    except Exception as exc:  # noqa: BLE001 - one broken run must not cost the other 300; reported and counted
        if isinstance(exc, RuntimeError) and COLLAPSED in str(exc):  # the engine gave up on an untrainable model
            out.update(accuracy=None, collapsed="every task failed", error=str(exc)[:300])
        else:
            log.exception("run %s %s %s seed %d failed", strategy, settings, attack, seed)
            out.update(accuracy=None, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    out["corrupted_replies"] = client.corrupted
    out.update(task_stats(db, str(run_id)))
    return out


CLIPPED = re.compile(r"(?:clipped|capped) from ([0-9.eE+-]+|inf) to (?:norm-cap )?([0-9.eE+-]+)")


def task_stats(db: Path, run_id: str) -> dict[str, Any]:
    """Tasks, rejections, failures and clips of the attacking and honest nodes, and the largest norm a clip reports."""
    bad = attackers(NODES)
    with sqlite3.connect(db) as con:
        parts = dict(con.execute("SELECT node_id, partition_id FROM nodes WHERE run_id=?", (run_id,)).fetchall())
        rows = con.execute("SELECT node_id, status, reason FROM updates WHERE run_id=?", (run_id,)).fetchall()
    out: dict[str, Any] = {}
    for who in ("attacker", "honest"):
        mine = [(status, reason or "") for node, status, reason in rows
                if (parts.get(node) in bad) == (who == "attacker")]
        clips = [(float(m.group(1)), float(m.group(2))) for _, reason in mine if (m := CLIPPED.search(reason))]
        out[f"{who}_tasks"] = len(mine)
        out[f"{who}_rejected"] = sum(status == "rejected" for status, _ in mine)
        out[f"{who}_failed"] = sum(status == "failed" for status, _ in mine)  # no reply (e.g. training a wrecked model)
        out[f"{who}_clipped"] = len(clips)
        out[f"{who}_max_clipped_norm"] = max((n for n, _ in clips), default=None)  # as sent
        out[f"{who}_max_clip_ratio"] = max((n / b for n, b in clips if b > 0), default=None)  # sent / applied
    return out


# ----------------------------------------------------------------------------------------------------- the table
def cell(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and 95% half-width of the final accuracies of the completed runs; collapsed and failed seeds counted."""
    accs = [r["accuracy"] for r in runs if r["accuracy"] is not None]
    mean, half = mean_ci(accs)
    return {"seeds": [r["seed"] for r in runs], "accuracies": accs, "mean": mean, "ci95": half,
            "collapsed": sum(bool(r["collapsed"]) for r in runs),
            "failed": sum(1 for r in runs if r["error"] and not r["collapsed"])}


def judge(cells: dict[str, dict[str, Any]], honest_default: float | None) -> None:
    """Mark each attack cell of one row with ``holds`` (see the module docstring)."""
    honest = cells.get("honest", {}).get("mean")
    for attack, c in cells.items():
        refs = [honest_default] if attack == "honest" else [honest, honest_default]
        ok = not c["collapsed"] and not c["failed"] and c["mean"] is not None
        ok = ok and all(r is not None and c["mean"] >= r - TOLERANCE - 1e-9 for r in refs)
        c["holds"] = bool(ok)


def best_row(rows: Mapping[str, dict[str, Any]]) -> str:
    """The row under which the most attacks hold; ties: the higher worst-case mean accuracy, then table order."""
    def score(name: str) -> tuple[int, float]:
        cells = rows[name]["cells"]
        held = sum(c["holds"] for a, c in cells.items() if a != "honest")
        worst = min((c["mean"] if c["mean"] is not None and not c["collapsed"] else 0.0) for c in cells.values())
        return held, worst

    return max(rows, key=score)  # max keeps the first of equals: table order


def fmt(c: dict[str, Any]) -> str:
    """``0.952 ±0.004 ✓`` (no interval for one seed; "collapsed" when every seed's run did)."""
    mark = "✓" if c["holds"] else "✗"
    if c["mean"] is None:
        return f"collapsed {mark}" if c["collapsed"] else f"failed {mark}"
    text = f"{c['mean']:.3f}"
    if c["ci95"] is not None:
        text += f" ±{c['ci95']:.3f}"
    if c["collapsed"]:
        text += f" ({c['collapsed']} collapsed)"
    if c["failed"]:
        text += f" ({c['failed']} failed)"
    return f"{text} {mark}"


def settings_text(settings: Mapping[str, ConfigValue]) -> str:
    """``aggregation="median", byzantine=2`` (TOML values), or "(no keys)"."""
    def value(v: ConfigValue) -> str:
        return f'"{v}"' if isinstance(v, str) else (f"{v:g}" if isinstance(v, float) else str(v))

    return ", ".join(f"{k}={value(v)}" for k, v in settings.items()) or "(no keys)"


def markdown(report: dict[str, Any]) -> str:
    """The command, the scenario, the table (rows strategy x defence, columns the attacks), what holds."""
    attacks = report["attacks"]
    lines = [f"    {report['command']}", "",
             f"{NODES} nodes, digits, MLP, IID; partitions {sorted(attackers(NODES))} attack from their first task; "
             f"{report['max_updates']} updates per run; seeds {', '.join(map(str, report['seeds']))}; "
             f"wall time {report['wall_s'] / 60:.1f} min.",
             f"Final accuracy, mean over the seeds (± half-width of the 95% interval); ✓: at most "
             f"{TOLERANCE * 100:g} points below both the honest run under the same defence and the honest default "
             f"run; collapsed: the engine stopped the run, its model non-finite or untrainable (every client's "
             f"training of it failed, 100 tasks in a row).", "",
             "| strategy | defence | " + " | ".join(ATTACKS[a][0] for a in attacks) + " |",
             "|---|---|" + "---:|" * len(attacks)]
    for strategy, rows in report["table"].items():
        for row in rows.values():
            lines.append(f"| {strategy} | {row['label']} | " + " | ".join(fmt(row["cells"][a]) for a in attacks) + " |")
    shares = attacker_shares(report["runs"])
    if shares:
        lines += ["", "The attackers' share of the tasks (attacked runs under `default`; per seed): an asynchronous "
                  "strategy gives fast nodes more tasks than their share of the fleet.", ""]
        lines += [f"- {strategy}: " + ", ".join(f"seed {seed} {share:.0%}" for seed, share in by_seed.items())
                  for strategy, by_seed in shares.items()]
    lines += ["", "Defences (run-config keys added to the scenario):", ""]
    seen: set[str] = set()
    for strategy, rows in report["table"].items():
        for name, row in rows.items():
            if DEFENCES[name].get("aggregation") == BEST or name == "recommended":
                lines.append(f"- `{row['label']}` ({strategy}): {settings_text(row['settings'])}")
            elif name not in seen:
                seen.add(name)
                lines.append(f"- `{name}`: {settings_text(row['settings'])}")
    lines += ["", "Rows under which every attack holds:", ""]
    for strategy, held in report["holds_everything"].items():
        lines.append(f"- {strategy}: {', '.join(held) if held else 'none'}")
    return "\n".join(lines)


def attacker_shares(runs: Sequence[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """Per strategy and seed, the attackers' share of the recorded tasks, from its first attacked run under default."""
    out: dict[str, dict[int, float]] = {}
    for r in runs:
        tasks = r["attacker_tasks"] + r["honest_tasks"]
        if r["defence"] == "default" and r["attack"] != "honest" and tasks:
            out.setdefault(r["strategy"], {}).setdefault(r["seed"], r["attacker_tasks"] / tasks)
    return out


# ------------------------------------------------------------------------------------------------------- driver
def pick(value: str | None, known: Sequence[str], what: str) -> list[str]:
    """A comma-separated subset of ``known`` (all when None), in ``known``'s order."""
    if value is None:
        return list(known)
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return [k for k in known if k in chosen]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the grid; write the JSON and the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"seed 0, {QUICK_UPDATES} updates per run")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; --quick: 0)")
    parser.add_argument("--strategies", help=f"subset of {','.join(STRATEGIES)}")
    parser.add_argument("--attacks", help=f"subset of {','.join(ATTACKS)} (honest is always run)")
    parser.add_argument("--defences", help=f"subset of {','.join(DEFENCES)} (default is always run)")
    parser.add_argument("--max-updates", type=int, help=f"updates per run (default {SCENARIO['max-updates']}; "
                                                        f"--quick: {QUICK_UPDATES})")
    parser.add_argument("--json", default="results/byzantine.json")
    parser.add_argument("--markdown", default="results/byzantine.md")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    logging.getLogger("staleflower").setLevel(logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else ([0] if args.quick else [0, 1, 2])
    max_updates = args.max_updates or (QUICK_UPDATES if args.quick else int(SCENARIO["max-updates"]))
    strategies = pick(args.strategies, list(STRATEGIES), "strategies")
    attacks = pick(args.attacks, list(ATTACKS), "attacks")
    attacks = attacks if "honest" in attacks else ["honest", *attacks]
    attacks = [a for a in ATTACKS if a in attacks]
    defences = pick(args.defences, list(DEFENCES), "defences")
    defences = [d for d in DEFENCES if d in defences or d == "default"]
    db = Path(args.json).with_suffix(".db")
    db.parent.mkdir(parents=True, exist_ok=True)
    db.unlink(missing_ok=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for strategy in strategies:
        rows: dict[str, dict[str, Any]] = {}
        mine = [d for d in defences if strategy in ONLY.get(d, (strategy,))]
        # rows that take the best rule run after the others
        for name in sorted(mine, key=lambda d: DEFENCES[d].get("aggregation") == BEST):
            settings = dict(RECOMMENDED[strategy] if name == "recommended" else DEFENCES[name])
            label = name
            if settings.get("aggregation") == BEST:
                best = best_row({k: v for k, v in rows.items() if DEFENCES[k].get("aggregation") != BEST})
                settings = {**rows[best]["settings"], **{k: v for k, v in settings.items() if k != "aggregation"}}
                label = name.replace(BEST, best)
            cells = {}
            for attack in attacks:
                mine_runs = []
                for seed in seeds:
                    r = run_one(strategy, settings, ATTACKS[attack][1], seed, db=db, max_updates=max_updates)
                    r.update(strategy=strategy, defence=name, attack=attack, settings=settings)
                    runs.append(r)
                    mine_runs.append(r)
                    acc = ("collapsed" if r["collapsed"] else "failed" if r["accuracy"] is None
                           else f"{r['accuracy']:.4f}")
                    print(f"[{time.perf_counter() - t0:7.1f}s] {strategy:8s} {label:24s} {attack:13s} seed {seed}: "
                          f"{acc} ({r['wall_s']} s)", flush=True)
                cells[attack] = cell(mine_runs)
            rows[name] = {"label": label, "settings": settings, "cells": cells}
            judge(cells, rows["default"]["cells"]["honest"]["mean"])
        table[strategy] = {d: rows[d] for d in mine}  # table order
    wall = time.perf_counter() - t0
    report = {
        "command": "python -m bench.byzantine " + " ".join(argv if argv is not None else sys.argv[1:]),
        "scenario": {**SCENARIO, "max-updates": max_updates, "nodes": NODES},
        "strategies": {s: STRATEGIES[s] for s in strategies},
        "attackers": {"fraction": FRACTION, "partitions": sorted(attackers(NODES))},
        "attacks": attacks,
        "attack_definitions": {a: {"heading": ATTACKS[a][0], "factor": ATTACKS[a][1].factor,
                                   "claim": ATTACKS[a][1].claim} for a in attacks},
        "defences": {d: DEFENCES[d] for d in defences},
        "seeds": seeds, "max_updates": max_updates, "tolerance": TOLERANCE,
        "table": table,
        "holds_everything": {s: [rows[d]["label"] for d in rows if all(c["holds"] for c in rows[d]["cells"].values())]
                             for s, rows in table.items()},
        "failed_runs": sum(1 for r in runs if r["error"] and not r["collapsed"]),
        "wall_s": round(wall, 1),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "loadavg_before": list(load_before),
                    "loadavg_after": list(os.getloadavg())},
        "runs": runs,
    }
    write_report(report, markdown(report), args.json, args.markdown)
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failed_runs"] else 0)
