"""The dedup bomb: a small reply whose one array chunk is referenced thousands of times is refused before inflation.

Flower sends a message as unique content-addressed objects; an ``Array`` lists its chunks by reference, and
``Array.inflate`` copies the chunk once per reference. ``bomb`` forges such a reply the way a hostile SuperNode
would: it sets the ``Array``'s chunk list (Flower's own cache, ``_chunks``) to one small chunk repeated, so
Flower deflates it to a few tens of kilobytes that inflate to hundreds of megabytes.

The replies travel as in deployment: ``WireGrid`` is Flower's real ``HttpGrid`` whose Runtime API client is
``FakeLink``, a stand-in for the SuperLink that stores each reply's objects in Flower's own ``InMemoryObjectStore``
(which checks every object's hash and head, as the SuperLink does) and serves Flower's PullMessages / PullObject /
ConfirmMessageReceived responses from it; the ClientApps run on an in-process ``LocalGrid``. So the pull is the
real one: Flower's ``HttpGrid.pull_messages`` unbounded, ``server_app.inflation.BoundedGrid`` as ``run_experiment``
installs it. Memory is measured with ``tracemalloc`` (Python and numpy allocations, the bytes inflation makes).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import tracemalloc
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.app.message.arraychunk import ArrayChunk
from flwr.common.serde import message_to_proto
from flwr.proto.message_pb2 import ConfirmMessageReceivedResponse, ObjectTree, PullObjectResponse
from flwr.proto.runtime_pb2 import PullAppMessagesResponse
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.grid import HttpGrid

import tests.numpy_client as numpy_client
from server_app import inflation
from server_app.app import run_experiment
from server_app.inflation import REPLY_REFUSED, BoundedGrid, Refused, inflated_bytes, is_refused
from server_app.intake import Intake, RejectedUpdate, TaskFailed, UpdateGuard
from server_app.local_grid import LocalGrid
from server_app.simulate import merge_config
from server_app.state import Flight
from strategies.codecs import to_record
from strategies.config import RunConfig, key_of

HOSTILE = 1001  # LocalGrid's node ids are 1000 + partition id: the second node sends bombs
RUN_ID = 1
MiB = 2**20
# The engine run's bomb: 16 KiB chunk x 16,384 references = 256 MiB inflated from about 66 KB of objects, under the
# logreg model's admission limit (71,760 bytes: 2 x its 3,112 dense bytes + 64 KiB).
CHUNK, REFS = 16 * 1024, 16 * 1024
BIAS = len(Array(np.zeros(10, np.float32)).data)  # the bomb's second array, left honest: its .npy bytes
# tracemalloc peak allowed while bombs are refused: a 16th of what one inflates to. Observed on 2 shared cores:
# 0.6 MiB pulling one 64 MiB bomb (Flower's own pull: 132 MiB), 4.5 MiB over the whole run of 256 MiB bombs.
TOLERANCE = 16


def bomb(reply: Message, chunk: int, refs: int) -> Message:
    """``reply`` with its first array replaced by one ``chunk``-byte chunk referenced ``refs`` times."""
    record = next(iter(reply.content.array_records.values()))
    array = next(iter(record.values()))
    array.data = np.random.default_rng(0).bytes(chunk)  # random: no accidental dedup inside the chunk
    piece = ArrayChunk(memoryview(array.data))
    array.__dict__["_chunks"] = [(piece.object_id, piece)] * refs  # Flower's cache of the chunk list, forged
    return reply


def hostile(chunk: int, refs: int, nodes: Iterable[int] = (HOSTILE,)) -> Callable[[Message, Context], Message]:
    """The numpy stand-in ClientApp; ``nodes`` reply to every training task with a bomb."""
    bombers = set(nodes)

    def app(msg: Message, context: Context) -> Message:
        if msg.metadata.message_type == "query.describe":
            return numpy_client.describe(msg, context)
        reply = numpy_client.train(msg, context)
        return bomb(reply, chunk, refs) if context.node_id in bombers else reply

    return app


class FakeLink:
    """The Runtime API calls ``HttpGrid.pull_messages`` makes, answered as a SuperLink would.

    A finished reply is "pushed" as a SuperNode pushes it (message id = its object id, every unique object of its
    tree deflated into Flower's ``InMemoryObjectStore`` with hash and head checks); pulls are served from the
    store; a confirmed message's objects are deleted. ``sent`` counts the bytes of objects pulled.
    """

    def __init__(self, local: LocalGrid) -> None:
        self.local, self.store, self.sent = local, InMemoryObjectStore(verify=True), 0
        self.hide_chunks = False  # declare trees without their chunks (a SuperNode's tree is its own word)

    def PullMessages(self, request: Any) -> PullAppMessagesResponse:  # noqa: N802  (Flower's API names)
        protos, trees = [], []
        for reply in self.local.pull_messages(list(request.message_ids)):
            reply.metadata.__dict__["_message_id"] = reply.object_id
            objects = {oid: obj for oid, obj in get_all_nested_objects(reply).items()
                       if not (self.hide_chunks and isinstance(obj, ArrayChunk))}
            self.store.preregister(RUN_ID, _only(get_object_tree(reply), set(objects)))
            for oid, obj in objects.items():
                self.store.put(oid, obj.deflate())
            protos.append(message_to_proto(remove_content_from_message(reply)))
            trees.append(self.store.get_object_tree(reply.object_id))
        return PullAppMessagesResponse(messages_list=protos, message_object_trees=trees)

    def PullObject(self, request: Any) -> PullObjectResponse:  # noqa: N802
        content = self.store.get(request.object_id)
        self.sent += len(content or b"")
        return PullObjectResponse(object_found=content is not None, object_available=bool(content),
                                  object_content=content or b"")

    def ConfirmMessageReceived(self, request: Any) -> ConfirmMessageReceivedResponse:  # noqa: N802
        self.store.delete(request.message_object_id)
        return ConfirmMessageReceivedResponse()


def _only(tree: ObjectTree, keep: set[str]) -> ObjectTree:
    return ObjectTree(object_id=tree.object_id, children=[_only(c, keep) for c in tree.children
                                                          if c.object_id in keep])


class WireGrid(HttpGrid):
    """Flower's ``HttpGrid`` over ``FakeLink``: pushing and node ids are the LocalGrid's, pulling is Flower's."""

    def __init__(self, app: Callable[[Message, Context], Message], nodes: int, run_config: dict[str, Any]) -> None:
        super().__init__(token="test")
        self.local = LocalGrid(app, nodes, run_config, run_id=RUN_ID)
        self.link = FakeLink(self.local)
        self._client = self.link  # type: ignore[assignment]  # HttpGrid's Runtime API client
        self.set_run(Run.create_empty(RUN_ID))

    def get_node_ids(self) -> list[int]:
        return self.local.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        return self.local.push_messages(messages)

    def close(self) -> None:
        self.local.close()


def one_reply(grid: HttpGrid | BoundedGrid, node: int = HOSTILE) -> tuple[Message, int]:
    """Send one training task to ``node`` and pull its reply: ``(reply, tracemalloc peak while pulling)``."""
    [mid] = grid.push_messages([train_message(node)])
    wire = grid.grid if isinstance(grid, BoundedGrid) else grid
    assert isinstance(wire, WireGrid)
    while mid not in wire.local.done:  # made, not pulled yet
        time.sleep(0.005)
    tracemalloc.start()
    try:
        [reply] = grid.pull_messages([mid])
        return reply, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


TASK = {"local-steps": 1, "batch-size": 8, "lr": 0.1, "momentum": 0.0, "prox-mu": 0.0, "task-seed": 1,
        "task-seq": 0, "model-version": 0}


def train_message(node: int) -> Message:
    """A training task for ``node`` as the numpy stand-in client reads one (the model: zeros)."""
    content = RecordDict({"arrays": to_record(list(numpy_client.NAMES), numpy_client_model()),
                          "config": ConfigRecord(TASK)})
    return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)


