"""Scale and scale-out on Flower's own runtime: ``make run`` with ``RAY_ADDRESS`` on a 2-node Ray cluster, 100 nodes.

Slow (about 60 s on 2 cores). The test starts a Ray cluster of two nodes on this host, a head and a worker, each
with ``--num-cpus 1``, its own ``--temp-dir`` (a short one under /tmp: Ray's Unix sockets live there) and its own
ports, in sessions of their own (``ray start --block``), and stops them by pid at the end, never with ``ray stop``
(which ends every Ray process on the host, other people's included). Both nodes register under 127.0.0.1
(``--node-ip-address``) and the test reaches them there, so their traffic stays on loopback; Ray has no
loopback-only mode, and some of its servers still listen on every interface. Then what ``make run`` runs,
``scripts/flwr_run.sh`` (its own SuperLink in a private FLWR_HOME, the run's status from ``flwr ls``), with
``RAY_ADDRESS`` pointing at the head and ``num-supernodes=100``: FedBuff with logreg on digits, every node busy,
150 applied updates. With one CPU per ClientApp actor, Flower's Ray backend makes one actor per CPU of the cluster,
and each node can hold only one, so the ClientApps must run on both nodes.

Checked: the run ends ``finished:completed``; every one of the 100 nodes described itself (partition ids 0..99 in
the store's ``nodes`` table) and the updates come from many nodes; and Ray's own record of the tasks it ran (the
task events its GCS keeps, the data behind ``ray list tasks``) shows ``ClientAppActor.run`` calls on the head and on
the worker. That record is read over the GCS's gRPC API, because Ray's state API (``ray list``) needs the dashboard
of ``ray[default]``, which requirements.txt does not install. docs/scale-out.md is the user's side of this.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "scripts"))
from deploy_local import Proc, tail  # noqa: E402  (the deployment kit's process handle: group + descendants, by pid)

# A Ray cluster and a SuperLink of its own, about 70 s: with the real deployment, so `make test` stays under 4 min.
pytestmark = [pytest.mark.slow, pytest.mark.deployment]

NODES = 100
UPDATES = 150
START_TIMEOUT_S = 90.0
RUN_TIMEOUT_S = 300.0

# Ray's record of a cluster, from its GCS (the head's --port): its nodes, or the ClientApp calls each node ran.
# A separate process, so that the test's own process never imports Ray.
GCS_QUERY = r"""
import collections, json, sys, time
import grpc
from ray.core.generated import gcs_pb2, gcs_service_pb2 as pb, gcs_service_pb2_grpc as rpc

address, what = sys.argv[1], sys.argv[2]
channel = grpc.insecure_channel(address)
if what == "nodes":  # wait until the cluster has this many live nodes, then list them
    want, deadline, nodes = int(sys.argv[3]), time.monotonic() + float(sys.argv[4]), []
    while time.monotonic() < deadline:
        try:
            reply = rpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(pb.GetAllNodeInfoRequest(), timeout=5)
            nodes = [n for n in reply.node_info_list if n.state == gcs_pb2.GcsNodeInfo.ALIVE]
        except grpc.RpcError:
            nodes = []
        if len(nodes) >= want:
            break
        time.sleep(0.5)
    print(json.dumps([{"id": n.node_id.hex(), "head": n.is_head_node, "cpus": n.resources_total.get("CPU", 0)}
                      for n in nodes]))
else:  # the ClientApp calls (ClientAppActor.run) each node ran, by node id
    reply = rpc.TaskInfoGcsServiceStub(channel).GetTaskEvents(pb.GetTaskEventsRequest(), timeout=30)
    calls = collections.Counter(e.state_updates.node_id.hex() for e in reply.events_by_task
                                if e.task_info.name == "ClientAppActor.run")
    print(json.dumps(calls))
