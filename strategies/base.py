"""The contract between the engine and a strategy.

The engine (``server_app/engine.py``) owns everything that is mechanism: dispatching, the clock, ordering,
time-outs, failures, evaluation and metrics. A strategy is policy only, and pure: no I/O, no clock reads, no
Flower types. It answers two questions:

- ``task_for(node)``: a node is free; what should it do (or should it wait)?
- ``apply(update)`` / ``fail(node)``: a result (or a failure) arrived, in clock order; what happens to the model?

Weights are lists of numpy arrays in the model's ``state_dict`` order. A strategy never mutates an array it has
published as ``weights``: each new version is a new list, because the engine keeps older versions alive while
tasks computed on them are in flight (clients send deltas relative to the version they were given).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np

from strategies.config import RunConfig

Weights = list[np.ndarray]
LocalTrain = Callable[[Weights], tuple[Weights, dict[str, float]]]
Status = Literal["applied", "buffered", "dropped"]


@dataclass(frozen=True)
class Task:
    """What a free node is asked to do: train on model ``version`` with these extra settings."""

    version: int
    config: dict[str, int | float | str | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class Update:
    """A client's result, validated by the engine, handed to the strategy in clock order.

    ``delta`` is ``base - trained`` (a descent direction: ``base - delta`` is the client's model).
    ``staleness`` is the number of versions published since ``base_version`` was sent.
    """

    seq: int
    node: int
    base_version: int
    staleness: int
    delta: Weights
    base: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """What the strategy did with an update.

    ``status`` is the fate of this update; ``applied`` lists the seqs (this one and/or earlier buffered ones)
    that went into the model as a consequence, so the engine can mark them ``applied`` in the store.
    """

    status: Status
    reason: str = ""
    applied: tuple[int, ...] = ()


class Strategy(ABC):
    """Server half of an algorithm. Subclass, set ``name``, implement ``apply``; register in ``strategies``."""

    name: ClassVar[str] = ""

    def __init__(self, cfg: RunConfig, weights: Weights, num_nodes: int) -> None:
        self.cfg = cfg
        self.weights: Weights = weights
        self.version = 0
        self.num_nodes = num_nodes

    def task_for(self, node: int) -> Task | None:
        """A node is free: give it the newest model (asynchronous default). ``None`` makes it wait."""
        return Task(self.version)

    @abstractmethod
    def apply(self, update: Update) -> Verdict:
        """Incorporate (or buffer, or drop) one client update."""

    def fail(self, node: int, base_version: int) -> Verdict:
        """A task on ``node`` failed (dropout, lost node, client error, rejected update). Default: nothing."""
        return Verdict("dropped")

    @staticmethod
    def client(weights: Weights, train: LocalTrain, state: MutableMapping[str, Weights]) -> tuple[Weights, dict]:
        """Client half: run the local steps and return the delta ``weights - trained`` to upload.

        ``state`` persists on the node across tasks of a run (Flower's ``context.state``): the place for
        error-feedback residuals and in-flight queues of algorithms that need them.
        """
        trained, metrics = train(weights)
        return [w - t for w, t in zip(weights, trained, strict=True)], metrics

    def state_summary(self) -> dict[str, float]:
        """Numbers worth logging at evaluation time (buffer fill, K, bound...)."""
        return {}

    def _publish(self, weights: Weights) -> None:
        """Install a new model version."""
        self.weights = weights
        self.version += 1


def step(weights: Sequence[np.ndarray], direction: Sequence[np.ndarray], scale: float) -> Weights:
    """``weights - scale * direction`` as new arrays in the weights' dtypes."""
    return [(w - scale * d).astype(w.dtype, copy=False) for w, d in zip(weights, direction, strict=True)]


def weighted_sum(parts: Sequence[tuple[float, Sequence[np.ndarray]]]) -> Weights:
    """``sum_i c_i * x_i`` accumulated in float64, so the order of the parts barely matters."""
    first = parts[0][1]
    acc = [np.zeros(a.shape, dtype=np.float64) for a in first]
    scratch = [np.empty(a.shape, dtype=np.float64) for a in first]  # reused: no temporary per term
    for coef, arrays in parts:
        for a, tmp, x in zip(acc, scratch, arrays, strict=True):
            np.multiply(x, coef, out=tmp)
            a += tmp
    return acc
