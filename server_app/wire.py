"""What travels: model records, their real serialized size, and validation of what clients send back.

Sizes are the bytes Flower really serializes for a message: since Flower 1.20 a message travels as a tree of
content-addressed objects (message, record dict, records, arrays, array chunks), each pushed and pulled as its
``deflate()`` bytes, identical objects once. ``wire_bytes`` sums exactly those bytes (HTTP framing aside).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from client_app.records import to_record

__all__ = ["RejectedUpdate", "read_reply", "to_record", "wire_bytes"]

NUMPY_STYPE = "numpy.ndarray"


class RejectedUpdate(ValueError):
    """A reply that must not touch the model; the message is the reason recorded in the store."""


def wire_bytes(msg: Message) -> int:
    """Bytes of the message as Flower serializes it for transport (unique objects of its tree)."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


def read_reply(msg: Message, names: Sequence[str], base: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int, dict]:
    """Validate a training reply and return ``(delta, num_examples, metrics)``.

    Our ClientApp sends ``delta`` (``base - trained``); a ClientApp written for Flower's FedAvg sends ``arrays``
    (trained weights), from which the delta is derived against the version it was sent. Anything malformed
    raises ``RejectedUpdate`` with the reason: unknown or missing keys, wrong stype, dtype or shape, undecodable
    bytes, NaN or Inf, a bad ``num-examples``.
    """
    content = msg.content
    records = content.array_records
    if "delta" in records:
        arrays, is_delta = records["delta"], True
    elif "arrays" in records:
        arrays, is_delta = records["arrays"], False
    else:
        raise RejectedUpdate(f"reply has no 'delta' or 'arrays' ArrayRecord (has: {sorted(records) or 'none'})")
    values = _decode(arrays, names, base)
    delta = values if is_delta else [b - v for b, v in zip(base, values, strict=True)]
    metrics = _metrics(content.metric_records.get("metrics"))
    return delta, _num_examples(metrics), metrics


def _decode(record: ArrayRecord, names: Sequence[str], base: Sequence[np.ndarray]) -> list[np.ndarray]:
    missing = [n for n in names if n not in record]
    extra = [k for k in record if k not in set(names)]
    if missing or extra:
        raise RejectedUpdate(f"array keys do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    out = []
    for name, ref in zip(names, base, strict=True):
        out.append(_decode_one(name, record[name], ref))
    return out


def _decode_one(name: str, arr: Array, ref: np.ndarray) -> np.ndarray:
    if arr.stype != NUMPY_STYPE:
        raise RejectedUpdate(f"{name}: unsupported stype {arr.stype!r} (codecs arrive with issue 3)")
    if arr.dtype != str(ref.dtype) or tuple(arr.shape) != ref.shape:
        raise RejectedUpdate(
            f"{name}: got {arr.dtype}{list(arr.shape)}, expected {ref.dtype}{list(ref.shape)}"
        )
    try:
        value = arr.numpy()
    except Exception as exc:  # np.load raises many types on hostile bytes; all mean "undecodable"
        raise RejectedUpdate(f"{name}: undecodable array bytes ({type(exc).__name__}: {exc})") from exc
    if value.dtype != ref.dtype or value.shape != ref.shape:
        raise RejectedUpdate(f"{name}: bytes decode to {value.dtype}{list(value.shape)}, not the declared type")
    if not np.isfinite(value).all():
        raise RejectedUpdate(f"{name}: contains NaN or Inf")
    return value


def _metrics(record: object) -> dict[str, float]:
    if record is None:
        return {}
    return {k: v for k, v in dict(record).items() if isinstance(v, int | float)}


def _num_examples(metrics: dict[str, float]) -> int:
    n = metrics.get("num-examples", 1)
    if isinstance(n, bool) or not float(n).is_integer() or n < 1:
        raise RejectedUpdate(f"num-examples must be a positive integer, got {n!r}")
    return int(n)
