"""Runs that talk: progress while they run, a summary in human units, a fast ``--help``, and ``make run``'s check.

The check of ``make run`` (``scripts/flwr_run.sh``) is ``python -m server_app.simulate --check``: a mistake ends it
with one line and exit code 2 before any SuperLink starts.
"""

from __future__ import annotations

import io
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.common.config import parse_config_args

from server_app import progress, simulate
from server_app.progress import Lines, RunStats, format_summary, human_bytes, human_duration
from server_app.state import RunSummary
from strategies.config import RunConfig

ROOT = Path(__file__).parents[1]
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
       "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONPATH": str(ROOT)}


def _summary(statuses: dict[str, int] | None = None) -> RunSummary:
    return RunSummary(run_id="42", stop_reason="max-updates", time=61.25, version=96, applied=480,
                      bytes_up=22_412_345, bytes_down=1_120_765, loss=0.3012, accuracy=0.912,
                      statuses={"rejected": 1, "buffered": 8, "applied": 480} if statuses is None else statuses,
                      weights=[np.zeros(2)])


# ------------------------------------------------------------------------------------------------ the summary
def test_the_summary_speaks_human_units() -> None:
    cfg = RunConfig(max_updates=480, target_accuracy=0.9, metrics_db="/tmp/m.db")
    text = format_summary(_summary(), cfg, wall_s=125.4,
                          stats=RunStats(staleness_mean=1.5, staleness_max=4, time_to_target=40.0))
    assert "stopped on max-updates · accuracy 0.9120 · loss 0.3012" in text
    assert "tasks: applied 480 · buffered 8 · rejected 1" in text  # applied, buffered first; no dict
    assert "up 22.4 MB · down 1.1 MB" in text
    assert "staleness of applied updates: mean 1.50 · max 4" in text
    assert "target accuracy 0.9: reached at t=40.0 s" in text
    assert "t=61.2 s on the run's clock · wall 2 min 05 s" in text
    assert text.splitlines()[-1] == "metrics store: /tmp/m.db"  # scripts/flwr_run.sh reads it
    assert "{" not in text and "bytes up=" not in text


def test_a_missed_target_and_no_stats_say_so() -> None:
    cfg = RunConfig(max_updates=480, target_accuracy=0.99, metrics_db="/tmp/m.db")
    text = format_summary(_summary(statuses={}), cfg, sep=" | ")
    assert "target accuracy 0.99: not reached" in text and "tasks: none" in text
    assert "staleness" not in text and "wall" not in text and "·" not in text


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (999, "999 B"), (1_500, "1.5 kB"), (1_120_845, "1.1 MB"),
                                         (3.2e9, "3.2 GB")])
