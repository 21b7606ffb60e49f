"""A ClientApp that trains nothing, for timing the engine alone (``python -m bench.scale --client noop``).

Its train reply is what the engine accepts from staleflower's ClientApp, at no cost: a ``delta`` of zeros with
the received model's names, shapes and dtypes (the model does not move), ``num-examples = 1`` and the task's
``task-seq`` / ``model-version`` echoed back (``server_app.intake.Intake.admit`` rejects a reply that echoes
another task's). It describes itself as our ClientApp does (partition id, CPU), so discovery orders the fleet by
partition as it does for real runs. Its zero arrays are built once per shape and shared by every reply.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from strategies import taskkeys as keys

app = ClientApp()
_zeros: dict[tuple[tuple[int, ...], str], Array] = {}


def _zero(arr: Array) -> Array:
    key = (tuple(arr.shape), arr.dtype)
    if key not in _zeros:
        _zeros[key] = Array(np.zeros(key[0], dtype=np.dtype(key[1])))
    return _zeros[key]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The received model back as a delta of zeros, with the metrics the engine checks."""
    task = msg.content.config_records["config"]
    delta = ArrayRecord({name: _zero(arr) for name, arr in msg.content.array_records["arrays"].items()})
    metrics = {keys.NUM_EXAMPLES: 1, **{k: int(task[k]) for k in keys.ECHO if k in task}}
    return Message(RecordDict({"delta": delta, "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """The node's partition, as staleflower's ClientApp says it."""
    info = {"partition-id": int(context.node_config["partition-id"]),
            "num-partitions": int(context.node_config["num-partitions"]), "torch-device": "cpu"}
    return Message(RecordDict({"describe": ConfigRecord(info)}), reply_to=msg)
