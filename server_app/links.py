"""Virtual time of node-to-node traffic (gossip, all-reduce) over the nodes' own access links.

A star strategy's task pays the node's download and upload; a decentralized task pays an ``Exchange``
(``strategies.base``): rounds of concurrent transfers between nodes. Each node sits behind its own access link
(its network profile), so within a round a node's uplink carries everything it sends and its downlink
everything it receives, and a transfer between two nodes pays both one-way latencies (node to the core, core to
node). A round lasts as long as its most loaded link plus its slowest pair's latency; rounds run one after the
other (ring all-reduce has 2(n-1) of them); a collective's plans and their costs are in
``strategies/collectives.py``, and the clock charges the fastest. Link speeds are the profiles' nominal ones,
without the per-task jitter of star transfers: an all-reduce round is one event shared by every node, so it must
cost every node the same. Contention in the core network is not modelled; two AD-PSGD exchanges with a node in
common queue for it (its model lock and its link, ``server_app/peerlocks.py``), so they never overlap.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

from server_app.profiles import NodeProfile
from strategies.base import Exchange


def exchange_seconds(exchange: Exchange, profiles: Mapping[int, NodeProfile]) -> float:
    """Seconds the exchange takes on the virtual clock (0 when it has no transfers).

    An exchange with ``options`` takes its fastest option (a collective library's choice of algorithm); one with
    ``phases`` runs its own rounds, then each phase in turn.
    """
    if exchange.options:
        return min(exchange_seconds(o, profiles) for o in exchange.options)
    return _rounds_seconds(exchange, profiles) + sum(exchange_seconds(p, profiles) for p in exchange.phases)


def _rounds_seconds(exchange: Exchange, profiles: Mapping[int, NodeProfile]) -> float:
    if not exchange.transfers:
        return 0.0
    sent: dict[int, int] = defaultdict(int)
    received: dict[int, int] = defaultdict(int)
    latency = 0.0
    for src, dst, nbytes in exchange.transfers:
        sent[src] += nbytes
        received[dst] += nbytes
        latency = max(latency, profiles[src].network.latency_s + profiles[dst].network.latency_s)
    load = max(
        max((8.0 * b / profiles[n].network.up_bps for n, b in sent.items()), default=0.0),
        max((8.0 * b / profiles[n].network.down_bps for n, b in received.items()), default=0.0),
    )
    return exchange.rounds * (latency + load)
