"""Server-to-client compression of the global model (two-way compression) for strategies that broadcast it.

With ``codec-downlink`` set, a node that already holds a copy of the model gets ``C(w_v - copy)`` instead of the
full ``w_v``, where ``copy`` is the model the node was last *confirmed* to hold. Node and server compute the same
new copy ``copy + decoded`` (decoding is deterministic). What a message leaves out stays in ``w - copy`` and goes
with the next one (``strategies.codecs.encode_difference``: difference coding is its own error feedback; an extra
residual would count it twice and diverge). The server only trusts the new copy once the node's reply comes
back: a lost or failed task leaves the confirmed copy as it was, so the next message is a diff against a copy
the node still has (it keeps its last two, keyed by version: ``strategies.client.downlink_model``). The node
trains from its copy; the first task of every node carries the full model.

The per-node copies and codec states are a ``strategies.links.LinkCompressor`` in model mode (one link per node,
no copy before the first, full, message); this class adds what only the broadcast needs: the version of each
node's copy and the copy awaiting confirmation. Strategies that send their own payload (the OLCO3 family)
compress it themselves with the same run-config key (``codec-downlink``).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array

from strategies.codecs import CodecSpec
from strategies.links import LinkCompressor
from strategies.taskkeys import BASE_VERSION, DOWNLINK, DOWNLINK_DELTA, DOWNLINK_FULL, TaskConfig

Weights = list[np.ndarray]


class DownlinkCompressor:
    """Per-node model copies; one instance per run."""

    def __init__(self, spec: CodecSpec) -> None:
        self.spec = spec
        self.links: LinkCompressor[int] = LinkCompressor(spec)  # node -> its confirmed copy, codec states
        self.versions: dict[int, int] = {}                       # node -> version of its confirmed copy
        self.pending: dict[int, tuple[int, Weights]] = {}        # node -> version and copy, once confirmed

    def payload(self, node: int, version: int, weights: Weights, seed: int) -> tuple[TaskConfig, list[Array] | None]:
        """Task config additions and the arrays to send (None: send the full model as usual)."""
        if self.links.copy(node) is None:
            self.pending[node] = (version, weights)
            return {DOWNLINK: DOWNLINK_FULL}, None
        arrays, copy = self.links.encode_model(node, weights, seed)
        self.pending[node] = (version, copy)
        return {DOWNLINK: DOWNLINK_DELTA, BASE_VERSION: self.versions[node]}, arrays

    def confirm(self, node: int) -> None:
        """The node's reply arrived: what it was sent is what it holds now."""
        pending = self.pending.pop(node, None)  # none: the strategy sent its own payload (OLCO3 family)
        if pending is not None:
            self.versions[node], copy = pending
            self.links.commit(node, copy)

    def discard(self, node: int) -> None:
        """The task failed: the node may or may not have applied it, but it still keeps the confirmed copy."""
        self.pending.pop(node, None)
