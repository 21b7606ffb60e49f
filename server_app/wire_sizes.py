"""The bytes Flower serializes for a message, from what determines them instead of by serializing it.

Flower 1.41 sends a message as a tree of content-addressed objects, each pushed once as its ``deflate()`` bytes: a
header (class name, the ids of its distinct children, the body's length), then a body (the protobuf of a config
or metric record, the JSON of an array's metadata or of a record's references, an array chunk's data). The store
must say exactly how many bytes that is for every message (DESIGN.md: what was really serialized, not an
estimate), and deflating each object (then hashing it, to name it in its parent's header and to find identical
objects) only to count its bytes was a fifth of the engine's time per update with a small model.

The length of an object's deflated bytes is a function of a few facts about it, its *signature*: a record's keys
and, for each value, its wire type and payload length; an array's dtype, shape, stype and number of chunks; the
number of distinct children (every id is 64 hex digits); the lengths of a message's metadata fields. ``sizes``
computes signatures, looks each up in a memo, and deflates an object only the first time its signature is seen, so
every length is Flower's own. A signature is only ever finer than the length it stands for (``-0.0`` and ``0.0``
differ in it, for one): two objects with one signature have deflated lengths that are equal. Which objects are
identical, hence pushed once, is decided by their bytes: two arrays with the same dtype, shape, stype and data are
one object, two chunks with the same data one chunk.

Where that reasoning does not reach (a record dict with two records of one kind, which may be one object; an array
of several chunks; a value or field of a type Flower would refuse), ``sizes`` returns None and the caller deflates
the message (``wire.message_sizes``), which also raises what Flower would. ``tests/test_wire_sizes.py`` compares
both with ``wire.reference_wire_bytes`` over generated messages.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.supercore.inflatable.inflatable_object import InflatableObject

from strategies.flower_arrays import CHUNKS_KEY, chunk_header

__all__ = ["chunk_bytes", "sizes"]

_INT64_MIN, _INT64_MAX, _UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1
#: The types a record's values may have, in the order Flower's serializer tries them (``_record_value_to_proto``).
_ALLOWED: dict[type, tuple[type, ...]] = {ConfigRecord: (bool, int, float, str, bytes), MetricRecord: (float, int)}
#: Signatures remembered, at most; keys longer than ``_MEMO_KEY_CHARS`` in all are not remembered (a client's
#: metric names are its own choice: the memo must not hold what one reply sent).
_MEMO_ENTRIES, _MEMO_KEY_CHARS = 2048, 2048
_memo: dict[Hashable, int] = {}


def chunk_bytes(n: int) -> int:
    """``len(ArrayChunk(data).deflate())`` for ``n`` bytes of data: its header (``chunk_header``), then the data."""
    return len(chunk_header(n)) + n


def sizes(msg: Message) -> tuple[int, int] | None:
    """``(wire bytes, content bytes)`` as ``wire.message_sizes`` defines them, or None where only deflating tells."""
    try:
        signature = _message_signature(msg)
        if signature is None:
            return None
        content = 0
        if msg.has_content():
            found = _record_dict(msg.content)
            if found is None:
                return None
            content = found
        return content + _length(signature, msg), content
    except Exception:  # noqa: BLE001 - a first deflate that fails: the caller's deflating path raises it again
        return None


def _length(signature: Hashable, obj: InflatableObject, remember: bool = True) -> int:
    """The deflated length of ``obj``, whose signature this is: from the memo, else deflated (and remembered)."""
    known = _memo.get(signature)
    if known is None:
        known = len(obj.deflate())
        if remember:
            if len(_memo) >= _MEMO_ENTRIES:
                _memo.clear()
            _memo[signature] = known
    return known


# ------------------------------------------------------------------------------------------------- the tree
def _record_dict(content: RecordDict) -> int | None:
    """Bytes of a record dict and everything in it; None unless its records are of different kinds."""
    if type(content) is not RecordDict:
        return None
    total, names, kinds = 0, [], set()
    for name, record in content.items():
        kind = type(record)
        if type(name) is not str or kind in kinds:  # two records of one kind may be one object: deflate tells
            return None
        kinds.add(kind)
        if isinstance(record, ArrayRecord) and kind is ArrayRecord:
            found = _array_record(record)
        elif isinstance(record, ConfigRecord | MetricRecord) and kind in _ALLOWED:
            found = _flat_record(record, _ALLOWED[kind])
        else:
            return None
        if found is None:
            return None
        total += found
        names.append(name)
    return total + _length(("RecordDict", tuple(names)), content, _short(names))


def _array_record(record: ArrayRecord) -> int | None:
    """Bytes of an array record, its distinct arrays and their distinct chunks (arrays of one chunk only)."""
    total, names = 0, []
    arrays: dict[Hashable, Any] = {}  # (signature, data length) -> the data of those seen (bytes, or a set)
    chunks: dict[Hashable, Any] = {}  # data length -> the chunks seen
    distinct = 0
    for name, array in record.items():
        if type(name) is not str or type(array) is not Array:
            return None
        data = array.data
        if type(data) is not bytes or len(data) > FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE or not _natural(array, data):
            return None  # several chunks, a view, or chunks cached that are not the data: Flower's deflate tells
        signature = _array_signature(array, len(data) > 0)
        if signature is None:
            return None
        names.append(name)
        if not _first(arrays, (signature, len(data)), data):
            continue  # the same array again: one object, pushed once
        distinct += 1
        total += _length(signature, array)
        if data and _first(chunks, len(data), data):
            total += chunk_bytes(len(data))
    return total + _length(("ArrayRecord", tuple(names), distinct), record, _short(names))


def _natural(array: Array, data: bytes) -> bool:
    """Whether the chunks Flower has cached on ``array``, if any, are the ones it would make: the data itself.

    Flower deflates an array from that cache (``Array.slice_array``); an in-process ClientApp could hand back an
    array whose cache says something else, and the deflated tree would follow the cache, not the data.
    """
    chunks = array.__dict__.get(CHUNKS_KEY)
    if chunks is None:
        return True
    if not data:
        return not chunks
    if len(chunks) != 1:
        return False
    held = getattr(chunks[0][1], "data", None)
    return held is data or (isinstance(held, memoryview) and held.obj is data and len(held) == len(data))


def _first(seen: dict[Hashable, Any], key: Hashable, data: bytes) -> bool:
    """Whether ``data`` is new under ``key`` (and note it): one comparison for two, a set (hashes) beyond."""
    found = seen.get(key)
    if found is None:
        seen[key] = data
        return True
    if type(found) is bytes:
        if found == data:
            return False
        seen[key] = found = {found}
    if data in found:
        return False
    found.add(data)
    return True


def _array_signature(array: Array, one_chunk: bool) -> tuple[Any, ...] | None:
    """What the length of ``Array.deflate()`` follows from: the JSON of its metadata and its number of chunks."""
    shape = array.shape
    if type(array.dtype) is not str or type(array.stype) is not str or not isinstance(shape, tuple | list):
        return None
    if any(type(d) is not int for d in shape):
        return None
    return ("Array", array.dtype, tuple(shape), array.stype, one_chunk)


def _flat_record(record: ConfigRecord | MetricRecord, allowed: tuple[type, ...]) -> int | None:
    """Bytes of a config or metric record: a protobuf of (key, value) items, no children."""
    items = []
    for key, value in record.items():
        found = _value_signature(value, allowed)
        if type(key) is not str or found is None:
            return None
        items.append((key, found))
    return _length((type(record).__name__, tuple(items)), record, _short(key for key, _ in items))


def _value_signature(value: object, allowed: tuple[type, ...]) -> tuple[Any, ...] | None:
    """Which field of the record-value protobuf ``value`` goes into and its payload's length, as Flower picks it."""
    for t in allowed:
        if isinstance(value, t):
            if t is int:
                return _int_signature(value)  # type: ignore[arg-type]
            if t is str:
                length = _utf8_length(value)  # type: ignore[arg-type]
                return None if length is None else ("str", length)
            return (t.__name__, len(value)) if t is bytes else (t.__name__,)  # type: ignore[arg-type]
        if isinstance(value, list) and all(isinstance(item, t) for item in value):
            return _list_signature(value, t)
    return None


