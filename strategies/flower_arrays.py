"""Flower's ``Array(ndarray)``, built in one copy of the values and with its chunks' ids taken in one hashing pass.

A model version goes out in hundreds of messages, and every reply of a plain ClientApp carries a model-sized
record: how an ``Array`` is built is on the engine's hot path. Flower's ``Array.from_numpy_ndarray`` writes the
values through ``np.save`` into a ``BytesIO`` and copies them out (three passes over the data), and the first
``slice_array`` deflates each chunk, header and data concatenated twice, only to hash it. ``npy_array`` writes the
same ``.npy`` bytes with one copy (``b"".join`` of the header and the array's buffer) and hashes each chunk's
header and data incrementally, without concatenating them, then leaves the ``(id, chunk)`` list where
``Array.slice_array`` caches its own. That is done for arrays of one chunk (up to 5 MB: every tensor of the
models here), whose chunk holds the data itself and so pickles with the array (a checkpoint holds some);
larger arrays are sliced by Flower, on first use, as before. The bytes and ids are Flower's to the bit
(``tests/test_wire.py``), so a record built here travels, dedups and is sized exactly like one Flower built;
only the copies are gone.

Anything ``np.lib.format`` would not write as a version 1.0 header (object or structured dtypes with non-ASCII
names, headers past 64 KiB) takes Flower's own path.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.app.message.arraychunk import ArrayChunk
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, SType
from flwr.supercore.constant import HEAD_BODY_DIVIDER, HEAD_VALUE_DIVIDER

__all__ = ["CHUNKS_KEY", "checked_record", "chunk_header", "dtype_str", "named_record", "npy_array", "npy_bytes",
           "record_of", "required_record"]

#: Where ``Array.slice_array`` caches its ``[(chunk id, ArrayChunk), ...]`` (flwr 1.41).
CHUNKS_KEY = "_chunks"


def npy_bytes(values: np.ndarray) -> bytes | None:
    """``np.save(values)``'s bytes for a C-contiguous array, in one copy; None where only ``np.save`` knows."""
    if values.dtype.hasobject or not values.flags.c_contiguous:
        return None
    header = _npy_header(values)
    return None if header is None else b"".join((header, values.reshape(-1).view(np.uint8).data))


#: ``.npy`` headers by (dtype, shape) for plain dtypes: numpy writes a header through a dict's repr, its dtype's
#: descr and padding, which cost more than copying a small model's values. Bounded; models have few shapes.
_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}  # b"": no version 1.0 header (``np.save`` writes 2.0)
_HEADERS_MAX = 1024


def _npy_header(values: np.ndarray) -> bytes | None:
    """What ``np.save`` writes before a C-contiguous array's data; None for headers past format 1.0."""
    plain = values.dtype.fields is None and values.dtype.metadata is None and values.dtype.subdtype is None
    key = (values.dtype.str, values.shape)
    known = _HEADERS.get(key) if plain else None  # one lookup: another thread may clear the memo between two
    if known is not None:
        return known or None
    out = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(out, np.lib.format.header_data_from_array_1_0(values))
        header = out.getvalue()
    except ValueError:  # a header that needs format 2.0 or 3.0
        header = b""
    if plain:
        if len(_HEADERS) >= _HEADERS_MAX:
            _HEADERS.clear()
        _HEADERS[key] = header
    return header or None


def dtype_str(dtype: np.dtype) -> str:
    """``str(dtype)`` as ``Array(ndarray)`` writes it, remembered for plain dtypes (numpy builds it in Python)."""
    return _plain_dtype_str(dtype) if dtype.fields is None and dtype.metadata is None else str(dtype)


@functools.lru_cache(maxsize=64)
def _plain_dtype_str(dtype: np.dtype) -> str:
    return str(dtype)


def chunk_header(size: int) -> bytes:
    """What Flower puts before an ``ArrayChunk``'s ``size`` bytes of data when it deflates it."""
    return f"{ArrayChunk.__qualname__}{HEAD_VALUE_DIVIDER}{HEAD_VALUE_DIVIDER}{size}".encode() + HEAD_BODY_DIVIDER


def npy_array(values: np.ndarray) -> Array:
    """``Array(values)``: the same bytes and ids, built with one copy and one hash pass (C-contiguous arrays)."""
    data = npy_bytes(values)
    if data is None:
        return Array(values)
    array = Array(dtype=dtype_str(values.dtype), shape=tuple(values.shape), stype=SType.NUMPY, data=data)
    if 0 < len(data) <= FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE:  # one chunk: the data itself (no view, so it pickles)
        digest = hashlib.sha256(chunk_header(len(data)))
        digest.update(data)
        array.__dict__[CHUNKS_KEY] = [(digest.hexdigest(), ArrayChunk(data))]  # type: ignore[arg-type]
    return array


def record_of(arrays: Mapping[str, Array]) -> ArrayRecord:
    """An ``ArrayRecord`` holding these very ``Array`` objects.

    ``ArrayRecord(dict_of_arrays)`` rebuilds every ``Array`` from its fields, which drops the chunks and ids cached
    on it; setting them one by one keeps them (Flower's ``__setitem__`` stores the object it is given).
    """
    record = ArrayRecord()
    for name, array in arrays.items():
        record[name] = array
    return record


R = TypeVar("R", ArrayRecord, ConfigRecord, MetricRecord)
Checked = TypeVar("Checked", ConfigRecord, MetricRecord, RecordDict)


def checked_record(kind: type[Checked], items: Mapping[str, Any]) -> Checked:
    """``kind(dict(items))``: a new ``ConfigRecord``, ``MetricRecord`` or ``RecordDict``, each item through its checks.

    Flower's ``TypedDict.__setitem__`` calls each check through ``typing.cast(Callable[[K], None], ...)``, which
    builds a new ``Callable`` alias on every call, and ``RecordDict``'s looks the key up first through a raised
    ``KeyError``: three quarters of building a task's 11-item ``ConfigRecord`` (28 -> 7 us, flwr 1.41), and every
    update builds four such records on each side of the client processes' pipe. The record's own key and value
    checks run here, item by item in order, raising what Flower raises; the result equals Flower's
    (``tests/test_wire.py``). A fresh record has nothing to overwrite, so ``RecordDict``'s overwrite warning cannot
    apply.
    """
    record = kind()
    slots = record.__dict__
    check_key, check_value, data = slots["_check_key_fn"], slots["_check_value_fn"], slots["_data"]
    for key, value in items.items():
        check_key(key)
        check_value(value)
        data[key] = value
    return record


def named_record(content: RecordDict, name: str, kind: type[R]) -> R | None:
    """``content.array_records.get(name)`` (or config, metric): the record of that name if it is of that kind.

    Flower's ``array_records``, ``config_records`` and ``metric_records`` build a new filtered dictionary, checking
    every entry, on every access; a task reads two records and a reply two more.
    """
    value = content.get(name)
    return value if isinstance(value, kind) else None


def required_record(content: RecordDict, name: str, kind: type[R]) -> R:
    """``named_record``, or the ``KeyError`` naming it that Flower's ``content.array_records[name]`` raises."""
    record = named_record(content, name, kind)
    if record is None:
        raise KeyError(name)
    return record
