"""How a message crosses the pipe between the engine and a client process: a JSON head, then the arrays' bytes.

Flower's protobuf (``message_to_proto`` and back) cost the engine about a fifth of its time per update with a small
model, in Python: a protobuf object per record value and per array, built, serialized, parsed and read back. What
must cross the pipe is only what those objects hold: the metadata fields the protobuf carries, each record's kind
and items in order, each array's dtype, shape, stype and data. Here they go as one JSON document (JSON tells
``1``, ``1.0`` and ``true`` apart, keeps key order, and round-trips every float, NaN and infinities included, and
every integer) followed by the arrays' data and any ``bytes`` values, which the head refers to as
``{"b": index}`` (no record value is ever a JSON object, so the marker cannot be confused with one). The receiving
side builds Flower's objects with the constructors ``message_from_proto`` uses, so it validates what it gets as
Flower would; a message Flower's protobuf would drop nothing from comes back equal to what was sent
(``tests/test_pipe_codec.py``).

What a message's size is on Flower's wire does not depend on this format: ``wire.message_sizes`` measures that.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata

from strategies.flower_arrays import checked_record, record_of

__all__ = ["decode", "encode"]

_HEAD = 4  # bytes of the head's length, little-endian
_KINDS: dict[type, str] = {ArrayRecord: "arrays", ConfigRecord: "config", MetricRecord: "metrics"}


def encode(msg: Message) -> bytes:
    """The message as bytes for ``decode``; a ``ValueError`` or ``TypeError`` for a record Flower cannot carry."""
    md = msg.metadata
    blobs: list[bytes] = []
    content = None
    if msg.has_content():
        content = [_record(name, record, blobs) for name, record in msg.content.items()]
    error = [msg.error.code, msg.error.reason] if msg.has_error() else None
    head = json.dumps([md.run_id, md.message_id, md.src_node_id, md.dst_node_id, md.reply_to_message_id, md.group_id,
                       md.created_at, md.ttl, md.message_type, md.src_task_id, md.dst_task_id, error, content,
                       [len(b) for b in blobs]], separators=(",", ":")).encode()
    return b"".join([len(head).to_bytes(_HEAD, "little"), head, *blobs])


def decode(data: bytes) -> Message:
    """The message ``encode`` made (a ``ValueError``, ``TypeError`` or ``LookupError`` for bytes it did not make)."""
    size = int.from_bytes(data[:_HEAD], "little")
    (run_id, message_id, src, dst, reply_to, group_id, created_at, ttl, kind, src_task, dst_task, error, content,
     sizes) = json.loads(data[_HEAD:_HEAD + size])
    view, blobs, pos = memoryview(data), [], _HEAD + size
    for n in sizes:
        blobs.append(bytes(view[pos:pos + n]))
        pos += n
    if pos != len(data):
        raise ValueError(f"pipe message: {len(data) - pos} bytes where its parts should end")
    metadata = Metadata(run_id=run_id, message_id=message_id, src_node_id=src, dst_node_id=dst,
                        reply_to_message_id=reply_to, group_id=group_id, created_at=float(created_at),
                        ttl=float(ttl), message_type=kind, src_task_id=src_task, dst_task_id=dst_task)
    records = None
    if content is not None:
        records = checked_record(RecordDict, {name: _build(record_kind, items, blobs)
                                              for name, record_kind, items in content})
    failure = None if error is None else Error(code=error[0], reason=error[1] or None)  # "" is None, as in protobuf
    return make_message(metadata, records, failure)


def _record(name: str, record: object, blobs: list[bytes]) -> list[Any]:
    kind = _KINDS.get(type(record))
    if kind is None:
        raise ValueError(f"Unsupported record type: {type(record)}")
    if kind == "arrays":
        items = [[key, array.dtype, list(array.shape), array.stype, _blob(bytes(array.data), blobs)]
                 for key, array in record.items()]  # type: ignore[attr-defined]
    else:
        items = [[key, _plain(value, blobs)] for key, value in record.items()]  # type: ignore[attr-defined]
    return [name, kind, items]


def _blob(data: bytes, blobs: list[bytes]) -> int:
    blobs.append(data)
    return len(blobs) - 1


def _plain(value: object, blobs: list[bytes]) -> object:
    """A record value as JSON takes it: ``bytes`` go after the head, referred to by their place."""
    if isinstance(value, bytes):
        return {"b": _blob(value, blobs)}
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [_plain(v, blobs) for v in value]
    if isinstance(value, float | int | str | list):  # bool is an int; JSON keeps it apart
        return value
    raise TypeError(f"a record value of type {type(value).__name__} cannot be sent")


def _restored(value: Any, blobs: list[bytes]) -> Any:
    if isinstance(value, dict):
        return blobs[value["b"]]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [blobs[v["b"]] for v in value]
    return value


def _build(kind: str, items: list[Any], blobs: list[bytes]) -> ArrayRecord | ConfigRecord | MetricRecord:
    if kind == "arrays":
        return record_of({key: Array(dtype=dtype, shape=tuple(shape), stype=stype, data=blobs[index])
                          for key, dtype, shape, stype, index in items})  # ArrayRecord(array_dict): 3x longer
    values: dict[str, Any] = {key: _restored(value, blobs) for key, value in items}
    if kind == "config":
        return checked_record(ConfigRecord, values)
    if kind == "metrics":
        return checked_record(MetricRecord, values)
    raise ValueError(f"pipe message: unknown record kind {kind!r}")
