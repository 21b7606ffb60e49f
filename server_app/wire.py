"""What travels: model records, their real serialized size, and validation of what clients send back.

Sizes are the bytes Flower really serializes for a message: since Flower 1.20 a message travels as a tree of
content-addressed objects (message, record dict, records, arrays, array chunks), each pushed and pulled as its
``deflate()`` bytes, identical objects once. ``wire_bytes`` sums exactly those bytes (HTTP framing aside).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.app.message.arraychunk import ArrayChunk
from flwr.supercore.inflatable.inflatable_object import (
    InflatableObject,
    _get_computed_object_ids,
    get_all_nested_objects,
    get_object_id,
    no_object_id_recompute,
)

from server_app.wire_sizes import chunk_bytes, sizes
from strategies.base import Encoded, Payload
from strategies.codecs import STYPE_NONE, CodecError, all_finite, decode, npy_view, to_record
from strategies.flower_arrays import dtype_str, named_record
from strategies.taskkeys import COMPUTE_S, MODEL_VERSION, NUM_EXAMPLES, TASK_SEQ, TRAIN_LOSS

__all__ = ["KNOWN_METRICS", "RejectedUpdate", "check_known_metrics", "finite_number", "message_sizes",
           "payload_bytes", "payload_record", "read_reply", "shown", "to_record", "validate_reply", "wire_bytes"]

log = logging.getLogger("staleflower")


class RejectedUpdate(ValueError):
    """A reply that must not touch the model; the message is the reason recorded in the store."""


def payload_record(names: Sequence[str], payload: Payload) -> ArrayRecord:
    """A strategy's ``Task.payload`` as the "arrays" record of its train message, keyed by the model's names.

    Numpy arrays travel as Flower's own ``Array(ndarray)`` (codec ``none``, what ``to_record`` writes); arrays a
    codec has ``Encoded`` travel as they are, in copies (``ArrayRecord(dict)`` rebuilds them): sizing a message
    caches memoryviews of its chunks on its Arrays, and the strategy's own, which a checkpoint pickles, must not
    hold them. An empty payload is an empty record (the task sends no model).
    """
    if isinstance(payload, Encoded):
        return ArrayRecord(dict(zip(names, payload.arrays, strict=True)))
    return to_record(names, payload) if payload else ArrayRecord({})


def wire_bytes(msg: Message) -> int:
    """Bytes of the message as Flower serializes it for transport (unique objects of its tree)."""
    return message_sizes(msg)[0]


def payload_bytes(msg: Message) -> int:
    """Bytes of the message's content tree only (see ``message_sizes``)."""
    return message_sizes(msg)[1]


def message_sizes(msg: Message) -> tuple[int, int]:
    """``(wire bytes, content bytes)`` of a message.

    Wire bytes equal ``sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())`` (the tests check
    it). The messages the engine sends and receives are sized from their objects' signatures, without deflating
    them (``server_app/wire_sizes.py``); any other is deflated, in one walk of its object tree: an array chunk's
    size is computed from its length instead of deflating it again (chunks are the model's bytes, their ids are
    cached by ``Array.slice_array``, hashed once per array).

    Content bytes leave out the message object itself, whose metadata has varints of the run id and node ids:
    random 64-bit numbers that differ between runs of the same seed. The virtual clock charges content bytes, so
    that a run's timing, hence its event order, does not depend on them.
    """
    found = sizes(msg)
    if found is not None:
        return found
    seen: dict[str, int] = {}

    def visit(obj: InflatableObject, into: dict[str, int]) -> None:
        if isinstance(obj, ArrayRecord):  # a model version's record travels in many messages: sized once
            memo = obj.__dict__.get(_SIZES_KEY)
            if memo is None or memo[0] != obj.object_id:
                sizes: dict[str, int] = {}
                walk(obj, sizes)
                memo = obj.__dict__[_SIZES_KEY] = (obj.object_id, sizes)
            into.update(memo[1])  # an object's size follows from its id: update is setdefault here
            return
        walk(obj, into)

    def walk(obj: InflatableObject, into: dict[str, int]) -> None:
        if isinstance(obj, Array):
            for chunk_id, chunk in obj.slice_array():
                assert isinstance(chunk, ArrayChunk)  # what slice_array makes (typed as any InflatableObject)
                into.setdefault(chunk_id, chunk_bytes(len(chunk.data)))
        else:
            for child in _parts(obj):
                visit(child, into)
        oid, size = _identify(obj)
        into.setdefault(oid, size)

    with no_object_id_recompute():  # Flower's own cache of object ids for the duration of one serialization
        if msg.has_content():
            visit(msg.content, seen)
        content = sum(seen.values())
        return content + len(msg.deflate()), content


