"""Malformed and hostile client replies: the mutation classes of issue 9, and ClientApps that send them.

Used by ``tests/test_hostile.py`` (hypothesis drives the choices) and ``bench/fuzz_report.py`` (a seeded numpy
generator drives them). A mutation takes a valid reply, as our ClientApp builds it, and breaks it in one way:

==================== ===========================================================================================
class                what it does (every class but ``byte-flip`` always yields an invalid reply)
==================== ===========================================================================================
unknown-stype        the Array's stype becomes a name no decoder knows
truncated            the Array's bytes are cut short (anywhere, header included)
extra-bytes          bytes are appended to the Array
wrong-shape          the declared shape differs from the model's (or the ``.npy`` header's shape lies)
wrong-dtype          the declared dtype differs (or the ``.npy`` header's dtype lies)
nan-inf              a NaN or an infinity where the decoder reads a value, a norm or a scale
out-of-range         an index past the tensor, a level above s, a negative scale, an impossible rank, ...
duplicate-index      top-k: two equal (or decreasing) indices
huge-size            a claimed k, shape, ``.npy`` header length or factor size far beyond the tensor
byte-flip            random bytes overwritten (may still decode to a valid, finite update)
record-level         no delta/arrays record, a missing or unexpected tensor, a bad ``num-examples``
oversized            a well-formed reply carrying far more bytes than the model (an extra record)
wrong-version        the reply echoes another ``model-version`` or ``task-seq`` than its task's
==================== ===========================================================================================

``HostileClient`` wraps our ClientApp's train handler and corrupts the replies of a deterministic subset of
tasks, one class after the other; ``ScalingClient`` multiplies the delta of some tasks by a factor (the norm
filter's test).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from client_app.app import describe as real_describe
from client_app.app import train as real_train
from strategies.codecs import CODECS, STYPES, CodecSpec, decode, encode, parse_npy_header

T = TypeVar("T")

# A small model with a multi-block top-k tensor (76,800 entries: two 65536-entry blocks) and a vector.
NAMES = ["w", "b"]
SHAPES = [(300, 256), (10,)]
SPEC = CodecSpec("none", ratio=0.3, levels=8, rank=2)

ARRAY_KINDS = ("unknown-stype", "truncated", "extra-bytes", "wrong-shape", "wrong-dtype", "nan-inf", "out-of-range",
               "duplicate-index", "huge-size", "byte-flip")
REPLY_KINDS = ("record-level", "oversized", "wrong-version")
KINDS = ARRAY_KINDS + REPLY_KINDS
ALWAYS_INVALID = tuple(k for k in KINDS if k != "byte-flip")
# Which array classes apply to which stype (no indices in a sign payload, no header in fp16, ...).
APPLICABLE = {
    "none": ("unknown-stype", "truncated", "extra-bytes", "wrong-shape", "wrong-dtype", "nan-inf", "out-of-range",
             "huge-size", "byte-flip"),
    "fp16": ("unknown-stype", "truncated", "extra-bytes", "wrong-shape", "wrong-dtype", "nan-inf", "huge-size",
             "byte-flip"),
    "topk": ARRAY_KINDS,
    "randk": ("unknown-stype", "truncated", "extra-bytes", "wrong-shape", "wrong-dtype", "nan-inf", "out-of-range",
              "huge-size", "byte-flip"),
    "qsgd": ("unknown-stype", "truncated", "extra-bytes", "wrong-shape", "wrong-dtype", "nan-inf", "out-of-range",
             "huge-size", "byte-flip"),
    "sign": ("unknown-stype", "truncated", "extra-bytes", "wrong-shape", "wrong-dtype", "nan-inf", "out-of-range",
             "huge-size", "byte-flip"),
    "powersgd": ("unknown-stype", "truncated", "extra-bytes", "wrong-shape", "wrong-dtype", "nan-inf", "out-of-range",
                 "huge-size", "byte-flip"),
}


class Source(Protocol):
    """Where a mutation's choices come from: hypothesis (shrinks) or a seeded generator (fast, counted)."""

    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""

    def pick(self, options: Sequence[T]) -> T:
        """One of the options."""


