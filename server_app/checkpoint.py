"""Crash-safe runs: the engine's whole state, checkpointed atomically into the metrics store, and resumed.

With ``checkpoint-every = N`` the engine saves, after every N applied updates (and at the end of the run), one
pickle of everything that decides the rest of the run: the strategy object (model, versions, buffers, queues,
server-side residuals, its random generators), the engine's clock, counters, random generator, outlier-filter
window, published versions still in use, the downlink compressor's copies, and every task in flight with the
message it was sent.
It goes into the store's ``checkpoints`` table in one SQLite transaction, together with how far the store's
``updates`` and ``evals`` tables had been written, so a checkpoint and the rows it accounts for can never
disagree; the previous checkpoint of the run is replaced in the same transaction.

``resume = RUN_ID`` (or ``python -m server_app.simulate --resume RUN_ID``) reopens the run: rows written after
the checkpoint are rolled back (buffered updates that were applied since go back to ``buffered``), the state is
restored, tasks that were in flight are sent again (same task seed, same timings), and the run goes on. On the
virtual clock the remaining run is then the same as if it had never stopped: same update sequence, same final
weights (tested by SIGKILLing the runner). Rows between the last checkpoint and the crash are redone, not lost;
on the wall clock their clients' work is redone too, so ``checkpoint-every = 1`` is the setting that never
rolls back an update the store had shown as applied.

What a checkpoint cannot hold is the nodes' own state (``context.state``: error-feedback residuals, OLCO3's
queues, downlink copies). SuperNodes keep theirs across a server crash; the in-process runner's nodes die with
it, so runs that use client state resume exactly only in deployment.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

if TYPE_CHECKING:
    from server_app.engine import Engine

FORMAT = 1
ENGINE_FIELDS = ("profiles", "rng", "strategy", "cap", "idle", "flights", "versions", "node_tasks", "downlink", "guard",
                 "totals", "seq", "now", "last_eval", "failing", "last_failure")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (missing, other format, other fleet)."""


def capture(engine: Engine) -> bytes:
    """The engine's state as bytes (see the module docstring for what is in it)."""
    state: dict[str, Any] = {name: getattr(engine, name) for name in ENGINE_FIELDS}
    state["format"] = FORMAT
    state["nodes"] = list(engine.nodes)
    saved = [(f, f.reply, f.msg_id, f.arrived_at, f.content) for f in engine.flights.values()]
    records = [(v, v._record) for v in engine.versions.values()]
    memo: dict[int, Frozen] = {}
    try:
        for f, *_ in saved:  # replies and message ids belong to this process's Grid, not to the run
            f.reply, f.msg_id, f.arrived_at = None, None, None
            f.content = _freeze(f.content, memo)  # type: ignore[assignment]
        for v, _ in records:  # serialized records are rebuilt on demand
            v._record = None
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        for f, reply, msg_id, arrived, content in saved:
            f.reply, f.msg_id, f.arrived_at, f.content = reply, msg_id, arrived, content
        for v, rec in records:
            v._record = rec


def restore(engine: Engine, blob: bytes) -> None:
    """Put a captured state into a freshly built engine of the same run, and send the tasks in flight again."""
    state = pickle.loads(blob)  # the blob comes from our own store, written by capture()
    if state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint format {state.get('format')!r} is not {FORMAT}")
    if sorted(state["nodes"]) != sorted(engine.nodes) and engine.virtual:
        raise CheckpointError(f"the run had {len(state['nodes'])} nodes; {len(engine.nodes)} are connected now: "
                              "resume with the same fleet")
    for name in ENGINE_FIELDS:
        setattr(engine, name, state[name])
    engine.nodes = state["nodes"]
    engine.by_msg.clear()
    engine.zombies.clear()
    engine.zombie_deadlines.clear()
    engine.held.clear()
    memo: dict[int, RecordDict] = {}
    for flight in sorted(engine.flights.values(), key=lambda f: f.seq):
        flight.content = _thaw(flight.content, memo)  # type: ignore[arg-type]
        if not flight.failure and flight.content is not None:
            engine.resend(flight)


# A message's content as plain values: Flower's records cache memoryviews of their serialized form, which do not
# pickle. (config items, ((name, dtype, shape, stype, data), ...)); tasks sharing one record share one tuple.
Frozen = tuple[tuple, tuple]


def _freeze(content: RecordDict | None, memo: dict[int, Frozen]) -> Frozen | None:
    if content is None:
        return None
    arrays = content.array_records["arrays"]
    if id(arrays) not in memo:
        memo[id(arrays)] = tuple((n, a.dtype, tuple(a.shape), a.stype, bytes(a.data)) for n, a in arrays.items())
    config = tuple(content.config_records["config"].items())
    return config, memo[id(arrays)]  # type: ignore[return-value]


def _thaw(frozen: Frozen | None, memo: dict[int, RecordDict]) -> RecordDict | None:
    if frozen is None:
        return None
    config, arrays = frozen
    if id(arrays) not in memo:
        memo[id(arrays)] = ArrayRecord({n: Array(dtype=d, shape=tuple(sh), stype=st, data=data)
                                        for n, d, sh, st, data in arrays})
    return RecordDict({"arrays": memo[id(arrays)], "config": ConfigRecord(dict(config))})
