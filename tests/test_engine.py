"""The event engine on the in-process Grid: clock order, determinism, concurrency, failures and bad input."""

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.app import train as real_train

FLEET = {"straggler_fraction": 0.25, "straggler_slowdown": 5.0, "compute_jitter": 0.5}


def trace(run):
    keep = ("seq", "node_id", "dispatched_at", "completed_at", "base_version", "applied_version", "staleness",
            "bytes_up", "bytes_down", "status", "reason")
    return [tuple(r[k] for k in keep) for r in run.updates()]


@pytest.mark.parametrize("strategy", ["fedbuff", "fedasync", "fedavg"])
def test_same_seed_same_run_whatever_the_reply_order(simulate, strategy, tmp_path):
    # One run id for all: wire bytes include its varint (random ids below 2**56 are a byte shorter).
    runs = [simulate(strategy, nodes=6, concurrency=4, max_updates=24, dropout=0.1, reorder_seed=r,
                     run_id=2**62 + 1, db=tmp_path / f"{r}.db", **FLEET) for r in (None, 1, 2)]
    first = runs[0]
    assert len(trace(first)) >= 24
    for other in runs[1:]:
        assert trace(other) == trace(first)
        for a, b in zip(other.summary.weights, first.summary.weights, strict=True):
            np.testing.assert_array_equal(a, b)
        assert [(e["t"], e["accuracy"]) for e in other.evals()] == [(e["t"], e["accuracy"]) for e in first.evals()]


def test_run_and_node_ids_do_not_change_the_clock(simulate):
    """Flower's run and node ids are random; their varint lengths must not reach the virtual clock."""
    a, b = (simulate("fedbuff", nodes=4, max_updates=12, run_id=rid, **FLEET) for rid in (7, 2**62 + 12345))
    keep = ("seq", "dispatched_at", "completed_at", "status")
    assert [tuple(r[k] for k in keep) for r in a.updates()] == [tuple(r[k] for k in keep) for r in b.updates()]
    assert [r["bytes_down"] for r in a.updates()] != [r["bytes_down"] for r in b.updates()]  # ids are on the wire


def test_another_seed_gives_another_run(simulate):
    a = simulate("fedbuff", nodes=4, max_updates=12, seed=1, **FLEET)
    b = simulate("fedbuff", nodes=4, max_updates=12, seed=2, **FLEET)
    assert trace(a) != trace(b)


def test_results_are_applied_in_clock_order_within_the_concurrency_cap(simulate):
    run = simulate("fedasync", nodes=8, concurrency=3, max_updates=40, **FLEET)
    rows = run.updates()
    done = [r["completed_at"] for r in rows if r["status"] == "applied"]
    by_version = [r["completed_at"] for r in sorted(rows, key=lambda r: r["applied_version"])]
    assert by_version == sorted(by_version) and len(done) == 40
    events = sorted([(r["dispatched_at"], 1) for r in rows] + [(r["completed_at"], -1) for r in rows],
                    key=lambda e: (e[0], e[1]))  # completions before dispatches at the same instant
    in_flight = peak = 0
    for _, step in events:
        in_flight += step
        peak = max(peak, in_flight)
    assert peak == 3
    for node in {r["node_id"] for r in rows}:  # one task at a time per node
        spans = sorted((r["dispatched_at"], r["completed_at"]) for r in rows if r["node_id"] == node)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_staleness_is_the_version_gap_at_apply_time(simulate):
    run = simulate("fedasync", nodes=6, max_updates=30, **FLEET)
    rows = run.updates()
    assert all(r["staleness"] == r["applied_version"] - 1 - r["base_version"] for r in rows)
    assert max(r["staleness"] for r in rows) >= 2  # stragglers really were stale


def test_bytes_are_the_serialized_sizes(simulate):
    run = simulate("fedbuff", nodes=4, max_updates=8)
    params = sum(w.size for w in run.summary.weights)
    for r in run.updates():
        assert 4 * params < r["bytes_down"] < 4 * params + 4096
        assert 4 * params < r["bytes_up"] < 4 * params + 4096
    last = run.evals()[-1]
    assert last["bytes_up_total"] == sum(r["bytes_up"] for r in run.updates())


