"""Per-node persistent arrays in Flower's ``context.state`` (weights <-> records live in ``strategies.codecs``)."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from strategies.codecs import array_of
from strategies.flower_arrays import required_record


class NodeState(MutableMapping[str, list[np.ndarray]]):
    """Per-node persistent arrays (error-feedback residuals, in-flight queues) kept in Flower's ``context.state``.

    ``context.state`` survives across the messages of a run on a node, in simulation and in deployment, so it is
    the one place client-side algorithm state may live (module globals do not survive a new process).
    """

    PREFIX = "staleflower."

    def __init__(self, state: RecordDict) -> None:
        self.state = state

    def __getitem__(self, key: str) -> list[np.ndarray]:
        record = required_record(self.state, self.PREFIX + key, ArrayRecord)
        return [array_of(record[str(i)]) for i in range(len(record))]

    def __setitem__(self, key: str, value: list[np.ndarray]) -> None:
        arrays = {str(i): Array(np.ascontiguousarray(v)) for i, v in enumerate(value)}
        self.state[self.PREFIX + key] = ArrayRecord(arrays)

    def __delitem__(self, key: str) -> None:
        del self.state[self.PREFIX + key]

    def __iter__(self) -> Iterator[str]:
        return (k[len(self.PREFIX):] for k in self.state.array_records if k.startswith(self.PREFIX))

    def __len__(self) -> int:
        return sum(1 for _ in self)
