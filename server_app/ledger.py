"""The ledger: every task's row in the metrics store, and the running totals the evaluations and the summary show.

One place decides what a row says: which bytes a task is charged (a gossip task's are its node-to-node exchange,
``strategies.base.Exchange``; what Flower's messages carried in this emulation goes to the ``transport_bytes_*``
columns), which version a row was applied at, and how the totals move when buffered updates are applied later.

A row's reason may quote what a client sent (its exception message, a value it echoed); it is cut to
``MAX_REASON`` characters here, where every row is written, so no client can make the store grow by more than
that per task.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from server_app import progress
from server_app.state import EngineState, Flight, Totals
from server_app.store import MetricsStore, UpdateRow
from strategies.base import Status

#: The longest reason a row keeps: enough for any reason the server writes, and for the start of a client's.
MAX_REASON = 500


def bounded_reason(reason: str, limit: int = MAX_REASON) -> str:
    """``reason`` if it fits in ``limit`` characters; else its start and a marker saying how long it was."""
    if len(reason) <= limit:
        return reason
    marker = f" [... cut: {len(reason)} characters]"
    return reason[: max(limit - len(marker), 0)] + marker


class Ledger:
    """Writes one run's ``updates`` rows and keeps its ``Totals`` in step with them."""

    def __init__(self, store: MetricsStore) -> None:
        self.store = store

    def record(self, totals: Totals, f: Flight, status: Status, reason: str, *, now: float, staleness: int,
               applied_version: int | None, durations: tuple[float, float]) -> None:
        """Write the task's row and count it in the totals."""
        ex = f.exchange
        if ex is None:
            bytes_up, bytes_down = f.bytes_up, f.bytes_down
        elif status in (Status.FAILED, Status.RESTARTED):  # the node never got to its exchange
            bytes_up = bytes_down = 0
        else:
            bytes_up, bytes_down = ex.bytes_up, ex.bytes_down
        totals.bytes_up += bytes_up
        totals.bytes_down += bytes_down
        totals.count(status)
        compute_s, comm_s = durations
        self.store.record_update(UpdateRow(
            seq=f.seq, node_id=f.node, dispatched_at=f.dispatched_at, completed_at=now,
            base_version=f.version, applied_version=applied_version,
            staleness=None if status == Status.FAILED else staleness,
            bytes_up=bytes_up, bytes_down=bytes_down, compute_s=compute_s, comm_s=comm_s,
            status=str(status), reason=bounded_reason(reason), peer_id=ex.peer if ex is not None else None,
            transport_bytes_up=f.bytes_up, transport_bytes_down=f.bytes_down,
        ))
        progress.task(totals.applied, now)  # the run's progress bar or lines (server_app/progress.py)

    def nodes(self, state: EngineState, nodes: Sequence[tuple[int, Mapping[str, object]]]) -> None:
        """``nodes`` rows: where each node is in the fleet, its profile, and what it said of itself."""
        self.store.record_nodes(
            (n, state.position(n), info.get("partition-id"), state.profiles[n].device.name,
             state.profiles[n].network.name, state.profiles[n].slowdown, state.profiles[n].dropout,
             info.get("torch-device"))
            for n, info in nodes)

    def applied_later(self, totals: Totals, seqs: Sequence[int], version: int) -> None:
        """Buffered updates went into the model with a later one: their rows and the totals say so."""
        if seqs:
            self.store.mark_applied(seqs, version)
            totals.count(Status.BUFFERED, -len(seqs))
            totals.count(Status.APPLIED, len(seqs))

    def task_metrics(self, f: Flight, metrics: Mapping[str, float]) -> None:
        """The multi-thread executors' numbers (``exec-*`` metrics) of a task, in their own table."""
        if any(k.startswith("exec-") for k in metrics):
            self.store.record_task_metrics(f.seq, f.node, metrics)

    def evaluation(self, totals: Totals, now: float, version: int, loss: float, accuracy: float,
                   summary: Mapping[str, float]) -> None:
        """One ``evals`` row with the totals so far."""
        self.store.record_eval(now, version, totals.applied, totals.bytes_up, totals.bytes_down, loss, accuracy,
                               dict(summary))
        progress.evaluation(totals.applied, now, accuracy, summary)