def _parts(obj: InflatableObject) -> list[InflatableObject]:
    """The objects ``obj``'s deflated form refers to, without taking their ids (``children`` would hash each)."""
    if isinstance(obj, RecordDict | ArrayRecord):
        return list(obj.values())
    if isinstance(obj, Message):
        return [obj.content] if obj.has_content() else []
    return list((obj.children or {}).values())


def _identify(obj: InflatableObject) -> tuple[str, int]:
    """``(obj.object_id, len(obj.deflate()))`` from one deflate, inside ``no_object_id_recompute``.

    ``object_id`` deflates the object to hash it and keeps only the hash, so sizing a message deflated each
    record twice. Here the bytes are hashed and measured once, and the id is left where Flower's own cache for the
    current serialization looks (``_object_id`` and the context's set of computed ids), with the dirty flag that
    ``Array.object_id`` and ``ArrayRecord.object_id`` clear, so that a parent's deflate reuses it; the ids are
    Flower's (``tests/test_wire.py`` compares the sizes with ``reference_wire_bytes``).
    """
    data = obj.deflate()
    oid = get_object_id(data)
    obj.__dict__["_object_id"] = oid
    _get_computed_object_ids().add(oid)
    if isinstance(obj, Array | ArrayRecord):
        obj.is_dirty = False
    return oid, len(data)


#: Where ``message_sizes`` keeps an ArrayRecord's sizes on the record itself: ``(its object id then, {object id:
#: bytes} of its tree)``; a record changed since (its object id differs) is walked again.
_SIZES_KEY = "_staleflower_sizes"


def reference_wire_bytes(msg: Message) -> int:
    """The definition ``wire_bytes`` implements faster: every unique object of the tree, deflated."""
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


def read_reply(
    msg: Message, names: Sequence[str], base: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], bool, int, dict[str, float]]:
    """Validate a training reply and return ``(arrays, is_delta, num_examples, metrics)``.

    Our ClientApp sends ``delta`` (``base - trained``); a ClientApp written for Flower's FedAvg sends ``arrays``
    (trained weights); ``strategies.base.Update`` derives either form from the other. Anything malformed
    raises ``RejectedUpdate`` with the reason: unknown or missing keys, wrong stype, dtype or shape, undecodable
    bytes, NaN or Inf, a bad ``num-examples``.

    A reply comes from a device the server does not control, so any other exception the checks of
    ``validate_reply`` might still raise on some input nobody foresaw is turned into a ``RejectedUpdate`` too
    (and logged with its traceback): a bug in validation must cost one update, not the run. The engine reads
    replies through ``server_app.intake.Intake.read``, whose safety net covers the whole reply and not only
    this part; this one is for callers outside the engine. The fuzz tests and ``bench/fuzz_report.py`` call
    ``validate_reply`` itself and count such exceptions as crashes.
    """
    try:
        return validate_reply(msg, names, base)
    except RejectedUpdate:
        raise
    except Exception as exc:
        log.exception("reply validation raised %s; rejecting the reply", type(exc).__name__)
        raise RejectedUpdate(f"malformed reply (validation raised {type(exc).__name__}: {exc})") from exc


#: ``finite(index, values, is_delta)``: whether a decoded tensor has no NaN or Inf, in place of ``all_finite``
#: (the update guard answers it from the norm it needs anyway: ``server_app.intake.UpdateGuard.finite_check``).
FiniteCheck = Callable[[int, np.ndarray, bool], bool]


def validate_reply(
    msg: Message, names: Sequence[str], base: Sequence[np.ndarray], finite: FiniteCheck | None = None
) -> tuple[list[np.ndarray], bool, int, dict[str, float]]:
    """``read_reply`` without its last line of defence: only ``RejectedUpdate`` is expected out of it.

    ``finite``, when given, replaces the NaN/Inf check of each plain (codec ``none``) tensor; it must answer
    exactly what ``all_finite`` would.
    """
    content = msg.content
    delta = named_record(content, "delta", ArrayRecord)
    arrays = delta if delta is not None else named_record(content, "arrays", ArrayRecord)
    if arrays is None:
        has = sorted(content.array_records) or "none"
        raise RejectedUpdate(f"reply has no 'delta' or 'arrays' ArrayRecord (has: {has})")
    is_delta = delta is not None
    values = _decode(arrays, names, base, is_delta, finite)
    record = named_record(content, "metrics", MetricRecord)
    check_known_metrics(record)
    metrics = numeric_metrics(record)
    return values, is_delta, num_examples(metrics), metrics


