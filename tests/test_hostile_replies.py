"""Every field of every message a client sends, broken, through a real engine run: the run completes.

``tests/test_hostile.py`` breaks the arrays of a reply; this file breaks everything else a client says: each key
of a training reply's ``metrics`` record (the ones the server reads, and ones it does not), the record itself,
an error reply's reason, and each field of the ``query.describe`` answer (at discovery, and from a node joining
a wall-clock run late). One node (``HOSTILE``) lies; the others are the numpy stand-in client of
``tests/numpy_client.py``, so every run is the real ServerApp and engine in a fraction of a second. Each test
asserts that the run completes, that the lying node's tasks are ``rejected`` (or its claims left out) with a
readable reason when the server reads the field, and that the honest nodes keep training.
"""

from __future__ import annotations

import itertools
import math
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import server_app.membership as membership
import tests.numpy_client as numpy_client
from server_app.app import run_experiment
from server_app.intake import Intake, RejectedUpdate, TaskFailed, UpdateGuard, client_compute_s, read_describe
from server_app.ledger import MAX_REASON, bounded_reason
from server_app.local_grid import LocalGrid
from server_app.simulate import merge_config
from server_app.state import Flight
from server_app.wire import KNOWN_METRICS
from strategies.config import RunConfig, key_of
from tests.hostile import NAMES, instruction, model, reply, valid_content

HOSTILE = 1001  # LocalGrid's node ids are 1000 + the partition id: the second node lies
FAST = {"local_steps": 1, "eval_every": 0, "checkpoint_every": 0}

# ------------------------------------------------------------------------------------------ training replies
# What a MetricRecord can carry over the wire (numbers, lists of numbers), at and past every bound the server
# cares about. Strings, bools and other objects cannot be sent at all: see test_forged_metric_values_*.
BAD_VALUES: list[Any] = [[1.0, 2.0], [1, 2], [], math.nan, math.inf, -math.inf, -1, -1.5, 0, 0.5, 2**53 + 1,
                         2**63 - 1, 1e300]
UNREAD = ("examples-seen", "exec-threads", "train_loss", "")  # keys the server stores or ignores, never reads


def expected(key: str, value: Any) -> set[str]:
    """The statuses a reply may end with whose metric ``key`` is ``value`` (the rest of it honest)."""
    number = not isinstance(value, list) and math.isfinite(value)
    if key in ("task-seq", "model-version"):  # an echo: anything but the task's own value is a stray reply
        return {"rejected", "applied"} if key == "model-version" and value == 0 else {"rejected"}  # 0 may be it
    if key == "num-examples":
        ok = number and 1 <= value <= 2**53 and float(value).is_integer()
    elif key == "compute-s":
        ok = number and value >= 0
    else:  # train-loss must be a number; a key the server does not read may hold anything: it is dropped
        ok = number or key != "train-loss"
    return {"applied"} if ok else {"rejected"}


class MetricLiar:
    """A ClientApp whose ``HOSTILE`` node sends its honest reply with ``metrics[key]`` set to the next bad value.

    ``sent`` maps each task seq the node answered to the value it sent, for the assertions.
    """

    def __init__(self, key: str, values: list[Any] = BAD_VALUES) -> None:
        self.key, self.values, self.sent = key, values, {}
        self.turn = itertools.count()
        self.lock = threading.Lock()
        self.app = ClientApp()
        self.app.train()(self.train)
        self.app.evaluate()(numpy_client.evaluate)
        self.app.query("describe")(numpy_client.describe)

    def train(self, msg: Message, context: Context) -> Message:
        honest = numpy_client.train(msg, context)
        if context.node_id != HOSTILE:
            return honest
        seq = int(msg.content.config_records["config"]["task-seq"])
        with self.lock:
            value = self.values[next(self.turn) % len(self.values)]
            self.sent[seq] = value
        metrics = dict(honest.content.metric_records["metrics"])
        metrics[self.key] = value
        honest.content["metrics"] = MetricRecord(metrics)
        return honest