"""


@dataclass
class RayCluster:
    address: str  # the head's GCS, what RAY_ADDRESS names
    head: Proc
    worker: Proc
    nodes: list[dict]  # Ray's view: {"id": node id (hex), "head": bool, "cpus": float} per live node

    def query(self, *args: str, timeout: float = 120.0) -> object:
        res = subprocess.run([sys.executable, "-c", GCS_QUERY, self.address, *args], capture_output=True, text=True,
                             timeout=timeout, check=False)
        assert res.returncode == 0, f"querying Ray's GCS at {self.address} failed:\n{res.stderr[-3000:]}"
        return json.loads(res.stdout)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log}) ---\n{tail(p.log)}" for p in (self.head, self.worker))


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free now on every interface, as Ray binds them (all held while the OS picks)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]


def _ray_start(name: str, temp: Path, ports: list[int], env: dict[str, str], head_port: int, head: bool) -> Proc:
    """``ray start --block`` for one node, in a session of its own (its group is what stops), logging to a file.

    Every port Ray would otherwise take from a fixed default is given, so that two nodes on one host (and anyone
    else's Ray) never collide: the node manager, object manager, dashboard agent (default 52365), runtime-env agent,
    metrics and, on the head, the GCS (default 6379) and the Ray Client server (default 10001). Worker processes
    bind ports the OS picks (``--min-worker-port 0 --max-worker-port 0``). One CPU, no GPU, a small object store,
    no dashboard and no log monitor (nothing here reads the workers' output): as little CPU as Ray allows.
    """
    node_manager, object_manager, agent_http, agent_grpc, runtime_env, metrics, client = ports
    cmd = [str(BIN / "ray"), "start", "--block", "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", str(temp),
           "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats",
           "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
           "--min-worker-port", "0", "--max-worker-port", "0",
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
           "--include-log-monitor", "false", "--node-ip-address", "127.0.0.1"]
    if head:
        cmd += ["--head", "--port", str(head_port), "--include-dashboard", "false",
                "--ray-client-server-port", str(client)]
    else:
        cmd += ["--address", f"127.0.0.1:{head_port}"]
    log = temp.parent / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    return Proc(name, popen, log)


def _wait_for_port(proc: Proc, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            pytest.fail(f"`ray start` of the {proc.name} exited with {proc.popen.returncode}; Ray could not start "
                        f"here (it needs /dev/shm and free local ports):\n{tail(proc.log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    pytest.fail(f"the {proc.name}'s GCS is not listening on port {port} after {timeout:.0f} s:\n{tail(proc.log)}")


@contextlib.contextmanager
def ray_cluster() -> Iterator[RayCluster]:
    """A head and a worker node on this host, one CPU each; both stopped by pid (group and descendants) at the end."""
    base = Path(tempfile.mkdtemp(prefix="sfray"))  # short: Ray's socket paths must stay under ~107 characters
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # No idle worker process started for the first driver (the ClientApp actors need workers of their own, with
    # Flower's runtime environment): one Python process less to start on the head.
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_prestart_worker_first_driver="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    ports = _free_ports(15)
    gcs, head_ports, worker_ports = ports[0], ports[1:8], ports[8:15]
    nodes: list[Proc] = []
    try:
        nodes.append(_ray_start("head", base / "head", head_ports, env, gcs, head=True))
        _wait_for_port(nodes[0], gcs, START_TIMEOUT_S)
        nodes.append(_ray_start("worker", base / "worker", worker_ports, env, gcs, head=False))
        cluster = RayCluster(f"127.0.0.1:{gcs}", nodes[0], nodes[1], [])
        live = cluster.query("nodes", "2", str(START_TIMEOUT_S), timeout=START_TIMEOUT_S + 30)
        assert isinstance(live, list)
        if len(live) != 2 or any(n["cpus"] != 1 for n in live):
            pytest.fail(f"the Ray cluster did not come up with two 1-CPU nodes: {live}\n{cluster.logs()}")
        cluster.nodes = live
        yield cluster
    finally:
        with ThreadPoolExecutor(2) as pool:  # both at once: each waits up to its grace for its processes to end
            list(pool.map(lambda node: node.stop(grace_s=10.0), nodes))
        shutil.rmtree(base, ignore_errors=True)


def test_make_run_on_a_two_node_ray_cluster_runs_100_supernodes(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    config = (f"strategy='fedbuff' model='logreg' local-steps=2 max-updates={UPDATES} eval-every=50 "
              f"min-nodes={NODES} concurrency=0 metrics-db='{db}'")
    t0 = time.monotonic()
    with ray_cluster() as cluster:
        t_cluster = time.monotonic() - t0
        nodes = cluster.nodes
        # What `make run NODES=100 SET="..."` runs, with the environment it sets, and RAY_ADDRESS from the caller's.
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "VENV": str(BIN.parent),
               "FLWR_HOME": str(tmp_path / "flwr-home"), "NUM_SUPERNODES": str(NODES), "CLIENT_CPUS": "1",
               "RUN_TIMEOUT": "120", "STALEFLOWER_METRICS_DB": str(tmp_path / "default-metrics.db")}
        res = subprocess.run(["bash", str(ROOT / "scripts" / "flwr_run.sh"), "--run-config", config], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
        out = res.stdout + res.stderr
        assert res.returncode == 0, f"make run on the Ray cluster failed (rc {res.returncode}):\n{out[-6000:]}\n" \
                                    f"{cluster.logs()}"
        calls = cluster.query("tasks")
        assert isinstance(calls, dict)
    elapsed = time.monotonic() - t0
    found = re.findall(r"run (\d+) finished:completed", out)
    assert found, out[-4000:]
    run_id = found[-1]

    con = sqlite3.connect(db)
    try:
        partitions = [p for (p,) in con.execute("SELECT partition_id FROM nodes WHERE run_id=? ORDER BY idx",
                                                 (run_id,))]
        applied, nodes_used = con.execute("SELECT COUNT(*), COUNT(DISTINCT node_id) FROM updates WHERE run_id=? AND "
                                          "status='applied'", (run_id,)).fetchone()
        status = con.execute("SELECT status FROM runs WHERE run_id=?", (run_id,)).fetchone()[0]
        accuracy = con.execute("SELECT accuracy FROM evals WHERE run_id=? ORDER BY t DESC, rowid DESC LIMIT 1",
                               (run_id,)).fetchone()[0]
    finally:
        con.close()
    by_role = {("head" if n["head"] else "worker"): calls.get(n["id"], 0) for n in nodes}
    print(f"make run with {NODES} SuperNodes on a 2-node Ray cluster (up in {t_cluster:.0f} s): finished:completed, "
          f"{elapsed:.0f} s in all; ClientApp calls by Ray node {by_role}; {applied} updates applied from "
          f"{nodes_used} distinct nodes, {len(partitions)} nodes described, accuracy {accuracy:.3f}")
    assert len(nodes) == 2 and {n["head"] for n in nodes} == {True, False}, nodes
    assert set(calls) <= {n["id"] for n in nodes}, (calls, nodes)  # no other Ray node ran anything
    assert all(count > 0 for count in by_role.values()), f"the ClientApps did not run on both Ray nodes: {by_role}"
    assert partitions == list(range(NODES))
    assert status == "completed" and applied >= UPDATES
    assert nodes_used >= NODES // 2, nodes_used  # concurrency 0: all 100 nodes got work at once