def numpy_client_model() -> list[np.ndarray]:
    """The logreg model of ``tests.numpy_client`` (digits: 10 classes x 64 features), zeros."""
    return [np.zeros((10, 64), np.float32), np.zeros(10, np.float32)]


def config(**settings: Any) -> RunConfig:
    values = {"model": "logreg", "min-nodes": 2, "local-steps": 1, "eval-every": 0, "checkpoint-every": 0,
              **{key_of(k): v for k, v in settings.items()}}
    return RunConfig.from_mapping(merge_config(overrides=values))


# ---------------------------------------------------------------------------------------------- counting
def wire_objects(msg: Message) -> dict[str, bytes]:
    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}


def test_inflated_bytes_counts_every_reference_not_every_unique_chunk():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1  # as LocalGrid sets it
    honest = numpy_client.train(train_message(1000),
                                Context(RUN_ID, 1000, {"partition-id": 0, "num-partitions": 2}, RecordDict(),
                                        config().to_mapping()))
    data = sum(len(a.data) for a in honest.content["delta"].values())
    assert inflated_bytes(honest.object_id, wire_objects(honest)) == (data, 2, 2)
    forged = bomb(honest, CHUNK, REFS)
    objects = wire_objects(forged)
    assert inflated_bytes(forged.object_id, objects) == (CHUNK * REFS + BIAS, REFS + 1, 2)
    assert sum(map(len, objects.values())) < UpdateGuard(config(), numpy_client_model()).max_bytes  # sent: small


