"""Update codecs: round trips, statistical properties, error feedback, wire sizes and hostile payloads."""

import json
import math
import struct

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.common.serde import array_from_proto, array_to_proto
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from strategies.codecs import CODECS, STYPES, CodecError, CodecSpec, ErrorFeedback, decode, encode, roundtrip

FLOATS = ("float16", "float32", "float64")
SHAPES = [(), (0,), (7,), (5, 6), (3, 4, 5), (300, 200), (2, 0)]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rand(shape, dtype="float32", seed=0, scale=1.0):
    return np.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype)


def topk_parts(arr):
    """Parse the top-k wire format independently of the codec: <B3xI header (2, k), a uint32 count per
    65536-entry block, uint16 offsets within blocks, float32 values."""
    width, k = struct.unpack_from("<B3xI", arr.data)
    assert width == 2
    nb = max(1, -(-math.prod(arr.shape) // 65536))
    counts = np.frombuffer(arr.data, "<u4", nb, 8)
    low = np.frombuffer(arr.data, "<u2", k, 8 + 4 * nb).astype(np.int64)
    idx = np.repeat(np.arange(nb) * 65536, counts) + low
    return idx, np.frombuffer(arr.data, "<f4", k, 8 + 4 * nb + 2 * k)


def with_data(arr, data, **changes):
    fields = {"dtype": arr.dtype, "shape": tuple(arr.shape), "stype": arr.stype, "data": data} | changes
    return Array(**fields)


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", CODECS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", SHAPES)
def test_roundtrip_keeps_shape_and_dtype(name, dtype, shape):
    x = rand(shape, dtype)
    arr = encode(CodecSpec(name, ratio=0.1, levels=8, rank=1), x, seed=3)
    assert arr.dtype == dtype and tuple(arr.shape) == shape
    y = decode(arr, shape=shape, dtype=dtype)
    assert y.shape == shape and y.dtype == np.dtype(dtype) and np.isfinite(y).all()
    assert y is not x and not np.shares_memory(y, x)


@pytest.mark.parametrize("dtype", FLOATS)
def test_none_is_exact_and_plain_flower(dtype):
    x = rand((4, 5), dtype)
    arr = encode(CodecSpec("none"), x, seed=0)
    assert arr.stype == "numpy.ndarray" and np.array_equal(arr.numpy(), x)
    assert np.array_equal(decode(arr, shape=(4, 5), dtype=dtype), x)
    fortran = Array(np.asfortranarray(x))  # Flower writes fortran_order=True for F-contiguous arrays
    assert np.array_equal(decode(fortran, shape=(4, 5), dtype=dtype), x)


def test_fp16_is_close_and_clips_to_the_fp16_range():
    x = rand((50, 40), scale=3.0)
    assert np.allclose(roundtrip(CodecSpec("fp16"), x, seed=0), x, rtol=1e-3, atol=1e-4)
    big = np.array([1e6, -1e6, 1.0], np.float32)
    assert roundtrip(CodecSpec("fp16"), big, seed=0).tolist() == [65504.0, -65504.0, 1.0]
    assert len(encode(CodecSpec("fp16"), x, seed=0).data) == 2 * x.size


@FAST
@given(x=hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=40),
                    elements=st.floats(-1e6, 1e6, width=32)), ratio=st.floats(0.01, 1.0))
def test_topk_keeps_exactly_the_k_largest_magnitudes(x, ratio):
    arr = encode(CodecSpec("topk", ratio=ratio), x, seed=0)
    y = decode(arr, shape=x.shape, dtype=x.dtype).reshape(-1)
    idx, values = topk_parts(arr)
    flat = x.reshape(-1)
    assert idx.size == min(flat.size, max(1, math.ceil(round(ratio * flat.size, 6))))
    assert np.all(np.diff(idx) > 0)
    assert np.array_equal(values, flat[idx]) and np.array_equal(y[idx], flat[idx])
    dropped = np.ones(flat.size, bool)
    dropped[idx] = False
    assert not y[dropped].any()
    if dropped.any():
        assert np.abs(flat[idx]).min() >= np.abs(flat[dropped]).max()