# --------------------------------------------------------------------------------------- hostile and broken clients
hostile = ClientApp()
BAD = {
    1: ("nan", "contains NaN or Inf"),
    2: ("shape", "expected float32"),
    3: ("dtype", "got float64"),
    4: ("keys", "array keys do not match"),
    5: ("empty", "no 'delta' or 'arrays'"),
    6: ("examples", "num-examples must be a positive integer"),
    7: ("bytes", "undecodable array bytes"),
    8: ("raise", "client error 2"),
}


@hostile.train()
def hostile_train(msg, context):
    seq = int(msg.content["config"]["task-seq"])
    kind = BAD.get(seq % 10, ("ok",))[0] if seq < 20 else "ok"
    if kind == "raise":
        raise RuntimeError("the device ran out of battery")
    reply = real_train(msg, context)
    delta = reply.content["delta"]
    name = next(iter(delta))
    if kind == "nan":
        value = delta[name].numpy().copy()
        value.flat[0] = np.nan
        delta[name] = Array(value)
    elif kind == "shape":
        delta[name] = Array(np.zeros((2, 2), np.float32))
    elif kind == "dtype":
        delta[name] = Array(delta[name].numpy().astype(np.float64))
    elif kind == "keys":
        delta["extra.weight"] = Array(np.zeros(3, np.float32))
    elif kind == "empty":
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 3})}), reply_to=msg)
    elif kind == "examples":
        reply.content["metrics"] = MetricRecord({"num-examples": -4})
    elif kind == "bytes":
        good = delta[name]
        delta[name] = Array(good.dtype, good.shape, good.stype, b"\x93NUMPY garbage")
    return reply


def test_malformed_replies_are_rejected_with_a_reason_and_the_run_goes_on(simulate):
    run = simulate("fedasync", nodes=4, max_updates=20, clientapp=hostile)
    rows = run.updates()
    for seq, (kind, reason) in BAD.items():
        row = rows[seq]
        assert row["status"] == ("failed" if kind == "raise" else "rejected"), (kind, row)
        assert reason in row["reason"], (kind, row["reason"])
        assert row["applied_version"] is None
    assert run.summary.applied == 20
    assert run.run_row()["status"] == "completed"
    node = rows[8]["node_id"]  # the node whose client raised got work again
    assert any(r["node_id"] == node and r["seq"] > 8 for r in rows)
    assert not any(isinstance(v, float) and np.isnan(v).any() for v in run.summary.weights)


def test_fedavg_round_closes_despite_failures(simulate):
    run = simulate("fedavg", nodes=4, max_updates=12, clientapp=hostile)
    assert run.summary.applied == 12
    statuses = {r["status"] for r in run.updates()}
    assert {"applied", "rejected", "failed"} <= statuses


def test_simulated_dropouts_are_recorded_and_work_is_redispatched(simulate):
    run = simulate("fedbuff", nodes=4, max_updates=20, dropout=0.3)
    failed = [r for r in run.updates() if r["status"] == "failed"]
    assert failed and all(r["reason"] == "dropout (simulated)" and r["bytes_up"] == 0 for r in failed)
    assert run.summary.applied == 20


slow = ClientApp()


@slow.train()
def slow_train(msg, context):
    if context.node_config["partition-id"] == 0 and int(msg.content["config"]["task-seq"]) == 0:
        time.sleep(1.5)
    return real_train(msg, context)


def test_a_reply_later_than_the_ttl_is_a_failed_task(simulate):
    run = simulate("fedasync", nodes=2, max_updates=6, task_ttl=0.5, clientapp=slow)
    first = run.updates()[0]
    assert first["status"] == "failed" and "no reply within task-ttl" in first["reason"]
    assert run.summary.applied == 6


def test_max_time_stops_on_the_clock(simulate):
    run = simulate("fedasync", nodes=4, max_updates=10_000, max_time=0.5)  # virtual seconds: ~60 updates
    assert run.summary.stop_reason == "max-time"
    assert max(r["completed_at"] for r in run.updates()) <= 0.5
    assert run.evals()[-1]["t"] == 0.5  # exactly: the engine sets its clock to max-time


def test_target_accuracy_stops_the_run(simulate):
    run = simulate("fedasync", nodes=4, max_updates=10_000, target_accuracy=0.5, eval_every=2, lr=0.1)
    assert run.summary.stop_reason == "target-accuracy"
    assert run.evals()[-1]["accuracy"] >= 0.5


