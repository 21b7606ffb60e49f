"""The engine on the scripted clock with a pure-numpy stand-in client: exact schedules, no torch, no training.

The stand-in client does one step of least squares on a fixed problem per task, so every update's delta is
known in closed form; the scripted clock gives each task a compute time chosen by the test and instant links.
A subprocess checks that none of this imports torch.
"""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from server_app.clocks import ScriptedClock
from server_app.engine import Engine
from server_app.local_grid import LocalGrid
from server_app.state import ModelSpec
from server_app.store import MetricsStore
from strategies import get_strategy
from strategies.codecs import array_of
from strategies.config import RunConfig

TARGET = np.arange(4, dtype=np.float32)  # every node's least-squares optimum
SPEC = ModelSpec(names=["w"], initial=[np.zeros(4, np.float32)], flops_per_step=0.0)


def numpy_client(msg: Message, context: Context) -> Message:
    """One gradient step of 0.5 * ||w - TARGET||^2 with the task's lr; replies with the delta, as our ClientApp."""
    w = array_of(msg.content.array_records["arrays"]["w"])
    cfg = msg.content.config_records["config"]
    delta = np.float32(cfg["lr"]) * (w - TARGET)
    metrics = MetricRecord({"num-examples": 10, "task-seq": cfg["task-seq"], "model-version": cfg["model-version"]})
    return Message(RecordDict({"delta": ArrayRecord({"w": Array(delta.astype(np.float32))}), "metrics": metrics}),
                   reply_to=msg)


def evaluate(weights):
    loss = float(0.5 * np.sum((weights[0] - TARGET) ** 2))
    return loss, float(loss < 1e-2)


def run(tmp_path, strategy, script, nodes=3, client=numpy_client, **settings):
    settings.setdefault("clock", "virtual")
    cfg = RunConfig(strategy=strategy, lr=0.5, eval_every=0, **settings)
    grid = LocalGrid(client, nodes, cfg.to_mapping(), workers=3 if client is not numpy_client else 2)
    store = MetricsStore(tmp_path / "m.db")
    store.start_run("r", strategy, cfg.to_mapping())
    try:
        engine = Engine(grid, cfg, get_strategy(strategy), SPEC, evaluate, store, "r", sorted(grid.contexts),
                        clock=ScriptedClock(script) if cfg.clock == "virtual" else None)
        summary = engine.run()
    finally:
        grid.close()
    keys = ("seq", "node", "base", "applied", "staleness", "status", "t", "reason", "sent", "compute", "up", "down")
    rows = [dict(zip(keys, r, strict=True)) for r in store.db.execute(
        "SELECT seq, node_id - 1000, base_version, applied_version, staleness, status, completed_at, reason, "
        "dispatched_at, compute_s, bytes_up, bytes_down FROM updates ORDER BY seq")]
    store.close()
    return summary, rows


def test_async_sgd_applies_in_scripted_order_with_the_staleness_of_the_schedule(tmp_path):
    # Node 0 takes 1 s per task, node 1 takes 3 s, node 2 takes 10 s.
    summary, rows = run(tmp_path, "async-sgd", lambda node, task: (1.0, 3.0, 10.0)[node], max_updates=6)
    applied = sorted((r for r in rows if r["status"] == "applied"), key=lambda r: r["applied"])
    # Node 0 completes at t = 1, 2, 3, 4, 5; node 1 at t = 3 on version 0, two versions late. At t = 3 the tie
    # goes to the earlier dispatch (node 1, seq 1), so node 0's third task, sent at t = 2, is one version late.
    expected = [(0, 1.0), (0, 2.0), (1, 3.0), (0, 3.0), (0, 4.0), (0, 5.0)]
    assert [(r["node"], r["t"]) for r in applied] == expected, "\n".join(map(str, rows))
    assert [r["staleness"] for r in applied] == [0, 0, 2, 1, 0, 0]
    assert summary.applied == 6 and summary.time == 5.0


def test_fedavg_waits_for_the_slowest_node_every_round(tmp_path):
    summary, rows = run(tmp_path, "fedavg", lambda node, task: (1.0, 2.0, 7.0)[node], max_updates=9)
    assert summary.version == 3 and summary.time == pytest.approx(21.0)
    assert {r["staleness"] for r in rows} == {0}
    # Every round moves w halfway to TARGET (lr 0.5, equal weights): after 3 rounds, w = TARGET * (1 - 0.5**3).
    np.testing.assert_allclose(summary.weights[0], TARGET * (1 - 0.5**3), rtol=1e-6)


def test_k_sync_restarts_the_slowest_task_and_charges_its_wasted_compute(tmp_path):
    summary, rows = run(tmp_path, "k-sync", lambda node, task: (1.0, 2.0, 7.0)[node], k=2, max_updates=4,
                        restart="interrupt")
    restarted = [r for r in rows if r["status"] == "restarted"]
    assert restarted and all(r["node"] == 2 for r in restarted)
    assert all(r["staleness"] == 0 for r in rows if r["status"] == "applied")


