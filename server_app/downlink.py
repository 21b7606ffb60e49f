"""Server-to-client compression of the global model (two-way compression) for strategies that broadcast it.

With ``codec-downlink`` set, a node that already holds a copy of the model gets ``C(w_v - copy)`` instead of the
full ``w_v``, where ``copy`` is the model the node was last *confirmed* to hold. Node and server compute the same
new copy ``copy + decoded`` (decoding is deterministic). What a message leaves out stays in ``w - copy`` and goes
with the next one (``strategies.codecs.encode_difference``: difference coding is its own error feedback; an extra
residual would count it twice and diverge). The server only trusts the new copy once the node's reply comes
back: a lost or failed task leaves the confirmed copy as it was, so the next message is a diff against a copy
the node still has (it keeps its last two, keyed by version: ``strategies.client.downlink_model``). The node
trains from its copy; the first task of every node carries the full model.

Strategies that send their own payload (the OLCO3 family) compress it themselves with the same key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from flwr.app import Array

from strategies.codecs import CodecSpec, encode_difference
from strategies.taskkeys import BASE_VERSION, DOWNLINK, DOWNLINK_DELTA, DOWNLINK_FULL

Weights = list[np.ndarray]


@dataclass
class _Node:
    version: int = -1                               # version of the confirmed copy; -1: the node holds nothing
    copy: Weights | None = None
    states: dict[int, dict] = field(default_factory=dict)   # per-tensor codec state (PowerSGD's warm start)
    pending: tuple[int, Weights] | None = None               # version and copy, once confirmed


class DownlinkCompressor:
    """Per-node model copies; one instance per run."""

    def __init__(self, spec: CodecSpec) -> None:
        self.spec = spec
        self.nodes: dict[int, _Node] = {}

    def payload(self, node: int, version: int, weights: Weights, seed: int) -> tuple[dict, list[Array] | None]:
        """Task config additions and the arrays to send (None: send the full model as usual)."""
        n = self.nodes.setdefault(node, _Node())
        if n.copy is None:
            n.pending = (version, weights)
            return {DOWNLINK: DOWNLINK_FULL}, None
        pairs = [encode_difference(self.spec, w, c, seed=(seed + i) % 2**64, state=n.states.setdefault(i, {}))
                 for i, (w, c) in enumerate(zip(weights, n.copy, strict=True))]
        n.pending = (version, [c for _, c in pairs])
        return {DOWNLINK: DOWNLINK_DELTA, BASE_VERSION: n.version}, [a for a, _ in pairs]

    def confirm(self, node: int) -> None:
        """The node's reply arrived: what it was sent is what it holds now."""
        n = self.nodes.get(node)  # absent: the strategy sent its own payload (OLCO3 family)
        if n is not None and n.pending is not None:
            n.version, n.copy = n.pending
            n.pending = None

    def discard(self, node: int) -> None:
        """The task failed: the node may or may not have applied it, but it still keeps the confirmed copy."""
        if node in self.nodes:
            self.nodes[node].pending = None
