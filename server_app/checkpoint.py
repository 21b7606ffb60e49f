"""Crash-safe runs: the engine's whole state, checkpointed atomically into the metrics store, and resumed.

With ``checkpoint-every = N`` (on by default, every 500 applied updates: RELIABILITY.md measures what that costs)
the engine saves, after every N applied updates and at the end of the run, one pickle of its ``EngineState``
(``server_app/state.py``), which holds everything that decides the rest of the run: the strategy object (model,
versions, buffers, queues, server-side residuals, its random generators), the clock's time, counters, random
generator, outlier-filter window, published versions still in use, the downlink compressor's copies, and every
task in flight with the message it was sent.
It goes into the store's ``checkpoints`` table in one SQLite transaction, together with how far the store's
``updates`` and ``evals`` tables had been written, so a checkpoint and the rows it accounts for can never
disagree; the previous checkpoint of the run is replaced in the same transaction.

``resume = RUN_ID`` (or ``python -m server_app.simulate --resume RUN_ID``) reopens the run: the checkpoint is
verified and decoded first, and only then are rows written after it rolled back (buffered updates that were
applied since go back to ``buffered``), the state restored, tasks that were in flight sent again (same task seed,
same timings), and the run goes on. On the virtual clock the remaining run is then the same as if it had never
stopped: same update sequence, same final weights (tested by SIGKILLing the runner). Rows between the last
checkpoint and the crash are redone, not lost; on the wall clock their clients' work is redone too, so
``checkpoint-every = 1`` is the setting that never rolls back an update the store had shown as applied.

What a checkpoint cannot hold is the nodes' own state (``context.state``: error-feedback residuals, OLCO3's
queues, downlink copies). SuperNodes keep theirs across a server crash; the in-process runner's nodes die with
it, so runs that use client state resume exactly only in deployment.

Why pickle, and how it is made safe
-----------------------------------
Unpickling runs whatever code the bytes name, and a metrics store is a file people copy, share and download; a
flipped byte could also decode to a different model and resume silently. The state is kept as a pickle because
it is the strategy's *whole* object graph (any registered strategy, or one outside this repository, with its own
buffers and generators): a plain format (``np.save(allow_pickle=False)`` + JSON) would need every strategy to
write and read its own state, and a field one forgot would resume wrong without an error. So the pickle is
authenticated instead: the blob is ``MAGIC | format | HMAC-SHA256 tag | pickle``, the tag computed over the
format, the checkpoint's row in the store (run id, applied updates, how far ``updates`` and ``evals`` went, the
buffered rows) and the pickle, with a key that lives *outside* the store. On resume the tag is checked with
``hmac.compare_digest`` before ``pickle.loads`` sees a byte, and before the store is touched; a blob that is
truncated, altered, of another format, from another run or row, or sealed with another key is refused with one
line (``CheckpointError``), never unpickled.

The key is 32 random bytes, hex, in a per-user file created with mode 0600 on first use: ``$STALEFLOWER_CHECKPOINT_KEY``
names the file, else ``$XDG_CONFIG_HOME/staleflower/checkpoint.key`` (``~/.config/...``). It lives apart from the
store so that whoever gets a store (a copy, a shared results folder, a download) cannot forge a checkpoint in it;
a key file readable by group or others is refused for the same reason. The flip side: **anyone who can read the
key file can forge checkpoints**, and a forged checkpoint runs code as whoever resumes it; guard it like an SSH
key. A run resumes on another machine or account only with its key copied there (or the variable pointing at it).
The tag proves who wrote a checkpoint and that it is intact; it hides nothing (the pickle is not encrypted).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import secrets
import stat
import struct
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, ConfigRecordValues, RecordDict

from server_app.state import EngineState

FORMAT = 3  # 3: sealed with HMAC-SHA256 (2 and earlier: a bare pickle, never unpickled now)
MAGIC = b"SFCK"
HEADER = struct.Struct(">4sH")  # magic, format
TAG_BYTES = hashlib.sha256().digest_size
KEY_ENV = "STALEFLOWER_CHECKPOINT_KEY"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (missing, other format, other fleet, failed verification)."""


# ---------------------------------------------------------------------------------------------------- the key
def key_path() -> Path:
    """Where the checkpoint key lives: ``$STALEFLOWER_CHECKPOINT_KEY``, else the user's config directory."""
    if named := os.environ.get(KEY_ENV, ""):
        return Path(named).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME", "") or "~/.config"
    return Path(config).expanduser() / "staleflower" / "checkpoint.key"


def signing_key(create: bool = True) -> bytes:
    """The checkpoint key, made on first use when ``create`` (a resume never makes one: it could not match)."""
    path = key_path()
    if not path.exists():
        if not create:
            raise CheckpointError(f"no checkpoint key at {path}: checkpoints verify only with the key that sealed "
                                  f"them (copy it here, or set {KEY_ENV} to its file)")
        _create_key(path)
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the checkpoint key {path}: {exc}") from exc
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CheckpointError(f"the checkpoint key {path} is accessible to group or others (mode "
                              f"{stat.S_IMODE(mode):o}): anyone who reads it can forge checkpoints; chmod 600 it")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 32:
        raise CheckpointError(f"the checkpoint key {path} is not 64 hex digits")
    return key


