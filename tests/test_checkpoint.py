"""Crash-safe runs: SIGKILL the in-process runner mid-run, resume it, and get the uninterrupted run exactly."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server_app import checkpoint
from server_app.app import reopen
from server_app.simulate import main as simulate_cli
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
    store = MetricsStore(db)
    try:
        return store.load_checkpoint(run_id, checkpoint.load).policy.weights  # verified, then unpickled
    finally:
        store.close()


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
    # The victim is a real `python -m server_app.simulate` process, SIGKILLed once a checkpoint holds >= 60
    # updates; the reference run and the `--resume` run go through the same command line (``main``) in this
    # process, which saves two interpreter start-ups. logreg and 160 updates (was mlp, 400): the killed run still
    # has more than a third of its work to do (about a second) when it dies.
    total, kill_after = 160, 60
    settings = ["strategy='fedbuff'", "model='logreg'", f"max-updates={total}", "checkpoint-every=10",
                "eval-every=40", "compute-dist='shifted-exp'", "compute-jitter=1.0", "straggler-fraction=0.25",
                "straggler-slowdown=5.0", "local-steps=2"]
    options = ["--nodes", "8", "--quiet"]

    def args(db):
        return [*options, *[f"--set={s}" for s in [*settings, f"metrics-db='{db}'"]]]

    victim = subprocess.Popen([sys.executable, "-m", "server_app.simulate", *args(tmp_path / "crash.db")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed_at = None
    try:
        assert simulate_cli(args(tmp_path / "ref.db")) == 0  # the uninterrupted run, while the victim starts
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
            if got and got[0] >= kill_after:
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
    assert status == "running" and kill_after <= applied_before < total  # it died mid-run, as the store shows

    assert simulate_cli([*options, "--resume", run_id, f"--set=metrics-db='{tmp_path / 'crash.db'}'"]) == 0
    with sqlite3.connect(tmp_path / "ref.db") as con:
        (ref_id,) = con.execute("SELECT run_id FROM runs").fetchone()
    got, want = rows(tmp_path / "crash.db", run_id), rows(tmp_path / "ref.db", ref_id)
    assert got == want  # same update sequence: nothing lost, nothing applied twice
    assert sum(r[SAME.index("status")] == "applied" for r in got) == total
    assert_same_weights(final_weights(tmp_path / "crash.db", run_id), final_weights(tmp_path / "ref.db", ref_id))


def test_resume_errors_are_clear(simulate, tmp_path):
    db = tmp_path / "m.db"
    plain = simulate("fedbuff", max_updates=8, db=db, model="logreg", min_nodes=1, checkpoint_every=0)
    with pytest.raises(ConfigError, match="has no checkpoint: set checkpoint-every"):
        simulate("fedbuff", max_updates=8, db=db, model="logreg", min_nodes=1, checkpoint_every=0,
                 resume=plain.summary.run_id)
    with pytest.raises(ConfigError, match="no such run"):
        simulate("fedbuff", max_updates=8, db=db, model="logreg", min_nodes=1, resume="12345")
    done = simulate("fedbuff", max_updates=8, db=db, model="logreg", min_nodes=1, checkpoint_every=4)
    cfg = RunConfig.from_mapping(json.loads(done.run_row()["config_json"]))
    store = MetricsStore(db)
    with pytest.raises(ConfigError, match="differs from the run's own"):
        reopen(store, cfg.replace(resume=done.summary.run_id, lr=0.5))
    store.close()


# The command line's main() in this process: its exit status and stderr are what `python -m server_app.simulate`
# returns and prints (the module only does sys.exit(main())); the sigkill test above runs the real module.
def test_in_process_resume_refuses_runs_with_node_state(simulate, tmp_path, capsys):
    db = tmp_path / "m.db"
    run = simulate("olco3", max_updates=12, db=db, checkpoint_every=4, model="logreg", min_nodes=1)
    capsys.readouterr()
    rc = simulate_cli(["--resume", run.summary.run_id, f"--set=metrics-db='{db}'"])
    assert rc == 2 and "keeps its in-flight queues on the nodes" in capsys.readouterr().err


def test_cli_resume_of_an_unknown_run_exits_2(tmp_path, capsys):
    db = tmp_path / "none.db"
    sqlite3.connect(db).close()
    MetricsStore(db).close()
    rc = simulate_cli(["--resume", "999", f"--set=metrics-db='{db}'"])
    assert rc == 2 and "no such run" in capsys.readouterr().err
