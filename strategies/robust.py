"""Robust aggregation: the one place every strategy combines a set of client contributions.

A strategy that aggregates a set of updates (a FedAvg round, a FedBuff buffer, the K of the K-families, OLCO3's
period, AllReduce's step, D-PSGD's neighbourhood) asks ``Aggregation.combine`` for ``sum_i c_i x_i`` instead of
computing it. Run-config key ``aggregation`` picks the rule:

- ``mean`` (default): exactly ``sum_i c_i x_i``, the strategy's own arithmetic.
- ``median``: coordinate-wise median of the ``x_i`` (Flower's ``FedMedian``), times ``sum_i c_i``.
- ``trimmed-mean``: per coordinate, the mean of the ``x_i`` left after cutting the ``trim-fraction`` largest and
  smallest (Flower's ``FedTrimmedAvg``), times ``sum_i c_i``.
- ``krum``: the ``x_i`` whose summed squared distance to its ``n - f - 2`` nearest others is smallest, ``f`` being
  run-config ``byzantine`` (Flower's ``Krum``), times ``sum_i c_i``.
- ``multi-krum``: the plain mean of the ``n - f`` best-scored ``x_i`` by that score, times ``sum_i c_i`` (Flower's
  ``MultiKrum`` with ``num_nodes_to_keep = n - f``, except that Flower weights the kept ones by their claimed
  ``num-examples``: a liar Krum happens to keep would then own the mean, so here they weigh the same).

Why "times ``sum_i c_i``": the coefficients carry the strategy's policy (``1/K``, staleness weights, example
counts), and the rule replaces only the averaging. A robust rule ignores the individual weights (as Flower's do):
a weight is itself something a client can lie about. ``tests/test_robust.py`` checks each rule against Flower's
``flwr.server.strategy.aggregate`` functions.

A rule is only as robust as its set is large: a median of 2 is their mean, a trimmed mean with ``trim-fraction``
0.2 cuts nothing below 5 contributions, and Krum needs ``n >= 2f + 3`` to guarantee anything. An asynchronous
strategy that applies each update alone (FedAsync, async-SGD with K = 1) has no set: the norm cap and the update
filter (``server_app/intake.py``) are what protect it. Coordinate-wise rules suit dense contributions; on top-k
sparse ones (OLCO3's compressed uplink) the median of mostly-zero coordinates is mostly zero: use ``krum`` or
``multi-krum`` there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from strategies.client import Weights
from strategies.config import ConfigError, RunConfig
from strategies.sums import Accumulator, Update, weighted_sum

Parts = Sequence[tuple[float, Sequence[np.ndarray]]]


class Aggregation:
    """The run's aggregation rule (``aggregation``, ``trim-fraction``, ``byzantine``)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.rule = cfg.aggregation
        self.trim = cfg.trim_fraction
        self.f = cfg.byzantine

    @property
    def streams(self) -> bool:
        """Whether contributions can be summed as they arrive (``mean``) instead of kept until the set is complete."""
        return self.rule == "mean"

    def combine(self, parts: Parts) -> Weights:
        """``sum_i c_i x_i`` under the rule (see the module docstring); new arrays in the contributions' dtypes."""
        if not parts:
            raise ValueError("nothing to aggregate")
        if self.rule == "mean":
            return weighted_sum(parts)
        total = float(sum(c for c, _ in parts))
        xs = [x for _, x in parts]
        if self.rule == "median":
            return _scaled(coordinate_median(xs), total)
        if self.rule == "trimmed-mean":
            return _scaled(trimmed_mean(xs, self.trim), total)
        chosen = krum_order(xs, self.f)
        if self.rule == "krum":
            return _scaled(xs[chosen[0]], total)
        keep = [xs[i] for i in chosen[:max(1, len(parts) - self.f)]]
        return weighted_sum([(total / len(keep), x) for x in keep])


def coordinate_median(xs: Sequence[Sequence[np.ndarray]]) -> Weights:
    """Per tensor, the median over contributions of every coordinate (``np.median``: the mean of the middle two)."""
    return [np.median(np.stack(layer), axis=0).astype(layer[0].dtype, copy=False) for layer in zip(*xs, strict=True)]