def _object(kind: str, children: list[str], body: bytes) -> tuple[str, bytes]:
    content = f"{kind} {','.join(children)} {len(body)}".encode() + b"\x00" + body
    return hashlib.sha256(content).hexdigest(), content


@pytest.mark.parametrize("case, reason", [
    ("past the chunk list", "references chunk 1 of 1"),
    ("child not a chunk", "is a ConfigRecord, not an ArrayChunk"),
    ("chunk not sent", "was not sent"),
])
def test_a_malformed_array_is_refused_by_the_count(case, reason):
    chunk_id, chunk = _object("ConfigRecord" if case == "child not a chunk" else "ArrayChunk", [], b"x" * 10)
    meta = {"dtype": "float32", "shape": [1], "stype": "numpy.ndarray",
            "arraychunk_ids": [0, 1] if case == "past the chunk list" else [0]}
    array_id, array = _object("Array", [chunk_id], json.dumps(meta).encode())
    contents = {array_id: array} | ({} if case == "chunk not sent" else {chunk_id: chunk})
    with pytest.raises(Refused, match=reason):
        inflated_bytes(array_id, contents)


def test_only_the_grid_s_refusal_is_a_rejection_a_client_s_error_with_that_code_is_a_failure():
    guard, base = UpdateGuard(config(), numpy_client_model()), numpy_client_model()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
    task = Message(RecordDict({}), dst_node_id=HOSTILE, message_type="train")
    refusal = Message(Error(REPLY_REFUSED, "oversized reply: its arrays inflate to 9 bytes"), reply_to=task)
    refusal.metadata.__dict__["_src_node_id"] = 1  # SUPERLINK_NODE_ID: what BoundedGrid's refusals come from
    assert is_refused(refusal)
    with pytest.raises(RejectedUpdate, match="inflate to 9 bytes"):
        Intake(["1.weight", "1.bias"]).read(_flight(refusal), guard, base, 0, 1.0)
    refusal.metadata.__dict__["_src_node_id"] = HOSTILE  # a client sending our code is a client error
    with pytest.raises(TaskFailed, match=f"client error {REPLY_REFUSED}"):
        Intake(["1.weight", "1.bias"]).read(_flight(refusal), guard, base, 0, 1.0)


def _flight(reply: Message) -> Flight:
    f = Flight(seq=7, node=HOSTILE, version=3, dispatched_at=0.0, bytes_down=0)
    f.reply = reply
    return f