def check_run(run: Any, liar: MetricLiar) -> None:
    """The run completed, the liar's tasks met their expected fate with a reason, honest nodes trained."""
    assert run.summary.stop_reason == "max-updates" and run.run_row()["status"] == "completed"
    rows = run.updates()
    assert all(r["status"] == "applied" for r in rows if r["node_id"] != HOSTILE), rows
    assert {r["node_id"] for r in rows if r["status"] == "applied"} - {HOSTILE}, "no honest node trained"
    lied = [r for r in rows if r["seq"] in liar.sent]
    assert len(lied) >= 3, "the hostile node hardly got any task"
    for r in lied:
        value = liar.sent[r["seq"]]
        assert r["status"] in expected(liar.key, value), (liar.key, value, r)
        if r["status"] == "rejected":
            assert liar.key in r["reason"] and len(r["reason"]) <= MAX_REASON, r["reason"]
        assert r["compute_s"] is not None and 0 <= r["compute_s"] <= r["completed_at"] - r["dispatched_at"] + 1e-9
    finite = run.rows("SELECT value FROM task_metrics WHERE run_id=?", run.summary.run_id)
    assert all(v["value"] is not None and math.isfinite(v["value"]) for v in finite)


@pytest.mark.parametrize("key", [*KNOWN_METRICS, *UNREAD])
def test_every_metric_key_with_every_bad_value_costs_its_task_only(simulate, key):
    """Virtual clock: deterministic, so the hostile node's share of tasks covers every value in every run."""
    liar = MetricLiar(key)
    share = 3 if key in KNOWN_METRICS else 5  # the hostile node is the slower one: it gets about 40 % of tasks
    run = simulate("fedasync", nodes=2, max_updates=share * len(BAD_VALUES) + 4, clientapp=liar.app, **FAST)
    check_run(run, liar)
    assert set(map(repr, liar.sent.values())) == set(map(repr, BAD_VALUES)), "not every value was tried"


@pytest.mark.parametrize("key", ["compute-s", "num-examples", "train-loss", "exec-threads"])
def test_on_the_wall_clock_a_bad_compute_claim_costs_its_task_only(simulate, key):
    """The wall clock reads ``compute-s`` of every reply, rejected ones included: a list there once failed runs."""
    liar = MetricLiar(key)
    run = simulate("fedasync", nodes=2, max_updates=len(BAD_VALUES), clock="wall", clientapp=liar.app, **FAST)
    check_run(run, liar)


def test_a_huge_compute_claim_is_held_to_the_task_s_time(simulate):
    liar = MetricLiar("compute-s", [1e300, 2**63 - 1, 3.0e7])
    run = simulate("fedasync", nodes=2, max_updates=12, clock="wall", clientapp=liar.app, **FAST)
    check_run(run, liar)
    lied = [r for r in run.updates() if r["seq"] in liar.sent]
    assert all(r["status"] == "applied" and r["compute_s"] < 60 for r in lied)


def replace_record(name: str, record: Any) -> Callable[[Message, Context], Message]:
    """A train handler whose ``HOSTILE`` node's reply has record ``name`` replaced (None: removed)."""
    def train(msg: Message, context: Context) -> Message:
        honest = numpy_client.train(msg, context)
        if context.node_id != HOSTILE:
            return honest
        content = RecordDict({k: v for k, v in honest.content.items() if k != name})
        if record is not None:
            content[name] = record
        return Message(content, reply_to=msg)
    return train


RECORD_CASES = {
    "no-metrics": ("metrics", None, "applied"),  # a Flower-style reply: num-examples 1, no echo to check
    "metrics-as-config": ("metrics", ConfigRecord({"num-examples": "many", "compute-s": "1", "task-seq": "x"}),
                          "applied"),  # not a MetricRecord: the server reads no metrics from it
    "empty-metrics": ("metrics", MetricRecord({}), "applied"),
    "delta-as-config": ("delta", ConfigRecord({"1.weight": b"x"}), "rejected"),
    "delta-empty": ("delta", ArrayRecord({}), "rejected"),
    "extra-config": ("config", ConfigRecord({"x" * 1000: "y" * 10_000}), "applied"),
}


