"""``delay = "auto"``: the OLCO3 family's delay D as a consequence of latency, not a protocol parameter.

D counts the periods a node computes while one average makes its round trip through the server. With, for node i,
``L_i`` its one-way latency, ``down_i``/``up_i`` its nominal link rates (bits/s, without the per-task jitter),
``c_i`` its period compute time at nominal speed, and ``L_s``, ``B`` the server's one-way latency and bandwidth
(``server-latency``, ``server-bandwidth``; B infinite when 0), ``M`` the model's size in bytes (dense)::

    rtt_i = L_s + L_i + 8 M / min(B, down_i)  +  L_i + 8 M / min(B, up_i) + L_s
    c_i   = local_steps * (step_overhead_s + flops_per_step / flops) * slowdown
    D     = max(1, ceil(max_i rtt_i / median_i c_i))

The slowest node's round trip sets D (every node takes part in every period, and the average waits for the last
contribution); the median period time is the pace the fleet computes at. The model is counted dense both ways, so
with an uplink codec D is an upper bound: set ``delay`` by hand to go lower. Queueing at the server is not counted
(a round trip with an idle server link). D is capped at the ``delay`` key's upper bound.

The engine resolves ``"auto"`` once, when it builds the strategy, from the profiles it assigned the fleet (on the
wall clock too: the real fleet's latency is not measured); the chosen D is logged and the family's strategies
report it in their state summary (``evals.metrics_json``). ``cocod-sgd`` and ``overlap-local-sgd`` overlap exactly
one period and ``local-sgd`` none, whatever ``delay`` says.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping

from server_app.profiles import NodeProfile, nominal_compute_s
from server_app.state import ModelSpec
from strategies.config import AUTO, MAX_LOCAL_STEPS, RunConfig

log = logging.getLogger("staleflower")


def round_trip_s(profile: NodeProfile, model_bytes: int, server_bps: float, server_latency_s: float) -> float:
    """Seconds for one model to go from the server to the node and one back, at nominal rates, queues empty."""
    net = profile.network
    bits = 8.0 * model_bytes
    return (2 * server_latency_s + 2 * net.latency_s + bits / min(server_bps, net.down_bps)
            + bits / min(server_bps, net.up_bps))


def auto_delay(cfg: RunConfig, profiles: Mapping[int, NodeProfile], spec: ModelSpec) -> int:
    """D from the module docstring's equation."""
    bps = cfg.server_bandwidth * 1e6 if cfg.server_bandwidth > 0 else math.inf
    model_bytes = int(sum(w.nbytes for w in spec.initial))
    rtt = max(round_trip_s(p, model_bytes, bps, cfg.server_latency * 1e-3) for p in profiles.values())
    period = statistics.median(nominal_compute_s(p, cfg.local_steps, spec.flops_per_step) for p in profiles.values())
    d = max(1, math.ceil(rtt / period)) if period > 0 else MAX_LOCAL_STEPS
    d = min(d, MAX_LOCAL_STEPS)
    log.info("delay = auto: D = %d (slowest round trip %.4g s, median period %.4g s)", d, rtt, period)
    return d


def resolve_delay(cfg: RunConfig, profiles: Mapping[int, NodeProfile], spec: ModelSpec) -> RunConfig:
    """``cfg`` with ``delay = "auto"`` replaced by its D; any other ``cfg`` as it is."""
    return cfg.replace(delay=auto_delay(cfg, profiles, spec)) if cfg.delay == AUTO else cfg