def test_failed_run_is_recorded_as_failed(simulate, tmp_path):
    broken = ClientApp()

    @broken.train()
    def _train(msg, context):
        raise RuntimeError("always")

    db = tmp_path / "f.db"
    with pytest.raises(RuntimeError, match="consecutive failed tasks.*client error 2: RuntimeError: always"):
        simulate("fedavg", nodes=2, max_updates=4, clientapp=broken, db=db)
    import sqlite3
    with sqlite3.connect(db) as con:
        status, error = con.execute("SELECT status, error FROM runs").fetchone()
        failed = con.execute("SELECT COUNT(*) FROM updates WHERE status='failed'").fetchone()[0]
    assert status == "failed" and "consecutive failed tasks" in error
    assert failed == 100


def test_wall_clock_runs_in_arrival_order(simulate):
    run = simulate("fedbuff", nodes=4, max_updates=12, clock="wall", buffer_size=4)
    rows = run.updates()
    assert run.summary.applied == 12
    times = [r["completed_at"] for r in rows]
    assert all(t >= 0 for t in times) and all(r["compute_s"] > 0 for r in rows)


def test_arrays_record_reply_must_match_keys():
    ArrayRecord({"a": Array(np.zeros(2, np.float32))})  # construction sanity for the hostile client


def test_profile_file_slows_the_named_node_and_the_fleet_is_recorded(simulate, tmp_path):
    trace_file = tmp_path / "fleet.csv"
    trace_file.write_text("node,device,network,slowdown\n0,raspberry-pi,3g,20\n")
    run = simulate("fedasync", nodes=4, max_updates=30, profiles="laptop/wifi=1", profile_file=str(trace_file))
    counts = {}
    for r in run.updates():
        counts[r["node_id"]] = counts.get(r["node_id"], 0) + 1
    fleet = run.rows("SELECT * FROM nodes WHERE run_id=? ORDER BY idx", run.summary.run_id)
    assert [f["partition_id"] for f in fleet] == [0, 1, 2, 3]
    assert (fleet[0]["device"], fleet[0]["network"], fleet[0]["slowdown"]) == ("raspberry-pi", "3g", 20.0)
    assert all(f["torch_device"] in ("cpu", "cuda") for f in fleet)
    slow_node = fleet[0]["node_id"]
    assert counts.get(slow_node, 0) < min(c for n, c in counts.items() if n != slow_node)


@pytest.mark.parametrize(("codec", "ef"), [("topk", True), ("sign", True), ("qsgd", False), ("powersgd", True),
                                           ("fp16", False), ("randk", True)])
def test_every_strategy_takes_a_codec_and_bytes_shrink(simulate, shared_run, codec, ef):
    plain = shared_run("fedbuff", nodes=4, max_updates=12, model="mlp", buffer_size=4)  # the same for every codec
    packed = simulate("fedbuff", nodes=4, max_updates=12, model="mlp", codec=codec, error_feedback=ef, buffer_size=4,
                      codec_ratio=0.05)
    assert packed.summary.applied == 12
    assert {r["status"] for r in packed.updates()} == {"applied"}
    up_plain = sum(r["bytes_up"] for r in plain.updates()) / len(plain.updates())
    up_packed = sum(r["bytes_up"] for r in packed.updates()) / len(packed.updates())
    assert up_packed < up_plain / {"fp16": 1.9, "qsgd": 3}.get(codec, 5)


def test_a_nodes_position_is_its_place_in_the_fleet_after_joins_and_a_checkpoint():
    """``EngineState.position`` (task seeds, scripted clocks, the nodes table) answers as ``nodes.index``."""
    import pickle

    from server_app.state import EngineState

    state = EngineState(nodes=[2**40 + 7, 3, 2**63 - 1], profiles={}, rng=np.random.default_rng(0), cap=1,
                        fleet_online=3, guard=None, downlink=None)  # type: ignore[arg-type]
    assert [state.position(n) for n in state.nodes] == [0, 1, 2]
    state.nodes.append(99)  # a late join
    assert state.position(99) == 3 and state.position(3) == 1
    restored = pickle.loads(pickle.dumps(state))
    assert "_positions" not in restored.__dict__
    assert [restored.position(n) for n in restored.nodes] == [restored.nodes.index(n) for n in restored.nodes]