@pytest.mark.parametrize("case", list(RECORD_CASES))
def test_a_missing_or_wrong_kind_of_record_costs_its_task_only(simulate, case):
    name, record, want = RECORD_CASES[case]
    app = ClientApp()
    app.train()(replace_record(name, record))
    run = simulate("fedasync", nodes=2, max_updates=4, clientapp=app, **FAST)
    assert run.run_row()["status"] == "completed"
    rows = run.updates()
    assert all(r["status"] == "applied" for r in rows if r["node_id"] != HOSTILE)
    lied = [r for r in rows if r["node_id"] == HOSTILE]
    assert lied and all(r["status"] == want for r in lied), lied
    assert all(r["reason"] for r in lied if want == "rejected")


def test_a_five_megabyte_error_reason_is_stored_cut(simulate):
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if context.node_id == HOSTILE:
            raise RuntimeError("x" * 5_000_000)
        return numpy_client.train(msg, context)

    run = simulate("fedasync", nodes=2, max_updates=4, clientapp=app, **FAST)
    assert run.run_row()["status"] == "completed"
    failed = [r for r in run.updates() if r["node_id"] == HOSTILE]
    assert failed and all(r["status"] == "failed" for r in failed)
    for r in failed:
        assert len(r["reason"]) == MAX_REASON and r["reason"].startswith("client error 2: RuntimeError: xxx")
        assert r["reason"].endswith(" characters]") and "cut" in r["reason"]


def test_bounded_reason_keeps_short_reasons_and_says_how_long_a_cut_one_was():
    assert bounded_reason("buffer 1/5") == "buffer 1/5"
    assert bounded_reason("y" * MAX_REASON) == "y" * MAX_REASON
    cut = bounded_reason("y" * 10_000)
    assert len(cut) == MAX_REASON and cut.endswith("[... cut: 10000 characters]")
    assert bounded_reason(cut) == cut  # cutting twice changes nothing


# ------------------------------------------------------------------------------------- what cannot be sent
BASE = model()


def flight(msg: Message, seq: int = 7, version: int = 3) -> Flight:
    f = Flight(seq, HOSTILE, version, 0.0, 0)
    f.reply = msg
    f.bytes_up = f.payload_up = 100
    return f


def forged(key: str, value: object) -> Message:
    """A reply whose metric ``key`` is ``value``, put past MetricRecord's type check (no wire carries it)."""
    content = valid_content("none")
    content["metrics"].__dict__["_data"][key] = value
    return reply(content)


FORGED = ["12", b"1", True, None, {"a": 1}, ["a"], 10**400, -(10**400), object()]


@pytest.mark.parametrize("key", list(KNOWN_METRICS))
@pytest.mark.parametrize("value", FORGED, ids=[type(v).__name__ + str(i) for i, v in enumerate(FORGED)])
def test_forged_metric_values_are_rejected_by_intake_never_raised(key, value):
    with pytest.raises(RejectedUpdate, match=key):
        Intake(NAMES).read(flight(forged(key, value)), UpdateGuard(RunConfig(), BASE), BASE, 0, 1.0)
    assert client_compute_s(forged(key, value)) >= 0.0


@pytest.mark.parametrize("value", FORGED, ids=[type(v).__name__ + str(i) for i, v in enumerate(FORGED)])
def test_forged_values_under_keys_the_server_does_not_read_are_dropped(value):
    update = Intake(NAMES).read(flight(forged("exec-x", value)), UpdateGuard(RunConfig(), BASE), BASE, 0, 1.0)
    assert "exec-x" not in update.metrics and update.num_examples == 32


def test_intake_turns_any_exception_while_reading_a_reply_into_a_rejection(monkeypatch, caplog):
    import server_app.intake as intake

    def broken(*args: object) -> None:
        raise KeyError("a check nobody wrote")

    monkeypatch.setattr(intake.UpdateGuard, "admit", broken)
    with pytest.raises(RejectedUpdate, match="reading it raised KeyError: 'a check nobody wrote'"):
        Intake(NAMES).read(flight(reply(valid_content("none"))), UpdateGuard(RunConfig(), BASE), BASE, 0, 1.0)
    assert "rejecting the reply" in caplog.text


