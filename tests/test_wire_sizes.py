"""Sizes from signatures (``server_app/wire_sizes.py``) are the deflated object tree's, byte for byte.

The memo is shared by every example of a test, so an example whose signature matches an earlier one with a
different deflated length (a signature missing a fact the length depends on) would fail here; the examples
are drawn so that signatures repeat (few keys, few shapes) while the values under them change.
"""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from server_app import wire_sizes
from server_app.wire import message_sizes, reference_wire_bytes
from strategies.codecs import to_record
from strategies.flower_arrays import npy_array, record_of

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)
ANY_INT = st.integers(-(2**65), 2**65)  # past both ends: Flower refuses those, and so must the sizes
KEYS = st.sampled_from(["lr", "seed", "task-seq", "é", "num-examples", "loss", "ключ", ""])
TEXT = st.text(max_size=12)
CONFIG_VALUE = st.one_of(
    st.booleans(), ANY_INT, st.floats(), TEXT, st.binary(max_size=12),
    st.lists(st.booleans(), max_size=4), st.lists(INT64, max_size=4), st.lists(UINT64, max_size=4),
    st.lists(st.floats(), max_size=4), st.lists(TEXT, max_size=4), st.lists(st.binary(max_size=6), max_size=4),
)
METRIC_VALUE = st.one_of(ANY_INT, st.floats(), st.lists(st.floats(), max_size=4), st.lists(INT64, max_size=4),
                         st.lists(UINT64, max_size=4))
SHAPES = [(3,), (2, 3), (6,), (), (0,), (3, 2)]
DTYPES = ["float32", "float64", "int8", "float16"]


def reference(msg: Message) -> tuple[int, int] | None:
    """``(wire, content)`` from deflating every object of the tree; None where Flower cannot serialize it."""
    try:
        wire = reference_wire_bytes(msg)
        return wire, wire - len(msg.deflate())
    except Exception:  # noqa: BLE001 - what Flower refuses, message_sizes must refuse too
        return None


def assert_sized_as_deflated(msg: Message) -> None:
    expected = reference(msg)
    fast = None
    try:
        fast = wire_sizes.sizes(msg)
    except Exception:  # noqa: BLE001
        pytest.fail("the signature path raised: it must leave what it cannot size to the deflating path")
    if expected is None:
        with pytest.raises(Exception):  # noqa: B017, PT011 - whatever Flower raises, as before
            message_sizes(msg)
        return
    assert message_sizes(msg) == expected
    assert fast is None or fast == expected


@st.composite
def arrays(draw: st.DrawFn) -> Array:
    """Arrays from a small pool of shapes and values (so equal arrays and equal chunks come up), or raw ones."""
    shape = draw(st.sampled_from(SHAPES))
    dtype = draw(st.sampled_from(DTYPES))
    fill = draw(st.sampled_from([0, 1, 7]))
    values = np.full(shape, fill, dtype=dtype)
    if draw(st.booleans()):
        return npy_array(values) if draw(st.booleans()) else Array(values)
    return Array(dtype=draw(st.sampled_from([dtype, "x" * 3])), shape=shape,
                 stype=draw(st.sampled_from(["numpy.ndarray", "topk.v1", "é"])),
                 data=draw(st.sampled_from([b"", b"\x00" * 6, b"\x01" * 6, values.tobytes()])))


def records(draw: st.DrawFn) -> RecordDict:
    content = RecordDict()
    if draw(st.booleans()):
        names = draw(st.lists(st.sampled_from(["w", "b", "é", "k" * 40]), max_size=4, unique=True))
        content["arrays"] = ArrayRecord({n: draw(arrays()) for n in names})
    if draw(st.booleans()):
        content["config"] = ConfigRecord(draw(st.dictionaries(KEYS, CONFIG_VALUE, max_size=4)))
    if draw(st.booleans()):
        content["metrics"] = MetricRecord(draw(st.dictionaries(KEYS, METRIC_VALUE, max_size=4)))
    if draw(st.booleans()):  # a second record of a kind: may be the same object, so deflated
        content["again"] = ConfigRecord(draw(st.dictionaries(KEYS, st.booleans(), max_size=2)))
    return content


@st.composite
def messages(draw: st.DrawFn) -> Message:
    content = records(draw)
    if draw(st.booleans()):
        kind = draw(st.sampled_from(["train", "query.describe", "evaluate.x" + "y" * 30]))
        sent = Message(content, dst_node_id=draw(UINT64), message_type=kind, group_id=draw(TEXT))
    else:
        instruction = Message(RecordDict(), dst_node_id=5, message_type="train")
        instruction.metadata.__dict__["_message_id"] = draw(st.sampled_from(["", "a" * 64, "é"]))
        sent = (Message(Error(code=draw(ANY_INT), reason=draw(st.one_of(st.none(), TEXT))), reply_to=instruction)
                if draw(st.booleans()) else Message(content, reply_to=instruction))
    md = sent.metadata.__dict__
    md["_run_id"] = draw(st.one_of(UINT64, st.just(-1)))
    md["_src_node_id"] = draw(UINT64)
    md["_created_at"] = draw(st.sampled_from([0.0, -0.0, 1.7e9, float("nan")]))
    md["_ttl"] = draw(st.sampled_from([0.0, 3600.0, -0.0]))
    md["_src_task_id"] = draw(st.one_of(st.none(), UINT64))
    md["_dst_task_id"] = draw(st.one_of(st.none(), UINT64))
    return sent


