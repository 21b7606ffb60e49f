"""What travels: exact serialized sizes and validation of replies."""

import contextlib
import io
import re

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from server_app.wire import RejectedUpdate, read_reply, reference_wire_bytes, wire_bytes
from strategies.base import Update
from strategies.codecs import to_record
from strategies.flower_arrays import checked_record

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
NAMES = ["w", "b"]
BASE = [np.ones((300, 40), np.float32), np.zeros(40, np.float32)]


def instruction(weights=BASE):
    msg = Message(RecordDict({"arrays": to_record(NAMES, weights), "config": ConfigRecord({"lr": 0.1})}),
                  dst_node_id=7, message_type="train")
    msg.metadata.__dict__["_message_id"] = "ins"
    return msg


def reply_with(content):
    return Message(content, reply_to=instruction())


@pytest.mark.parametrize("weights", [BASE, [np.zeros((600, 700), np.float32), np.zeros(3, np.float32)],
                                     [np.arange(2_000_000, dtype=np.float32), np.ones(5, np.float32)]])
def test_wire_bytes_equals_the_deflated_object_tree(weights):
    msg = instruction(weights)
    assert wire_bytes(msg) == reference_wire_bytes(msg)
    assert wire_bytes(msg) > sum(w.nbytes for w in weights) - 1_700_000 * (weights[0].max() == 0)


def test_reply_bytes_grow_with_the_payload():
    small = reply_with(RecordDict({"delta": to_record(NAMES, [np.zeros((3, 4), np.float32)] * 2)}))
    big = reply_with(RecordDict({"delta": to_record(NAMES, BASE)}))
    assert wire_bytes(big) - wire_bytes(small) > 40_000
    assert wire_bytes(big) == reference_wire_bytes(big)


def test_weights_reply_is_turned_into_a_delta():
    trained = [w - 0.5 for w in BASE]
    reply = reply_with(RecordDict({"arrays": to_record(NAMES, trained), "metrics": MetricRecord({"num-examples": 9})}))
    values, is_delta, n, metrics = read_reply(reply, NAMES, BASE)
    assert n == 9 and metrics["num-examples"] == 9 and not is_delta
    update = Update(0, 1, 0, 0, values, BASE, n, metrics, sent_is_delta=is_delta)
    assert update.model is values
    for d in update.delta:
        np.testing.assert_allclose(d, 0.5)


def test_records_are_found_by_name_and_kind_only():
    """Replies are read by record name (not through Flower's filtered ``*_records`` copies): a record of the
    wrong kind under a known name is not taken for the right one."""
    trained = [w - 0.5 for w in BASE]
    content = RecordDict({"delta": MetricRecord({"num-examples": 3}), "arrays": to_record(NAMES, trained),
                          "metrics": ConfigRecord({"num-examples": 5})})
    values, is_delta, n, metrics = read_reply(reply_with(content), NAMES, BASE)
    assert not is_delta and n == 1 and metrics == {}  # "delta" is not arrays, "metrics" not a MetricRecord
    np.testing.assert_array_equal(values[0], trained[0])
    with pytest.raises(RejectedUpdate, match=r"no 'delta' or 'arrays' ArrayRecord \(has: \['weights'\]\)"):
        read_reply(reply_with(RecordDict({"weights": to_record(NAMES, BASE), "arrays": ConfigRecord({"a": 1})})),
                   NAMES, BASE)


def test_missing_num_examples_counts_as_one():
    reply = reply_with(RecordDict({"delta": to_record(NAMES, BASE)}))
    assert read_reply(reply, NAMES, BASE)[2] == 1


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_values_are_rejected(bad):
    w = [x.copy() for x in BASE]
    w[1][7] = bad
    with pytest.raises(RejectedUpdate, match="b: contains NaN or Inf"):
        read_reply(reply_with(RecordDict({"delta": to_record(NAMES, w)})), NAMES, BASE)


def test_large_finite_values_are_not_mistaken_for_inf():
    w = [np.full((300, 40), 3e38, np.float32), BASE[1]]
    delta, _, _, _ = read_reply(reply_with(RecordDict({"delta": to_record(NAMES, w)})), NAMES, BASE)
    assert np.isfinite(delta[0]).all()


def npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "undecodable"),
    (npy(np.zeros(40, np.float32))[:-4], "data bytes for 40"),
    (npy(np.zeros(40, np.float32)) + b"xx", "data bytes for 40"),
    (npy(np.zeros(41, np.float32)), "bytes decode to float32[41]"),
    (npy(np.zeros(40, np.float64)), "bytes decode to float64[40]"),
])
def test_lying_or_broken_array_bytes_are_rejected(data, reason):
    arr = Array("float32", (40,), "numpy.ndarray", data)
    content = RecordDict({"delta": to_record(NAMES, BASE)})
    content["delta"]["b"] = arr
    with pytest.raises(RejectedUpdate, match=re.escape(reason)):
        read_reply(reply_with(content), NAMES, BASE)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_the_decoder(data):
    content = RecordDict({"delta": to_record(NAMES, BASE)})
    content["delta"]["b"] = Array("float32", (40,), "numpy.ndarray", data)
    with contextlib.suppress(RejectedUpdate):
        read_reply(reply_with(content), NAMES, BASE)


def test_unknown_stype_is_rejected():
    content = RecordDict({"delta": to_record(NAMES, BASE)})
    content["delta"]["b"] = Array("float32", (40,), "topk.v1", b"\x00" * 8)
    with pytest.raises(RejectedUpdate, match="b: unknown stype 'topk.v1'"):
        read_reply(reply_with(content), NAMES, BASE)