def slow_first(node, task):
    """Node 0 takes 1 s, node 1 takes 2 s; node 2 takes 7 s on its first task and 0.5 s on later ones."""
    return (1.0, 2.0, 7.0 if task == 0 else 0.5)[node]


def test_a_restart_under_finish_keeps_the_node_busy_until_its_task_ends(tmp_path):
    # k-sync, K = 2. t=1: node 0 arrives (buffered). t=2: node 1 arrives, version 1, node 2's 7 s task (seq 2) is
    # abandoned but runs on. Nodes 0 and 1 alternate: updates at t=4 (v2) and t=6 (v3). t=7: seq 2 ends first
    # (ties go to the earlier seq): its reply is dropped and recorded restarted; node 2 gets version 3 at t=7 and
    # its 0.5 s task, with node 0's result of t=7, makes version 4 at t=7.5 (8 applied: the stop).
    summary, rows = run(tmp_path, "k-sync", slow_first, k=2, max_updates=8)
    restarted = [r for r in rows if r["status"] == "restarted"]
    assert [(r["seq"], r["node"], r["sent"], r["t"], r["staleness"]) for r in restarted] == [(2, 2, 0.0, 7.0, 1)]
    assert restarted[0]["compute"] == 7.0, "the whole abandoned task is wasted"
    assert "dropped on arrival" in restarted[0]["reason"]
    applied = [r for r in rows if r["status"] == "applied"]
    assert restarted[0]["up"] > 0 and restarted[0]["up"] == applied[-1]["up"], "the dropped reply's real size"
    node2 = [(r["seq"], r["sent"], r["t"], r["staleness"]) for r in applied if r["node"] == 2]
    assert node2 == [(9, 7.0, 7.5, 0)], "node 2 takes no work before its abandoned task ends"
    assert summary.time == 7.5 and summary.version == 4 and summary.applied == 8
    assert summary.statuses == {"applied": 8, "restarted": 1}
    assert sum(r["compute"] for r in restarted) == 7.0
    assert len({r["down"] for r in rows}) == 1 and summary.bytes_down == 9 * rows[0]["down"]  # seq 8 still out


def test_a_restart_under_interrupt_frees_the_node_at_once(tmp_path):
    # The same schedule, node 2 freed at each restart. t=2: v1, seq 2 restarted after 2 s of work; node 2 restarts
    # first (seq 3, 2 -> 2.5), node 0 (2 -> 3), node 1 (seq 5, 2 -> 4). t=2.5: node 2 buffered; t=3: node 0 makes
    # v2 and node 1's seq 5 is restarted after 1 s. Node 1 (2 s) is then restarted at t=4 and t=5 as nodes 2 and
    # 0 (0.5 s, 1 s) make v3 at t=4 and v4 at t=5 (8 applied).
    summary, rows = run(tmp_path, "k-sync", slow_first, k=2, max_updates=8, restart="interrupt")
    restarted = [r for r in rows if r["status"] == "restarted"]
    assert [(r["seq"], r["node"], r["sent"], r["t"], r["compute"]) for r in restarted] == [
        (2, 2, 0.0, 2.0, 2.0), (5, 1, 2.0, 3.0, 1.0), (6, 1, 3.0, 4.0, 1.0), (9, 1, 4.0, 5.0, 1.0)]
    assert all(r["up"] == 0 and r["reason"] == "abandoned by the strategy" for r in restarted)
    node2 = [(r["seq"], r["sent"], r["t"]) for r in rows if r["node"] == 2 and r["status"] == "applied"]
    assert node2 == [(3, 2.0, 2.5), (7, 3.0, 3.5), (10, 4.0, 4.5)], "node 2 works again from its restart on"
    assert summary.time == 5.0 and summary.applied == 8
    assert sum(r["compute"] for r in restarted) == 5.0
    assert summary.bytes_down == 12 * rows[0]["down"]


def test_on_the_wall_clock_an_abandoned_task_always_runs_to_its_end(tmp_path):
    def sleepy_client(msg, context):  # node 2's first task (seq 2) takes 0.4 s, the others 0.02-0.04 s
        seq = int(msg.content.config_records["config"]["task-seq"])
        time.sleep(0.4 if seq == 2 else 0.02 * (msg.metadata.dst_node_id - 999))
        return numpy_client(msg, context)

    # "interrupt" asked for, but a real ClientApp cannot be interrupted: the engine finishes (and warns)
    summary, rows = run(tmp_path, "k-sync", None, client=sleepy_client, clock="wall", k=2, max_updates=40,
                        restart="interrupt")
    restarted = [r for r in rows if r["status"] == "restarted"]
    assert restarted and restarted[0]["seq"] == 2 and restarted[0]["up"] > 0
    assert restarted[0]["t"] - restarted[0]["sent"] >= 0.4
    later = [r["sent"] for r in rows if r["node"] == 2 and r["seq"] > 2]
    assert all(t >= restarted[0]["t"] for t in later), "node 2 took no work before its abandoned task ended"


def test_the_engine_and_its_tests_need_no_torch():
    code = ("import sys; import server_app.engine, server_app.local_grid, server_app.clocks, strategies.registry;"
            "import strategies; strategies.registry.names(); assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
