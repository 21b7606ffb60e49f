"""Installable, with a ``staleflower`` command: ``runs list | show | export`` against a real store, every user
mistake one line and exit 2, and (slow) a real install, editable and from a wheel, used from outside the
repository: imports, the command, presets, the dashboard and the ``simulate`` fixture of a project of one's own.

The installs go into fresh virtual environments that reuse this interpreter's site-packages (a ``.pth`` line), from
a copy of the sources, with ``--no-deps --no-build-isolation --no-index``: nothing is downloaded, and nothing is
written into the repository.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from server_app import cli
from server_app.testing import simulate

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server_app", "client_app", "strategies", "dashboard")
#: Two runs whose ids share the suffix "2345" (ambiguous) and differ in "12345" / "22345" (each names one run).
RUN_A, RUN_B = 4_611_686_018_428_012_345, 4_611_686_018_428_022_345  # in [2**62, 2**63), as the runners draw


# ------------------------------------------------------------------------------------------------ in-process
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with two short real runs: FedBuff and FedAvg."""
    db = tmp_path_factory.mktemp("runs") / "metrics.db"
    simulate("fedbuff", db=db, nodes=2, max_updates=10, eval_every=5, run_id=RUN_A)
    simulate("fedavg", db=db, nodes=2, max_updates=4, eval_every=2, run_id=RUN_B)
    return db


def staleflower(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``staleflower ARGV`` in this process: exit status, stdout, stderr."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse's own errors and --help
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    return err


def sql(db: Path, query: str, *params: object) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query, params).fetchall()


def as_csv_field(value: object) -> str:
    return "" if value is None else str(value)


def test_runs_list_shows_every_run_with_its_applied_updates_and_final_accuracy(store, capsys):
    code, out, err = staleflower(capsys, "runs", "list", "--db", str(store))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["RUN", "ID", "STRATEGY", "STATUS", "STARTED", "UPDATES", "ACCURACY"]
    for run_id, strategy in ((RUN_A, "fedbuff"), (RUN_B, "fedavg")):
        (line,) = [ln for ln in lines if ln.startswith(str(run_id))]
        (applied,) = sql(store, "SELECT COUNT(*) FROM updates WHERE run_id=? AND status='applied'", str(run_id))[0]
        (acc,) = sql(store, "SELECT accuracy FROM evals WHERE run_id=? ORDER BY t DESC, rowid DESC LIMIT 1",
                     str(run_id))[0]
        fields = line.split()
        assert fields[1:3] == [strategy, "completed"]
        assert fields[-2:] == [str(applied), f"{acc:.4f}"]

    code, out, _ = staleflower(capsys, "runs", "list", "--db", str(store), "--json")
    listed = {r["run_id"]: r for r in json.loads(out)}
    assert listed[str(RUN_A)]["updates_applied"] == 10 and listed[str(RUN_B)]["strategy"] == "fedavg"
    assert [r["run_id"] for r in json.loads(out)] == [str(RUN_A), str(RUN_B)]  # oldest first


def test_runs_list_reads_the_runners_default_store(store, capsys, monkeypatch):
    monkeypatch.setenv("STALEFLOWER_METRICS_DB", str(store))  # what a run with an empty metrics-db writes
    code, out, _ = staleflower(capsys, "runs", "list")
    assert code == 0 and str(RUN_A) in out


def test_runs_show_gives_the_summary_and_the_config(store, capsys):
    code, out, err = staleflower(capsys, "runs", "show", "12345", "--db", str(store))  # the last digits suffice
    assert code == 0, err
    assert f"run        {RUN_A}" in out and "status     completed" in out
    assert "10 applied of" in out and "nodes      2" in out
    assert "max-updates = 10" in out and "model       = \"logreg\"" in out  # differs from the defaults
    assert "batch-size" not in out  # a default: only with --full-config
    code, out, _ = staleflower(capsys, "runs", "show", str(RUN_A), "--db", str(store), "--full-config")
    assert "batch-size  " in out

    code, out, _ = staleflower(capsys, "runs", "show", str(RUN_B), "--db", str(store), "--json")
    shown = json.loads(out)
    (config_json,) = sql(store, "SELECT config_json FROM runs WHERE run_id=?", str(RUN_B))[0]
    assert shown["config"] == json.loads(config_json)
    tasks = sql(store, "SELECT status, COUNT(*) FROM updates WHERE run_id=? GROUP BY status", str(RUN_B))
    assert shown["updates"]["by_status"] == dict(tasks)
    (acc,) = sql(store, "SELECT accuracy FROM evals WHERE run_id=? ORDER BY t DESC, rowid DESC LIMIT 1",
                 str(RUN_B))[0]
    assert shown["final"]["accuracy"] == acc and shown["strategy"] == "fedavg"


