"""Crash-safe runs: SIGKILL the in-process runner mid-run, resume it, and get the uninterrupted run exactly."""

import json
import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server_app.app import reopen
from server_app.store import MetricsStore
from strategies.config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parent.parent
SAME = ("seq", "node_id", "dispatched_at", "completed_at", "base_version", "applied_version", "staleness",
        "compute_s", "comm_s", "status", "peer_id")
FAST = {"model": "logreg", "local_steps": 2, "eval_every": 10, "min_nodes": 1, "nodes": 6,
        "compute_dist": "shifted-exp", "compute_jitter": 1.0, "straggler_fraction": 0.34, "straggler_slowdown": 4.0}


def rows(db, run_id):
    with sqlite3.connect(db) as con:
        con.row_factory = sqlite3.Row
        return [tuple(r[c] for c in SAME) for r in con.execute("SELECT * FROM updates WHERE run_id=? ORDER BY seq",
                                                                (run_id,))]


def final_weights(db, run_id):
    with sqlite3.connect(db) as con:
        blob = con.execute("SELECT state FROM checkpoints WHERE run_id=?", (run_id,)).fetchone()[0]
    return pickle.loads(blob)["strategy"].weights


def assert_same_weights(a, b):
    """Bitwise: a resumed run repeats, in this process, the arithmetic of the uninterrupted one."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("strategy,extra", [
    ("fedbuff", {"update_filter": "clip", "norm_multiplier": 1.5}), ("fedavg", {}),
    ("abs", {"k": 2, "k_double_every": 0.05}), ("ad-psgd", {}),
    ("k-sync", {"k": 3}), ("d-psgd", {"codec": "topk", "codec_ratio": 0.3}), ("fedasync", {"dropout": 0.2}),
])
def test_a_stopped_run_resumed_is_the_uninterrupted_run(simulate, tmp_path, strategy, extra):
    whole = simulate(strategy, max_updates=60, checkpoint_every=7, db=tmp_path / "a.db", **FAST, **extra)
    part = simulate(strategy, max_updates=25, checkpoint_every=7, db=tmp_path / "b.db", **FAST, **extra)
    resumed = simulate(strategy, max_updates=60, checkpoint_every=7, db=tmp_path / "b.db",
                       resume=part.summary.run_id, **FAST, **extra)
    assert resumed.summary.run_id == part.summary.run_id
    assert rows(tmp_path / "b.db", part.summary.run_id) == rows(tmp_path / "a.db", whole.summary.run_id)
    assert_same_weights(resumed.summary.weights, whole.summary.weights)
    assert resumed.run_row()["status"] == "completed"


def test_sigkill_mid_run_then_resume_gives_the_same_run(tmp_path):
    settings = ["strategy='fedbuff'", "model='mlp'", "max-updates=400", "checkpoint-every=10", "eval-every=40",
                "compute-dist='shifted-exp'", "compute-jitter=1.0", "straggler-fraction=0.25",
                "straggler-slowdown=5.0", "local-steps=4"]
    cmd = [sys.executable, "-m", "server_app.simulate", "--nodes", "8", "--quiet"]

    def run(db, *more):
        args = [*cmd, *[f"--set={s}" for s in [*settings, f"metrics-db='{db}'"]], *more]
        return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    ref = run(tmp_path / "ref.db")
    victim = run(tmp_path / "crash.db")
    killed_at = None
    try:
        deadline = time.monotonic() + 120
        while killed_at is None and time.monotonic() < deadline:
            time.sleep(0.02)
            if not (tmp_path / "crash.db").exists():
                continue
            try:
                with sqlite3.connect(f"file:{tmp_path / 'crash.db'}?mode=ro", uri=True) as con:
                    got = con.execute("SELECT applied FROM checkpoints").fetchone()
            except sqlite3.OperationalError:
                continue
            if got and got[0] >= 100:
                os.kill(victim.pid, signal.SIGKILL)
                killed_at = got[0]
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
    assert killed_at is not None and victim.returncode == -signal.SIGKILL
    with sqlite3.connect(tmp_path / "crash.db") as con:
        run_id, status = con.execute("SELECT run_id, status FROM runs").fetchone()
        applied_before = con.execute("SELECT COUNT(*) FROM updates WHERE status='applied'").fetchone()[0]
    assert status == "running" and 100 <= applied_before < 400  # it died mid-run, as the store shows
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err

    resume = subprocess.run([*cmd, "--resume", run_id, f"--set=metrics-db='{tmp_path / 'crash.db'}'"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr
    with sqlite3.connect(tmp_path / "ref.db") as con:
        (ref_id,) = con.execute("SELECT run_id FROM runs").fetchone()
    got, want = rows(tmp_path / "crash.db", run_id), rows(tmp_path / "ref.db", ref_id)
    assert got == want  # same update sequence: nothing lost, nothing applied twice
    assert sum(r[SAME.index("status")] == "applied" for r in got) == 400
    assert_same_weights(final_weights(tmp_path / "crash.db", run_id), final_weights(tmp_path / "ref.db", ref_id))


def test_resume_errors_are_clear(simulate, tmp_path):
    db = tmp_path / "m.db"
    plain = simulate("fedbuff", max_updates=8, db=db, model="logreg", min_nodes=1)
    with pytest.raises(ConfigError, match="has no checkpoint: set checkpoint-every"):
        simulate("fedbuff", max_updates=8, db=db, model="logreg", min_nodes=1, resume=plain.summary.run_id)
    with pytest.raises(ConfigError, match="no such run"):
        simulate("fedbuff", max_updates=8, db=db, model="logreg", min_nodes=1, resume="12345")
    done = simulate("fedbuff", max_updates=8, db=db, model="logreg", min_nodes=1, checkpoint_every=4)
    cfg = RunConfig.from_mapping(json.loads(done.run_row()["config_json"]))
    store = MetricsStore(db)
    with pytest.raises(ConfigError, match="differs from the run's own"):
        reopen(store, cfg.replace(resume=done.summary.run_id, lr=0.5))
    store.close()


def test_in_process_resume_refuses_runs_with_node_state(simulate, tmp_path):
    db = tmp_path / "m.db"
    run = simulate("olco3", max_updates=12, db=db, checkpoint_every=4, model="logreg", min_nodes=1)
    r = subprocess.run([sys.executable, "-m", "server_app.simulate", "--resume", run.summary.run_id,
                        f"--set=metrics-db='{db}'"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "keeps its in-flight queues on the nodes" in r.stderr


def test_cli_resume_of_an_unknown_run_exits_2(tmp_path):
    db = tmp_path / "none.db"
    sqlite3.connect(db).close()
    MetricsStore(db).close()
    r = subprocess.run([sys.executable, "-m", "server_app.simulate", "--resume", "999", f"--set=metrics-db='{db}'"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no such run" in r.stderr
