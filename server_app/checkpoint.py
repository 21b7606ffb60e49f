"""Crash-safe runs: the engine's whole state, checkpointed atomically into the metrics store, and resumed.

With ``checkpoint-every = N`` the engine saves, after every N applied updates (and at the end of the run), one
pickle of its ``EngineState`` (``server_app/state.py``), which holds everything that decides the rest of the run:
the strategy object (model, versions, buffers, queues, server-side residuals, its random generators), the clock's
time, counters, random generator, outlier-filter window, published versions still in use, the downlink
compressor's copies, and every task in flight with the message it was sent.
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
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, ConfigRecordValues, RecordDict

from server_app.state import EngineState

FORMAT = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run (missing, other format, other fleet)."""


def capture(state: EngineState) -> bytes:
    """The engine's state as bytes, whole (see the module docstring for what is in it).

    Replies in hand and cached serialized records belong to this process, not to the run: they are left out
    (and put back afterwards); each flight's message content is kept as plain values, so the task can be sent
    again after a resume.
    """
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
        return pickle.dumps({"format": FORMAT, "state": state}, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        for f, reply, arrived, content in saved:
            f.reply, f.arrived_at, f.content = reply, arrived, content
        for v, rec in records:
            v._record = rec


def restore(blob: bytes, nodes: list[int], virtual: bool) -> EngineState:
    """The state a checkpoint holds, for a run that now has ``nodes`` connected; its flights' contents rebuilt."""
    saved: dict[str, Any] = pickle.loads(blob)  # the blob comes from our own store, written by capture()
    if saved.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint format {saved.get('format')!r} is not {FORMAT}")
    state: EngineState = saved["state"]
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