def _create_key(path: Path) -> None:
    """Write a fresh key with mode 0600, atomically: a concurrent run either wins the link or reads ours."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(secrets.token_hex(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the checkpoint key {path}: {exc} (set {KEY_ENV} to a writable path, "
                              "or checkpoint-every = 0)") from exc


# ------------------------------------------------------------------------------------------- sealing the bytes
def seal(payload: bytes, extent: str, key: bytes) -> bytes:
    """``payload`` with its header and tag; ``extent`` (the checkpoint's row in the store) is authenticated too."""
    header = HEADER.pack(MAGIC, FORMAT)
    return header + _tag(key, header, extent, payload) + payload


def unseal(blob: bytes, extent: str, key: bytes) -> bytes:
    """The payload of a sealed blob, once its format and tag check out; ``CheckpointError`` otherwise."""
    if len(blob) < HEADER.size + TAG_BYTES or not blob.startswith(MAGIC):
        raise CheckpointError(f"not a format-{FORMAT} staleflower checkpoint (truncated, corrupted, or an older "
                              "version's unauthenticated one): refusing to load it")
    header = blob[:HEADER.size]
    _, version = HEADER.unpack(header)
    if version != FORMAT:
        raise CheckpointError(f"checkpoint format {version} is not {FORMAT}: refusing to load it")
    tag, payload = blob[HEADER.size:HEADER.size + TAG_BYTES], blob[HEADER.size + TAG_BYTES:]
    if not hmac.compare_digest(tag, _tag(key, header, extent, payload)):
        raise CheckpointError(f"the checkpoint fails its integrity check (HMAC-SHA256, key {key_path()}): it was "
                              "corrupted, tampered with, or sealed with another key; refusing to load it")
    return payload


def _tag(key: bytes, header: bytes, extent: str, payload: bytes) -> bytes:
    mac = hmac.new(key, header, hashlib.sha256)
    data = extent.encode()
    mac.update(struct.pack(">Q", len(data)) + data)  # length-prefixed: no shifting bytes between extent and payload
    mac.update(payload)
    return mac.digest()


# ------------------------------------------------------------------------------------------- capture and restore
def capture(state: EngineState, extent: str) -> bytes:
    """The engine's state as sealed bytes, whole (see the module docstring for what is in it and how it is sealed).

    ``extent`` is the checkpoint's row as the store describes it (``MetricsStore.save_checkpoint``): sealed with
    the state, so that a checkpoint moved to another run or row, or a row whose extent changed, is refused.
    Replies in hand and cached serialized records belong to this process, not to the run: they are left out
    (and put back afterwards); each flight's message content is kept as plain values, so the task can be sent
    again after a resume.
    """
    key = signing_key()
    saved = [(f, f.reply, f.arrived_at, f.content) for f in state.flights.values()]
    records = [(v, v._record) for v in state.versions.values()]
    memo: dict[int, FrozenArrays] = {}
    try:
        for f, *_ in saved:
            f.reply, f.arrived_at = None, None
            # The field holds its frozen form while pickled (restore thaws it): Flight's type names the live form.
            f.content = _freeze(f.content, memo)  # type: ignore[assignment]
        for v, _ in records:
            v._record = None
        payload = pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        for f, reply, arrived, content in saved:
            f.reply, f.arrived_at, f.content = reply, arrived, content
        for v, rec in records:
            v._record = rec
    return seal(payload, extent, key)


def load(blob: bytes, extent: str) -> EngineState:
    """The state a sealed checkpoint holds, its flights still frozen: verified first, unpickled only then.

    The resume calls this before it rolls back any row, so a checkpoint that cannot be used leaves the store as
    it was. A key is never made here: a new one could not verify an existing checkpoint.
    """
    payload = unseal(blob, extent, signing_key(create=False))
    try:
        state: Any = pickle.loads(payload)  # authenticated above: written by capture() with our key
    except Exception as exc:  # a class this version of the code no longer has, or renamed
        raise CheckpointError(f"the checkpoint does not decode with this version of the code: "
                              f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(state, EngineState):
        raise CheckpointError(f"the checkpoint holds a {type(state).__name__}, not an EngineState")
    return state


def restore(state: EngineState, nodes: list[int], virtual: bool) -> EngineState:
    """A loaded checkpoint's state (``load``) for a run that now has ``nodes`` connected; flights' contents rebuilt."""
    if virtual and sorted(state.nodes) != sorted(nodes):
        raise CheckpointError(f"the run had {len(state.nodes)} nodes; {len(nodes)} are connected now: "
                              "resume with the same fleet")
    memo: dict[int, ArrayRecord] = {}
    for flight in sorted(state.flights.values(), key=lambda f: f.seq):
        flight.content = _thaw(flight.content, memo)  # type: ignore[arg-type]  # pickled frozen (see capture)
    return state


# A message's content as plain values: Flower's records cache memoryviews of their serialized form, which do not
# pickle. (config items, ((name, dtype, shape, stype, data), ...)); tasks sharing one record share one tuple.
FrozenArrays = tuple[tuple[str, str, tuple[int, ...], str, bytes], ...]
Frozen = tuple[tuple[tuple[str, ConfigRecordValues], ...], FrozenArrays]


def _freeze(content: RecordDict | None, memo: dict[int, FrozenArrays]) -> Frozen | None:
    if content is None:
        return None
    arrays = content.array_records["arrays"]
    if id(arrays) not in memo:
        memo[id(arrays)] = tuple((n, a.dtype, tuple(a.shape), a.stype, bytes(a.data)) for n, a in arrays.items())
    config = tuple(content.config_records["config"].items())
    return config, memo[id(arrays)]


def _thaw(frozen: Frozen | None, memo: dict[int, ArrayRecord]) -> RecordDict | None:
    if frozen is None:
        return None
    config, arrays = frozen
    if id(arrays) not in memo:
        memo[id(arrays)] = ArrayRecord({n: Array(dtype=d, shape=tuple(sh), stype=st, data=data)
                                        for n, d, sh, st, data in arrays})
    return RecordDict({"arrays": memo[id(arrays)], "config": ConfigRecord(dict(config))})
