"""Compressed links: what each receiver holds of what was sent to it, when what travels is compressed.

Three senders compress over many links with one codec, and keep per link what both ends agree on:

- the server's broadcast of the global model with ``codec-downlink`` (``server_app/downlink.py``): one link per
  node, model mode;
- gossip between nodes with ``codec`` (``strategies/gossip.py``): one link per directed edge ``(src, dst)``,
  model mode;
- OLCO3's broadcast of each period's average with ``codec-downlink`` (``strategies/olco3.py``): one link to every
  node, update mode.

Both modes are error feedback, and are equal in exact arithmetic, but not bit for bit in floating point (one
subtracts a running copy, the other adds a running residual), so each sender keeps the form it always had:

- **model** (``encode_model``, ``commit``, ``send_model``): difference coding against the copy of the model the
  receiver holds. Send ``C(target - copy)``; both ends then hold ``copy + decode(...)``, and what a message left
  out stays in ``target - copy`` for the next one (``strategies.codecs.encode_difference``). A link starts from
  ``initial`` (gossip: the run's initial model, which every node holds) or from nothing (the downlink sends the
  full model first and commits it once the node confirms).
- **update** (``send_update``): a stream of increments with an error memory ``e``: send ``C(x + e)`` and keep
  ``e <- x + e - decode(...)`` (``strategies.codecs.ErrorFeedback``).

Per link and tensor the codec keeps its own state (PowerSGD's warm-start Q). Tensor ``t`` of a message is
encoded with seed ``(seed + t) mod 2**64``. Pure numpy on the caller's side: the encoded arrays are the codec's
objects, handed on unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Generic, TypeVar

import numpy as np
from flwr.app import Array

from strategies.codecs import CodecSpec, CodecState, ErrorFeedback, encode_difference

Weights = list[np.ndarray]
K = TypeVar("K", bound=Hashable)


class LinkCompressor(Generic[K]):
    """One codec over many links keyed by ``K``: per link the receiver's copy (model mode) or error memory."""

    def __init__(self, spec: CodecSpec, initial: Weights | None = None) -> None:
        self.spec = spec
        self.initial = initial                                  # every link's copy before its first commit
        self.copies: dict[K, Weights] = {}                      # model mode: what the receiver holds
        self.states: dict[tuple[K, int], CodecState] = {}       # model mode: (link, tensor) -> codec state
        self.memories: dict[K, ErrorFeedback] = {}              # update mode: residuals and codec states

    def copy(self, link: K) -> Weights | None:
        """The model the receiver of ``link`` holds (``initial`` until a copy is committed; None: nothing)."""
        return self.copies.get(link, self.initial)

    def encode_model(self, link: K, target: Sequence[np.ndarray], seed: int) -> tuple[list[Array], Weights]:
        """``C(target - copy)`` per tensor, and the copy both ends hold once the receiver has applied it.

        The copy is not committed: a sender that cannot know whether the message arrived commits it when the
        receiver confirms (``commit``). The codec's state moves on at once.
        """
        copy = self.copy(link)
        if copy is None:
            raise ValueError(f"link {link!r} holds no copy to code a difference against; send the model first")
        pairs = [encode_difference(self.spec, x, c, seed=(seed + t) % 2**64,
                                   state=self.states.setdefault((link, t), {}))
                 for t, (x, c) in enumerate(zip(target, copy, strict=True))]
        return [a for a, _ in pairs], [c for _, c in pairs]

    def commit(self, link: K, copy: Weights) -> None:
        """The receiver of ``link`` now holds ``copy``."""
        self.copies[link] = copy

    def send_model(self, link: K, target: Sequence[np.ndarray], seed: int) -> tuple[list[Array], Weights]:
        """``encode_model`` and ``commit`` at once, for a receiver that is known to get every message."""
        arrays, copy = self.encode_model(link, target, seed)
        self.commit(link, copy)
        return arrays, copy

    def send_update(self, link: K, update: Sequence[np.ndarray], seed: int) -> tuple[list[Array], Weights]:
        """``C(update + e)`` per tensor with the link's error memory: the arrays, and what the receiver decodes."""
        memory = self.memories.setdefault(link, ErrorFeedback(self.spec))
        pairs = [memory.compress(t, x, seed=(seed + t) % 2**64) for t, x in enumerate(update)]
        return [a for a, _ in pairs], [d for _, d in pairs]