# -------------------------------------------------------------------------------- Flower's pull vs. ours
def test_flower_s_pull_inflates_the_bomb_and_the_bounded_grid_refuses_it_before_inflating():
    """The same 64 MiB bomb (8 KiB x 8,192 references, 33 KB sent) through both pulls of the same link."""
    chunk, refs = 8 * 1024, 8 * 1024
    cfg = config()
    limit = UpdateGuard(cfg, numpy_client_model()).max_bytes
    grid = WireGrid(hostile(chunk, refs), 2, cfg.to_mapping())
    try:
        reply, peak = one_reply(grid)  # Flower's own HttpGrid.pull_messages
        assert len(reply.content["delta"]["1.weight"].data) == chunk * refs
        assert peak >= chunk * refs, "Flower's inflation allocates the whole inflated array"
        assert grid.link.sent < limit

        bounded = BoundedGrid(grid, limit)
        refused, peak = one_reply(bounded)
        assert is_refused(refused) and refused.error.code == REPLY_REFUSED
        assert f"its arrays inflate to {chunk * refs + BIAS} bytes ({refs + 1} chunk references to 2 unique " \
               f"chunks" in refused.error.reason and f"limit of {limit}" in refused.error.reason
        assert peak < chunk * refs / TOLERANCE, f"peak {peak / MiB:.1f} MiB while refusing a 64 MiB bomb"
        assert not grid.link.store.store, "the refused reply's objects are confirmed, so the SuperLink frees them"

        honest, _ = one_reply(bounded, node=1000)
        assert not honest.has_error() and set(honest.content["delta"]) == {"1.weight", "1.bias"}
    finally:
        grid.close()


def test_a_reply_with_more_unique_bytes_than_the_limit_is_refused_while_pulling():
    cfg = config()
    limit = UpdateGuard(cfg, numpy_client_model()).max_bytes
    grid = WireGrid(hostile(2 * limit, 1), 2, cfg.to_mapping())  # one chunk twice the limit, referenced once
    try:
        [refused] = BoundedGrid(grid, limit).send_and_receive([train_message(HOSTILE)], timeout=60)
        assert is_refused(refused) and "refused while pulling it" in refused.error.reason
    finally:
        grid.close()


def test_a_reply_whose_tree_leaves_out_its_chunks_is_refused_where_flower_s_pull_raises():
    """The SuperLink stores the tree a SuperNode declares; an honest reply declared without its chunks."""
    cfg = config()
    grid = WireGrid(hostile(CHUNK, REFS, nodes=()), 2, cfg.to_mapping())  # all honest
    grid.link.hide_chunks = True
    try:
        with pytest.raises(KeyError):  # inside Flower's inflation: the whole pull, hence the run, would end
            one_reply(grid)
        refused, _ = one_reply(BoundedGrid(grid, UpdateGuard(cfg, numpy_client_model()).max_bytes))
        assert is_refused(refused) and "malformed reply: chunk" in refused.error.reason
    finally:
        grid.close()


# ------------------------------------------------------------------------------------------ an engine run
def test_a_dedup_bomb_in_a_run_is_rejected_with_its_inflated_size_and_memory_stays_bounded(tmp_path, monkeypatch):
    """The real ServerApp body (``run_experiment``) over the wire grid: one node sends 256 MiB bombs."""
    cfg = config(strategy="fedasync", max_updates=8, metrics_db=str(tmp_path / "m.db"))
    wrapped: list[object] = []
    monkeypatch.setattr(inflation, "BoundedGrid", _recording(wrapped))
    grid = WireGrid(hostile(CHUNK, REFS), 2, cfg.to_mapping())
    tracemalloc.start()
    try:
        summary = run_experiment(grid, cfg, run_id="r1")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        grid.close()
    assert wrapped, "run_experiment pulls through BoundedGrid on Flower's HttpGrid"
    assert summary.stop_reason == "max-updates"
    with sqlite3.connect(tmp_path / "m.db") as db:
        db.row_factory = sqlite3.Row
        rows = [dict(r) for r in db.execute("SELECT * FROM updates ORDER BY seq")]
        status = db.execute("SELECT status FROM runs").fetchone()[0]
    assert status == "completed"
    bombs = [r for r in rows if r["node_id"] == HOSTILE]
    assert bombs and {r["status"] for r in bombs} == {"rejected"}
    assert all(f"its arrays inflate to {CHUNK * REFS + BIAS} bytes" in r["reason"] for r in bombs), bombs[0]
    assert {r["status"] for r in rows if r["node_id"] != HOSTILE} == {"applied"}
    assert peak < CHUNK * REFS / TOLERANCE, f"peak {peak / MiB:.1f} MiB during a run of 256 MiB bombs"


def _recording(seen: list[object]) -> type[BoundedGrid]:
    class Recording(BoundedGrid):
        def __init__(self, grid: HttpGrid, limit: int) -> None:
            super().__init__(grid, limit)
            seen.append(self)

    return Recording
