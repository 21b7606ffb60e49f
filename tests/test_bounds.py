"""Bounds and malformed input: every config or command-line mistake is one line and exit 2, never a traceback or a
hang; a run whose global model stops being finite ends ``failed`` with the reason, its last good checkpoint kept.

The command-line cases run in-process through ``main`` (each stops before any training), and a few of them
again as real subprocesses to prove the exit code and that nothing but one line reaches stderr.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server_app import compare, simulate
from server_app.profiles import EXCERPT_CHARS, MAX_PROFILE_FILE_BYTES, ProfileError, check_profile_file
from strategies.base import ModelNotFinite, Status, Strategy, Update, Verdict
from strategies.config import ConfigError, RunConfig
from tests.hostile import ScalingClient

ROOT = Path(__file__).resolve().parent.parent

# Each value is past its key's upper bound (strategies/config.py says why each bound is where it is).
OUT_OF_RANGE = {
    "buffer-size": 10**9, "local-steps": 10**12, "server-lr": 1e300, "lr": 1e300, "seed": 2**64, "seed ": 2**63,
    "batch-size": 10**9, "k": 10**9, "min-nodes": 10**6, "concurrency": 10**6, "max-updates": 10**12,
    "max-time": 1e300, "task-ttl": 1e300, "delay": 10**9, "codec-levels": 70000, "codec-rank": 10**6,
    "compute-jitter": 1e300, "staleness-b": 1e300, "norm-window": 10**9, "dirichlet-alpha": 1e300,
    "prox-mu": 1e300, "checkpoint-every": 2**64, "lr  ": 10**400,
}


@pytest.mark.parametrize(("key", "value"), list(OUT_OF_RANGE.items()))
def test_out_of_range_values_are_config_errors(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=rf"{key.strip()}.*(out of range|beyond 64-bit)"):
        RunConfig.from_mapping({key.strip(): value})  # type: ignore[dict-item]


def test_defaults_and_bounds_hold_together() -> None:
    RunConfig()  # every default within its bounds
    RunConfig.from_mapping({"seed": 2**63 - 1, "local-steps": 10**6, "buffer-size": 10**5, "server-lr": 1e3})
    with pytest.raises(ConfigError, match="at most 4096"):
        RunConfig.from_mapping({"data-dir": "x" * 5000})


def _bad_toml(tmp: Path) -> str:
    (tmp / "bad.toml").write_text('strategy = "fedavg\n')
    return str(tmp / "bad.toml")


def _binary(tmp: Path) -> str:
    (tmp / "bin.toml").write_bytes(b"\xff\xfe\x00garbage")
    return str(tmp / "bin.toml")


def _not_csv(tmp: Path) -> str:
    (tmp / "p.csv").write_text("node,device\nsecret-token-abcdefghijklmnopqrstuvwxyz0123456789,phone\n")
    return str(tmp / "p.csv")


def _nul_csv(tmp: Path) -> str:
    (tmp / "environ").write_bytes(b"SECRET=hunter2\x00HOME=/root\x00")
    return str(tmp / "environ")


def _latin1_csv(tmp: Path) -> str:
    (tmp / "l.csv").write_bytes(b"node,device\n0,caf\xe9\n")
    return str(tmp / "l.csv")


def _huge_csv(tmp: Path) -> str:
    (tmp / "h.csv").write_text("node\n" + "0\n" * (MAX_PROFILE_FILE_BYTES // 2 + 1))
    return str(tmp / "h.csv")


def _bad_quote_csv(tmp: Path) -> str:
    (tmp / "q.csv").write_text('node,device\n0,"phone' + "x" * 200_000 + "\n")
    return str(tmp / "q.csv")


def _set(key: str, value: str) -> list[str]:
    return ["--set", f"{key}={value}"]


# (argv builder given a tmp dir, what stderr must say). Every case ends with exit 2 before training starts.
SIMULATE_CASES: dict[str, tuple[object, str]] = {
    "seed-2^64": (lambda t: _set("seed", str(2**64)), "seed = 18446744073709551616 is out of range"),
    "strategy-colon": (lambda t: _set("strategy", "':X'"), "neither a registered name"),
    "strategy-missing-module": (lambda t: _set("strategy", "'no_such_pkg.mod:X'"), "cannot be imported"),
    "strategy-import-raises": (lambda t: _set("strategy", "'tests.raises_on_import:X'"), "cannot be imported"),
    "toml-unparsable": (lambda t: ["--run-config", _bad_toml(t)], "is not valid TOML"),
    "toml-binary": (lambda t: ["--run-config", _binary(t)], "not UTF-8"),
    "toml-missing": (lambda t: ["--run-config", str(t / "nope.toml")], "not found"),
    "toml-directory": (lambda t: ["--run-config", str(t)], "not found"),
    "nodes-0": (lambda t: ["--nodes", "0"], "--nodes must be in [1, 1000]"),
    "nodes-3000": (lambda t: ["--nodes", "3000"], "--nodes must be in [1, 1000]"),
    "nodes-below-min": (lambda t: ["--nodes", "1", *_set("min-nodes", "2")], "fewer than min-nodes"),
    "workers-0": (lambda t: ["--workers", "0"], "--workers must be in"),
    "metrics-db-root": (lambda t: _set("metrics-db", "'/'"), "cannot open a metrics store at /"),
    "metrics-db-unwritable": (lambda t: _set("metrics-db", "'/proc/none/m.db'"), "cannot open a metrics store"),
    "profile-missing": (lambda t: _set("profile-file", f"'{t}/none.csv'"), "not found"),
    "profile-nul": (lambda t: _set("profile-file", f"'{_nul_csv(t)}'"), "not a CSV text file"),
    "profile-not-utf8": (lambda t: _set("profile-file", f"'{_latin1_csv(t)}'"), "not UTF-8"),
    "profile-bad-cell": (lambda t: _set("profile-file", f"'{_not_csv(t)}'"), "cannot parse 'secret-token-abcd"),
    "profile-huge": (lambda t: _set("profile-file", f"'{_huge_csv(t)}'"), "larger than"),
    "profile-bad-csv": (lambda t: _set("profile-file", f"'{_bad_quote_csv(t)}'"), "not CSV"),
    "buffer-size": (lambda t: _set("buffer-size", "1e9"), "buffer-size = 1000000000 is out of range"),
    "local-steps": (lambda t: _set("local-steps", "1e12"), "local-steps = 1000000000000 is out of range"),
    "server-lr": (lambda t: _set("server-lr", "1e300"), "server-lr = 1e+300 is out of range"),
}


@pytest.fixture
def raising_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A module ``tests.raises_on_import`` whose import raises, as a user's broken strategy file would."""
    pkg = tmp_path / "pkgroot" / "tests"
    pkg.mkdir(parents=True)
    (pkg / "raises_on_import.py").write_text("raise RuntimeError('boom at import')\n")
    import tests

    monkeypatch.setattr(tests, "__path__", [*tests.__path__, str(pkg)])


