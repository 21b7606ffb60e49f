"""Checkpoints are verified before they are unpickled, and before the store is touched (server_app/checkpoint.py).

A metrics store is a file people copy and share, so its ``checkpoints.state`` is untrusted input: a flipped byte,
a truncation, a checkpoint sealed with another key, an older unauthenticated one, or a crafted pickle must all be
refused by ``python -m server_app.simulate --resume`` with exit 2 and one line, no code run, and every row of the
store left as it was. One small checkpointed run is made per module; each test tampers with its own copy.
"""

import os
import pickle
import sqlite3
import stat
from pathlib import Path

import pytest

from server_app import checkpoint
from server_app.checkpoint import FORMAT, HEADER, MAGIC, TAG_BYTES, CheckpointError
from server_app.simulate import main as simulate_cli
from server_app.store import MetricsStore
from server_app.testing import simulate

TABLES = ("runs", "updates", "evals", "nodes", "checkpoints")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished run with a checkpoint, plus one ``updates`` row written after it (as a crash would leave): a
    resume rolls that row back, so a refused resume that left it in place really wrote nothing."""
    db = tmp_path_factory.mktemp("made") / "metrics.db"
    run = simulate("fedbuff", nodes=4, db=db, max_updates=8, checkpoint_every=4, model="logreg", min_nodes=1)
    run_id = run.summary.run_id
    with sqlite3.connect(db) as con:
        cols = [r[1] for r in con.execute("PRAGMA table_info(updates)")]
        last = con.execute("SELECT * FROM updates WHERE run_id=? ORDER BY seq DESC LIMIT 1", (run_id,)).fetchone()
        row = dict(zip(cols, last, strict=True), seq=last[cols.index("seq")] + 1000)
        con.execute(f"INSERT INTO updates({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    return db, run_id


@pytest.fixture
def store_copy(made, tmp_path):
    """A private copy of the made store (SQLite's backup API: the WAL's pages included)."""
    src_path, run_id = made
    dst = tmp_path / "copy.db"
    with sqlite3.connect(src_path) as src, sqlite3.connect(dst) as out:
        src.backup(out)
    return dst, run_id


def dump(db):
    with sqlite3.connect(db) as con:
        return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}


def set_state(db, run_id, blob, **columns):
    with sqlite3.connect(db) as con:
        con.execute("UPDATE checkpoints SET state=? WHERE run_id=?", (blob, run_id))
        for col, value in columns.items():
            con.execute(f"UPDATE checkpoints SET {col}=? WHERE run_id=?", (value, run_id))


def state_of(db, run_id):
    with sqlite3.connect(db) as con:
        return con.execute("SELECT state FROM checkpoints WHERE run_id=?", (run_id,)).fetchone()[0]


def refused(db, run_id, capsys, why):
    """``--resume`` exits 2 with one line saying ``why``, and the store is exactly as it was."""
    before = dump(db)
    capsys.readouterr()
    rc = simulate_cli(["--resume", run_id, f"--set=metrics-db='{db}'", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and why in lines[0], err
    assert "Traceback" not in err
    assert dump(db) == before


class Evil:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with the server's rights."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_verified_checkpoint_rolls_back_the_later_rows(store_copy):
    """The control for the tests below: an intact checkpoint resumes and removes the row written after it."""
    db, run_id = store_copy
    store = MetricsStore(db)
    state = store.resume_run(run_id, checkpoint.load)
    store.close()
    assert state.totals.applied >= 8  # the final checkpoint: max-updates reached (FedBuff applies in batches)
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT MAX(seq) FROM updates WHERE run_id=?", (run_id,)).fetchone()[0] < 1000


@pytest.mark.parametrize("where", ["payload", "tag", "spread"])
def test_flipped_bytes_are_refused_and_the_store_is_untouched(store_copy, capsys, where):
    db, run_id = store_copy
    blob = bytearray(state_of(db, run_id))
    start = HEADER.size + (TAG_BYTES if where == "payload" else 0)
    spots = range(len(blob) // 3, len(blob), len(blob) // 40) if where == "spread" else range(start, start + 16)
    for i in list(spots)[:16]:
        blob[i] ^= 0xFF
    set_state(db, run_id, bytes(blob))
    refused(db, run_id, capsys, "fails its integrity check")


def test_a_truncated_checkpoint_is_refused(store_copy, capsys):
    db, run_id = store_copy
    blob = state_of(db, run_id)
    set_state(db, run_id, blob[: len(blob) // 2])
    refused(db, run_id, capsys, "fails its integrity check")
    set_state(db, run_id, blob[:10])
    refused(db, run_id, capsys, "not a format-3 staleflower checkpoint")


def test_another_format_version_is_refused(store_copy, capsys):
    db, run_id = store_copy
    blob = state_of(db, run_id)
    set_state(db, run_id, HEADER.pack(MAGIC, FORMAT + 1) + blob[HEADER.size:])
    refused(db, run_id, capsys, f"checkpoint format {FORMAT + 1} is not {FORMAT}")


def test_a_changed_extent_is_refused(store_copy, capsys):
    """The seal covers the checkpoint's row too: rolling back to another point is a tampering like any other."""
    db, run_id = store_copy
    with sqlite3.connect(db) as con:
        (u_rowid,) = con.execute("SELECT updates_rowid FROM checkpoints WHERE run_id=?", (run_id,)).fetchone()
    set_state(db, run_id, state_of(db, run_id), updates_rowid=u_rowid - 3)
    refused(db, run_id, capsys, "fails its integrity check")