def _decode(record: ArrayRecord, names: Sequence[str], base: Sequence[np.ndarray], is_delta: bool = True,
            finite: FiniteCheck | None = None) -> list[np.ndarray]:
    missing = [n for n in names if n not in record]
    known = set(names)
    extra = [k for k in record if k not in known]
    if missing or extra:
        raise RejectedUpdate(f"array keys do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    out = []
    for i, (name, ref) in enumerate(zip(names, base, strict=True)):
        check = all_finite if finite is None else (lambda v, i=i: finite(i, v, is_delta))
        out.append(_decode_one(name, record[name], ref, check))
    return out


def _decode_one(name: str, arr: Array, ref: np.ndarray,
                finite: Callable[[np.ndarray], bool] = all_finite) -> np.ndarray:
    if arr.stype != STYPE_NONE:  # a codec's payload: strategies.codecs validates every byte of it
        try:
            return decode(arr, shape=ref.shape, dtype=ref.dtype)
        except CodecError as exc:
            raise RejectedUpdate(f"{name}: {exc}") from exc
    if arr.dtype != dtype_str(ref.dtype) or tuple(arr.shape) != ref.shape:  # numpy's str(dtype) is Python code
        raise RejectedUpdate(
            f"{name}: got {arr.dtype}{list(arr.shape)}, expected {ref.dtype}{list(ref.shape)}"
        )
    try:
        value = npy_view(arr.data, ref.shape, ref.dtype)  # a read-only view of the message's bytes: no copy
    except CodecError as exc:
        raise RejectedUpdate(f"{name}: undecodable array bytes ({exc})") from exc
    if not finite(value):
        raise RejectedUpdate(f"{name}: contains NaN or Inf")
    return value


#: Reply metrics the server reads, and what each must be. The echoes (``task-seq``, ``model-version``) are held
#: to their task's values by ``server_app.intake.UpdateGuard.admit`` and ``num-examples`` by ``num_examples``;
#: here each is only held to be one finite number, so that a list, a NaN or an infinity is a reason, not a crash.
KNOWN_METRICS: dict[str, str] = {
    NUM_EXAMPLES: "a finite number",
    COMPUTE_S: "a finite number >= 0",
    TRAIN_LOSS: "a finite number",
    TASK_SEQ: "a finite number",
    MODEL_VERSION: "a finite number",
}


def finite_number(value: object) -> float | None:
    """``value`` as a float when it is a finite int or float (not a bool, not beyond float's range), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int past 1.8e308: not one a MetricRecord can carry, but a forged one might
        return None
    return number if math.isfinite(number) else None


def check_known_metrics(record: Mapping[str, object] | None) -> None:
    """Reject a reply whose ``metrics`` holds anything but what ``KNOWN_METRICS`` says under one of its keys.

    A MetricRecord may carry lists of numbers, and a forged one anything; the server reads these keys as one
    number each, so a wrong kind is the reply's fault and costs the reply, never the run.
    """
    if record is None:
        return
    for key, kind in KNOWN_METRICS.items():
        if key not in record:
            continue
        value = record[key]
        number = finite_number(value)
        if number is None or (key == COMPUTE_S and number < 0):
            raise RejectedUpdate(f"metric {key} must be {kind}, got {shown(value)}")


def numeric_metrics(record: Mapping[str, object] | None) -> dict[str, float]:
    """The finite numbers of a reply's ``metrics`` record, as sent (an int stays an int); anything else is dropped.

    Lists, NaN and infinities under keys the server does not read are a ClientApp's own business (a stock Flower
    ClientApp may send them): they are left out, so that what strategies and the store see is numbers only.
    """
    if record is None:
        return {}
    out: dict[str, float] = {}
    for key, value in dict(record).items():
        if finite_number(value) is not None:
            assert isinstance(value, int | float)  # what finite_number accepts
            out[key] = value
    return out


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: a reason quotes what a client sent, never all of it."""
    if isinstance(value, list | tuple | str | bytes) and len(value) > limit:  # no repr of a million items
        return f"{repr(value[:limit])[:limit]}... ({type(value).__name__} of length {len(value)})"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


MAX_EXAMPLES = 2**53  # beyond, a float count is no longer exact; and FedAvg weights by it: a claim, not a fact


def num_examples(metrics: Mapping[str, object]) -> int:
    """A reply's ``num-examples`` claim (1 when absent): a positive integer up to 2**53, else ``RejectedUpdate``."""
    n = metrics.get(NUM_EXAMPLES, 1)
    if finite_number(n) is None:
        raise RejectedUpdate(f"num-examples must be a positive integer up to 2**53, got {shown(n)}")
    assert isinstance(n, int | float)
    if isinstance(n, bool) or not 1 <= n <= MAX_EXAMPLES or not float(n).is_integer():  # NaN fails the range
        raise RejectedUpdate(f"num-examples must be a positive integer up to 2**53, got {shown(n)}")
    return int(n)
