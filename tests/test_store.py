"""The metrics store keeps DESIGN.md's schema, in WAL mode, readable while a run writes."""

import sqlite3

import pytest

from server_app.store import MetricsStore, UpdateRow, unsigned_node_id

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
    reader = sqlite3.connect(tmp_path / "m.db")
    assert reader.execute("SELECT status, applied_version FROM updates ORDER BY seq").fetchall() == [
        ("applied", 3), ("applied", 3)]
    assert reader.execute("SELECT status FROM runs").fetchone() == ("running",)
    store.finish_run("completed")
    assert reader.execute("SELECT status, finished_at > started_at FROM runs").fetchone() == ("completed", 1)
    store.close()


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
