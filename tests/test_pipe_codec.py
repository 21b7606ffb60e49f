"""The client processes' pipe format gives back the message Flower's protobuf would, value for value."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from hypothesis import given, settings

from server_app import pipe_codec
from server_app.wire import message_sizes
from strategies.codecs import to_record
from tests.test_wire_sizes import messages

FIELDS = ("run_id", "message_id", "src_node_id", "dst_node_id", "reply_to_message_id", "group_id", "created_at",
          "ttl", "message_type", "src_task_id", "dst_task_id")


def canonical(msg: Message) -> tuple:
    """Everything a message holds, with each value's type and exact repr (-0.0, NaN and 1 vs 1.0 vs True differ)."""
    md = tuple((f, type(getattr(msg.metadata, f)).__name__, repr(getattr(msg.metadata, f))) for f in FIELDS)
    error = (msg.error.code, msg.error.reason) if msg.has_error() else None
    content = None
    if msg.has_content():
        content = []
        for name, record in msg.content.items():
            if isinstance(record, ArrayRecord):
                items = tuple((k, a.dtype, tuple(a.shape), a.stype, bytes(a.data)) for k, a in record.items())
            else:
                items = tuple((k, type(v).__name__, repr(v)) for k, v in record.items())
            content.append((name, type(record).__name__, items))
    return md, error, content


def through_protobuf(msg: Message) -> Message | None:
    try:
        return message_from_proto(ProtoMessage.FromString(message_to_proto(msg).SerializeToString()))
    except Exception:  # noqa: BLE001 - what Flower cannot carry is refused before the pipe (message_sizes)
        return None


@settings(max_examples=150, deadline=None)
@given(messages())
def test_a_message_crosses_the_pipe_as_it_crosses_flowers_protobuf(msg):
    expected = through_protobuf(msg)
    if expected is None:
        return
    got = pipe_codec.decode(pipe_codec.encode(msg))
    assert canonical(got) == canonical(expected)
    if got.has_content():
        assert message_sizes(got) == message_sizes(expected)


def test_a_task_and_its_reply_cross_unchanged():
    record = to_record(["w", "b"], [np.arange(640, dtype=np.float32).reshape(64, 10), np.zeros(10, np.float32)])
    config = ConfigRecord({"lr": 0.05, "task-seq": 7, "flag": True, "blob": b"\x00\xff", "names": ["a", "é"],
                           "blobs": [b"x", b""], "empty": [], "big": 2**64 - 1, "nan": float("nan")})
    task = Message(RecordDict({"arrays": record, "config": config}), dst_node_id=2**63 + 3, message_type="train",
                   group_id="7")
    reply = Message(RecordDict({"delta": record, "metrics": MetricRecord({"num-examples": 3, "loss": -0.0})}),
                    reply_to=task)
    for msg in (task, reply):
        assert canonical(pipe_codec.decode(pipe_codec.encode(msg))) == canonical(through_protobuf(msg))


@pytest.mark.parametrize("cut", [1, 5, -1])
def test_bytes_it_did_not_make_are_refused(cut):
    data = pipe_codec.encode(Message(RecordDict({"a": to_record(["w"], [np.ones(3, np.float32)])}),
                                     dst_node_id=3, message_type="train"))
    with pytest.raises((ValueError, TypeError, LookupError)):
        pipe_codec.decode(data[:cut] if cut > 0 else data + b"\x00")
