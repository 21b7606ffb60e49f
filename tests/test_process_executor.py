"""LocalGrid's process executor: the same run as with threads, the same replies, and dead workers cost only tasks.

The first process grid of a test session starts Python's forkserver (it imports torch, Flower and the ClientApp:
about 1.5 s on an idle 2-core machine); later grids fork from it in milliseconds. The determinism test comes first,
so it pays that start and the others do not.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from server_app.client_processes import CLIENT_APP_CRASHED, CLIENT_APP_RAISED_EXCEPTION, REPLY_MESSAGE_UNAVAILABLE
from server_app.local_grid import LocalGrid
from server_app.simulate import merge_config, run_local
from server_app.testing import FAST_DEFAULTS, SimRun
from strategies.config import key_of
from tests.golden.record import trace_of
from tests.process_clients import counting

ROOT = Path(__file__).resolve().parent.parent

RUN_ID = 2**62 + 11  # a 9-byte varint, as random_run_id gives: the stored wire sizes do not depend on it


def ask(node: int, kind: str = "query.count", ttl: float | None = None) -> Message:
    return Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=node, message_type=kind, group_id="7",
                   ttl=ttl)


def wait_for(grid: LocalGrid, ids: list[str], timeout: float = 20.0) -> dict[str, Message]:
    """Pull until every id has its reply (fails the test after ``timeout`` s)."""
    got: dict[str, Message] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(ids):
        assert time.monotonic() < deadline, f"only {len(got)} of {len(ids)} replies after {timeout} s"
        got.update((r.metadata.reply_to_message_id, r) for r in grid.pull_messages([i for i in ids if i not in got]))
        time.sleep(0.002)
    return got


def run(executor: str, db, model: str | None = None) -> SimRun:
    values = {key_of(k): v for k, v in FAST_DEFAULTS.items()}
    values.update({"strategy": "fedbuff", "max-updates": 30, "metrics-db": str(db)})
    if model is not None:
        values["model"] = model
    summary = run_local(merge_config(overrides=values), nodes=6, executor=executor, run_id=RUN_ID)
    return SimRun(summary, db)


@pytest.mark.parametrize("model", [None, "tests.user_models:DropoutNet"], ids=["default", "dropout"])
def test_thread_and_process_give_the_same_run(tmp_path, model):
    """Same seed, same trace: who trained on which version, when on the virtual clock, the bytes, the model.

    The final weights are compared bitwise: both executors run the same torch operations on this machine with
    one intra-op thread (conftest.py sets it here, each worker process sets it for itself). A model with dropout
    too: its masks come from each task's seed (``client_app.models.task_rng``), not from whichever tasks the
    thread or the process ran before.
    """
    threads = run("thread", tmp_path / "thread.db", model)
    processes = run("process", tmp_path / "process.db", model)
    assert processes.summary.applied == 30
    assert trace_of(processes) == trace_of(threads)
    for a, b in zip(processes.summary.weights, threads.summary.weights, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_replies_and_node_state(executor):
    """Replies carry the same metadata on both executors, a raising client is an error reply, and each node keeps
    its Context across messages (with processes: in the one worker it is pinned to)."""
    grid = LocalGrid(counting if executor == "thread" else "tests.process_clients:counting", 4, {"a": 1},
                     run_id=RUN_ID, workers=2, executor=executor)
    try:
        tasks = [ask(1000), ask(1001), ask(1000), ask(1002, "query.boom"), ask(1000)]
        ids = grid.push_messages(tasks)
        got = wait_for(grid, ids)
    finally:
        grid.close()
    for task, mid in zip(tasks, ids, strict=True):
        reply = got[mid].metadata
        assert (reply.reply_to_message_id, reply.src_node_id, reply.dst_node_id, reply.run_id) == \
               (mid, task.metadata.dst_node_id, 0, RUN_ID)
        assert (reply.message_type, reply.group_id, reply.dst_task_id) == (task.metadata.message_type, "7", 1)
        assert reply.message_id and reply.message_id != mid
    counts = [int(got[m].content["count"]["n"]) for m in (ids[0], ids[1], ids[2], ids[4])]
    assert counts == [1, 1, 2, 3]
    assert got[ids[3]].error.code == CLIENT_APP_RAISED_EXCEPTION
    assert got[ids[3]].error.reason == "RuntimeError: boom"
    pids = {int(got[m].content["count"]["pid"]) for m in (ids[0], ids[2], ids[4])}
    assert len(pids) == 1 and (executor == "thread") == (pids == {os.getpid()})


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_a_clientapp_that_calls_sys_exit_costs_its_task_only(executor):
    """``sys.exit()`` in a ClientApp is Flower's "ClientApp crashed" for that task, on either executor; the node
    and the grid go on (on client threads it used to end the run with the exit code)."""
    grid = LocalGrid(counting if executor == "thread" else "tests.process_clients:counting", 4, {},
                     run_id=RUN_ID, workers=2, executor=executor)
    try:
        ids = grid.push_messages([ask(1000), ask(1000, "query.exit"), ask(1000)])
        got = wait_for(grid, ids)
        assert sorted(grid.get_node_ids()) == [1000, 1001, 1002, 1003]
    finally:
        grid.close()
    assert got[ids[1]].error.code == CLIENT_APP_CRASHED and got[ids[1]].error.reason == "SystemExit: 3"
    assert [int(got[m].content["count"]["n"]) for m in (ids[0], ids[2])] == [1, 2]


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_send_and_receive_returns_each_reply_once(executor):
    """Flower's strategies call ``send_and_receive``: every message's reply, once, whatever order they come in."""
    grid = LocalGrid(counting if executor == "thread" else "tests.process_clients:counting", 4, {},
                     run_id=RUN_ID, workers=2, executor=executor, reorder_seed=3)
    try:
        tasks = [ask(1000 + i % 4) for i in range(12)]
        replies = grid.send_and_receive(tasks, timeout=60)
    finally:
        grid.close()
    sent = [t.metadata.message_id for t in tasks]
    assert sorted(r.metadata.reply_to_message_id for r in replies) == sorted(sent)
    assert all(not r.has_error() for r in replies)


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_send_and_receive_is_not_held_up_by_a_reply_that_names_another_message(executor):
    """A reply is its task's, whatever message it names: a worker answers its tasks in order, one reply each."""
    grid = LocalGrid("tests.process_clients:counting", 2, {}, run_id=RUN_ID, workers=2, executor=executor)
    try:
        t = time.monotonic()
        replies = grid.send_and_receive([ask(1000), ask(1001, "query.spoof")], timeout=30)
        assert time.monotonic() - t < 10
    finally:
        grid.close()
    assert len(replies) == 2 and "another-message" in {r.metadata.reply_to_message_id for r in replies}


