"""The metrics store keeps DESIGN.md's schema, in WAL mode, readable while a run writes."""

import sqlite3
import time

import pytest

from client_app.app import app as staleflower_client
from server_app import store as store_module
from server_app.simulate import merge_config, run_local
from server_app.store import MetricsStore, UpdateRow, unsigned_node_id
from strategies.taskkeys import TASK_SEQ

CONTRACT = {
    "runs": ["run_id", "started_at", "finished_at", "status", "strategy", "config_json"],
    "updates": ["run_id", "seq", "node_id", "dispatched_at", "completed_at", "base_version", "applied_version",
                "staleness", "bytes_up", "bytes_down", "compute_s", "comm_s", "status", "reason"],
    "evals": ["run_id", "t", "model_version", "updates_applied", "bytes_up_total", "bytes_down_total", "loss",
              "accuracy"],
}


def row(seq, status="buffered"):
    return UpdateRow(seq, 7, 0.0, 1.0, 0, None, 0, 10, 20, 0.5, 0.5, status)


def test_schema_contains_the_contract_in_order_and_uses_wal(tmp_path):
    store = MetricsStore(tmp_path / "m.db")
    con = sqlite3.connect(tmp_path / "m.db")
    for table, columns in CONTRACT.items():
        have = [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
        assert have[: len(columns)] == columns
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_rows_are_visible_to_a_reader_while_the_writer_is_open(tmp_path):
    store = MetricsStore(tmp_path / "m.db")
    store.start_run("r1", "fedbuff", {"lr": 0.1})
    store.record_update(row(0))
    store.record_update(row(1))
    store.mark_applied([0, 1], version=3)
    store.commit()  # task outcomes are committed in groups (see the next test)
    reader = sqlite3.connect(tmp_path / "m.db")
    assert reader.execute("SELECT status, applied_version FROM updates ORDER BY seq").fetchall() == [
        ("applied", 3), ("applied", 3)]
    assert reader.execute("SELECT status FROM runs").fetchone() == ("running",)
    store.finish_run("completed")
    assert reader.execute("SELECT status, finished_at > started_at FROM runs").fetchone() == ("completed", 1)
    store.close()


def count(path, table="updates"):
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as reader:
        return reader.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def waiting_store(tmp_path, monkeypatch):
    """A store whose groups never age (only an explicit write commits them), a run, and task 0 in its group."""
    monkeypatch.setattr(store_module, "GROUP_COMMIT_S", 3600.0)
    store = MetricsStore(tmp_path / "m.db")
    store.start_run("r1", "fedbuff", {})
    store.record_update(row(0))
    return store


def test_task_outcomes_are_committed_in_groups_and_never_rolled_back_by_another_write(tmp_path, monkeypatch):
    """A group is committed when it is old enough, by any other write, on close; a failing write keeps it."""
    store = waiting_store(tmp_path, monkeypatch)
    store.record_task_metrics(0, 7, {"train-loss": 0.5})
    assert count(tmp_path / "m.db") == 0  # still waiting in the group
    store.commit()
    assert (count(tmp_path / "m.db"), count(tmp_path / "m.db", "task_metrics")) == (1, 1)

    store.record_update(row(1))
    with pytest.raises(RuntimeError, match="seal failed"):  # a write of its own fails and is rolled back...
        store.save_checkpoint(1, lambda extent: (_ for _ in ()).throw(RuntimeError("seal failed")))
    assert count(tmp_path / "m.db") == 2  # ...after the group was committed: the group stays
    assert count(tmp_path / "m.db", "checkpoints") == 0

    store.record_update(row(2))
    store.record_eval(1.0, 1, 2, 10, 20, 0.5, 0.9)  # an evaluation commits the group with it
    assert count(tmp_path / "m.db") == 3
    store.record_update(row(3))
    monkeypatch.setattr(store_module, "GROUP_COMMIT_S", 0.0)  # old enough: the next row commits the group
    store.record_update(row(4))
    assert count(tmp_path / "m.db") == 5
    monkeypatch.setattr(store_module, "GROUP_COMMIT_S", 3600.0)
    store.record_update(row(5))
    store.close()  # closing writes the waiting group
    assert count(tmp_path / "m.db") == 6


def test_a_group_does_not_hold_the_write_lock_and_a_failed_write_keeps_it(tmp_path, monkeypatch):
    """Another process's writer is never kept waiting by a group; a group whose write fails is written later."""
    store = waiting_store(tmp_path, monkeypatch)
    other = sqlite3.connect(tmp_path / "m.db", timeout=0.0)  # fails at once if the lock is held
    other.execute("INSERT INTO evals(run_id, t) VALUES ('other', 0.0)")
    other.commit()
    blocker = sqlite3.connect(tmp_path / "m.db", timeout=0.0, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock: the group cannot be written now
    store.db.execute("PRAGMA busy_timeout = 0")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.commit()
    blocker.execute("COMMIT")
    store.record_update(row(1))
    store.commit()
    assert count(tmp_path / "m.db") == 2  # the failed group was written with the next commit, in order
    store.close()


def test_a_group_is_one_transaction_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A statement failing in the middle of a group leaves none of the group's rows; the next commit writes all.

    The connection is in autocommit mode, where ``with db`` alone opens no transaction: without its ``BEGIN``
    the rows before the failure would be committed one by one (and each commit would cost more than its row).
    """
    store = waiting_store(tmp_path, monkeypatch)
    for seq in range(1, 10):
        store.record_update(row(seq))
    store.mark_applied(range(10), version=1)
    store.db.execute("CREATE TRIGGER no_five BEFORE INSERT ON updates WHEN NEW.seq = 5 "
                     "BEGIN SELECT RAISE(ABORT, 'seq 5 refused'); END")
    with pytest.raises(sqlite3.Error, match="seq 5 refused"):
        store.commit()
    assert count(tmp_path / "m.db") == 0  # rows 0-4 came before the failure: rolled back with it
    assert not store.db.in_transaction
    store.db.execute("DROP TRIGGER no_five")
    store.commit()
    with sqlite3.connect(f"file:{tmp_path / 'm.db'}?mode=ro", uri=True) as reader:
        assert reader.execute("SELECT seq, status, applied_version FROM updates ORDER BY seq").fetchall() == [
            (seq, "applied", 1) for seq in range(10)]
    store.close()


def test_rows_are_committed_before_the_engine_waits_for_a_client(tmp_path, monkeypatch):
    """A busy engine commits by age; one that waits for a slow client commits first, so a reader sees the run.

    One node's task waits until a reader sees rows; groups never age here, so only the commit before waiting
    lets the run go on (without it the task gives up after 20 s and the test fails).
    """
    monkeypatch.setattr(store_module, "GROUP_COMMIT_S", 3600.0)
    db, seen = tmp_path / "m.db", []

    def slow_client(msg, context):
        if msg.metadata.message_type == "train" and msg.content["config"][TASK_SEQ] == 6:
            deadline = time.monotonic() + 20
            while not seen and time.monotonic() < deadline:
                if (rows := count(db)) > 0:
                    seen.append(rows)
                time.sleep(0.01)
        return staleflower_client(msg, context)

    values = merge_config(overrides={"strategy": "fedbuff", "model": "logreg", "local-steps": 1, "max-updates": 10,
                                     "eval-every": 0, "metrics-db": str(db), "min-nodes": 3})
    summary = run_local(values, nodes=3, clientapp=slow_client)
    assert summary.applied >= 10
    assert seen and seen[0] >= 1
    assert count(db) >= 10  # and the run's end committed the rest


def test_unknown_statuses_are_refused(tmp_path):
    store = MetricsStore(tmp_path / "m.db")
    store.start_run("r1", "fedbuff", {})
    with pytest.raises(ValueError, match="unknown update status"):
        store.record_update(row(0, status="done"))
    with pytest.raises(ValueError, match="unknown run status"):
        store.finish_run("ok")


def test_two_runs_share_a_store(tmp_path):
    for run_id in ("a", "b"):
        store = MetricsStore(tmp_path / "m.db")
        store.start_run(run_id, "fedavg", {})
        store.record_update(row(0))
        store.finish_run("completed")
        store.close()
    con = sqlite3.connect(tmp_path / "m.db")
    assert con.execute("SELECT COUNT(*) FROM updates").fetchone() == (2,)


def test_flower_node_ids_beyond_2_63_are_stored_losslessly(tmp_path):
    big = 2**64 - 5  # Flower's real node ids are random unsigned 64-bit numbers
    store = MetricsStore(tmp_path / "m.db")
    store.start_run("r", "fedbuff", {})
    store.record_update(UpdateRow(0, big, 0.0, 1.0, 0, None, 0, 1, 1, 0.1, 0.1, "failed"))
    store.record_nodes([(big, 0, 0, "laptop", "wifi", 1.0, 0.0, "cpu")])
    con = sqlite3.connect(tmp_path / "m.db")
    (stored,) = con.execute("SELECT node_id FROM updates").fetchone()
    assert unsigned_node_id(stored) == big
    assert con.execute("SELECT node_id FROM nodes").fetchone() == (stored,)


def test_a_group_written_again_after_an_interrupted_commit_writes_the_same_rows(tmp_path, monkeypatch):
    """A signal may land after the commit but before the group is let go: writing it again changes nothing."""
    store = waiting_store(tmp_path, monkeypatch)
    store.record_task_metrics(0, 7, {"train-loss": 0.5})
    store.mark_applied([0], version=2)
    group = [(sql, list(rows)) for sql, rows in store._group]
    store.commit()
    store._group = group  # as the commit's failure path leaves it when the signal came after the commit
    store.commit()
    with sqlite3.connect(tmp_path / "m.db") as reader:
        assert reader.execute("SELECT seq, status, applied_version FROM updates").fetchall() == [(0, "applied", 2)]
        assert reader.execute("SELECT COUNT(*) FROM task_metrics").fetchone() == (1,)
    store.close()
