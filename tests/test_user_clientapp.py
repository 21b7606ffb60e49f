"""Existing Flower apps keep working: a quickstart-style ClientApp trains unchanged under every strategy."""

import sqlite3

import pytest

from server_app.simulate import main as simulate_cli


@pytest.mark.parametrize("strategy", ["fedavg", "fedasync", "fedbuff"])
def test_quickstart_clientapp_through_the_cli(tmp_path, capsys, strategy):
    # The command line's main() in this process (`python -m server_app.simulate` only adds sys.exit(main()), and
    # tests/test_checkpoint.py runs the real module): the same argument parsing, --clientapp loading, validation
    # and run, without an interpreter start-up (about 6 s) per strategy.
    db = tmp_path / "m.db"
    argv = ["--clientapp", "tests.quickstart_client:app",
            "--nodes", "4", "--quiet",
            "--set", f"strategy='{strategy}'", "--set", "model='tests.user_models:Net'",
            "--set", "max-updates=16", "--set", "eval-every=4", "--set", "buffer-size=2",
            "--set", "lr=0.1", "--set", f"metrics-db='{db}'"]
    rc = simulate_cli(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err[-2000:]
    assert "stopped on max-updates" in out
    with sqlite3.connect(db) as con:
        statuses = dict(con.execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall())
        losses = [loss for (loss,) in con.execute("SELECT loss FROM evals ORDER BY t, rowid")]
        (run_status,) = con.execute("SELECT status FROM runs").fetchone()
    assert statuses.get("applied", 0) >= 12
    assert "rejected" not in statuses and "failed" not in statuses
    assert run_status == "completed"
    assert losses[-1] < losses[0]  # the user's own training made the global model better