def test_an_error_reply_is_a_failed_task_whatever_its_reason():
    msg = Message(Error(2, "z" * 100_000), reply_to=instruction())
    with pytest.raises(TaskFailed, match="client error 2: zzz"):
        Intake(NAMES).read(flight(msg), UpdateGuard(RunConfig(), BASE), BASE, 0, 1.0)


class UnsizedGrid(LocalGrid):
    """A LocalGrid that hands replies over as built, unserialized: what a forged reply would look like."""

    def _handle(self, msg: Message) -> Message:
        out = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        out.metadata.__dict__["_message_id"] = f"r-{msg.metadata.message_id}"
        return out


def test_a_reply_that_cannot_be_serialized_fails_its_task_in_a_real_engine_run(tmp_path):
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        honest = numpy_client.train(msg, context)
        if context.node_id == HOSTILE:
            honest.content["metrics"].__dict__["_data"]["compute-s"] = "12 s"
        return honest

    app.query("describe")(numpy_client.describe)
    rows = run_on_grid(tmp_path, lambda cfg: UnsizedGrid(app, 2, cfg.to_mapping()), max_updates=4)
    assert {r["status"] for r in rows if r["node_id"] == HOSTILE} == {"failed"}
    assert all("cannot be serialized" in r["reason"] for r in rows if r["node_id"] == HOSTILE)
    assert {r["status"] for r in rows if r["node_id"] != HOSTILE} == {"applied"}


def run_on_grid(tmp_path: Path, make_grid: Callable[[RunConfig], LocalGrid], **settings: Any) -> list[dict]:
    """``run_experiment`` (the real ServerApp's body) on a grid of the test's; the store's updates rows."""
    values = {"model": "logreg", "min-nodes": 2, "metrics-db": str(tmp_path / "m.db"),
              **{key_of(k): v for k, v in {**FAST, **settings}.items()}}
    cfg = RunConfig.from_mapping(merge_config(overrides=values))
    grid = make_grid(cfg)
    try:
        summary = run_experiment(grid, cfg, run_id="r1")
    finally:
        grid.close()
    assert summary.stop_reason == "max-updates"
    with sqlite3.connect(tmp_path / "m.db") as db:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT * FROM updates ORDER BY seq")]


# -------------------------------------------------------------------------------------------- describe replies
DESCRIBE_BAD: dict[str, list[Any]] = {
    "partition-id": ["1", [1, 2], -5, 2**62, True, 1.5, b"\x01", "x" * 100_000, 99],  # 99: past num-partitions
    "num-partitions": ["8", [8], 0, -1, 2**62, True, 8.0, b"8"],
    "torch-device": [["cuda"], 5, b"cpu", "", "d" * 100_000, True],
}


def describe_liars(field: str, values: list[Any]) -> ClientApp:
    """Nodes 1001.. each describe themselves with ``field`` set to one of ``values`` (None: the field left out)."""
    app = ClientApp()
    app.train()(numpy_client.train)
    app.evaluate()(numpy_client.evaluate)

    @app.query("describe")
    def describe(msg: Message, context: Context) -> Message:
        honest = numpy_client.describe(msg, context)
        i = context.node_id - HOSTILE
        if not 0 <= i < len(values):
            return honest
        info = dict(honest.content.config_records["describe"])
        if values[i] is None:
            del info[field]
        else:
            info[field] = values[i]
        return Message(RecordDict({"describe": ConfigRecord(info)}), reply_to=msg)

    return app