def test_a_killed_worker_costs_the_node_it_was_running_and_close_stops_a_stuck_one():
    grid = LocalGrid("tests.process_clients:counting", 4, {}, workers=2, executor="process")
    assert grid.processes is not None
    try:
        stuck = grid.push_messages([ask(1000, "query.sleep")])  # worker 0 holds nodes 1000 and 1002
        grid.processes.wait_ready(timeout=20)
        time.sleep(0.05)  # let it start the task
        os.kill(grid.processes.workers[0].process.pid, signal.SIGKILL)
        lost = wait_for(grid, stuck)[stuck[0]]
        assert lost.error.code == CLIENT_APP_CRASHED and "SIGKILL" in lost.error.reason
        assert sorted(grid.get_node_ids()) == [1001, 1002, 1003]  # the node it was running is offline
        later = grid.push_messages([ask(1000), ask(1002), ask(1003)])
        replies = wait_for(grid, later)
        assert replies[later[0]].error.code == CLIENT_APP_CRASHED and "offline" in replies[later[0]].error.reason
        assert replies[later[1]].content["count"]["n"] == 1  # a new worker: a fresh Context, as after a reboot
        assert replies[later[2]].content["count"]["n"] == 1
        idle = grid.processes.workers[1].process  # nodes 1001 and 1003, nothing in flight
        os.kill(idle.pid, signal.SIGKILL)
        idle.join(5)
        again = grid.push_messages([ask(1001), ask(1003)])
        got = wait_for(grid, again)
        assert [got[m].content["count"]["n"] for m in again] == [1, 1]  # nobody to blame: both start afresh
        assert sorted(grid.get_node_ids()) == [1001, 1002, 1003] and grid.processes.workers[1].process is not idle
        grid.push_messages([ask(1001, "query.sleep")])
    finally:
        t = time.monotonic()
        grid.processes.close(timeout=0.3)  # worker 1 now sleeps in its client: killed after the timeout
        assert time.monotonic() - t < 5
    assert all(w.process.exitcode is not None for w in grid.processes.workers)