def test_a_record_sized_once_is_sized_again_when_it_changes():
    record = to_record(NAMES, BASE)
    msg = Message(RecordDict({"arrays": record, "config": ConfigRecord({"lr": 0.1})}), dst_node_id=7,
                  message_type="train")
    first = wire_bytes(msg)
    assert wire_bytes(msg) == first == reference_wire_bytes(msg)  # the second walk reads the record's memo
    record["b"] = Array(np.zeros(4000, np.float32))
    assert wire_bytes(msg) == reference_wire_bytes(msg) > first


_RNG = np.random.default_rng(0)


@pytest.mark.parametrize("values", [
    np.ones(()), np.full((), 2.5, np.float32), np.zeros((0, 3), np.float32), _RNG.random((3, 4)).astype(np.float16),
    np.arange(10), np.array([True, False]), _RNG.random((5, 7)).T, (_RNG.random(3) + 1j).astype(np.complex64),
    _RNG.random(3_000_000).astype(np.float32),  # three chunks of 5 MB, the last one short
    np.zeros(3_000_000, np.float32),  # identical chunks: one id, listed twice
    np.array(["ab", "c"]), np.zeros(3, dtype=[("a", "<f4"), ("b", "<i2")]),
])
def test_npy_array_is_flowers_array_to_the_bit(values):
    """The fast path builds Flower's bytes, chunks and ids: a record it built travels and dedups the same."""
    from strategies.flower_arrays import npy_array

    ours, flowers = npy_array(values), Array(values)
    assert (ours.dtype, ours.shape, ours.stype, ours.data) == (flowers.dtype, flowers.shape, flowers.stype,
                                                               flowers.data)
    assert [i for i, _ in ours.slice_array()] == [i for i, _ in flowers.slice_array()]
    assert [bytes(c.data) for _, c in ours.slice_array()] == [bytes(c.data) for _, c in flowers.slice_array()]
    assert ours.object_id == flowers.object_id
    np.testing.assert_array_equal(ours.numpy(), values)


def test_npy_headers_remembered_by_dtype_and_shape_are_np_saves():
    """Headers are memoised per (dtype, shape): a second array of each, other byte orders and shapes, and two
    structured dtypes that share ``dtype.str`` ('|V6') but not their field names, each get ``np.save``'s bytes."""
    from strategies.flower_arrays import npy_bytes

    arrays = [np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32), np.ones((3, 2), np.float32),
              np.ones(4, ">f4"), np.ones(4, "<f4"), np.zeros(2, [("a", "<f4"), ("b", "<i2")]),
              np.zeros(2, [("x", "<f4"), ("y", "<i2")]), np.zeros(2, np.dtype("<f8", metadata={"k": 1}))]
    for values in arrays + arrays:
        out = io.BytesIO()
        np.save(out, values)
        assert npy_bytes(values) == out.getvalue()


def test_sizes_of_messages_with_repeated_records_and_arrays_are_the_deflated_tree():
    """Identical records and arrays travel once: one deflate per object must keep Flower's ids and its dedup."""
    from strategies.flower_arrays import npy_array

    same = np.arange(50, dtype=np.float32)
    arrays = {"a": npy_array(same), "b": Array(same.copy()), "c": npy_array(np.zeros(7, np.float32))}
    content = RecordDict({
        "delta": ArrayRecord(arrays), "copy": ArrayRecord(dict(arrays)),
        "metrics": MetricRecord({"num-examples": 3, "loss": 0.25, "big": 2**62, "neg": -7, "list": [1.0, 2.0]}),
        "m2": MetricRecord({"num-examples": 3, "loss": 0.25, "big": 2**62, "neg": -7, "list": [1.0, 2.0]}),
        "config": ConfigRecord({"s": "é" * 30, "b": True, "x": b"\x00\x01", "u": 2**63 + 5, "f": -0.0}),
        "empty": ConfigRecord({}),
    })
    for msg in (reply_with(content), instruction()):
        assert wire_bytes(msg) == reference_wire_bytes(msg)
        assert wire_bytes(msg) == reference_wire_bytes(msg)  # again, from the record's memo


@pytest.mark.parametrize(("kind", "good", "bad"), [
    (ConfigRecord, {"lr": 0.1, "n": 3, "flag": True, "s": "é", "b": b"\x00", "l": [1, 2], "e": [], "bl": [b"x"]},
     [{1: 2}, {"k": object()}, {"k": [1, "a"]}, {"k": {"a": 1}}, {"k": None}]),
    (MetricRecord, {"loss": 0.5, "n": 3, "l": [0.1, 0.2], "e": []},
     [{1: 0.5}, {"k": "str"}, {"k": [0.1, 2]}, {"k": b"x"}, {"k": None}]),
    (RecordDict, {"a": ArrayRecord(), "m": MetricRecord({"x": 1}), "c": ConfigRecord({"y": "z"})},
     [{2: MetricRecord()}, {"k": {"a": 1}}, {"k": None}]),
], ids=["config", "metrics", "recorddict"])
def test_checked_record_is_the_record_flower_builds(kind, good, bad):
    """The fast constructor of the hot path: the same record, the same refusals, as Flower's own constructor."""
    built = checked_record(kind, good)
    assert type(built) is kind and built == kind(dict(good)) and list(built) == list(good)
    for items in bad:
        with pytest.raises(Exception) as flowers:  # noqa: PT011 - whatever Flower raises, ours must raise too
            kind(dict(items))
        with pytest.raises(type(flowers.value)) as ours:
            checked_record(kind, items)
        assert str(ours.value) == str(flowers.value)