def test_human_bytes(n: float, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(("s", "text"), [(8.25, "8.2 s"), (59.94, "59.9 s"), (125, "2 min 05 s"),
                                         (3725, "1 h 02 min")])
def test_human_duration(s: float, text: str) -> None:
    assert human_duration(s) == text


def test_run_stats_read_the_store_as_the_dashboard_does(simulate: object, tmp_path: Path) -> None:
    run = simulate("fedbuff", max_updates=20, eval_every=5, target_accuracy=0.3)  # type: ignore[operator]
    stats = progress.run_stats(run.db, run.summary.run_id, 0.3)
    with sqlite3.connect(run.db) as db:
        mean, top = db.execute("SELECT AVG(staleness), MAX(staleness) FROM updates WHERE run_id=? AND "
                               "status='applied'", (run.summary.run_id,)).fetchone()
        first = db.execute("SELECT MIN(t) FROM evals WHERE run_id=? AND accuracy >= 0.3",
                           (run.summary.run_id,)).fetchone()[0]
    assert (stats.staleness_mean, stats.staleness_max, stats.time_to_target) == (mean, top, first)
    assert progress.run_stats(tmp_path / "none.db", "1") == RunStats()  # no store: no numbers, no error


def test_the_summary_names_the_score_the_target_read_when_it_is_not_the_average(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE updates (run_id TEXT, staleness INTEGER, status TEXT)")
        con.execute("CREATE TABLE evals (run_id TEXT, t REAL, accuracy REAL, metrics_json TEXT)")
        rows = [(1.0, 0.91, 0.85, 0.80), (2.0, 0.93, 0.90, 0.84), (3.0, 0.95, 0.93, 0.91)]
        con.executemany("INSERT INTO evals VALUES ('g', ?, ?, ?)",
                        [(t, a, json.dumps({"local-acc-mean": m, "local-acc-min": w})) for t, a, m, w in rows])
        con.executemany("INSERT INTO evals VALUES ('s', ?, ?, ?)", [(1.0, 0.85, "{}"), (2.0, 0.9, None)])
    assert progress.run_stats(db, "g", 0.9) == RunStats(time_to_target=1.0)  # the average: the default here
    assert progress.run_stats(db, "g", 0.9, "local-mean") == RunStats(None, None, 2.0, "node models' mean")
    assert progress.run_stats(db, "g", 0.9, "local-min") == RunStats(None, None, 3.0, "worst node model")
    assert progress.run_stats(db, "s", 0.9, "local-mean") == RunStats(time_to_target=2.0)  # a star run: no label
    cfg = RunConfig(max_updates=480, target_accuracy=0.9, metrics_db="/tmp/m.db")
    text = format_summary(_summary(), cfg, stats=progress.run_stats(db, "g", 0.9, "local-mean"))
    assert "target accuracy 0.9 (node models' mean): reached at t=2.0 s" in text
    assert "target accuracy 0.9: reached at t=1.0 s" in format_summary(_summary(), cfg,
                                                                      stats=progress.run_stats(db, "g", 0.9))


def test_progress_lines_show_the_score_the_target_reads_beside_the_average() -> None:
    r = progress.Reporter()
    local = {"local-acc-mean": 0.8512, "local-acc-min": 0.7, "local-acc-nodes": 6}
    r.start(RunConfig(max_updates=100, target_accuracy=0.9), "1")
    r.evaluation(50, 5.0, 0.875, local)
    assert "acc 0.875 · node models' mean 0.851" in r.line()
    r.evaluation(60, 6.0, 0.88, {})  # no local scores (a star strategy): the average is what the target reads
    assert "node" not in r.line()
    for cfg in (RunConfig(max_updates=100, target_accuracy=0.9, target_score="average"), RunConfig(max_updates=100)):
        r.start(cfg, "2")
        r.evaluation(50, 5.0, 0.875, local)
        assert "node" not in r.line() and "acc 0.875" in r.line()


# ------------------------------------------------------------------------------------------------ progress
def test_progress_lines_come_at_each_tenth_and_never_twice() -> None:
    out = io.StringIO()
    lines = Lines(stream=out)
    lines.start(RunConfig(max_updates=200, eval_every=10), "7")
    for applied in range(0, 201, 10):
        for _ in range(10):
            lines.task(applied, applied / 10)
        lines.evaluation(applied, applied / 10, 0.5 + applied / 1000)
    lines.evaluation(200, 20.0, 0.7)  # the final evaluation repeats the last one
    lines.close()
    shown = out.getvalue().splitlines()
    assert shown[0].startswith("staleflower run 7: fedbuff, virtual clock, until 200 updates")
    assert [s.split(" · ")[0] for s in shown[1:]] == [f"updates {a}/200 ({a // 2}%)" for a in range(0, 201, 20)]
    assert "ETA" in shown[-2] and "ETA" not in shown[-1]
    assert "t=12.0 s · acc 0.620" in shown[7]


def test_progress_of_a_time_limited_run() -> None:
    r = progress.Reporter()
    r.start(RunConfig(max_updates=0, max_time=300.0), "1")
    r.evaluation(12, 75.0, 0.5)
    assert r.line().startswith("updates 12 · t=75.0/300 s (25%) · acc 0.500")


def test_no_reporter_outside_a_run() -> None:
    progress.task(3, 1.0)  # the ledger's hooks outside any run: nothing, no error
    progress.evaluation(3, 1.0, 0.5)


def test_the_cli_shows_no_bar_when_not_on_a_terminal_and_nothing_with_quiet(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert type(simulate._reporter(quiet=True)) is progress.Reporter
    assert type(simulate._reporter(quiet=False)) is Lines  # captured output is no terminal
    argv = ["--nodes", "2", "--set", "model='logreg'", "--set", "local-steps=2", "--set", "max-updates=20",
            "--set", f"metrics-db='{tmp_path / 'm.db'}'"]
    assert simulate.main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("staleflower run ") and "updates 0/20" not in out and out.count("stopped on") == 1
    assert simulate.main(argv) == 0
    out = capsys.readouterr().out
    assert "updates 0/20 (0%)" in out and "updates 20/20 (100%)" in out and out.count("stopped on") == 1
    assert "\r" not in out and "\x1b" not in out  # no bar, no terminal codes


def test_the_real_cli_off_a_terminal_prints_each_line_once(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "server_app.simulate", "--nodes", "2", "--set", "model='logreg'",
                        "--set", "local-steps=2", "--set", "max-updates=20", "--set", "eval-every=10",
                        "--set", f"metrics-db='{tmp_path / 'm.db'}'"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stdout + p.stderr and "\x1b" not in p.stdout + p.stderr
    assert p.stdout.count("updates 20/20 (100%)") == 1 and p.stdout.count("stopped on") == 1
    assert "version=" not in p.stderr  # the engine's line per evaluation: the progress lines say it


# ------------------------------------------------------------------------------------------------ start-up
def test_help_imports_neither_torch_nor_flower() -> None:
    code = ("import runpy, sys\n"
            "sys.argv = ['simulate', '--help']\n"
            "try:\n    runpy.run_module('server_app.simulate', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('IMPORTED', [m for m in ('torch', 'flwr', 'numpy') if m in sys.modules])\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "--run-config" in p.stdout and "IMPORTED []" in p.stdout


# ------------------------------------------------------------------------------------- make run's check
def test_the_check_catches_a_typo_with_did_you_mean(capsys: pytest.CaptureFixture[str]) -> None:
    assert simulate.main(["--check", "--nodes", "10", "--run-config", "configs/fedbuff-digits.toml",
                          "--run-config", "max-update=50"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown run-config key(s): 'max-update' (did you mean 'max-updates'?)")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(("items", "message"), [
    (["configs/nope.toml"], "run-config file not found: configs/nope.toml"),
    (["lr='fast'"], "lr must be float"),
    (["max-updates=50 oops"], "expected space-separated KEY=VALUE pairs, got 'oops'"),
    (["min-nodes=20"], "--nodes 10 is fewer than min-nodes = 20"),
])
def test_the_check_refuses_in_one_line(items: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--check", "--nodes", "10"] + [a for item in items for a in ("--run-config", item)]
    assert simulate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_a_preset_and_overrides_merge_into_one_flwr_run_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("STALEFLOWER_METRICS_DB", str(tmp_path / "default.db"))
    items = ["configs/stragglers-fedbuff.toml", "max-updates=50 lr=0.01 strategy=fedasync", "eval-every=5"]
    assert simulate.main(["--check", "--print-run-config", "--nodes", "10",
                          *[a for item in items for a in ("--run-config", item)]]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1
    merged = parse_config_args([out])  # exactly what flwr run makes of it
    assert merged["max-updates"] == 50 and merged["lr"] == 0.01 and merged["strategy"] == "fedasync"
    assert merged["eval-every"] == 5 and merged["straggler-fraction"] == 0.2  # the preset's own keys stay
    assert merged["metrics-db"] == str(tmp_path / "default.db")  # absolute: the ServerApp's cwd is not ours
    # flwr run fills in the rest from pyproject.toml: the very config the preset and the overrides make
    assert simulate.merge_config(overrides=merged) == simulate.merge_config(
        items, overrides={"metrics-db": str(tmp_path / "default.db")})


def test_flwr_run_config_strings_round_trip_through_flower() -> None:
    values = {"profiles": "wifi=0.5,4g=0.5", "data-dir": "/data/it's here", "error-feedback": True, "lr": 1e-5,
              "seed": 2**62, "metrics-db": "/tmp/a b.db"}
    assert parse_config_args([simulate.flwr_run_config(values)]) == values


def test_make_run_passes_the_preset_set_and_db_to_the_check() -> None:
    p = subprocess.run(["make", "-n", "run", "CONFIG=configs/fedbuff-digits.toml", "SET=max-updates=50 lr=0.01",
                        "DB=results/x.db"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    cmd = p.stdout[p.stdout.index("scripts/flwr_run.sh"):]
    assert ('--run-config "configs/fedbuff-digits.toml"' in cmd and '--run-config "max-updates=50 lr=0.01"' in cmd
            and f"--run-config \"metrics-db='{ROOT / 'results/x.db'}'\"" in cmd)


def test_the_script_stops_at_a_typo_before_any_superlink(tmp_path: Path) -> None:
    home = tmp_path / "flwr-home"
    p = subprocess.run(["bash", str(ROOT / "scripts/flwr_run.sh"), "--run-config", "max-update=5"], cwd=tmp_path,
                       env={**ENV, "FLWR_HOME": str(home), "VENV": str(Path(sys.executable).parents[1])},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    assert "did you mean 'max-updates'?" in p.stderr and "nothing was started" in p.stderr
    assert not home.exists()  # no SuperLink, not even its state directory


def test_one_results_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """make run, simulate, bare flwr run and make dashboard: one default store, unless DB= or metrics-db says."""
    from dashboard.queries import default_db

    assert re.search(r"^DB\s*\?=\s*$", (ROOT / "Makefile").read_text(), re.M)  # no DB: the runners' default
    assert "results/metrics.db" not in (ROOT / "scripts/flwr_run.sh").read_text()
    assert default_db([]) == str(RunConfig().metrics_path()) == str(Path("~/.staleflower/metrics.db").expanduser())
    monkeypatch.setenv("STALEFLOWER_METRICS_DB", str(tmp_path / "elsewhere.db"))
    assert default_db([]) == str(RunConfig().metrics_path()) == str(tmp_path / "elsewhere.db")