class RngSource:
    """Choices from a numpy generator."""

    def __init__(self, seed: int | np.random.Generator) -> None:
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)

    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi] (any size: Python ints beyond int64 are drawn as a scaled float)."""
        if hi - lo < 2**62:
            return lo + int(self.rng.integers(0, hi - lo + 1))
        return lo + int((hi - lo) * self.rng.random())

    def pick(self, options: Sequence[T]) -> T:
        """One of the options, uniformly."""
        return options[int(self.rng.integers(len(options)))]


class DataSource:
    """Choices drawn from hypothesis's ``st.data()``, so failures shrink to a minimal example."""

    def __init__(self, data: object) -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        return self.data.draw(self.st.integers(lo, hi))  # type: ignore[attr-defined]

    def pick(self, options: Sequence[T]) -> T:
        """One of the options."""
        return self.data.draw(self.st.sampled_from(list(options)))  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------ valid replies
def model(seed: int = 0) -> list[np.ndarray]:
    """The base weights the fuzzed replies are deltas of."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def instruction(seq: int = 7, version: int = 3) -> Message:
    """A server->client train message like the engine's (the reply's ``reply_to``)."""
    if TaskIdentity._run_id is None:  # outside a Flower process (the fuzz tests): any identity will do
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    msg = Message(RecordDict({"config": ConfigRecord({"task-seq": seq, "model-version": version})}),
                  dst_node_id=1000, message_type="train")
    msg.metadata.__dict__["_message_id"] = f"task-{seq}"
    return msg


def valid_content(codec: str, seed: int = 0, *, seq: int = 7, version: int = 3, weights: bool = False) -> RecordDict:
    """A reply's content as our ClientApp builds it: ``delta`` encoded with ``codec``, plus metrics.

    ``weights=True`` builds a Flower-style reply instead: trained weights under ``arrays`` (always raw numpy).
    """
    rng = np.random.default_rng(seed)
    delta = [(0.01 * rng.standard_normal(s)).astype(np.float32) for s in SHAPES]
    if weights:
        record = ArrayRecord({n: Array(b - d) for n, b, d in zip(NAMES, model(), delta, strict=True)})
        return RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 32})})
    spec = CodecSpec(codec, ratio=SPEC.ratio, levels=SPEC.levels, rank=SPEC.rank)
    record = ArrayRecord({n: encode(spec, d, seed=seed + i) for i, (n, d) in enumerate(zip(NAMES, delta,
                                                                                             strict=True))})
    metrics = MetricRecord({"num-examples": 32, "train-loss": 0.5, "task-seq": seq, "model-version": version})
    return RecordDict({"delta": record, "metrics": metrics})


def reply(content: RecordDict, seq: int = 7, version: int = 3) -> Message:
    """``content`` as the reply to task ``seq``."""
    return Message(content, reply_to=instruction(seq, version))


def stype_name(arr: Array) -> str:
    """The codec name of an Array's stype ("none" for Flower's numpy stype)."""
    return next((c for c in CODECS if STYPES[c] == arr.stype), "unknown")


# --------------------------------------------------------------------------------------------- array mutations
def mutate(content: RecordDict, kind: str, src: Source) -> RecordDict:
    """A copy of ``content`` broken by mutation class ``kind`` (one tensor, or the reply as a whole)."""
    if kind in REPLY_KINDS:
        return _REPLY_MUTATIONS[kind](content, src)
    key = "delta" if "delta" in content.array_records else "arrays"
    record = content.array_records[key]
    candidates = [n for n in record if kind in APPLICABLE[stype_name(record[n])]] or list(record)
    name = src.pick(candidates)
    ref = np.zeros(tuple(record[name].shape), record[name].dtype)  # a valid reply declares the model's own
    arrays = {n: record[n] for n in record}
    arrays[name] = mutate_array(record[name], ref, kind, src)
    out = RecordDict({k: v for k, v in content.items() if k != key})
    out[key] = ArrayRecord(arrays)
    return out


def mutate_array(arr: Array, ref: np.ndarray, kind: str, src: Source) -> Array:
    """One tensor's Array broken by ``kind`` (see the module docstring); ``ref`` is the model's tensor."""
    codec = stype_name(arr)
    data = bytearray(arr.data)
    if kind == "unknown-stype":
        stype = src.pick(["", "bogus", "staleflower.topk.v1", "staleflower.zip.v1", "numpy.ndarray2",
                          f"staleflower.{codec}.v{src.int(3, 99)}", "x" * src.int(1, 300)])
        return _with(arr, stype=stype)
    if kind == "truncated":
        return _with(arr, data=bytes(data[: src.int(0, len(data) - 1)]))
    if kind == "extra-bytes":
        n = src.int(1, 64)
        return _with(arr, data=bytes(data) + bytes(src.int(0, 255) for _ in range(n)))
    if kind == "wrong-shape":
        return _wrong_shape(arr, ref, src)
    if kind == "wrong-dtype":
        return _wrong_dtype(arr, ref, src)
    if kind == "byte-flip":
        for _ in range(src.int(1, 8)):
            pos = src.pick([src.int(0, min(len(data), 64) - 1), src.int(0, len(data) - 1)])  # header or anywhere
            data[pos] = src.int(0, 255)
        return _with(arr, data=bytes(data))
    return _CODEC_MUTATIONS[kind][codec](arr, ref, data, src)


def _with(arr: Array, **changes: object) -> Array:
    fields = {"dtype": arr.dtype, "shape": tuple(arr.shape), "stype": arr.stype, "data": arr.data} | changes
    return Array(**fields)


def _wrong_shape(arr: Array, ref: np.ndarray, src: Source) -> Array:
    shape = list(ref.shape)
    variant = src.pick(["dim", "drop", "add", "scalar", "header"] if arr.stype == STYPES["none"] else
                       ["dim", "drop", "add", "scalar"])
    if variant == "dim":
        i = src.int(0, len(shape) - 1)
        shape[i] = src.pick([0, shape[i] + src.int(1, 9), max(shape[i] - src.int(1, 9), 0) or shape[i] + 1])
        if tuple(shape) == ref.shape:
            shape[i] += 1
    elif variant == "drop":
        shape = shape[1:] if len(shape) > 1 else [shape[0], 1]
    elif variant == "add":
        shape = [*shape, 1] if src.int(0, 1) else [1, *shape]
    elif variant == "scalar":
        shape = []
    else:  # the declared shape is right; the .npy header says otherwise
        head = list(ref.shape)
        head[0] += src.int(1, 5)
        return _with(arr, data=_npy_rewrite(arr.data, shape=tuple(head)))
    return _with(arr, shape=tuple(shape))


def _wrong_dtype(arr: Array, ref: np.ndarray, src: Source) -> Array:
    if arr.stype == STYPES["none"] and src.int(0, 1):  # the declared dtype is right; the .npy header lies
        return _with(arr, data=_npy_rewrite(arr.data, descr=src.pick(["<f8", "<f2", ">f4", "<i4", "|u1", "<c8"])))
    return _with(arr, dtype=src.pick([d for d in ("float64", "float16", "int32", "uint8", "<f4", "complex64",
                                                  "bool", "", "float32 ", "object") if d != str(ref.dtype)]))


def _npy_rewrite(data: bytes, *, descr: str | None = None, shape: tuple[int, ...] | None = None,
                 fortran: bool | None = None, body: bytes | None = None) -> bytes:
    """The ``.npy`` bytes with some header fields replaced (a well-formed header that lies)."""
    dtype, old_shape, old_fortran, offset = parse_npy_header(data)
    return npy_bytes(descr or dtype.str, old_shape if shape is None else shape,
                     old_fortran if fortran is None else fortran, data[offset:] if body is None else body)


def npy_bytes(descr: str, shape: tuple[int, ...], fortran: bool, body: bytes, version: int = 1) -> bytes:
    """A version-1 ``.npy`` file as ``np.save`` writes it, with any header values."""
    dims = ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "")
    header = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': ({dims}), }}"
    header = header.encode("latin-1")
    pad = 64 - (10 + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    return b"\x93NUMPY" + bytes([version, 0]) + len(header).to_bytes(2, "little") + header + body


# Per codec: byte offsets and sizes of each payload's fields (strategies/codecs.py's wire formats).
def _topk_layout(data: bytes, numel: int) -> tuple[int, int, int, int]:
    k = struct.unpack_from("<I", data, 4)[0]
    nb = max(1, -(-numel // 65536))
    return k, nb, 8 + 4 * nb, 8 + 4 * nb + 2 * k  # k, blocks, offsets start, values start


def _nan(src: Source) -> float:
    return src.pick([math.nan, math.inf, -math.inf])


def _put(data: bytearray, fmt: str, offset: int, *values: object) -> bytes:
    struct.pack_into(fmt, data, offset, *values)
    return bytes(data)


def _nan_none(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    offset = parse_npy_header(bytes(data))[3]
    return _with(arr, data=_put(data, "<f", offset + 4 * src.int(0, ref.size - 1), _nan(src)))


def _nan_fp16(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    bits = src.pick([0x7E00, 0x7C00, 0xFC00, 0x7C01])  # NaN, +inf, -inf, a signalling NaN
    return _with(arr, data=_put(data, "<H", 2 * src.int(0, ref.size - 1), bits))


def _nan_topk(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    k, _, _, values = _topk_layout(bytes(data), ref.size)
    return _with(arr, data=_put(data, "<f", values + 4 * src.int(0, k - 1), _nan(src)))


def _nan_randk(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    k = struct.unpack_from("<I", data, 8)[0]
    return _with(arr, data=_put(data, "<f", 16 + 4 * src.int(0, k - 1), _nan(src)))


def _nan_qsgd(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    return _with(arr, data=_put(data, "<f", 0, _nan(src)))  # the norm


def _nan_sign(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    return _with(arr, data=_put(data, "<f", 0, _nan(src)))  # the scale


def _nan_powersgd(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    n, m, r = struct.unpack_from("<III", data, 0)
    return _with(arr, data=_put(data, "<f", 12 + 4 * src.int(0, r * (n + m) - 1), _nan(src)))


def _range_none(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    variant = src.pick(["version", "magic", "descr"])
    if variant == "version":  # .npy versions are 1, 2, 3
        data[6] = src.pick([0, 4, 9, 255])
        return _with(arr, data=bytes(data))
    if variant == "magic":
        data[src.int(0, 5)] ^= 0x20
        return _with(arr, data=bytes(data))
    return _with(arr, data=_npy_rewrite(bytes(data), descr=src.pick(["|O", "<U3", "V8", "<M8", "|b1", "<f99"])))


def _range_topk(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    k, nb, offsets, _ = _topk_layout(bytes(data), ref.size)
    variant = src.pick(["index", "counts", "width"])
    if variant == "index":  # the last offset past the tensor (the last block is not full for these shapes)
        last_block = ref.size - 65536 * (nb - 1)
        return _with(arr, data=_put(data, "<H", offsets + 2 * (k - 1), src.int(last_block, 65535)))
    if variant == "counts":  # block counts that do not sum to k
        block = src.int(0, nb - 1)
        count = struct.unpack_from("<I", data, 8 + 4 * block)[0]
        return _with(arr, data=_put(data, "<I", 8 + 4 * block, count + src.pick([1, -1 if count else 2, 2**31])))
    return _with(arr, data=_put(data, "<B", 0, src.pick([0, 1, 4, 8, 255])))  # index width


def _range_randk(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    if src.int(0, 1):
        return _with(arr, data=_put(data, "<B", 12, src.int(2, 255)))  # the scaled flag is 0 or 1
    return _with(arr, data=_put(data, "<I", 8, ref.size + src.int(1, 1000)))  # k > numel


def _range_qsgd(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    s = struct.unpack_from("<H", data, 4)[0]
    variant = src.pick(["level", "zero-s", "width", "norm"])
    if variant == "level":
        return _with(arr, data=_put(data, "<B", 8 + src.int(0, ref.size - 1), src.int(s + 1, 255)))
    if variant == "zero-s":
        return _with(arr, data=_put(data, "<H", 4, 0))
    if variant == "width":
        return _with(arr, data=_put(data, "<B", 6, src.pick([0, 2, 3, 255])))
    return _with(arr, data=_put(data, "<f", 0, -float(src.int(1, 10**6))))  # a negative norm


def _range_sign(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    if ref.size % 8 and src.int(0, 1):  # nonzero padding bits past the last entry
        data[-1] |= 1 << src.int(ref.size % 8, 7)
        return _with(arr, data=bytes(data))
    return _with(arr, data=_put(data, "<f", 0, -float(src.int(1, 10**6)) / 7))  # a negative scale


def _range_powersgd(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    n, m, r = struct.unpack_from("<III", data, 0)
    variant = src.pick(["rank", "rows", "swap"])
    if variant == "rank":  # a rank that would not compress (or zero)
        return _with(arr, data=_put(data, "<I", 8, src.pick([0, n * m // (n + m) + 1, 2**32 - 1])))
    if variant == "rows":
        return _with(arr, data=_put(data, "<I", 0, n + src.int(1, 100)))
    return _with(arr, data=_put(data, "<II", 0, m, n))


def _duplicate_topk(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    k, nb, offsets, _ = _topk_layout(bytes(data), ref.size)
    counts = struct.unpack_from(f"<{nb}I", data, 8)
    pairs = [s + i for b, s in enumerate(np.cumsum((0, *counts[:-1]))) for i in range(counts[b] - 1)]
    i = int(src.pick(pairs))  # two neighbours in the same block: make the second equal to (or below) the first
    first = struct.unpack_from("<H", data, offsets + 2 * i)[0]
    return _with(arr, data=_put(data, "<H", offsets + 2 * (i + 1), first - src.pick([0, 0, 1 if first else 0])))


def _huge_none(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    variant = src.pick(["header-shape", "header-len", "declared"])
    if variant == "header-shape":
        shape = src.pick([(2**32, 2**32), (10**30,), (2**63, 2), (2**40, 256)])
        return _with(arr, data=_npy_rewrite(bytes(data), shape=shape))
    if variant == "header-len":
        true_len = struct.unpack_from("<H", data, 8)[0]  # any other length cuts the header or swallows data
        struct.pack_into("<H", data, 8, src.pick([src.int(true_len + 1, 65535), src.int(0, true_len - 1)]))
        return _with(arr, data=bytes(data))
    return _with(arr, shape=src.pick([(2**31, 2**31), (2**40,), (10**6, 10**6, 10**6)]))


def _huge_declared(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    return _with(arr, shape=src.pick([(2**31, 2**31), (2**40,), (10**6, 10**6, 10**6), (2**32 - 1,)]))


def _huge_topk(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    if src.int(0, 3) == 0:
        return _huge_declared(arr, ref, data, src)
    return _with(arr, data=_put(data, "<I", 4, src.pick([2**32 - 1, 2**31, ref.size + 1, 10**9])))


def _huge_randk(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    if src.int(0, 3) == 0:
        return _huge_declared(arr, ref, data, src)
    return _with(arr, data=_put(data, "<I", 8, src.pick([2**32 - 1, 2**31, 10**9])))


def _huge_qsgd(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    if src.int(0, 1):
        return _huge_declared(arr, ref, data, src)
    return _with(arr, data=_put(data, "<H", 4, src.int(256, 65535)))  # s needs 2-byte levels, width says 1


def _huge_powersgd(arr: Array, ref: np.ndarray, data: bytearray, src: Source) -> Array:
    if src.int(0, 2) == 0:
        return _huge_declared(arr, ref, data, src)
    field_ = src.int(0, 2)
    return _with(arr, data=_put(data, "<I", 4 * field_, src.pick([2**32 - 1, 2**31, 10**9])))


def _by_codec(none: Callable, fp16: Callable | None, topk: Callable, randk: Callable | None, qsgd: Callable | None,
              sign: Callable | None, powersgd: Callable | None) -> dict[str, Callable]:
    table = {"none": none, "fp16": fp16, "topk": topk, "randk": randk, "qsgd": qsgd, "sign": sign,
             "powersgd": powersgd}
    return {k: v for k, v in table.items() if v is not None}


_CODEC_MUTATIONS: dict[str, dict[str, Callable[[Array, np.ndarray, bytearray, Source], Array]]] = {
    "nan-inf": _by_codec(_nan_none, _nan_fp16, _nan_topk, _nan_randk, _nan_qsgd, _nan_sign, _nan_powersgd),
    "out-of-range": _by_codec(_range_none, None, _range_topk, _range_randk, _range_qsgd, _range_sign,
                              _range_powersgd),
    "duplicate-index": _by_codec(None, None, _duplicate_topk, None, None, None, None),
    "huge-size": _by_codec(_huge_none, _huge_declared, _huge_topk, _huge_randk, _huge_qsgd, _huge_declared,
                           _huge_powersgd),
}


# --------------------------------------------------------------------------------------------- reply mutations
def _record_level(content: RecordDict, src: Source) -> RecordDict:
    key = "delta" if "delta" in content.array_records else "arrays"
    record = content.array_records[key]
    metrics = dict(content.metric_records.get("metrics", {}))
    variant = src.pick(["no-record", "renamed-record", "missing-tensor", "extra-tensor", "renamed-tensor",
                        "num-examples", "config-record"])
    out = RecordDict({k: v for k, v in content.items() if k != key})
    arrays = {n: record[n] for n in record}
    if variant == "no-record":
        return out
    if variant == "renamed-record":
        out[src.pick(["deltas", "weights", "Delta", "params"])] = ArrayRecord(arrays)
        return out
    if variant == "config-record":  # the right name, the wrong kind of record
        out[key] = ConfigRecord({"w": 1.0})
        return out
    if variant == "missing-tensor":
        del arrays[src.pick(list(arrays))]
    elif variant == "extra-tensor":
        arrays[src.pick(["extra", "w.bias", "b2", "fc.weight2"])] = Array(np.zeros(src.int(0, 5), np.float32))
    elif variant == "renamed-tensor":
        name = src.pick(list(arrays))
        arrays[name.upper() + "_"] = arrays.pop(name)
    else:
        metrics["num-examples"] = src.pick([0, -1, -(2**40), 2.5, math.nan, math.inf, -math.inf, 2**60, 1e300])
        out["metrics"] = MetricRecord(metrics)
    out[key] = ArrayRecord(arrays)
    return out


def _oversized(content: RecordDict, src: Source) -> RecordDict:
    """A valid reply plus an extra record of junk larger than twice the dense model."""
    record = content.array_records["delta" if "delta" in content.array_records else "arrays"]
    dense = sum(4 * math.prod(a.shape) for a in record.values())
    out = RecordDict(dict(content.items()))
    junk = np.zeros(src.int(2 * dense + 70_000, 4 * dense + 70_000) // 4, np.float32)
    out[src.pick(["junk", "extra", "padding"])] = ArrayRecord({"x": Array(junk)})
    return out


def _wrong_version(content: RecordDict, src: Source) -> RecordDict:
    metrics = dict(content.metric_records["metrics"])
    key = src.pick(["model-version", "task-seq"])
    if key in metrics:
        echoed = int(metrics[key])  # type: ignore[call-overload]
        wrong = [echoed + src.int(1, 1000), echoed - src.int(1, 5), math.nan, echoed + 0.5, [1, 2]]
    else:  # a reply that echoed nothing (Flower-style) now echoes something no task was sent with
        wrong = [-src.int(1, 1000), math.nan, 0.5, [1, 2]]
    metrics[key] = src.pick(wrong)
    out = RecordDict(dict(content.items()))
    out["metrics"] = MetricRecord(metrics)
    return out


_REPLY_MUTATIONS = {"record-level": _record_level, "oversized": _oversized, "wrong-version": _wrong_version}


# ------------------------------------------------------------------------------------------------- ClientApps
def codec_for(kind: str, turn: int) -> str:
    """The codec a hostile client encodes its delta with for mutation ``kind`` on its ``turn``-th try of it."""
    codecs = [c for c in CODECS if kind in APPLICABLE[c]] if kind in ARRAY_KINDS else ["none"]
    return codecs[turn % len(codecs)]


@dataclass
class HostileClient:
    """Corrupts the replies of tasks whose ``task-seq % every == offset``, one mutation class after the other.

    The class of corrupted task number j (counting corrupted tasks in seq order) is ``kinds[j % len(kinds)]``,
    its codec ``codec_for(kind, j // len(kinds))``: deterministic, so a test knows which seq got what.
    """

    every: int = 3
    offset: int = 1
    kinds: tuple[str, ...] = ALWAYS_INVALID
    app: ClientApp = field(init=False)

    def __post_init__(self) -> None:
        self.app = ClientApp()
        self.app.train()(self.train)
        self.app.query("describe")(real_describe)  # staleflower's ClientApp, so every strategy serves it

    def plan(self, seq: int) -> tuple[str, str] | None:
        """``(kind, codec)`` for task ``seq``, or None if it is left alone."""
        if seq % self.every != self.offset:
            return None
        j = seq // self.every
        kind = self.kinds[j % len(self.kinds)]
        return kind, codec_for(kind, j // len(self.kinds))

    def train(self, msg: Message, context: Context) -> Message:
        """Our ClientApp's train, then (for planned tasks) the reply re-encoded and broken."""
        honest = real_train(msg, context)
        seq = int(msg.content.config_records["config"]["task-seq"])
        plan = self.plan(seq)
        if plan is None:
            return honest
        kind, codec = plan
        content = reencode(honest.content, codec, seed=seq)
        return Message(mutate(content, kind, RngSource(seq)), reply_to=msg)


def reencode(content: RecordDict, codec: str, seed: int) -> RecordDict:
    """The reply's delta encoded with ``codec`` (the server decodes any codec, whatever the run's codec is)."""
    record = content.array_records["delta"]
    arrays = {}
    for i, (name, arr) in enumerate(record.items()):
        value = decode(arr, shape=tuple(arr.shape), dtype=arr.dtype)
        arrays[name] = encode(CodecSpec(codec, ratio=SPEC.ratio, levels=SPEC.levels, rank=SPEC.rank), value,
                              seed=seed + i)
    out = RecordDict(dict(content.items()))
    out["delta"] = ArrayRecord(arrays)
    return out


@dataclass
class ScalingClient:
    """Multiplies the delta of tasks with ``task-seq >= start`` and ``task-seq % every == offset`` by ``factor``."""

    factor: float = 1e3
    every: int = 5
    offset: int = 2
    start: int = 20
    app: ClientApp = field(init=False)

    def __post_init__(self) -> None:
        self.app = ClientApp()
        self.app.train()(self.train)
        self.app.query("describe")(real_describe)  # staleflower's ClientApp, so every strategy serves it

    def scaled(self, seq: int) -> bool:
        """Whether task ``seq``'s delta is scaled."""
        return seq >= self.start and seq % self.every == self.offset

    def train(self, msg: Message, context: Context) -> Message:
        """Our ClientApp's train, with the delta scaled on the chosen tasks."""
        honest = real_train(msg, context)
        if not self.scaled(int(msg.content.config_records["config"]["task-seq"])):
            return honest
        record = honest.content.array_records["delta"]
        out = RecordDict(dict(honest.content.items()))
        out["delta"] = ArrayRecord({n: Array(np.ascontiguousarray(a.numpy() * np.float32(self.factor)))
                                    for n, a in record.items()})
        return Message(out, reply_to=msg)
