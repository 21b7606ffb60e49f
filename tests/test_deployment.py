"""End-to-end deployment on Flower's real runtime: a SuperLink with TLS and SuperNode authentication, registered
SuperNodes, ``flwr run`` on the wall clock (marked ``deployment``; ``make test-deployment``, about 2 minutes on 2
idle cores).

Everything is started by ``scripts/deploy_local.py``'s ``LocalDeployment`` (the library behind ``make
deploy-local``) in tmp, each process in its own session, and stopped by its process-group id. The run's status
always comes from ``flwr ls`` (``flwr run --stream`` exits 0 even when the ServerApp fails).

1. On loopback, with 3 SuperNodes: a SuperNode whose key was never registered is refused; a FedBuff run completes
   although one SuperNode is killed (SIGKILL: a device losing power or its link) right after its first result, and
   the task it had in flight is recorded as ``failed`` while the others keep training.
2. In network namespaces (root; skipped with the failing command when not permitted), run in the background while
   the loopback tests run, since it mostly waits on its links: one SuperNode behind a
   Wi-Fi-rate link and one behind a slow cellular link, shaped with ``tc ... tbf``; the slow link's updates are
   staler in the store.
"""

from __future__ import annotations

import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from deploy_local import (  # noqa: E402
    DeployError,
    LocalDeployment,
    Node,
    make_node_key,
    probe_namespaces,
    stage_app,
    tail,
)

pytestmark = pytest.mark.deployment

RUN_TIMEOUT_S = 400.0
# The kill test's run: FedBuff on the wall clock for MAX_TIME seconds. The task lost with the killed node fails
# when Flower reports the node unavailable (its heartbeats stop: within 2 x 30 s) or at TASK_TTL after its
# dispatch, whichever comes first; MAX_TIME leaves room for that after a first result that may take 30 s on a busy
# machine (the ServerApp's start, a describe query, then a task: each a fresh process).
TASK_TTL_S = 30
MAX_TIME_S = 70
KILL_RUN = (f"strategy='fedbuff' model='logreg' local-steps=5 buffer-size=2 max-updates=0 max-time={MAX_TIME_S} "
            f"eval-every=4 task-ttl={TASK_TTL_S} min-nodes=3")


def _signed(node_id: int) -> int:
    """Flower's unsigned 64-bit node id as the store keeps it (the signed integer with the same bits)."""
    return node_id - (1 << 64) if node_id >= 1 << 63 else node_id


def _rows(db: Path, sql: str, *params: object) -> list[dict]:
    if not db.exists():
        return []
    con = sqlite3.connect(db, timeout=10)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute(sql, params)]
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        con.close()


def _debug(dep: LocalDeployment, run_id: str = "") -> str:
    logs = [f"--- {p.name} ---\n{tail(p.log, 2500)}" for p in [*(n.proc for n in dep.nodes if n.proc), dep.superlink]
            if p is not None]
    if run_id:
        logs.append(f"--- flwr log {run_id} ---\n{dep.logs(run_id)}")
    return "\n".join(logs)


@pytest.fixture(scope="module")
def loopback(tmp_path_factory: pytest.TempPathFactory, shaped: ShapedRun) -> Iterator[LocalDeployment]:
    """A SuperLink (TLS, SuperNode auth) and 3 registered SuperNodes on 127.0.0.1 (the shaped scenario runs
    meanwhile)."""
    base = tmp_path_factory.mktemp("deploy")
    # The slim app (what the wheel ships): every task's fresh ClientApp process installs the FAB anew.
    dep = LocalDeployment(base / "deploy", num_nodes=3, app=stage_app(base / "app"), log=lambda msg: None)
    try:
        dep.start()
        yield dep
    except DeployError as exc:
        pytest.fail(f"deployment did not start: {exc}")
    finally:
        dep.close()