@pytest.mark.parametrize("table, order", [("updates", "seq"), ("evals", "t, rowid")])
def test_runs_export_csv_is_the_stores_rows(store, capsys, tmp_path, table, order):
    out_file = tmp_path / f"{table}.csv"
    code, _, err = staleflower(capsys, "runs", "export", str(RUN_A), "--table", table, "--format", "csv",
                               "-o", str(out_file), "--db", str(store))
    assert code == 0, err
    with sqlite3.connect(store) as conn:
        cur = conn.execute(f"SELECT * FROM {table} WHERE run_id=? ORDER BY {order}", (str(RUN_A),))
        header = [d[0] for d in cur.description]
        expected = [[as_csv_field(v) for v in row] for row in cur.fetchall()]
    got = list(csv.reader(out_file.open(newline="")))
    assert got[0] == header and got[1:] == expected and len(expected) >= 3
    # floats keep every digit: the file reads back to the same numbers
    assert [float(r[header.index("accuracy" if table == "evals" else "compute_s")]) for r in got[1:]] == [
        float(r[header.index("accuracy" if table == "evals" else "compute_s")]) for r in expected]

    code, out, _ = staleflower(capsys, "runs", "export", "12345", "--table", table, "--db", str(store))  # stdout
    assert code == 0 and list(csv.reader(io.StringIO(out))) == got
    assert not list(tmp_path.glob(f".{table}.csv.*"))  # no temporary file left behind