@pytest.mark.parametrize("kind", ["gaussian", "sparse", "ties", "spike-pattern", "sampled-spikes", "zeros"])
def test_topk_sampled_threshold_path_is_exact(kind):
    # d >= 65536 takes the sampled-threshold path; each case stresses its fallback or its zero-threshold rule.
    d, k = 300_000, 3000
    rng = np.random.default_rng(1)
    x = {"gaussian": lambda: rng.standard_normal(d),
         "sparse": lambda: np.where(rng.random(d) < 0.005, rng.standard_normal(d), 0.0),
         "ties": lambda: rng.integers(-3, 4, d).astype(float),
         "spike-pattern": lambda: np.where(np.arange(d) % 4 == 1, 100.0, 1e-3) * rng.standard_normal(d),
         "sampled-spikes": lambda: np.where(np.arange(d) % 4 == 0, 100.0, 1e-3) * rng.standard_normal(d),
         "zeros": lambda: np.zeros(d)}[kind]().astype(np.float32)
    idx, values = topk_parts(encode(CodecSpec("topk", ratio=k / d), x, seed=0))
    assert idx.size == k and np.all(np.diff(idx) > 0) and np.array_equal(values, x[idx])
    expected = np.sort(np.abs(x))[-k:]
    assert np.array_equal(np.sort(np.abs(values)), expected)


def test_randk_is_unbiased_and_seeded():
    x = rand(40, seed=5)
    spec = CodecSpec("randk", ratio=0.1)
    draws = np.stack([roundtrip(spec, x, seed=s) for s in range(4000)])
    assert np.count_nonzero(draws[0]) == 4
    std = np.abs(x) * math.sqrt((40 / 4 - 1) / len(draws))
    assert np.all(np.abs(draws.mean(axis=0) - x) < 5 * std + 1e-6)
    assert np.array_equal(roundtrip(spec, x, seed=7), roundtrip(spec, x, seed=7))
    assert not np.array_equal(roundtrip(spec, x, seed=7), roundtrip(spec, x, seed=8))


def test_qsgd_is_unbiased_with_levels_in_range():
    x = rand(50, seed=2)
    spec = CodecSpec("qsgd", levels=4)
    draws = np.stack([roundtrip(spec, x, seed=s) for s in range(3000)])
    unit = np.linalg.norm(x) / 4
    levels = np.abs(draws) / unit
    assert np.allclose(levels, np.round(levels), atol=1e-3) and levels.max() <= 4 + 1e-4
    # per-draw std <= unit / 2, so the mean of n draws is within 5 * unit / (2 sqrt(n))
    assert np.all(np.abs(draws.mean(axis=0) - x) < 5 * unit / (2 * math.sqrt(len(draws))))
    assert len(encode(CodecSpec("qsgd", levels=300), x, seed=0).data) == 8 + 2 * 50 + 7


def test_sign_decodes_to_scaled_signs():
    x = rand((13, 7), seed=4)
    x[0, :3] = [0.0, -0.0, 0.0]
    y = roundtrip(CodecSpec("sign"), x, seed=0)
    scale = np.float32(np.abs(x).mean())
    assert np.allclose(np.abs(y), scale, rtol=1e-5)
    assert np.array_equal(np.sign(y), np.where(x < 0, -1.0, 1.0))  # zeros (and -0.0) become +


def test_powersgd_is_exact_for_rank_r_and_improves_when_warm_started():
    rng = np.random.default_rng(0)
    low_rank = (rng.standard_normal((60, 2)) @ rng.standard_normal((2, 80))).astype(np.float32)
    spec, state = CodecSpec("powersgd", rank=2), {}
    for step in range(3):
        y = roundtrip(spec, low_rank, seed=step, state=state)
    assert np.allclose(y, low_rank, atol=1e-4 * np.abs(low_rank).max())
    assert state["q"].shape == (80, 2)
    # a decaying spectrum: warm-started power iterations converge to the best rank-2 approximation
    u, _ = np.linalg.qr(rng.standard_normal((60, 60)))
    v, _ = np.linalg.qr(rng.standard_normal((80, 60)))
    m = ((u * 0.7 ** np.arange(60)) @ v.T).astype(np.float32)
    state = {}
    errors = [np.linalg.norm(roundtrip(spec, m, seed=9, state=state) - m) for _ in range(6)]
    assert all(b <= a * (1 + 1e-4) for a, b in zip(errors, errors[1:], strict=False))
    best = np.linalg.norm(0.7 ** np.arange(2, 60))
    assert errors[0] > errors[-1] and errors[-1] < best * 1.01


def test_powersgd_sends_vectors_and_small_matrices_raw():
    for x in (rand(100), rand((3, 3)), rand((4, 2, 1))):
        arr = encode(CodecSpec("powersgd", rank=2), x, seed=0)
        assert arr.stype == "numpy.ndarray"
        assert np.array_equal(decode(arr, shape=x.shape, dtype=x.dtype), x)
    arr = encode(CodecSpec("powersgd", rank=2), rand((8, 5, 6)), seed=0)
    assert arr.stype == STYPES["powersgd"] and len(arr.data) == 12 + 4 * 2 * (8 + 30)