def test_unregistered_supernode_is_refused(loopback: LocalDeployment) -> None:
    key, pub = make_node_key(loopback.workdir / "intruder" / "key")
    intruder = Node(index=len(loopback.nodes), key=key, pub=pub)
    proc = loopback.start_node(intruder)
    try:
        rc = proc.popen.wait(timeout=120)
    finally:
        proc.stop()
    log = tail(proc.log)
    assert rc != 0, log
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log, log
    listed = {int(n["node-id"]) for n in loopback.supernodes()}
    assert listed == {n.node_id for n in loopback.nodes}, listed


@dataclass
class KilledRun:
    """The FedBuff run during which one SuperNode was killed."""

    run_id: str
    status: dict
    db: Path
    victim: int        # its node id as the store keeps it
    killed_at: float   # seconds on the run's clock (approximately: when the kill was sent)
    log: str


@pytest.fixture(scope="module")
def killed_run(loopback: LocalDeployment) -> KilledRun:
    """Start the FedBuff run, SIGKILL SuperNode 1 one second after its first result, wait for the run to end."""
    dep = loopback
    proc, db = dep.start_run([KILL_RUN], metrics_db=dep.workdir / "kill.db")
    run_id = dep.run_id(proc)
    victim = dep.nodes[1]
    sid = _signed(victim.node_id)
    deadline = time.monotonic() + 180
    first: list[dict] = []
    while not first:
        first = _rows(db, "SELECT completed_at FROM updates WHERE run_id=? AND node_id=?", run_id, sid)
        if time.monotonic() > deadline or not proc.alive():
            pytest.fail(f"SuperNode 1 sent no result within 180 s\n{_debug(dep, run_id)}")
        time.sleep(0.5)
    time.sleep(1.0)  # FedBuff has given it its next task by now: that task is the one lost
    clock = _rows(db, "SELECT MAX(completed_at) AS t FROM updates WHERE run_id=?", run_id)[0]["t"]
    assert victim.proc is not None
    victim.proc.stop(signal.SIGKILL, grace_s=2.0)
    status = dep.wait_run(proc, run_id, RUN_TIMEOUT_S)
    return KilledRun(run_id, status, db, sid, float(clock), _debug(dep, run_id))


def test_fedbuff_run_completes_on_tls_and_authenticated_nodes(loopback: LocalDeployment, killed_run: KilledRun):
    r = killed_run
    assert r.status.get("status") == "finished:completed", f"{r.status}\n{r.log}"
    (run,) = _rows(r.db, "SELECT status, strategy, config_json FROM runs WHERE run_id=?", r.run_id)
    assert run["status"] == "completed" and run["strategy"] == "fedbuff", run
    assert '"clock": "wall"' in run["config_json"]
    # The three registered, authenticated SuperNodes, each with its own partition, all trained.
    fleet = _rows(r.db, "SELECT node_id, partition_id FROM nodes WHERE run_id=?", r.run_id)
    assert sorted(n["partition_id"] for n in fleet) == [0, 1, 2], fleet
    assert {n["node_id"] for n in fleet} == {_signed(n.node_id) for n in loopback.nodes}
    trained = {u["node_id"] for u in _rows(r.db, "SELECT node_id FROM updates WHERE run_id=? AND status IN "
                                                 "('applied', 'buffered')", r.run_id)}
    assert trained == {n["node_id"] for n in fleet}
    assert _rows(r.db, "SELECT COUNT(*) AS n FROM evals WHERE run_id=?", r.run_id)[0]["n"] >= 2


def test_killed_supernode_task_is_recorded_failed_and_the_run_goes_on(killed_run: KilledRun) -> None:
    r = killed_run
    rows = _rows(r.db, "SELECT * FROM updates WHERE run_id=? ORDER BY seq", r.run_id)
    lost = [u for u in rows if u["node_id"] == r.victim and u["status"] == "failed"]
    assert lost, f"no failed task for the killed SuperNode\n{rows}\n{r.log}"
    first_loss = lost[0]
    # Lost to Flower's heartbeat check (NODE_UNAVAILABLE, error code 5) or to the task's TTL: Flower's own
    # (MESSAGE_UNAVAILABLE, code 3, when the SuperLink expires the message) or the engine's deadline.
    assert any(why in first_loss["reason"] for why in ("client error 5", "client error 3", "task-ttl")), first_loss
    assert first_loss["completed_at"] - first_loss["dispatched_at"] <= TASK_TTL_S + 10
    # After the kill the dead node produced nothing but failures, and got no task once its loss was known.
    after = [u for u in rows if u["node_id"] == r.victim and u["completed_at"] > r.killed_at]
    assert all(u["status"] == "failed" for u in after), after
    assert not [u for u in after if u["dispatched_at"] > first_loss["completed_at"] + 1.0], after
    # The two survivors kept training after the loss was recorded.
    later = [u for u in rows if u["node_id"] != r.victim and u["completed_at"] > first_loss["completed_at"]]
    assert later, rows