@pytest.mark.parametrize("field", list(DESCRIBE_BAD))
def test_a_bad_describe_field_costs_its_node_its_claim_never_the_run(simulate, field, caplog):
    values = [*DESCRIBE_BAD[field], None]
    nodes = len(values) + 1  # FedAvg: every node trains in every round, so each one's first task is recorded
    run = simulate("fedavg", nodes=nodes, max_updates=nodes, clientapp=describe_liars(field, values), **FAST)
    assert run.run_row()["status"] == "completed" and run.summary.stop_reason == "max-updates"
    fleet = run.rows("SELECT * FROM nodes WHERE run_id=? ORDER BY idx", run.summary.run_id)
    assert sorted(n["node_id"] for n in fleet) == [1000 + i for i in range(nodes)]  # nobody was lost
    liars = {1001 + i: v for i, v in enumerate(values)}
    for n in fleet:
        if n["node_id"] in liars and field == "partition-id":
            assert n["partition_id"] is None, n  # its claim is left out, and so is its place in the order
        else:
            assert n["partition_id"] == n["node_id"] - 1000, n
        if n["node_id"] in liars and field == "torch-device":
            assert n["torch_device"] is None
    if field == "partition-id":  # the honest node first, the undescribed after it by node id
        assert [n["node_id"] for n in fleet] == [1000, *sorted(liars)]
    trained = {r["node_id"] for r in run.updates() if r["status"] == "applied"}
    assert trained == {n["node_id"] for n in fleet}, "a node that described itself badly got no work"
    assert "described itself wrongly" in caplog.text and field in caplog.text


@pytest.mark.parametrize("content", [
    RecordDict({}), RecordDict({"describe": MetricRecord({"partition-id": 1})}),
    RecordDict({"other": ConfigRecord({"partition-id": 1})}),
])
def test_read_describe_without_a_describe_record_is_an_undescribed_node(content):
    assert read_describe(Message(content, reply_to=instruction())) == ({}, "")
    assert read_describe(Message(Error(0, "no query handler"), reply_to=instruction())) == ({}, "")


def test_read_describe_keeps_valid_fields_and_names_each_bad_one():
    msg = Message(RecordDict({"describe": ConfigRecord({"partition-id": 3, "num-partitions": 2,
                                                        "torch-device": "cpu", "torch-version": "x" * 10})}),
                  reply_to=instruction())
    info, problem = read_describe(msg)
    assert info == {"num-partitions": 2, "torch-device": "cpu"}
    assert problem == "partition-id must be an integer in 0 .. 1, got 3"


def test_read_describe_survives_a_forged_record():
    record = ConfigRecord({"partition-id": 1})
    record.__dict__["_data"] = None  # no dict at all: reading it raises
    info, problem = read_describe(Message(RecordDict({"describe": record}), reply_to=instruction()))
    assert info == {} and problem.startswith("malformed describe reply (reading it raised")


class LateLiarGrid(LocalGrid):
    """A LocalGrid whose last node comes online after the first training replies, and lies when described."""

    def __init__(self, app: ClientApp, nodes: int, run_config: dict) -> None:
        super().__init__(app, nodes, run_config, workers=2)
        self.late = max(self.contexts)
        self.replies = 0

    def get_node_ids(self) -> list[int]:
        return [n for n in self.contexts if n != self.late or self.replies >= 3]

    def pull_messages(self, message_ids: Any) -> list[Message]:
        out = super().pull_messages(message_ids)
        self.replies += len(out)
        return out


@pytest.mark.parametrize("value", ["1", [3], -7, 2**62])
def test_a_late_joiner_that_describes_itself_badly_joins_undescribed(tmp_path, monkeypatch, value):
    """Wall clock: ``Membership`` reads a newcomer's describe reply through the same checks as discovery."""
    monkeypatch.setattr(membership, "REFRESH_S", 0.02)
    app = ClientApp()
    app.train()(numpy_client.train)

    @app.query("describe")
    def describe(msg: Message, context: Context) -> Message:
        honest = numpy_client.describe(msg, context)
        if context.node_id != 1002:
            return honest
        info = {**dict(honest.content.config_records["describe"]), "partition-id": value}
        return Message(RecordDict({"describe": ConfigRecord(info)}), reply_to=msg)

    rows = run_on_grid(tmp_path, lambda cfg: LateLiarGrid(app, 3, cfg.to_mapping()), clock="wall",
                       strategy="fedasync", max_updates=30, task_ttl=10.0)
    with sqlite3.connect(tmp_path / "m.db") as db:
        fleet = dict(db.execute("SELECT node_id, partition_id FROM nodes").fetchall())
    assert fleet == {1000: 0, 1001: 1, 1002: None}
    assert any(r["node_id"] == 1002 and r["status"] == "applied" for r in rows)

