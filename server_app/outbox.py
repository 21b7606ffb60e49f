"""What a task's message carries: the model (or the strategy's payload, or a compressed difference) and its config.

The task config holds the run's local-training settings, the task's identity (``task-seq``, ``model-version``,
which our ClientApp echoes back so a reply meant for another task is refused) and its own seed, then whatever the
strategy's ``Task.config`` adds. A node's n-th task has seed ``SeedSequence([seed, node index, n])``: its batches
do not depend on how other nodes' tasks interleave.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from server_app.state import EngineState, Version
from server_app.wire import payload_record
from strategies import taskkeys as keys
from strategies.base import Payload, Task
from strategies.config import RunConfig
from strategies.flower_arrays import checked_record


class Outbox:
    """Builds the content of train messages for one run."""

    def __init__(self, cfg: RunConfig, names: list[str]) -> None:
        self.cfg = cfg
        self.names = names
        self._payload: tuple[object, ArrayRecord | None] = (None, None)

    def content(self, state: EngineState, seq: int, node: int, task: Task, version: Version) -> RecordDict:
        """The message content of task ``seq`` for ``node``."""
        config = self.task_config(state, seq, node, task)
        arrays = version.record if task.payload is None else self._payload_record(task.payload)
        broadcast = task.payload is None and task.exchange is None  # gossip and all-reduce broadcast nothing
        if broadcast and state.downlink is not None:  # two-way compression of the broadcast model
            extra, compressed = state.downlink.payload(node, task.version, version.weights, config[keys.TASK_SEED])
            config.update(extra)
            if compressed is not None:
                arrays = ArrayRecord(dict(zip(self.names, compressed, strict=True)))
        return checked_record(RecordDict, {"arrays": arrays, "config": checked_record(ConfigRecord, config)})

    def task_config(self, state: EngineState, seq: int, node: int, task: Task) -> dict[str, Any]:
        """The run's training settings, the task's identity and seed, then the strategy's own settings."""
        c = self.cfg
        return {
            keys.LR: c.lr, keys.LOCAL_STEPS: c.local_steps, keys.BATCH_SIZE: c.batch_size, keys.MOMENTUM: c.momentum,
            keys.PROX_MU: c.prox_mu, keys.TASK_SEQ: seq, keys.MODEL_VERSION: task.version,
            keys.TASK_SEED: self._task_seed(state, node),
            **task.config,
        }

    def _task_seed(self, state: EngineState, node: int) -> int:
        n = state.node_tasks[node] = state.node_tasks.get(node, -1) + 1
        return int(np.random.SeedSequence([self.cfg.seed, state.position(node), n]).generate_state(1)[0])

    def _payload_record(self, payload: Payload) -> ArrayRecord:
        """A payload as its record (``wire.payload_record``); the same object is serialized (and hashed) once."""
        if self._payload[0] is not payload:
            self._payload = (payload, payload_record(self.names, payload))
        assert self._payload[1] is not None
        return self._payload[1]