@settings(max_examples=250, deadline=None)
@given(messages())
def test_every_message_is_sized_as_its_deflated_tree(msg):
    assert_sized_as_deflated(msg)


def test_the_engines_own_messages_take_the_signature_path():
    """A task and its reply, as the engine and our ClientApp make them, are sized without deflating."""
    record = to_record(["w", "b"], [np.ones((64, 10), np.float32), np.zeros(10, np.float32)])
    for seq in (0, 1, 127, 128, 2**40):
        config = ConfigRecord({"lr": 0.05, "local-steps": 2, "batch-size": 32, "momentum": 0.0, "prox-mu": 0.0,
                               "task-seq": seq, "model-version": seq // 3, "task-seed": 2**31 + seq})
        task = Message(RecordDict({"arrays": record, "config": config}), dst_node_id=2**63 + seq,
                       message_type="train", group_id=str(seq // 3))
        task.metadata.__dict__["_message_id"] = f"{seq:064x}"
        reply = Message(RecordDict({
            "arrays": to_record(["w", "b"], [np.full((64, 10), seq, np.float32), np.zeros(10, np.float32)]),
            "metrics": MetricRecord({"num-examples": 3 + seq, "train-loss": 0.5, "task-seq": seq})}), reply_to=task)
        for msg in (task, reply):
            assert wire_sizes.sizes(msg) is not None
            assert_sized_as_deflated(msg)


def test_identical_arrays_and_chunks_are_counted_once():
    """Two equal arrays are one object; equal data under another dtype is one chunk and two arrays."""
    ones = np.ones(6, np.float32)
    same = RecordDict({"arrays": ArrayRecord({"a": Array(ones), "b": Array(ones.copy()), "c": Array(ones.copy())})})
    other = RecordDict({"arrays": ArrayRecord({"a": Array(ones), "b": Array(dtype="int32", shape=(6,),
                                                                            stype="numpy.ndarray",
                                                                            data=Array(ones).data)})})
    single = RecordDict({"arrays": ArrayRecord({"a": Array(ones)})})
    for content in (same, other, single):
        msg = Message(content, dst_node_id=3, message_type="train")
        assert wire_sizes.sizes(msg) is not None
        assert_sized_as_deflated(msg)
    wire = {name: wire_sizes.sizes(Message(c, dst_node_id=3, message_type="train"))[1]
            for name, c in (("same", same), ("other", other), ("single", single))}
    assert wire["same"] < wire["other"] < 2 * wire["single"]


def test_a_client_cannot_grow_the_memo_without_bound():
    """Replies with ever new metric names: the memo stays bounded, and long names are never remembered."""
    for i in range(wire_sizes._MEMO_ENTRIES + 10):
        msg = Message(RecordDict({"metrics": MetricRecord({f"m{i}": 1.0})}), dst_node_id=3, message_type="train")
        assert_sized_as_deflated(msg)
        assert len(wire_sizes._memo) <= wire_sizes._MEMO_ENTRIES
    before = len(wire_sizes._memo)
    long_keys = MetricRecord({"k" * (wire_sizes._MEMO_KEY_CHARS + 1): 1.0})
    assert_sized_as_deflated(Message(RecordDict({"metrics": long_keys}), dst_node_id=3, message_type="train"))
    assert not any(isinstance(k, tuple) and k[:1] == ("MetricRecord",) and len(k[1]) == 1
                   and len(k[1][0][0]) > wire_sizes._MEMO_KEY_CHARS for k in wire_sizes._memo)
    assert len(wire_sizes._memo) <= before + 2  # the record dict and the message may be new; the record is not


def test_an_array_whose_cached_chunks_are_not_its_data_is_sized_as_flower_would_send_it():
    """Flower deflates an array from its chunk cache: a forged cache (an in-process ClientApp's) is what travels."""
    from flwr.app.message.arraychunk import ArrayChunk

    natural = npy_array(np.ones(6, np.float32))
    natural.slice_array()  # Flower's own cache: the data itself
    forged = Array(np.ones(6, np.float32))
    piece = ArrayChunk(b"\x00" * 3)
    forged.__dict__["_chunks"] = [(piece.object_id, piece)] * 4
    for array, fast in ((natural, True), (forged, False)):
        msg = Message(RecordDict({"arrays": record_of({"a": array})}), dst_node_id=3, message_type="train")
        assert (wire_sizes.sizes(msg) is not None) == fast  # (ArrayRecord(dict) would rebuild it, cache dropped)
        assert_sized_as_deflated(msg)


EDGES = [0, 1, 63, 64, 127, 128, 8191, 8192, -1, -64, -65, 2**31, 2**62, -(2**63), 2**63 - 1, 2**63, 2**64 - 1]


@pytest.mark.parametrize("kind", [ConfigRecord, MetricRecord])
def test_values_under_one_key_at_every_varint_length_are_sized_as_deflated(kind):
    """One key, values whose encodings differ in length only: a signature that missed a length would repeat."""
    values = [*EDGES, [1], [10**6], [*EDGES[:5]], [2**64 - 1, 1], [0.5] * 3, [0.5], [], -0.0, float("nan")]
    if kind is ConfigRecord:
        values += [True, "", "é" * 3, b"", b"\x00" * 200, ["a", "é"], [b"x", b""], [True, False]]
    for value in values:
        msg = Message(RecordDict({"r": kind({"x": value})}), dst_node_id=3, message_type="train")
        assert_sized_as_deflated(msg)