def _argv(case: str, tmp_path: Path) -> list[str]:
    build, _ = SIMULATE_CASES[case]
    db = ["--set", f"metrics-db='{tmp_path / 'm.db'}'"]
    return [*db, "--set", "max-updates=2", *build(tmp_path), "--quiet"]  # type: ignore[operator]


@pytest.mark.usefixtures("raising_module")
@pytest.mark.parametrize("case", list(SIMULATE_CASES))
def test_simulate_mistakes_exit_2_with_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                               ) -> None:
    assert simulate.main(_argv(case, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert SIMULATE_CASES[case][1] in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert len(err) < 700
    assert "hunter2" not in err and "secret-token-abcdefghijklmnopqrstuvwxyz" not in err


@pytest.mark.parametrize("argv", [
    ["--nodes", "0"], ["--nodes", "5000"], ["--jobs", "0"], ["--jobs", "100000"], ["--budget", "10000000"],
    ["--eval-seeds", str(2**64)], ["--methods", ":X"], ["--set", "seed=18446744073709551616"],
    ["--set", "local-steps=1e12"], ["--metrics-db", "/"],
], ids=lambda a: " ".join(a)[:40])
def test_compare_mistakes_exit_2(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = [] if "--metrics-db" in argv else ["--metrics-db", str(tmp_path / "c.db")]
    assert compare.main([*db, *argv, "--budget", "1", "--quiet"] if "--budget" not in argv else [*db, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1


def test_compare_unparsable_run_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert compare.main(["--run-config", _bad_toml(tmp_path), "--metrics-db", str(tmp_path / "c.db")]) == 2
    assert "is not valid TOML" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["seed-2^64", "strategy-colon", "profile-nul", "metrics-db-root"])
def test_simulate_subprocess_exit_2_no_traceback(case: str, tmp_path: Path) -> None:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    p = subprocess.run([sys.executable, "-m", "server_app.simulate", *_argv(case, tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert "hunter2" not in p.stderr


def test_profile_file_content_is_never_echoed_in_full(tmp_path: Path) -> None:
    secret = "AKIA" + "Z" * 60
    path = tmp_path / "p.csv"
    path.write_text(f"{secret},node\n")
    with pytest.raises(ProfileError) as info:
        check_profile_file(str(path), 10)
    assert secret not in str(info.value) and "AKIA" + "Z" * EXCERPT_CHARS not in str(info.value)
    path.write_text("node,device\n0,\x1b[31mred\n")
    with pytest.raises(ProfileError, match=r"unknown device '\?\[31mred'"):
        check_profile_file(str(path), 10)


def test_profile_node_out_of_fleet_is_a_config_error(simulate: object, tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("node,device\n7,phone\n")
    with pytest.raises(ConfigError, match="node index 7 out of range"):
        simulate("fedbuff", nodes=4, profile_file=str(path))  # type: ignore[operator]


# ------------------------------------------------------------------------------------ a global model gone non-finite
class _Published(Strategy):
    name = ""

    def apply(self, update: Update) -> Verdict:
        return Verdict(Status.APPLIED)


def test_publish_refuses_a_non_finite_model() -> None:
    weights = [np.zeros(3, np.float32), np.ones((2, 2), np.float32)]
    s = _Published(RunConfig(), weights, (1, 2))
    s._publish([np.ones(3, np.float32), np.ones((2, 2), np.float32)])
    bad = [np.ones(3, np.float32), np.array([[1, np.inf], [0, 0]], np.float32)]
    with pytest.raises(ModelNotFinite, match="global model is not finite after update 2"):
        s._publish(bad)
    assert s.version == 1 and all(np.isfinite(w).all() for w in s.weights)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_overflowing_model_fails_the_run_with_the_reason(simulate: object, tmp_path: Path) -> None:
    """A client's finite but huge delta times ``server-lr = 1000`` overflows float32: the run ends ``failed``.

    Tasks from seq 12 on are scaled, so the checkpoint taken at 5 applied updates is of a finite model, and kept.
    The update filter is off: the default one clips such a delta (tests/test_robust.py), and this is the check
    behind every filter.
    """
    scaling = ScalingClient(factor=1e38, every=1, offset=0, start=12)
    db = tmp_path / "m.db"
    with pytest.raises(ModelNotFinite, match="global model is not finite after update"):
        simulate("fedbuff", nodes=4, db=db, clientapp=scaling.app, server_lr=1000.0,  # type: ignore[operator]
                 buffer_size=5, max_updates=60, checkpoint_every=5, update_filter="none")
    with sqlite3.connect(db) as con:
        status, reason = con.execute("SELECT status, error FROM runs").fetchone()
        applied = con.execute("SELECT applied FROM checkpoints").fetchone()
    assert status == "failed" and "global model is not finite after update" in reason
    assert applied is not None and applied[0] >= 5


def test_the_defaults_are_the_safe_ones() -> None:
    """A user who sets nothing gets checkpoints and the update filter (RELIABILITY.md, "Attacks tried")."""
    cfg = RunConfig()
    assert cfg.checkpoint_every > 0 and cfg.update_filter == "clip"