# --------------------------------------------------------------------------------------------- shaped links
SHAPED_RUN = ("strategy='fedbuff' buffer-size=1 model='mlp' local-steps=5 max-updates=6 eval-every=3 "
              "task-ttl=120 min-nodes=2")


@dataclass
class ShapedRun:
    """The shaped-links scenario, run in a background thread while the loopback tests run."""

    dep: LocalDeployment | None
    thread: threading.Thread | None = None
    skip: str = ""
    error: str = ""
    status: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)

    def run(self) -> None:
        dep = self.dep
        assert dep is not None
        run_id = ""
        try:
            dep.start()
            proc, db = dep.start_run([SHAPED_RUN])
            run_id = dep.run_id(proc)
            self.status = dep.wait_run(proc, run_id, RUN_TIMEOUT_S)
            self.stats = {r["partition_id"]: r for r in _rows(
                db, "SELECT n.partition_id, COUNT(*) AS n, AVG(u.staleness) AS staleness, AVG(u.comm_s) AS comm_s "
                    "FROM updates u JOIN nodes n ON n.run_id = u.run_id AND n.node_id = u.node_id "
                    "WHERE u.run_id = ? AND u.status IN ('applied', 'buffered') GROUP BY n.partition_id", run_id)}
        except Exception as exc:  # reported by the test, with the logs
            self.error = f"{type(exc).__name__}: {exc}\n{_debug(dep, run_id) if not dep.closed else ''}"
        finally:
            dep.close()


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShapedRun]:
    """Start the shaped-links scenario at once, in the background (its runtime is mostly waiting on links)."""
    why = probe_namespaces()
    if why:
        yield ShapedRun(None, skip=why)
        return
    # Node 0 on Wi-Fi rates (80/35 Mbit/s), node 1 on a poor cellular link (400/100 kbit/s): the MLP's ~224 KB
    # model takes ~4.5 s down and ~18 s up there, on top of a task's fixed costs.
    base = tmp_path_factory.mktemp("shaped")
    # The slim app: the FAB crosses the slow link once, and its size is not what this test measures.
    dep = LocalDeployment(base / "deploy", num_nodes=2, links=["wifi", "400kbit/100kbit"],
                          app=stage_app(base / "app"), log=lambda msg: None)
    scenario = ShapedRun(dep)
    scenario.thread = threading.Thread(target=scenario.run, name="shaped-links", daemon=True)
    scenario.thread.start()
    try:
        yield scenario
    finally:
        dep.close()  # stops it if the test never waited for it (interrupted session)
        scenario.thread.join(timeout=60)


def test_slow_cellular_link_gives_staler_updates(shaped: ShapedRun) -> None:
    if shaped.skip:
        pytest.skip(f"network namespaces with tc tbf are not permitted here: {shaped.skip}")
    assert shaped.thread is not None
    shaped.thread.join(timeout=RUN_TIMEOUT_S + 120)
    assert not shaped.thread.is_alive(), "the shaped-links scenario did not finish"
    assert not shaped.error, shaped.error
    assert shaped.status.get("status") == "finished:completed", shaped.status
    stats = shaped.stats
    assert set(stats) == {0, 1}, f"both nodes must contribute: {stats}"
    wifi, cellular = stats[0], stats[1]
    assert cellular["comm_s"] > wifi["comm_s"] + 5.0, stats
    assert cellular["staleness"] > wifi["staleness"], stats