# --------------------------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("name", CODECS)
def test_error_feedback_conserves_the_accumulated_input(name):
    ef = ErrorFeedback(CodecSpec(name, ratio=0.05, levels=4, rank=1))
    inputs, sent = [], []
    for step in range(6):
        x = rand((20, 30), seed=step)
        arr, c = ef.compress(0, x, seed=step)
        assert np.array_equal(decode(arr, shape=x.shape, dtype=x.dtype), c)
        inputs.append(x)
        sent.append(c)
    total_in = np.sum(inputs, axis=0, dtype=np.float64)
    total_out = np.sum(sent, axis=0, dtype=np.float64) + ef.residuals[0]
    assert np.allclose(total_out, total_in, atol=1e-4)


def test_error_feedback_sends_randk_unscaled_and_checks_residual_shapes():
    x = rand(100)
    arr, c = ErrorFeedback(CodecSpec("randk", ratio=0.1)).compress(0, x, seed=1)
    kept = c != 0
    assert kept.sum() == 10 and np.array_equal(c[kept], x[kept])  # plain encode would scale these by 10
    ef = ErrorFeedback(CodecSpec("topk"))
    ef.compress(3, x, seed=0)
    with pytest.raises(CodecError, match="residual 3"):
        ef.compress(3, rand(99), seed=0)


# --------------------------------------------------------------------------------------------- wire


def test_wire_sizes():
    x = rand(1_000_000)
    topk = encode(CodecSpec("topk", ratio=0.01), x, seed=0)
    assert len(topk.data) == 8 + 4 * 16 + 10_000 * 6 and len(topk.data) < x.nbytes / 60  # 16 blocks of 65536
    sign = encode(CodecSpec("sign"), x, seed=0)
    assert len(sign.data) == 4 + 125_000 and x.nbytes / len(sign.data) == pytest.approx(32, rel=1e-3)
    assert len(encode(CodecSpec("randk", ratio=0.01), x, seed=0).data) == 16 + 4 * 10_000
    assert len(encode(CodecSpec("topk", ratio=0.5), rand(1000), seed=0).data) == 8 + 4 + 500 * 6  # one block


@pytest.mark.parametrize("name", CODECS)
def test_arrays_survive_flower_serialization(name):
    x = rand((30, 20))
    arr = encode(CodecSpec(name, rank=2), x, seed=1)
    back = array_from_proto(array_to_proto(arr))
    assert np.array_equal(decode(back, shape=x.shape, dtype="float32"), decode(arr, shape=x.shape, dtype="float32"))
    record = ArrayRecord({"w": arr})
    assert record.count_bytes() >= len(arr.data)


# --------------------------------------------------------------------------------------------- hostile input

shapes = st.lists(st.integers(0, 6), max_size=3).map(tuple)
huge_shapes = st.lists(st.integers(0, 10**6), min_size=1, max_size=3).map(tuple)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=200), stype=st.sampled_from([*STYPES.values(), "bogus"]),
       shape=st.one_of(shapes, huge_shapes), dtype=st.sampled_from([*FLOATS, "int32"]))
def test_decode_of_random_bytes_raises_only_codec_error(data, stype, shape, dtype):
    arr = Array(dtype=dtype, shape=shape, stype=stype, data=data)
    try:
        y = decode(arr, shape=shape, dtype=dtype)
    except CodecError:
        return
    assert y.shape == shape and y.dtype == np.dtype(dtype) and np.isfinite(y).all()


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(CODECS), shape=st.sampled_from([(9,), (6, 7)]), seed=st.integers(0, 100),
       edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
       cut=st.integers(-3, 3))
def test_decode_of_mutated_payloads_raises_only_codec_error(name, shape, seed, edits, cut):
    x = rand(shape, seed=seed)
    arr = encode(CodecSpec(name, ratio=0.3, levels=5, rank=1), x, seed=seed)
    data = bytearray(arr.data)
    for pos, byte in edits:
        data[pos % len(data)] = byte
    data = bytes(data[:cut] if cut < 0 else data + b"\x01" * cut)
    try:
        y = decode(with_data(arr, data), shape=shape, dtype="float32")
    except CodecError:
        return
    assert y.shape == shape and np.isfinite(y).all()


