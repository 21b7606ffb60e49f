"""A ``flower-superlink --simulation`` for the real ``flwr run`` tests (tests/test_flwr_run.py).

One SuperLink per test session (the ``superlink`` fixture in tests/conftest.py): on a free loopback port, with its
state, Flower's home and the metrics stores in tmp, stopped by pid with whatever it spawned (superexec,
flwr-simulation, Ray). ``flwr run`` exits 0 even when the ServerApp fails, so a run's status always comes from
``flwr ls --format json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from deploy_local import _alive, _descendants  # noqa: E402  (the deployment kit's process helpers)
from deploy_local import tail as _tail  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLWR = BIN / "flwr"
CONN = "pytest-sim"
FEDERATION_CONFIG = "num-supernodes=4 client-resources-num-cpus=1"
RUN_TIMEOUT_S = 240.0


@dataclass
class SuperLink:
    pid: int
    port: int
    home: Path
    env: dict[str, str] = field(repr=False)
    log: Path

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(FLWR), *args], cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def run(self, run_config: str, app: str = ".") -> str:
        """``flwr run APP --stream`` with this run config on 4 simulated nodes; returns the run id flwr reported."""
        # --stream blocks, mostly idle, until the run ends: cheaper on 2 cores than polling `flwr ls` meanwhile.
        res = self.flwr("run", app, CONN, "--stream", "--run-config", run_config,
                        "--federation-config", FEDERATION_CONFIG, timeout=RUN_TIMEOUT_S)
        found = re.findall(r"Successfully started run (\d+)", res.stdout)
        assert found, f"flwr run (rc {res.returncode}) started no run:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        return found[-1]

    def wait(self, run_id: str) -> dict:
        """Poll ``flwr ls --run-id ID --format json`` until the run is finished; returns its entry."""
        deadline = time.monotonic() + RUN_TIMEOUT_S
        run: dict = {}
        while time.monotonic() < deadline:
            res = self.flwr("ls", CONN, "--run-id", run_id, "--format", "json", timeout=60)
            runs = _json(res.stdout).get("runs", []) if res.returncode == 0 else []
            if runs:
                run = runs[0]
                if str(run.get("status", "")).startswith("finished"):
                    return run
            assert _alive(self.pid), f"the SuperLink died:\n{_tail(self.log)}"
            time.sleep(1.0)
        pytest.fail(f"run {run_id} not finished after {RUN_TIMEOUT_S:.0f} s: {run}\n{self.logs(run_id)}")

    def logs(self, run_id: str) -> str:
        res = self.flwr("log", run_id, CONN, "--show", timeout=60)
        return f"--- flwr log {run_id} ---\n{res.stdout[-6000:]}{res.stderr[-2000:]}"


def _json(text: str) -> dict:
    start = text.find("{")
    if start < 0:
        return {}
    try:
        return json.loads(text[start:])
    except ValueError:
        return {}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the SuperLink by pid, then whatever it spawned (superexec, flwr-simulation, Ray) that outlives it."""
    kids = _descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    deadline = time.monotonic() + 5  # superexec watches its parent and exits on its own
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for k in kids:
        if _alive(k):
            with contextlib.suppress(OSError):
                os.kill(k, signal.SIGKILL)


def start_superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SuperLink]:
    """Start the SuperLink, yield it, stop it (the ``superlink`` fixture of tests/conftest.py)."""
    base = tmp_path_factory.mktemp("flwr")
    home = base / "flwr-home"
    home.mkdir()
    port = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONN}"\n\n[superlink.{CONN}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = dict(os.environ)
    env.update(
        # flower-superlink spawns flower-superexec and flwr-simulation by name.
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        # staleflower importable by any app's ServerApp, as `pip install staleflower` makes it (an app other than
        # this repository's, tests/template_app, names server_app.app:app without shipping it in its FAB).
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        # Never the user's ~/.staleflower, even if a run config forgot metrics-db.
        STALEFLOWER_METRICS_DB=str(base / "default-metrics.db"),
    )
    log = base / "superlink.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
             "--database", str(base / "state.db"), "--disable-runtime-dependency-installation"],
            cwd=base, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"flower-superlink exited with {proc.returncode}:\n{_tail(log)}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"flower-superlink not healthy after 60 s:\n{_tail(log)}"
            time.sleep(0.2)
        yield SuperLink(pid=proc.pid, port=port, home=home, env=env, log=log)
    finally:
        _stop(proc)