def trimmed_mean(xs: Sequence[Sequence[np.ndarray]], fraction: float) -> Weights:
    """Per coordinate, the mean after dropping ``int(fraction * n)`` of the largest and of the smallest values."""
    n = len(xs)
    cut = int(fraction * n)
    out = []
    for layer in zip(*xs, strict=True):
        stacked = np.partition(np.stack(layer), (cut, n - cut - 1), axis=0) if cut else np.stack(layer)
        out.append(np.mean(stacked[cut:n - cut], axis=0).astype(layer[0].dtype, copy=False))
    return out


def krum_order(xs: Sequence[Sequence[np.ndarray]], f: int) -> list[int]:
    """Contribution indices from best to worst Krum score.

    A contribution's score is the sum of its squared distances to its ``n - f - 2`` nearest others (at least
    1). Ties keep the earlier contribution first, so the order is deterministic.
    """
    flat = np.stack([np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in x]) for x in xs])
    sq = np.einsum("ij,ij->i", flat, flat)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)  # squared distances, Gram form
    np.fill_diagonal(dist, 0.0)
    nearest = max(1, len(xs) - f - 2)
    scores = [float(np.sum(np.sort(np.delete(row, i))[:nearest])) for i, row in enumerate(dist)]
    return sorted(range(len(xs)), key=lambda i: (scores[i], i))


def _scaled(x: Sequence[np.ndarray], factor: float) -> Weights:
    return [np.multiply(a, factor, dtype=a.dtype) for a in x]


def check_rule(cfg: RunConfig, strategy: str, set_size: int | None) -> None:
    """Refuse a rule that cannot act on the sets this strategy aggregates (``set_size``; None: the fleet's size).

    A robust rule left silently inert is worse than none: the user believes the run is protected.
    """
    rule = cfg.aggregation
    if rule == "mean" or set_size is None:
        return
    if set_size <= 1:
        raise ConfigError(f"strategy {strategy!r} applies each update alone: aggregation = {rule!r} has no set to "
                          f"act on; what protects it is update-filter and norm-cap (RELIABILITY.md)")
    if rule in ("krum", "multi-krum") and set_size < 2 * cfg.byzantine + 3:
        raise ConfigError(f"aggregation = {rule!r} with byzantine = {cfg.byzantine} needs sets of at least "
                          f"{2 * cfg.byzantine + 3} updates (n >= 2f + 3); strategy {strategy!r} aggregates "
                          f"{set_size}: raise its set (buffer-size, k) or lower byzantine")
    if rule == "trimmed-mean" and int(cfg.trim_fraction * set_size) == 0:
        raise ConfigError(f"aggregation = 'trimmed-mean' with trim-fraction = {cfg.trim_fraction:g} cuts nothing from "
                          f"sets of {set_size} updates (strategy {strategy!r}): raise trim-fraction or the set")


class Collector:
    """The aggregation state of a buffered strategy: a running sum for ``mean``, the contributions otherwise.

    ``strategies.sums.Accumulator``'s interface (``add``, ``add_update_delta``, ``result``), so a strategy that
    sums as updates arrive keeps one code path: under ``mean`` memory stays at two copies of the model whatever
    the buffer size; a robust rule needs every contribution of the set at once, so it keeps them (buffer-size
    copies) until ``result``.
    """

    def __init__(self, aggregation: Aggregation, like: Sequence[np.ndarray]) -> None:
        self.aggregation = aggregation
        self.stream = Accumulator(like) if aggregation.streams else None
        self.parts: list[tuple[float, Sequence[np.ndarray]]] = []

    def add(self, arrays: Sequence[np.ndarray], coef: float) -> None:
        """Add ``coef * arrays`` to the set."""
        if self.stream is not None:
            self.stream.add(arrays, coef)
        else:
            self.parts.append((coef, arrays))

    def add_update_delta(self, update: Update, coef: float) -> None:
        """Add ``coef * update.delta`` (without materialising the delta under ``mean``)."""
        if self.stream is not None:
            self.stream.add_update_delta(update, coef)
        else:
            self.parts.append((coef, update.delta))

    def result(self) -> Weights:
        """The aggregate of what was added."""
        if self.stream is not None:
            return self.stream.result()
        return self.aggregation.combine(self.parts)