def test_runs_export_parquet_keeps_the_column_types(store, capsys, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out_file = tmp_path / "updates.parquet"
    code, _, err = staleflower(capsys, "runs", "export", str(RUN_B), "-o", str(out_file), "--db", str(store))
    assert code == 0, err  # the format from the suffix
    table = pq.read_table(out_file)
    with sqlite3.connect(store) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM updates WHERE run_id=? ORDER BY seq", (str(RUN_B),))]
    assert table.to_pylist() == rows
    types = {f.name: str(f.type) for f in table.schema}
    assert types["seq"] == "int64" and types["compute_s"] == "double" and types["status"] == "string"
    assert types["peer_id"] == "int64"  # all NULL here, still the declared type


@pytest.mark.parametrize("argv, says", [
    (["runs", "show", "999999"], "no run '999999'"),
    (["runs", "show", "2345"], "ambiguous: 2 runs"),
    (["runs", "export", "nope"], "no run 'nope'"),
    (["runs", "export", "12345", "--format", "xlsx"], "invalid choice: 'xlsx'"),
    (["runs", "export", "12345", "--table", "nodes"], "invalid choice: 'nodes'"),
    (["runs", "export", "12345", "--format", "parquet"], "writes a file: give -o FILE"),
    (["runs", "export", "12345", "-o", "/nonexistent-dir/x.csv"], "no directory /nonexistent-dir"),
    (["runs", "show"], "required: RUN_ID"),
    (["runs"], "required: list|show|export"),
    (["runs", "lsit"], "invalid choice: 'lsit'"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["run", "--run-config", "no-such-preset"], "no preset 'no-such-preset'"),
    (["compare", "--run-config", "configs/no-such-preset.toml"], "no preset 'no-such-preset'"),
])
def test_user_mistakes_are_one_line_and_exit_2(store, capsys, argv, says):
    db = ["--db", str(store)] if argv[0] == "runs" and len(argv) > 1 and argv[1] in ("show", "export") else []
    code, out, err = staleflower(capsys, *argv, *db)
    assert says in one_line_error(code, err) and out == ""


def test_stores_that_cannot_be_read_are_one_line_and_exit_2(capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a database, just text long enough to be read as a header by sqlite\n" * 10)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE t(x)").connection.commit()
    cases = [(tmp_path / "missing.db", "no metrics store at"), (text, "cannot read"), (tmp_path, "not a file"),
             (other, "not a staleflower metrics store (no table evals, runs, updates)")]
    for path, says in cases:
        for argv in (["runs", "list"], ["runs", "show", "1"], ["runs", "export", "1"]):
            code, out, err = staleflower(capsys, *argv, "--db", str(path))
            assert says in one_line_error(code, err) and out == "", (argv, path)


def test_an_empty_store_lists_no_runs(capsys, tmp_path):
    from server_app.store import SCHEMA

    db = tmp_path / "fresh.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(SCHEMA)
    assert staleflower(capsys, "runs", "list", "--db", str(db))[:2] == (0, "no runs in this store yet\n")


def test_presets_are_found_by_name_from_any_directory(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    expected = str(ROOT / "configs" / "fedbuff-digits.toml")
    for spelling in ("fedbuff-digits", "fedbuff-digits.toml", "configs/fedbuff-digits.toml"):
        assert cli.resolve_run_config(spelling) == expected
    own = tmp_path / "configs" / "fedbuff-digits.toml"  # a file of the user's own wins over the preset
    own.parent.mkdir()
    own.write_text("max-updates = 3\n")
    assert cli.resolve_run_config("configs/fedbuff-digits.toml") == "configs/fedbuff-digits.toml"
    assert cli.with_presets(["--nodes", "2", "--run-config=ssp", "--set", "x=1"])[2] == \
        "--run-config=" + str(ROOT / "configs" / "ssp.toml")
    pairs = ["--run-config", "fedbuff-digits", "--run-config", "max-updates=5 lr=0.1"]  # flwr run's pairs: as given
    assert cli.with_presets(pairs) == ["--run-config", expected, "--run-config", "max-updates=5 lr=0.1"]
    assert cli.resolve_run_config("elsewhere/missing.toml") == "elsewhere/missing.toml"  # the runner says missing
    code, out, _ = staleflower(capsys, "presets")
    assert code == 0 and {ln.split()[0] for ln in out.splitlines()} == {p.stem for p in ROOT.glob("configs/*.toml")}


def test_dashboard_command_is_the_makefiles(tmp_path):
    cmd = cli.dashboard_command(str(tmp_path / "m.db"), None, "127.0.0.1", 8600, headless=True)
    app = Path(cmd[cmd.index("run") + 1])
    assert app == ROOT / "dashboard" / "app.py" and (app.parent / ".streamlit" / "config.toml").is_file()
    flags = " ".join(cmd)
    assert "--server.address 127.0.0.1" in flags and "--browser.gatherUsageStats false" in flags
    assert "--server.port 8600" in flags and "--server.headless true" in flags
    assert cmd[-3:] == ["--", "--db", str(tmp_path / "m.db")]


def test_help_imports_nothing_heavy():
    probe = ("import sys\nfrom server_app import cli\n"
             "for argv in ([], ['--help'], ['runs', '--help'], ['runs', 'export', '--help']):\n"
             "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
             "print(sorted(m for m in ('torch', 'flwr', 'numpy', 'pandas', 'streamlit', 'strategies') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------------------------ real installs
def copy_sources(dest: Path) -> Path:
    """What packaging reads, copied: the install never writes into the repository."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    for name in (*PACKAGES, "configs"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def fresh_venv(path: Path) -> Path:
    """A virtual environment without pip that sees this interpreter's packages (torch, flwr, pytest...)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    site = Path(subprocess.check_output([path / "bin" / "python", "-c", "import sysconfig; "
                                         "print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    (site / "_staleflower_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return path / "bin"


def pip_install(bindir: Path, *args: str) -> None:
    done = subprocess.run([bindir / "python", "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                           "--no-index", "--disable-pip-version-check", "-q", *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def outside_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS", "VIRTUAL_ENV")}
    env.update(FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def sh(cwd: Path, *argv: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in argv], cwd=cwd, env=outside_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


USER_TEST = '''
from strategies import Strategy, Verdict
from strategies.base import step


class HalfStep(Strategy):  # a strategy of the user's own project
    def apply(self, update):
        self._publish(step(self.weights, update.delta, 0.5))
        return Verdict("applied", applied=(update.seq,))


def test_half_step(simulate):  # the fixture comes from the installed plugin: no conftest.py
    run = simulate(HalfStep, nodes=2, max_updates=6)
    assert run.summary.applied == 6
    assert run.run_row()["strategy"].endswith(":HalfStep")
'''


@pytest.mark.slow
@pytest.mark.deployment  # installing the package: make test-deployment (make test keeps its 4-minute budget)
def test_editable_install_works_from_another_directory(tmp_path):
    """README's route: ``pip install -e .``, then the packages, the command and the fixture from elsewhere."""
    src = copy_sources(tmp_path / "src")
    bindir = fresh_venv(tmp_path / "venv")
    pip_install(bindir, "-e", str(src))
    away = tmp_path / "elsewhere"
    away.mkdir()

    where = sh(away, bindir / "python", "-c", "import server_app, client_app, strategies, dashboard, "
               "server_app.testing; print(server_app.__file__, list(dashboard.__path__)[0])").stdout.split()
    assert where == [str(src / "server_app" / "__init__.py"), str(src / "dashboard")]
    assert "runs" in sh(away, bindir / "staleflower", "--help").stdout

    db = away / "metrics.db"  # a preset by the repository's spelling, from a directory without it
    sh(away, bindir / "staleflower", "run", "--run-config", "configs/fedbuff-digits.toml", "--nodes", "2",
       "--set", "model='logreg'", "--set", "local-steps=2", "--set", "max-updates=5", "--set", f"metrics-db='{db}'",
       "--quiet")
    listed = sh(away, bindir / "staleflower", "runs", "list", "--db", db).stdout.splitlines()
    assert len(listed) == 2 and listed[1].split()[1:3] == ["fedbuff", "completed"]

    project = away / "my_project"
    project.mkdir()
    (project / "pytest.ini").write_text("[pytest]\n")  # the user's own project: not this repository's config
    (project / "test_mine.py").write_text(USER_TEST)
    done = sh(project, bindir / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_mine.py")
    assert "1 passed" in done.stdout


@pytest.mark.slow
@pytest.mark.deployment  # installing the package: make test-deployment (make test keeps its 4-minute budget)
def test_wheel_ships_presets_dashboard_and_plugin(tmp_path):
    """``pip wheel .`` then install: the presets and the dashboard's safe config travel inside the package."""
    src = copy_sources(tmp_path / "src")
    bindir = fresh_venv(tmp_path / "venv")
    dist = tmp_path / "dist"
    sh(src, bindir / "python", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
       "--disable-pip-version-check", "-q", "-w", dist, ".")
    (wheel,) = dist.glob("staleflower-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"server_app/presets/{p.name}" for p in ROOT.glob("configs/*.toml")} <= names
    assert {"dashboard/app.py", "dashboard/.streamlit/config.toml", "server_app/cli.py", "server_app/testing.py",
            "client_app/app.py", "strategies/base.py"} <= names
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "staleflower = server_app.cli:main" in meta and "server_app.testing = server_app.testing" in meta
    assert not any(n.startswith(("tests/", "bench/", "configs/")) for n in names)

    pip_install(bindir, str(wheel))
    away = tmp_path / "elsewhere"
    away.mkdir()
    site = sh(away, bindir / "python", "-c", "import server_app, dashboard; print(server_app.__file__)").stdout
    assert site.strip().startswith(str(tmp_path / "venv"))
    presets = sh(away, bindir / "staleflower", "presets").stdout
    assert {ln.split()[0] for ln in presets.splitlines()} == {p.stem for p in ROOT.glob("configs/*.toml")}

    db = away / "metrics.db"
    with sqlite3.connect(db) as conn:
        from server_app.store import SCHEMA

        conn.executescript(SCHEMA)
    start_dashboard_and_check_health(bindir, away, db)

    sh(away, bindir / "staleflower", "run", "--run-config", "fedbuff-digits", "--nodes", "2", "--set",
       "model='logreg'", "--set", "max-updates=4", "--set", f"metrics-db='{db}'", "--quiet")
    assert "fedbuff" in sh(away, bindir / "staleflower", "runs", "list", "--db", db).stdout


def start_dashboard_and_check_health(bindir: Path, cwd: Path, db: Path) -> None:
    """``staleflower dashboard`` on a free port answers Streamlit's health check, then stops on Ctrl-C."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([bindir / "staleflower", "dashboard", "--headless", "--port", str(port), "--db", db],
                            cwd=cwd, env=outside_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as reply:
                    assert reply.read() == b"ok"
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()[0]
                assert time.monotonic() < deadline, "the dashboard did not answer within 60 s"
                time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            output = proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
    assert "127.0.0.1" in output and "Traceback" not in output, output
