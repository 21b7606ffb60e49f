"""Existing Flower apps keep working: a quickstart-style ClientApp trains unchanged under every strategy."""

import sqlite3
from pathlib import Path

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


# ------------------------------------------------------------------ a ClientApp shaped like `flwr new`'s template
TEMPLATE = Path(__file__).parent / "template_app"


def _template_run(tmp_path, capsys, *sets: str, nodes: int = 4) -> tuple[int, str, str, Path]:
    """``python -m server_app.simulate --app tests/template_app`` in this process; the app's pyproject.toml gives
    its ClientApp, its model on flattened digits, its evaluate_fn and its own key ``local-epochs``."""
    db = tmp_path / "m.db"
    argv = ["--app", str(TEMPLATE), "--nodes", str(nodes), "--quiet", "--set", f"metrics-db='{db}'",
            *[a for s in sets for a in ("--set", s)]]
    rc = simulate_cli(argv)
    out, err = capsys.readouterr()
    return rc, out, err, db


@pytest.mark.parametrize("strategy", ["fedbuff", "fedasync", "abs"])
def test_the_template_clientapp_trains_with_its_own_local_epochs(tmp_path, capsys, monkeypatch, strategy):
    monkeypatch.syspath_prepend(str(TEMPLATE))  # what --app does for the run, done first to see the module
    from templateapp import task

    task.EPOCHS_SEEN.clear()
    rc, out, err, db = _template_run(tmp_path, capsys, f"strategy='{strategy}'", "local-epochs=2", "buffer-size=2")
    assert rc == 0, err[-2000:]
    assert task.EPOCHS_SEEN and set(task.EPOCHS_SEEN) == {2}  # its own key reached it, with the value we set
    with sqlite3.connect(db) as con:
        statuses = dict(con.execute("SELECT status, COUNT(*) FROM updates GROUP BY status").fetchall())
        accs = [a for (a,) in con.execute("SELECT accuracy FROM evals ORDER BY t, rowid")]
        (config,) = con.execute("SELECT config_json FROM runs").fetchone()
    assert statuses.get("applied", 0) >= 24 and not {"rejected", "failed"} & set(statuses), statuses
    assert accs[-1] > accs[0] + 0.2, accs  # the app's evaluate_fn saw its own training make the model better
    assert '"local-epochs": 2' in config  # recorded with the run, like every key


def test_federated_evaluation_asks_the_clientapps_evaluate(tmp_path, capsys):
    rc, out, err, db = _template_run(tmp_path, capsys, "evaluation='federated'", "evaluate-nodes=2",
                                     "max-updates=16")
    assert rc == 0, err[-2000:]
    with sqlite3.connect(db) as con:
        accs = [a for (a,) in con.execute("SELECT accuracy FROM evals ORDER BY t, rowid")]
    assert len(accs) >= 3 and all(0.0 <= a <= 1.0 for a in accs)
    assert accs[-1] > accs[0], accs  # the nodes' eval_acc, averaged by their num-examples


@pytest.mark.parametrize(("sets", "reason"), [
    (["strategy='olco3'"], "runs its own client half"),
    (["codec='topk'"], "codec = 'topk' is applied by staleflower's ClientApp"),
])
def test_what_a_stock_clientapp_cannot_serve_is_refused_before_training(tmp_path, capsys, sets, reason):
    rc, out, err, db = _template_run(tmp_path, capsys, *sets)
    assert rc == 2, err
    assert reason in err and "none of the 4 nodes runs it" in err and "fedbuff" in err
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*) FROM updates").fetchone() == (0,)  # refused before any task


@pytest.mark.parametrize(("item", "message"), [
    ("lcoal-epochs=3", "did you mean 'local-epochs'?"),
    ("local-epochs='two'", "local-epochs must be int"),
])
def test_the_apps_keys_are_checked_like_ours(tmp_path, capsys, item, message):
    rc, out, err, db = _template_run(tmp_path, capsys, item)
    assert rc == 2 and message in err, err


def test_without_its_evaluation_a_model_on_other_inputs_is_refused_with_the_way_out(tmp_path, capsys):
    rc, out, err, db = _template_run(tmp_path, capsys, "evaluate-fn=''")
    assert rc == 2
    assert "failed on an input of shape (N, 1, 8, 8)" in err and "evaluate-fn" in err and "federated" in err


def test_help_lists_the_keys_the_app_declares(capsys):
    with pytest.raises(SystemExit) as exit_:
        simulate_cli(["--app", str(TEMPLATE), "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "local-epochs (int, default 1)" in out and "num-server-rounds (int, default 3)" in out


def test_the_fixture_runs_an_app_directory(simulate):
    run = simulate("fedasync", app=TEMPLATE, nodes=3, local_epochs=1, max_updates=6, eval_every=3)
    assert run.summary.stop_reason == "max-updates"
    assert '"local-epochs": 1' in run.run_row()["config_json"]
