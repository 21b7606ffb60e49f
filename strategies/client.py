"""The client half's view of one task: what arrived, how to train, where state persists, how to compress.

``Strategy.client(job)`` runs on the node (inside the ClientApp) and returns the arrays to upload. ``ClientJob``
keeps everything Flower-specific out of the algorithms: the ClientApp decodes what arrived and builds the job,
the strategy computes, and ``job.compress`` applies the run's codec with error feedback whose residuals (and
PowerSGD's warm-start matrices) persist in the node's ``context.state`` across tasks, in simulation and in
deployment alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array

from strategies.codecs import CodecSpec, CodecState, ErrorFeedback, decode, encode
from strategies.config import ConfigValue
from strategies.taskkeys import BASE_VERSION, DOWNLINK, DOWNLINK_DELTA, MODEL_VERSION

Weights = list[np.ndarray]
LocalTrain = Callable[[Weights], tuple[Weights, dict[str, float]]]

RESIDUAL_KEY = "ef-residual"
POWERSGD_KEY = "powersgd-q"


@dataclass
class ClientJob:
    """One task on one node."""

    received: Weights                       # decoded "arrays" of the message: the model, or a strategy payload
    task: Mapping[str, ConfigValue]         # the task's ConfigRecord (keys: strategies.taskkeys)
    train: LocalTrain                       # local steps from given weights -> (trained weights, metrics)
    state: MutableMapping[str, Weights]     # persists on the node across the run's tasks
    codec: CodecSpec
    error_feedback: bool
    seed: int

    @property
    def residual(self) -> Weights | None:
        """The error-feedback memory e (None before the first compressed upload, or without error feedback)."""
        return self.state.get(RESIDUAL_KEY) if self.error_feedback else None

    def compress(self, delta: Weights, *, memory_from: str | None = RESIDUAL_KEY,
                 memory_to: str = RESIDUAL_KEY) -> tuple[list[Array], Weights]:
        """Encode ``delta`` with the run's codec (and error feedback): ``(arrays to send, what the server decodes)``.

        The residual and the codec's own state (PowerSGD's warm-start Q) are read from ``state[memory_from]``
        (None: start afresh) and written to ``state[memory_to]``; algorithms that must be able to redo a task
        (OLCO3's rounds) keep one memory per round. Tensor ``i`` uses seed ``seed + i``, so random codecs draw
        independently per tensor and reproducibly per task.
        """
        old_e = self.state.get(memory_from) if memory_from and self.error_feedback else None
        old_q = self.state.get(_q_key(memory_from)) if memory_from else None
        warm: Sequence[np.ndarray | None] = old_q or [None] * len(delta)
        codec_states: list[CodecState] = [{"q": q} if q is not None and q.size else {} for q in warm]
        seeds = [(self.seed + i) % 2**64 for i in range(len(delta))]
        if self.error_feedback:
            ef = ErrorFeedback(self.codec)
            ef.residuals = dict(enumerate(old_e or []))
            ef.states = dict(enumerate(codec_states))
            pairs = [ef.compress(i, d, seed=s) for i, (d, s) in enumerate(zip(delta, seeds, strict=True))]
            self.state[memory_to] = [ef.residuals[i] for i in range(len(delta))]
        else:
            arrays = [encode(self.codec, d, seed=s, state=st)
                      for d, s, st in zip(delta, seeds, codec_states, strict=True)]
            if self.codec.name == "none":  # lossless (encode refuses NaN/Inf): what the server decodes is the delta
                pairs = [(a, np.array(d, dtype=d.dtype, order="C")) for a, d in zip(arrays, delta, strict=True)]
            else:
                pairs = [(a, decode(a, shape=d.shape, dtype=d.dtype)) for a, d in zip(arrays, delta, strict=True)]
        if self.codec.name == "powersgd":
            self.state[_q_key(memory_to)] = [st.get("q", np.zeros(0, np.float32)) for st in codec_states]
        return [a for a, _ in pairs], [s for _, s in pairs]


def _q_key(memory: str) -> str:
    return POWERSGD_KEY if memory == RESIDUAL_KEY else f"{memory}/{POWERSGD_KEY}"


def downlink_model(state: MutableMapping[str, Weights], task: Mapping[str, ConfigValue], received: Weights) -> Weights:
    """The model a task trains from under downlink compression (``server_app/downlink.py``).

    ``downlink = "full"``: the message carries the model; ``"delta"``: it carries a compressed difference against
    the copy of version ``base-version`` that this node stored earlier. The node keeps that copy and the new one
    (keyed by version) and forgets the rest, so a task the server had to redo still finds its base.
    """
    version = int(task[MODEL_VERSION])
    if task[DOWNLINK] == DOWNLINK_DELTA:
        base_version = int(task[BASE_VERSION])
        model = [b + d for b, d in zip(state[f"downlink/{base_version}"], received, strict=True)]
    else:
        base_version, model = version, received
    state[f"downlink/{version}"] = model
    for key in [k for k in state if k.startswith("downlink/")]:
        if int(key.split("/")[1]) not in (version, base_version):
            del state[key]
    return model


def decode_received(arrays: Mapping[str, Array], names: list[str], like: Weights) -> Weights:
    """Decode a received record in model order: plain numpy arrays or any codec's arrays (validated)."""
    return [decode(arrays[n], shape=ref.shape, dtype=ref.dtype) for n, ref in zip(names, like, strict=True)]