def _list_signature(values: list[Any], t: type) -> tuple[Any, ...] | None:
    """A repeated field: packed numbers by their total length, strings and bytes by each one's."""
    if t is int:
        if any(v > _INT64_MAX for v in values):  # Flower sends the list as uint64 (negatives then fail)
            if any(v < 0 or v > _UINT64_MAX for v in values):
                return None
            return ("uint_list", sum(_varint_length(v) for v in values))
        if any(v < _INT64_MIN for v in values):
            return None
        return ("sint_list", sum(_varint_length(_zigzag(v)) for v in values))
    if t is str:
        lengths = tuple(_utf8_length(v) for v in values)
        return None if None in lengths else ("str_list", lengths)
    if t is bytes:
        return ("bytes_list", tuple(len(v) for v in values))
    return (t.__name__ + "_list", len(values))  # bool and float: fixed width


def _int_signature(value: int) -> tuple[Any, ...] | None:
    """sint64 (zigzag) or, past int64, uint64; None outside both (Flower's serializer refuses it)."""
    if value < _INT64_MIN or value > _UINT64_MAX:
        return None
    if value > _INT64_MAX:
        return ("uint64", _varint_length(value))
    return ("sint64", _varint_length(_zigzag(value)))


def _zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63)


def _varint_length(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


def _utf8_length(value: str) -> int | None:
    """Bytes of ``value`` in UTF-8; None for a string Flower cannot encode (a lone surrogate)."""
    try:
        return len(value.encode())
    except UnicodeEncodeError:
        return None


def _short(keys: Sequence[str] | Any) -> bool:
    """Whether keys are short enough to remember a signature that holds them."""
    return sum(len(k) for k in keys) <= _MEMO_KEY_CHARS


# ---------------------------------------------------------------------------------------------- the message
def _message_signature(msg: Message) -> tuple[Any, ...] | None:
    """What the length of ``Message.deflate()`` follows from: its metadata's fields, its error, its content's id.

    Unset (zero) fields are left out of the protobuf, so each number's signature is its varint length or 0, each
    double's whether it is +0.0 (-0.0 and NaN are told apart too, whatever the encoder does with them).
    """
    md = msg.metadata
    fields = (_uint(md.run_id), _uint(md.src_node_id), _uint(md.dst_node_id), _string(md.reply_to_message_id),
              _string(md.group_id), _double(md.ttl), _string(md.message_type), _double(md.created_at),
              _optional_uint(md.src_task_id), _optional_uint(md.dst_task_id))
    if any(f is None for f in fields):
        return None
    error: tuple[Any, ...] | None = None
    if msg.has_error():
        code, reason = msg.error.code, msg.error.reason or ""
        if type(code) is not int or not _INT64_MIN <= code <= _INT64_MAX:  # an error code is a sint64 only
            return None
        error = (_int_signature(code) if code else 0, _string(reason))
        if error[1] is None:
            return None
    return ("Message", fields, error, msg.has_content())


def _uint(value: object) -> int | None:
    if type(value) is not int or not 0 <= value <= _UINT64_MAX:
        return None
    return _varint_length(value) if value else 0


def _optional_uint(value: object) -> int | None:
    return -1 if value is None else _uint(value)


def _string(value: object) -> int | None:
    return _utf8_length(value) if type(value) is str else None


def _double(value: object) -> int | None:
    if type(value) is not float and type(value) is not int:
        return None
    if value == 0:
        return 0 if math.copysign(1.0, value) > 0 else 2
    return 1
