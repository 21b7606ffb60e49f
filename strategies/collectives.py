"""All-reduce and all-gather as node-to-node exchanges: the ring, and recursive halving and doubling.

A collective library (NCCL, MPI) does not run one algorithm whatever the message: NCCL chooses between a ring
and a tree, MPI libraries between a ring and recursive halving/doubling, by message size and link latency. An
all-reduce here is an ``Exchange`` with both plans as ``options``; the virtual clock times each on the nodes'
own links (``server_app/links.py``) and charges the faster one.

Costs in the alpha-beta model, for n nodes, a message of b bytes, alpha the latency of one step (both one-way
latencies of the slowest pair) and beta the slowest link's rate in bytes per second; r = 2^floor(log2 n)::

    ring all-reduce (reduce-scatter + all-gather)   2 (n-1) alpha + 2 (n-1)/n * b/beta
    recursive halving + doubling (Rabenseifner)     2 log2(r) alpha + 2 (r-1)/r * b/beta
        n not a power of two: the n - r extra nodes first fold their b bytes into a partner and get the result
        back at the end                             + 2 (alpha + b/beta)
    ring all-gather of c-byte blocks                (n-1) alpha + (n-1) c/beta
    recursive doubling all-gather                   log2(r) alpha + (r-1) * c/beta   (blocks of the folded
        pairs are 2c)                               + (alpha + c/beta) + (alpha + (n-1) c/beta) when n != r

The ring is bandwidth-optimal and pays 2(n-1) latencies; halving/doubling moves the same bytes (a power of two)
in 2 log2 n steps, so it wins for small messages or high latencies, and the ring for large messages on fast
links, where its steps are shorter. With heterogeneous links every step pays its own slowest pair and most
loaded link (``server_app.links.exchange_seconds``), not a fleet-wide alpha and beta.

The bytes a task is charged are the ring's (``2 (n-1)/n b`` up and down per node, the same as halving/doubling
on a power of two); a tree (NCCL's double binary tree) is not modelled, its latency term is that of
halving/doubling up to a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

from strategies.base import Exchange


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def ring_allreduce(ids: Sequence[int], nbytes: int) -> Exchange:
    """2(n-1) steps, each node sending a 1/n chunk to its successor on the ring."""
    n = len(ids)
    chunk, rounds = -(-nbytes // n), 2 * (n - 1)
    transfers = tuple((ids[k], ids[(k + 1) % n], chunk) for k in range(n))
    return Exchange(transfers, rounds=rounds, bytes_up=rounds * chunk, bytes_down=rounds * chunk)


def ring_allgather(ids: Sequence[int], block: int) -> Exchange:
    """n-1 steps, each node passing one block to its successor on the ring."""
    n = len(ids)
    transfers = tuple((ids[k], ids[(k + 1) % n], block) for k in range(n))
    return Exchange(transfers, rounds=n - 1, bytes_up=(n - 1) * block, bytes_down=(n - 1) * block)


def _pairs(ids: Sequence[int], r: int, distance: int, sizes: Sequence[int]) -> Exchange:
    """One step: node k of the first r exchanges with k XOR distance, sending sizes[k] bytes."""
    return Exchange(tuple((ids[k], ids[k ^ distance], sizes[k]) for k in range(r)))


def _fold(ids: Sequence[int], r: int, sizes: Sequence[int], inward: bool) -> Exchange:
    """The extra nodes r..n-1 send to (inward) or receive from node k - r: sizes[k - r] bytes."""
    pairs = [(ids[k], ids[k - r]) for k in range(r, len(ids))]
    return Exchange(tuple((a, b, sizes[i]) if inward else (b, a, sizes[i]) for i, (a, b) in enumerate(pairs)))


def halving_doubling_allreduce(ids: Sequence[int], nbytes: int) -> Exchange:
    """Rabenseifner: reduce-scatter by recursive halving, all-gather by recursive doubling (extra nodes folded)."""
    n = len(ids)
    r = _pow2_floor(n)
    steps: list[Exchange] = []
    half, sizes = r // 2, []
    while half >= 1:  # partner at distance r/2, r/4, ...: send the half of the current block the partner keeps
        size = -(-nbytes * half // r)
        sizes.append(size)
        steps.append(_pairs(ids, r, half, [size] * r))
        half //= 2
    steps += [_pairs(ids, r, 1 << k, [sizes[-1 - k]] * r) for k in range(len(sizes))]  # the mirror image
    if n > r:
        full = [nbytes] * (n - r)
        steps = [_fold(ids, r, full, inward=True), *steps, _fold(ids, r, full, inward=False)]
    return Exchange(phases=tuple(steps))


def doubling_allgather(ids: Sequence[int], block: int) -> Exchange:
    """Recursive doubling: at distance 1, 2, 4, ... each node sends everything it holds (extra nodes folded)."""
    n = len(ids)
    r = _pow2_floor(n)
    held = [block * (2 if k + r < n else 1) for k in range(r)]  # a partner of an extra node holds its block too
    steps: list[Exchange] = []
    if n > r:
        steps.append(_fold(ids, r, [block] * (n - r), inward=True))
    d = 1
    while d < r:
        steps.append(_pairs(ids, r, d, held))
        held = [held[k] + held[k ^ d] for k in range(r)]
        d *= 2
    if n > r:
        steps.append(_fold(ids, r, [(n - 1) * block] * (n - r), inward=False))
    return Exchange(phases=tuple(steps))


def allreduce(ids: Sequence[int], nbytes: int, summable: bool = True) -> Exchange:
    """An all-reduce of ``nbytes``, or an all-gather of one ``nbytes`` block per node; the faster plan is charged.

    ``summable``: the payloads can be summed on the way (dense, fp16); sparse or quantized ones cannot, and are
    gathered. The task's bytes are the ring's.
    """
    if len(ids) < 2:
        return Exchange()
    ring = ring_allreduce(ids, nbytes) if summable else ring_allgather(ids, nbytes)
    other = halving_doubling_allreduce(ids, nbytes) if summable else doubling_allgather(ids, nbytes)
    return Exchange(bytes_up=ring.bytes_up, bytes_down=ring.bytes_down, options=(ring, other))
