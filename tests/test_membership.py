"""Wall-clock fleet membership (server_app/membership.py) on an in-process grid whose nodes come and go.

``FlakyGrid`` behaves like Flower's link state as far as the engine can see: ``get_node_ids()`` lists only the
nodes online; a message to a node that went offline comes back as a ``NODE_UNAVAILABLE`` error reply (Flower's
heartbeat check), or, for a node that dies silently, never (until its TTL). Nodes join and die at scripted points
(after so many training replies), so the tests are quick and do not depend on timing. The real-runtime versions
of these scenarios are in tests/test_deployment.py.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Error, Message

import server_app.membership as membership
from client_app.app import app as client_app
from server_app.app import run_experiment
from server_app.local_grid import LocalGrid
from server_app.simulate import merge_config
from strategies import parse_config
from strategies.config import key_of

NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode


class FlakyGrid(LocalGrid):
    """A LocalGrid whose nodes join late and go offline (loudly or silently) at scripted reply counts."""

    def __init__(self, nodes: int, run_config: dict, *, late: Iterable[int] = (),
                 script: Iterable[tuple[int, str, int]] = ()) -> None:
        super().__init__(client_app, nodes, run_config, run_id=secrets.randbits(62), workers=2)
        self.joined = set(self.contexts) - set(late)
        self.offline: set[int] = set()   # Flower knows: error replies, not listed
        self.silent: set[int] = set()    # dead, but Flower does not know yet: no replies, still listed
        self.script = sorted(script)      # (after this many train replies, "join" | "die" | "vanish", node);
        # a node dies only while it has a training task in flight, so that a task is lost (not while it answers
        # the describe query: discovery would then wait its whole timeout, min(task-ttl, 60 s), for nothing)
        self.sent: dict[str, Message] = {}
        self.unanswered: set[str] = set()  # pushed, no reply handed over yet
        self.train_replies = 0
        self.guard = threading.Lock()

    def _play_script(self) -> None:
        busy = {self.sent[m].metadata.dst_node_id for m in self.unanswered
                if self.sent[m].metadata.message_type == "train"}
        while self.script and self.script[0][0] <= self.train_replies:
            _, action, node = self.script[0]
            if action == "join":
                self.joined.add(node)
            elif node not in busy:  # a node dies mid-task: wait until it has one
                break
            else:
                (self.offline if action == "die" else self.silent).add(node)
            self.script.pop(0)

    def get_node_ids(self) -> list[int]:
        return sorted(self.joined - self.offline)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        msgs = list(messages)
        ids = super().push_messages(msgs)
        for m, mid in zip(msgs, ids, strict=True):
            if mid:
                self.sent[mid] = m
                self.unanswered.add(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self._play_script()  # before pulling: the replies counted so far have been handled by the engine
        wanted = list(message_ids)
        out = []
        for mid in wanted:  # Flower's generated reply for a message whose node went offline
            msg = self.sent.get(mid)
            if msg is not None and msg.metadata.dst_node_id in self.offline and mid in self.unanswered:
                self.unanswered.discard(mid)  # its real reply, if it comes, is never asked for again
                reply = Message(Error(NODE_UNAVAILABLE, "node offline"), reply_to=msg)
                reply.metadata.__dict__["_message_id"] = str(uuid.uuid4())
                out.append(reply)
        dead = self.offline | self.silent
        alive = [m for m in wanted if m in self.sent and self.sent[m].metadata.dst_node_id not in dead]
        for reply in super().pull_messages(alive):
            out.append(reply)
            self.unanswered.discard(reply.metadata.reply_to_message_id)
            if self.sent[reply.metadata.reply_to_message_id].metadata.message_type == "train":
                self.train_replies += 1
        return out


@pytest.fixture(autouse=True)
def quick_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(membership, "REFRESH_S", 0.02)


def _run(tmp_path: Path, grid_kwargs: dict, nodes: int = 4, **settings) -> tuple[object, list[dict], list[dict]]:
    values = {"clock": "wall", "model": "logreg", "local-steps": 2, "eval-every": 10, "min-nodes": 3, "task-ttl": 10.0,
              "metrics-db": str(tmp_path / "m.db"), **{key_of(k): v for k, v in settings.items()}}
    cfg = parse_config(merge_config(overrides=values))  # with the strategy's own hyperparameters declared
    grid = FlakyGrid(nodes, cfg.to_mapping(), **grid_kwargs)
    try:
        summary = run_experiment(grid, cfg, run_id="r1")
    finally:
        grid.close()
    with sqlite3.connect(tmp_path / "m.db") as db:
        db.row_factory = sqlite3.Row
        updates = [dict(r) for r in db.execute("SELECT * FROM updates ORDER BY seq")]
        fleet = [dict(r) for r in db.execute("SELECT * FROM nodes ORDER BY idx")]
    return summary, updates, fleet


@pytest.mark.parametrize("strategy", ["fedbuff", "abs"])
def test_node_vanishing_mid_task_and_late_joiner(tmp_path: Path, strategy: str) -> None:
    # Node 1001 goes offline after 3 training replies; node 1003 only comes online after 6.
    summary, updates, fleet = _run(
        tmp_path, {"late": [1003], "script": [(3, "die", 1001), (6, "join", 1003)]},
        strategy=strategy, max_updates=40, buffer_size=2, k=2, k_double_every=0.0,
    )
    assert summary.stop_reason == "max-updates", summary
    lost = [u for u in updates if u["node_id"] == 1001 and u["status"] == "failed"]
    assert lost, "the task in flight on the vanished node is not recorded"
    assert all(f"client error {NODE_UNAVAILABLE}" in u["reason"] for u in lost), lost
    # The vanished node is not given work again: nothing dispatched to it after its loss was known.
    known_at = min(u["completed_at"] for u in lost)
    assert not [u for u in updates if u["node_id"] == 1001 and u["dispatched_at"] > known_at]
    # The late joiner was described (its partition is in the nodes table) and trained.
    late = [n for n in fleet if n["node_id"] == 1003]
    assert late and late[0]["partition_id"] == 3 and late[0]["idx"] == 3
    assert any(u["node_id"] == 1003 and u["status"] in ("applied", "buffered") for u in updates)
    survivors = {u["node_id"] for u in updates if u["status"] == "applied"}
    assert {1000, 1002, 1003} <= survivors


def test_silent_death_fails_at_task_ttl(tmp_path: Path) -> None:
    # The node dies without Flower noticing (heartbeats not yet overdue): its task fails at task-ttl.
    summary, updates, _ = _run(tmp_path, {"script": [(2, "vanish", 1002)]}, nodes=3, strategy="fedbuff",
                               max_updates=0, max_time=2.5, buffer_size=1, task_ttl=1.0)
    assert summary.stop_reason == "max-time"
    lost = [u for u in updates if u["node_id"] == 1002 and u["status"] == "failed"]
    assert lost and all("task-ttl" in u["reason"] for u in lost), lost


def test_abs_k_shrinks_with_the_fleet(tmp_path: Path) -> None:
    # K(t) = min(N, k 2^(t/every)) would wait for 4 distinct arrivals; with one node gone, N is 3.
    summary, updates, _ = _run(tmp_path, {"script": [(1, "die", 1001)]}, strategy="abs", max_updates=30, k=4,
                               k_double_every=0.0, abs_mode="clock")
    assert summary.stop_reason == "max-updates"
    assert {1000, 1002, 1003} <= {u["node_id"] for u in updates if u["status"] == "applied"}


def test_empty_fleet_waits_for_a_node_then_stalls(tmp_path: Path) -> None:
    # Both nodes gone after their first replies: the engine waits task-ttl for one to come back, then stops.
    with pytest.raises(RuntimeError, match="stalled"):
        _run(tmp_path, {"script": [(1, "die", 1000), (1, "die", 1001)]}, nodes=2, min_nodes=2,
             strategy="fedbuff", max_updates=50, task_ttl=0.5)


def test_fixed_fleet_strategy_leaves_newcomers_out(tmp_path: Path) -> None:
    # OLCO3's periods are built for the nodes it started with: a late node is not admitted.
    summary, updates, fleet = _run(tmp_path, {"late": [1003], "script": [(2, "join", 1003)]}, strategy="olco3",
                                   max_updates=12)
    assert summary.stop_reason == "max-updates"
    assert 1003 not in {n["node_id"] for n in fleet}
    assert 1003 not in {u["node_id"] for u in updates}


def test_abs_applies_arrivals_in_hand_when_a_silent_node_is_declared_gone(tmp_path: Path) -> None:
    # K = N = 4. Node 1001 dies silently; the three others deliver (3 of 4) and wait (distinct nodes); then
    # Flower declares 1001 unavailable. K is now 3: the three arrivals in hand are an update, not a stall.
    summary, updates, _ = _run(tmp_path, {"script": [(0, "vanish", 1001), (3, "die", 1001)]}, strategy="abs",
                               max_updates=12, k=4, k_double_every=0.0, task_ttl=5.0, abs_mode="clock")
    assert summary.stop_reason == "max-updates"
    lost = [u for u in updates if u["node_id"] == 1001]  # its one task, lost when Flower declared it gone
    assert [u["status"] for u in lost] == ["failed"] and f"client error {NODE_UNAVAILABLE}" in lost[0]["reason"]
