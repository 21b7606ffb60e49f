"""Byzantine clients for the benchmarks: our ClientApp, with the replies of some partitions corrupted.

``ByzantineClient(attack)`` runs our ClientApp (``client_app.app``: train, evaluate, describe) on every node; a
node whose ``partition-id`` (``context.node_config``) is one of ``attackers(num_partitions, fraction)`` sends,
from its first task on, its honest delta multiplied by ``attack.factor`` (-1: sign flip; 1e6: scaling) and, when
``attack.claim`` is set, ``num-examples = claim`` in its reply metrics (what ``server_app.wire._num_examples``
reads, and FedAvg weights by). The attackers are the lowest partition ids, so a run's attackers are a function of
the fleet size alone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.app import describe as real_describe
from client_app.app import evaluate as real_evaluate
from client_app.app import train as real_train
from strategies.codecs import array_of
from strategies.taskkeys import NUM_EXAMPLES

#: Share of the nodes that attack (2 of 10).
FRACTION = 0.2


def attackers(num_partitions: int, fraction: float = FRACTION) -> frozenset[int]:
    """The attacking partition ids: the ``round(fraction * num_partitions)`` lowest (at least one if fraction > 0)."""
    count = round(fraction * num_partitions)
    if fraction > 0:
        count = max(count, 1)
    return frozenset(range(min(count, num_partitions)))


@dataclass(frozen=True)
class Attack:
    """What an attacker sends: ``factor`` x its honest delta, and ``num-examples = claim`` when set."""

    factor: float = 1.0
    claim: int | None = None

    @property
    def honest(self) -> bool:
        """Whether the attack changes nothing."""
        return self.factor == 1.0 and self.claim is None


@dataclass
class ByzantineClient:
    """Our ClientApp; the nodes of the attacking partitions corrupt every train reply with ``attack``."""

    attack: Attack
    fraction: float = FRACTION
    app: ClientApp = field(init=False)
    corrupted: int = field(init=False, default=0)  # replies corrupted so far (the proof the attack ran)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.app = ClientApp()
        self.app.train()(self.train)
        self.app.evaluate()(real_evaluate)
        self.app.query("describe")(real_describe)

    def is_attacker(self, context: Context) -> bool:
        """Whether this node attacks, from its ``partition-id`` and ``num-partitions``."""
        if self.attack.honest:
            return False
        pid = int(context.node_config["partition-id"])
        parts = int(context.node_config["num-partitions"])
        return pid in attackers(parts, self.fraction)

    def train(self, msg: Message, context: Context) -> Message:
        """Our ClientApp's train; an attacker's reply then carries the corrupted delta and claim."""
        honest = real_train(msg, context)
        if not self.is_attacker(context) or honest.has_error():
            return honest
        content = corrupt(honest.content, self.attack)
        with self._lock:
            self.corrupted += 1
        return Message(content, reply_to=msg)


def corrupt(content: RecordDict, attack: Attack) -> RecordDict:
    """A reply's content with its ``delta`` multiplied by ``attack.factor`` and its ``num-examples`` set to the claim.

    The delta must be uncompressed (run-config ``codec = "none"``, what the benchmarks use).
    """
    out = RecordDict(dict(content.items()))
    if attack.factor != 1.0:
        arrays = {}
        for name, arr in content.array_records["delta"].items():
            value = array_of(arr)
            scaled = (value.astype(np.float64) * attack.factor).astype(value.dtype)
            arrays[name] = Array(np.ascontiguousarray(scaled))
        out["delta"] = ArrayRecord(arrays)
    if attack.claim is not None:
        metrics = dict(content.metric_records["metrics"])
        metrics[NUM_EXAMPLES] = int(attack.claim)
        out["metrics"] = MetricRecord(metrics)
    return out