def test_encode_refuses_bad_input_and_settings():
    for name in CODECS:
        for bad in (np.nan, np.inf, -np.inf):
            x = rand((10, 10))
            x[3, 4] = bad
            with pytest.raises(CodecError, match="NaN/Inf"):
                encode(CodecSpec(name, rank=1), x, seed=0)
    big = np.zeros((300, 300), np.float32)
    big[1, 2] = np.nan
    with pytest.raises(CodecError, match="NaN/Inf"):
        encode(CodecSpec("topk"), big, seed=0)  # the sampled-threshold path
    with pytest.raises(CodecError, match="float16/32/64"):
        encode(CodecSpec("topk"), np.arange(5), seed=0)
    with pytest.raises(CodecError, match="seed"):
        encode(CodecSpec("randk"), rand(5), seed=-1)
    for kwargs, message in [({"name": "zip"}, "unknown codec"), ({"ratio": 0}, "ratio"), ({"ratio": 1.5}, "ratio"),
                            ({"levels": 0}, "levels"), ({"levels": 70000}, "levels"), ({"rank": 0}, "rank")]:
        with pytest.raises(CodecError, match=message):
            CodecSpec(**kwargs)


def build(stype, data, shape=(10,), dtype="float32"):
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def good(name, shape=(10,), **kw):
    return encode(CodecSpec(name, **kw), rand(shape, seed=11), seed=5)


TOPK, RANDK, QSGD, SIGN, PSGD = (STYPES[n] for n in ("topk", "randk", "qsgd", "sign", "powersgd"))
MALFORMED = [
    ("wrong stype", lambda: with_data(good("topk"), good("topk").data, stype="staleflower.topk.v9"), "unknown stype"),
    ("wrong shape", lambda: with_data(good("sign"), good("sign").data, shape=(11,)), "does not match the expected"),
    ("wrong dtype", lambda: with_data(good("sign"), good("sign").data, dtype="int8"), "is not one of"),
    ("topk truncated", lambda: with_data(good("topk"), good("topk").data[:-1]), "topk: truncated"),
    ("topk extra bytes", lambda: with_data(good("topk"), good("topk").data + b"\0"), "topk: extra bytes"),
    ("topk short header", lambda: build(TOPK, b"\x02\0\0"), "truncated header"),
    ("topk out of range", lambda: build(TOPK, struct.pack("<B3xII2Hff", 2, 2, 2, 1, 10, 1, 1)), "out of range"),
    ("topk duplicate", lambda: build(TOPK, struct.pack("<B3xII2Hff", 2, 2, 2, 3, 3, 1, 1)), "strictly increasing"),
    ("topk unsorted", lambda: build(TOPK, struct.pack("<B3xII2Hff", 2, 2, 2, 4, 3, 1, 1)), "strictly increasing"),
    ("topk block counts", lambda: build(TOPK, struct.pack("<B3xII2Hff", 2, 2, 3, 1, 3, 1, 1)), "block counts sum"),
    ("topk huge k", lambda: build(TOPK, struct.pack("<B3xI", 2, 2**32 - 1)), "k=4294967295 > numel=10"),
    ("topk index width", lambda: build(TOPK, struct.pack("<B3xIIf", 4, 1, 0, 1)), "index width 4"),
    ("topk nan value", lambda: build(TOPK, struct.pack("<B3xIIHf", 2, 1, 1, 0, math.nan)), "NaN/Inf"),
    ("topk value overflows fp16", lambda: build(TOPK, struct.pack("<B3xIIHf", 2, 1, 1, 0, 1e6), dtype="float16"),
     "overflow"),
    ("randk huge k", lambda: build(RANDK, struct.pack("<QIB3x", 1, 10**9, 1)), "k=1000000000 > numel=10"),
    ("randk flag", lambda: build(RANDK, struct.pack("<QIB3xf", 1, 1, 7, 1.0)), "flag"),
    ("randk inf value", lambda: build(RANDK, struct.pack("<QIB3xf", 1, 1, 0, math.inf)), "NaN/Inf"),
    ("qsgd level > s", lambda: build(QSGD, struct.pack("<fHBx", 1.0, 4, 1) + bytes([5] + [0] * 9) + b"\0\0"),
     "level 5 > s=4"),
    ("qsgd nan norm", lambda: build(QSGD, struct.pack("<fHBx", math.nan, 4, 1) + bytes(12)), "norm nan"),
    ("qsgd width", lambda: build(QSGD, struct.pack("<fHBx", 1.0, 4, 2) + bytes(22)), "level width 2"),
    ("qsgd zero levels", lambda: build(QSGD, struct.pack("<fHBx", 1.0, 0, 1) + bytes(12)), "s = 0"),
    ("sign nan scale", lambda: build(SIGN, struct.pack("<f", math.nan) + bytes(2)), "scale nan"),
    ("sign negative scale", lambda: build(SIGN, struct.pack("<f", -1.0) + bytes(2)), "scale -1.0"),
    ("sign padding bits", lambda: build(SIGN, struct.pack("<f", 1.0) + b"\0\xff"), "padding bits"),
    ("sign truncated", lambda: build(SIGN, struct.pack("<f", 1.0) + b"\0"), "sign: truncated"),
    ("powersgd rank", lambda: build(PSGD, struct.pack("<III", 4, 5, 3) + bytes(108), (4, 5)), "rank 3"),
    ("powersgd dims", lambda: build(PSGD, struct.pack("<III", 5, 4, 1) + bytes(36), (4, 5)), "5 x 4 does not"),
    ("powersgd vector", lambda: build(PSGD, struct.pack("<III", 10, 1, 1) + bytes(44)), "does not match"),
    ("powersgd nan", lambda: build(PSGD, struct.pack("<III", 4, 5, 1) + struct.pack("<9f", *[math.nan] * 9),
                                   (4, 5)), "NaN/Inf"),
    ("powersgd truncated", lambda: build(PSGD, struct.pack("<III", 4, 5, 1) + bytes(35), (4, 5)), "truncated"),
    ("fp16 inf", lambda: build(STYPES["fp16"], np.full(10, np.inf, "<f2").tobytes()), "NaN/Inf"),
    ("fp16 truncated", lambda: build(STYPES["fp16"], bytes(19)), "fp16: truncated"),
    ("none bad header", lambda: build("numpy.ndarray", b"\x93NUMPY\x01\x00garbage"), ".npy header"),
    ("none dtype", lambda: with_data(Array(np.zeros(10, np.float32)), Array(np.zeros(10)).data), ".npy dtype float64"),
    ("none extra bytes", lambda: with_data(Array(np.zeros(10, np.float32)), Array(np.zeros(10, np.float32)).data
                                           + b"\0"), "extra bytes"),
    ("none nan", lambda: with_data(Array(np.full(10, np.nan, np.float32)), Array(np.full(10, np.nan, np.float32))
                                   .data), "NaN/Inf"),
    ("not an Array", lambda: "hello", "not an Array"),
]


