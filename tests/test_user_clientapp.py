"""Existing Flower apps keep working: a quickstart-style ClientApp trains unchanged under every strategy."""

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("strategy", ["fedavg", "fedasync", "fedbuff"])
def test_quickstart_clientapp_through_the_cli(tmp_path, strategy):
    db = tmp_path / "m.db"
    cmd = [sys.executable, "-m", "server_app.simulate", "--clientapp", "tests.quickstart_client:app",
           "--nodes", "4", "--quiet",
           "--set", f"strategy='{strategy}'", "--set", "model='tests.user_models:Net'",
           "--set", "max-updates=16", "--set", "eval-every=4", "--set", "buffer-size=2",
           "--set", "lr=0.1", "--set", f"metrics-db='{db}'"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped on max-updates" in proc.stdout
    with sqlite3.connect(db) as con:
        statuses = dict(con.execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall())
        losses = [loss for (loss,) in con.execute("SELECT loss FROM evals ORDER BY t, rowid")]
        (run_status,) = con.execute("SELECT status FROM runs").fetchone()
    assert statuses.get("applied", 0) >= 12
    assert "rejected" not in statuses and "failed" not in statuses
    assert run_status == "completed"
    assert losses[-1] < losses[0]  # the user's own training made the global model better