def test_a_worker_that_dies_before_it_is_known_ready_is_not_replaced():
    """No restart loop for a worker that cannot start: it is not replaced, its nodes go offline."""
    grid = LocalGrid("tests.process_clients:counting", 4, {}, workers=2, executor="process")
    assert grid.processes is not None
    try:
        dead = grid.processes.workers[0].process  # nodes 1000 and 1002; nothing read from it yet
        os.kill(dead.pid, signal.SIGKILL)
        dead.join(5)
        [lost] = grid.push_messages([ask(1002)])
        assert wait_for(grid, [lost])[lost].error.code == CLIENT_APP_CRASHED
        assert grid.processes.workers[0].process is dead and sorted(grid.get_node_ids()) == [1001, 1003]
    finally:
        grid.close()


def test_a_reply_that_cannot_be_decoded_costs_its_node_not_the_run():
    """A ClientApp that makes its worker write garbage: that worker is killed and replaced, that node goes offline,
    the grid goes on."""
    grid = LocalGrid("tests.process_clients:garbling", 4, {}, workers=2, executor="process")
    assert grid.processes is not None
    try:
        grid.processes.wait_ready(timeout=20)
        killed = grid.processes.workers[0].process
        ids = grid.push_messages([ask(1000, "query.garble"), ask(1001)])  # worker 0 holds 1000 and 1002
        replies = wait_for(grid, ids)
        lost = replies[ids[0]]
        assert lost.error.code == CLIENT_APP_CRASHED and "cannot be decoded" in lost.error.reason
        assert replies[ids[1]].content["count"]["n"] == 1
        assert sorted(grid.get_node_ids()) == [1001, 1002, 1003]
        later = grid.push_messages([ask(1000), ask(1002), ask(1003)])
        again = wait_for(grid, later)
        assert again[later[0]].error.code == CLIENT_APP_CRASHED and "cannot be decoded" in again[later[0]].error.reason
        assert again[later[1]].content["count"]["n"] == 1 and again[later[2]].content["count"]["n"] == 1
    finally:
        grid.close()
    assert killed.exitcode == -signal.SIGKILL


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_clientapps_that_never_return_cost_their_nodes_not_the_run(tmp_path, executor):
    """A real ``simulate`` whose ClientApp hangs on two of five nodes, as many as there are workers: the run
    completes on the other three (it used to fail, every client stuck), and the process exits (a stuck client thread
    is left behind with a warning: threads cannot be stopped)."""
    app = tmp_path / "hanging.py"
    app.write_text("import time\n\n"
                   "def app(msg, context):\n"
                   "    if msg.metadata.message_type == 'train' and context.node_id in (1001, 1002):\n"
                   "        time.sleep(600)\n"
                   "    from client_app.app import app as ours\n"
                   "    return ours(msg, context)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "server_app.simulate", "--quiet", "--nodes", "5", "--workers", "2",
                           "--executor", executor, "--clientapp", "hanging:app", "--set", "max-updates=12", "--set",
                           "task-ttl=2", "--set", "clock=wall", "--set", f"metrics-db={tmp_path / 'm.db'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stopped on max-updates" in proc.stdout and time.monotonic() - t < 60
    for node in (1001, 1002):
        assert f"node {node}: its ClientApp has run" in proc.stderr
    assert ("still running a ClientApp" in proc.stderr) == (executor == "thread")


def test_a_client_thread_stuck_past_its_ttl_is_replaced_and_its_node_carries_on_after():
    release = threading.Event()

    def app(msg: Message, context) -> Message:
        if msg.metadata.message_type == "query.hang":
            release.wait(30)
        return counting(msg, context)

    grid = LocalGrid(app, 2, {}, workers=1)
    assert grid.pool is not None
    try:
        [stuck] = grid.push_messages([ask(1000, "query.hang", ttl=0.3)])
        time.sleep(0.05)
        [waits] = grid.push_messages([ask(1000, ttl=0.3)])  # behind the stuck call, until its own ttl runs out
        [other] = grid.push_messages([ask(1001)])  # the only client thread is stuck: its replacement runs this
        got = wait_for(grid, [waits, other], timeout=10)
        assert got[other].content["count"]["n"] == 1
        assert got[waits].error.code == REPLY_MESSAGE_UNAVAILABLE and "ran out" in got[waits].error.reason
        assert len(grid.pool.threads) == 2 and len(grid.pool.retired) == 1
        release.set()
        assert wait_for(grid, [stuck])[stuck].content["count"]["n"] == 1  # late, but the node carries on
        [again] = grid.push_messages([ask(1000)])
        assert wait_for(grid, [again])[again].content["count"]["n"] == 2  # its Context kept
        assert sorted(grid.get_node_ids()) == [1000, 1001]
    finally:
        release.set()
        grid.close()


def test_a_node_runs_one_call_at_a_time_on_client_threads():
    active: dict[int, int] = {}
    most = [0]
    lock = threading.Lock()

    def app(msg: Message, context) -> Message:
        node = msg.metadata.dst_node_id
        with lock:
            active[node] = active.get(node, 0) + 1
            most[0] = max(most[0], active[node])
        time.sleep(0.05)
        with lock:
            active[node] -= 1
        return counting(msg, context)

    grid = LocalGrid(app, 2, {}, workers=4)
    try:
        ids = grid.push_messages([ask(1000) for _ in range(4)] + [ask(1001)])
        got = wait_for(grid, ids)
    finally:
        grid.close()
    assert most[0] == 1  # four threads, four tasks for node 1000: one at a time, in order
    assert [got[i].content["count"]["n"] for i in ids] == [1, 2, 3, 4, 1]


def test_a_worker_stuck_past_its_ttl_is_replaced_and_only_its_node_goes_offline():
    grid = LocalGrid("tests.process_clients:counting", 4, {}, workers=2, executor="process")
    assert grid.processes is not None
    try:
        grid.processes.wait_ready(timeout=20)
        first = grid.processes.workers[0].process  # nodes 1000 and 1002
        wait_for(grid, grid.push_messages([ask(1002)]))
        stuck, behind, other = grid.push_messages([ask(1000, "query.sleep", ttl=0.5), ask(1002), ask(1001)])
        got = wait_for(grid, [stuck, behind, other])
        assert got[stuck].error.code == CLIENT_APP_CRASHED and "offline for the rest of the run" in \
            got[stuck].error.reason
        assert got[behind].content["count"]["n"] == 1  # queued behind it, run by the new worker: a fresh Context
        assert got[other].content["count"]["n"] == 1 and first.exitcode == -signal.SIGKILL
        assert sorted(grid.get_node_ids()) == [1001, 1002, 1003]
        [again] = grid.push_messages([ask(1000)])
        assert wait_for(grid, [again])[again].error.code == CLIENT_APP_CRASHED
        napping, expires = grid.push_messages([ask(1002, "query.nap"), ask(1002, ttl=0.2)])
        late = wait_for(grid, [napping, expires])
        assert late[napping].content["count"]["n"] == 2 and late[expires].error.code == REPLY_MESSAGE_UNAVAILABLE
    finally:
        grid.close()


def test_what_a_worker_cannot_import_is_refused_at_once():
    with pytest.raises(ValueError, match="import path such as 'client_app.app:app'"):
        LocalGrid(lambda msg, context: msg, 2, {}, executor="process")
    with pytest.raises(ValueError, match="cannot load ClientApp 'no_such_module:app'"):
        LocalGrid("no_such_module:app", 2, {}, executor="process")
    with pytest.raises(ValueError, match="executor must be one of thread, process"):
        LocalGrid(counting, 2, {}, executor="fork")  # type: ignore[arg-type]


def test_the_command_line_takes_only_known_executors(capsys):
    from server_app.simulate import main

    with pytest.raises(SystemExit) as exc:
        main(["--executor", "fork"])
    assert exc.value.code == 2
    assert "invalid choice: 'fork'" in capsys.readouterr().err