def test_a_wrong_key_is_refused(store_copy, capsys, monkeypatch, tmp_path):
    db, run_id = store_copy
    monkeypatch.setenv("STALEFLOWER_CHECKPOINT_KEY", str(tmp_path / "other.key"))
    checkpoint.signing_key()  # another user's (or machine's) key
    refused(db, run_id, capsys, "sealed with another key")


def test_a_missing_key_is_refused_and_not_made(store_copy, capsys, monkeypatch, tmp_path):
    db, run_id = store_copy
    monkeypatch.setenv("STALEFLOWER_CHECKPOINT_KEY", str(tmp_path / "absent.key"))
    refused(db, run_id, capsys, "no checkpoint key at")
    assert not (tmp_path / "absent.key").exists()


def test_the_payload_used_below_does_run_code_when_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Evil(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("form", ["bare pickle", "forged tag", "attacker's key"])
def test_a_malicious_pickle_is_never_unpickled(store_copy, capsys, tmp_path, form):
    db, run_id = store_copy
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil(marker))
    with sqlite3.connect(db) as con:
        extent_row = con.execute("SELECT applied, updates_rowid, evals_rowid, buffered_json FROM checkpoints "
                                 "WHERE run_id=?", (run_id,)).fetchone()
    from server_app.store import checkpoint_extent

    extent = checkpoint_extent(run_id, *extent_row)
    blob = {"bare pickle": evil,  # the format-2 layout: a pickle and nothing else
            "forged tag": HEADER.pack(MAGIC, FORMAT) + bytes(TAG_BYTES) + evil,
            "attacker's key": checkpoint.seal(evil, extent, os.urandom(32))}[form]
    set_state(db, run_id, blob)
    refused(db, run_id, capsys, "not a format-3" if form == "bare pickle" else "fails its integrity check")
    assert not marker.exists()


def test_seal_binds_the_extent_and_the_key():
    key = os.urandom(32)
    blob = checkpoint.seal(b"payload", "row-1", key)
    assert checkpoint.unseal(blob, "row-1", key) == b"payload"
    for extent, k in (("row-2", key), ("row-1", os.urandom(32))):
        with pytest.raises(CheckpointError, match="integrity check"):
            checkpoint.unseal(blob, extent, k)


def test_the_key_file_is_private_and_made_once(monkeypatch, tmp_path):
    path = tmp_path / "sub" / "checkpoint.key"
    monkeypatch.setenv("STALEFLOWER_CHECKPOINT_KEY", str(path))
    key = checkpoint.signing_key()
    assert len(key) == 32 and checkpoint.signing_key() == key
    if os.name == "posix":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        path.chmod(0o640)
        with pytest.raises(CheckpointError, match="accessible to group or others"):
            checkpoint.signing_key()
    path.chmod(0o600)
    path.write_text("not hex\n")
    with pytest.raises(CheckpointError, match="not 64 hex digits"):
        checkpoint.signing_key()


def test_the_default_key_lives_outside_the_store(monkeypatch, tmp_path):
    monkeypatch.delenv("STALEFLOWER_CHECKPOINT_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert checkpoint.key_path() == tmp_path / "staleflower" / "checkpoint.key"