@pytest.mark.parametrize(("case", "make", "message"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_payloads_raise_codec_error(case, make, message):
    arr = make()
    shape = tuple(arr.shape) if isinstance(arr, Array) and arr.shape in [(4, 5)] else (10,)
    dtype = arr.dtype if isinstance(arr, Array) and arr.dtype == "float16" else "float32"
    with pytest.raises(CodecError, match=message.replace("(", r"\(").replace(".", r"\.")):
        decode(arr, shape=shape, dtype=dtype)


def test_decode_checks_the_requested_shape_and_dtype():
    arr = good("sign")
    with pytest.raises(CodecError, match="does not match the expected float64"):
        decode(arr, shape=(10,), dtype="float64")
    with pytest.raises(CodecError, match="not a numpy dtype"):
        decode(arr, shape=(10,), dtype="nonsense")
    with pytest.raises(CodecError, match="non-negative integers"):
        decode(arr, shape=(-1,), dtype="float32")
    with pytest.raises(CodecError, match="more than"):
        decode(arr, shape=(2**20, 2**20), dtype="float32")


def test_bench_codec_throughput_smoke(tmp_path, capsys):
    from bench import codec_throughput

    out = tmp_path / "codecs.json"
    report = codec_throughput.main(["--size", "4096", "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert {row["codec"] for row in report["results"]} == {"copy", *CODECS}
    assert "| topk |" in capsys.readouterr().out


def test_npy_headers_parse_without_ast_and_match_numpy():
    """Our strict .npy header parser agrees with np.save's output (and is thread-safe, unlike ast on 3.11)."""
    import io
    import threading

    from strategies.codecs import parse_npy_header

    arrays = (np.zeros((3, 4), np.float32), np.zeros(5, np.float64), np.zeros((), np.float16),
              np.asfortranarray(np.zeros((2, 3), np.float32)), np.zeros((0, 7), np.int64), np.zeros((4, 3), np.float32))
    for arr in arrays + arrays:  # the second time from the parser's memo
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        dtype, shape, fortran, offset = parse_npy_header(buf.getvalue())
        assert (dtype, shape, fortran) == (arr.dtype, arr.shape, arr.flags.f_contiguous and not arr.flags.c_contiguous)
        assert len(buf.getvalue()) - offset == arr.nbytes
    payload = io.BytesIO()
    np.save(payload, np.ones((64, 64), np.float32))
    errors = []

    def hammer():
        try:
            for _ in range(300):
                parse_npy_header(payload.getvalue())
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
