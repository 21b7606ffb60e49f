"""Tests for client_app.data: datasets, the IDX reader and its errors, partitioning."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client_app import data
from client_app.data import (
    DATASETS,
    PARTITIONS,
    DataError,
    DatasetMissingError,
    load_dataset,
    load_partition,
    partition_indices,
    read_idx,
)

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_FILES = [Path(data.DEBIAN_FASHION_MNIST_DIR) / f"{base}.gz" for base in data._FASHION_FILES.values()]


def _check_arrays(ds: data.Dataset) -> None:
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and y.dtype == np.int64
        assert x.flags.c_contiguous and y.flags.c_contiguous
        assert not x.flags.writeable and not y.flags.writeable  # shared through the cache
        assert x.ndim == 4 and x.shape[1:] == ds.input_shape and len(x) == len(y)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.min() >= 0 and y.max() < ds.num_classes


# -------------------------------------------------------------------------------- datasets


def test_importing_data_does_not_import_torch():
    code = "import sys, client_app.data; sys.exit('torch' in sys.modules or 'sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_digits_shapes_dtypes_and_ranges():
    ds = load_dataset("digits")
    _check_arrays(ds)
    assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (1, 8, 8)
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert ds.x_train.max() == 1.0  # 16/16: scaled, not raw 0..16


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_digits_split_is_stratified(fraction):
    ds = load_dataset("digits", test_fraction=fraction)
    test_counts = np.bincount(ds.y_test, minlength=10)
    total_counts = test_counts + np.bincount(ds.y_train, minlength=10)
    assert np.all(np.abs(test_counts - fraction * total_counts) <= 1)
    assert abs(len(ds.y_test) - fraction * 1797) <= 5


def test_split_disjoint_and_complete():
    ds = load_dataset("digits", seed=3)
    from sklearn.datasets import load_digits

    pool = load_digits().images.reshape(1797, -1)
    rows = {row.tobytes() for row in (pool / 16.0).astype(np.float32)}
    seen = [x.reshape(-1).tobytes() for x in np.concatenate([ds.x_train, ds.x_test])]
    assert set(seen) <= rows and len(seen) == 1797


def test_digits_read_without_scikit_learn_are_scikit_learns_digits():
    """The loader parses scikit-learn's file itself (no sklearn import per task): the same images and labels."""
    from sklearn.datasets import load_digits

    from client_app.data import _digits_table

    table, bunch = _digits_table(), load_digits()
    np.testing.assert_array_equal(table[:, :-1].reshape(-1, 8, 8), bunch.images)
    np.testing.assert_array_equal(table[:, -1].astype(np.int64), bunch.target)


def test_loading_digits_does_not_import_scikit_learn():
    code = ("import sys; from client_app.data import load_dataset; load_dataset('digits'); "
            "assert not [m for m in sys.modules if m.startswith('sklearn')], 'sklearn imported'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_deterministic_per_seed(name):
    a = load_dataset(name, seed=1)
    data.clear_cache()
    b = load_dataset(name, seed=1)
    c = load_dataset(name, seed=2)
    assert a is not b  # really recomputed, not served from the cache
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_test, c.y_test)


def test_cached_per_arguments():
    assert load_dataset("digits", seed=5) is load_dataset("digits", seed=5)
    assert load_dataset("digits", seed=5) is not load_dataset("digits", seed=6)


def test_synthetic_shapes_and_balance():
    ds = load_dataset("synthetic")
    _check_arrays(ds)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_test) == 3000
    assert np.all(np.bincount(ds.y_test) == 60)


def _softmax_regression_accuracy(ds: data.Dataset, steps: int = 200, lr: float = 1.0) -> float:
    """Full-batch gradient descent on standardised features: a plain linear model."""
    x = ds.x_train.reshape(len(ds.x_train), -1).astype(np.float64)
    mean, std = x.mean(0), x.std(0) + 1e-8
    x = (x - mean) / std
    x_t = np.ascontiguousarray(x.T)  # the transposed view makes the gradient product several times slower
    onehot = np.eye(ds.num_classes)[ds.y_train]
    w = np.zeros((x.shape[1], ds.num_classes))
    b = np.zeros(ds.num_classes)
    for _ in range(steps):
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        grad = (p - onehot) / len(x)
        w -= lr * x_t @ grad
        b -= lr * grad.sum(0)
    xt = (ds.x_test.reshape(len(ds.x_test), -1) - mean) / std
    return float(np.mean(np.argmax(xt @ w + b, 1) == ds.y_test))


def test_synthetic_is_learnable_by_a_linear_model():
    accuracy = _softmax_regression_accuracy(load_dataset("synthetic", seed=0))
    assert 0.7 < accuracy < 0.99  # learnable, but not trivially separable


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "mnist"}, "valid choices: digits, fashion-mnist, synthetic"),
        ({"name": "digits", "test_fraction": 0.0}, "test_fraction"),
        ({"name": "synthetic", "test_fraction": 1.0}, "test_fraction"),
        ({"name": "digits", "seed": -1}, "seed"),
    ],
)
def test_bad_dataset_requests(kwargs, fragment):
    name = kwargs.pop("name")
    with pytest.raises(DataError, match=fragment):
        load_dataset(name, **kwargs)


def test_error_types():
    assert issubclass(DataError, ValueError)
    assert issubclass(DatasetMissingError, FileNotFoundError)
    assert DATASETS == ("digits", "fashion-mnist", "synthetic")
    assert PARTITIONS == ("iid", "dirichlet", "shards")


# -------------------------------------------------------------------------------- IDX files


def _idx_bytes(array: np.ndarray, magic: bytes | None = None) -> bytes:
    header = magic if magic is not None else bytes([0, 0, 8, array.ndim])
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    return header + dims + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _write(path: Path, payload: bytes, compress: bool) -> None:
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def _fake_fashion(folder: Path, compress: bool, **overrides: bytes) -> dict[str, np.ndarray]:
    """Write a tiny but well-formed Fashion-MNIST folder; ``overrides`` replace a file's bytes by key."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, size=(12, 5, 4), dtype=np.uint8),
        "y_train": np.arange(12, dtype=np.uint8) % 10,
        "x_test": rng.integers(0, 256, size=(6, 5, 4), dtype=np.uint8),
        "y_test": np.array([9, 0, 1, 2, 3, 4], dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, base in data._FASHION_FILES.items():
        _write(folder / base, overrides.get(key, _idx_bytes(arrays[key])), compress)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_round_trip_from_idx_files(tmp_path, compress):
    arrays = _fake_fashion(tmp_path, compress)
    ds = load_dataset("fashion-mnist", data_dir=str(tmp_path))
    _check_arrays(ds)
    assert ds.name == "fashion-mnist" and ds.num_classes == 10 and ds.input_shape == (1, 5, 4)
    np.testing.assert_allclose(ds.x_train[:, 0], arrays["x_train"] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert ds is load_dataset("fashion-mnist", data_dir=str(tmp_path), seed=9, test_fraction=0.5)


def test_read_idx_detects_gzip_by_content(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "images"  # no .gz suffix
    path.write_bytes(gzip.compress(_idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(path, ndim=3), array)


def test_fashion_found_in_a_fashion_mnist_subfolder(tmp_path):
    _fake_fashion(tmp_path / "fashion-mnist", compress=True)
    assert len(load_dataset("fashion-mnist", data_dir=str(tmp_path)).y_train) == 12


def test_fashion_env_var_is_the_fallback_for_an_empty_data_dir(tmp_path, monkeypatch):
    _fake_fashion(tmp_path, compress=False)
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path))
    assert len(load_dataset("fashion-mnist").y_train) == 12


def _corrupt(key: str, payload: bytes) -> dict[str, bytes]:
    return {key: payload}


_GOOD_LABELS = np.arange(12, dtype=np.uint8) % 10
_GOOD_IMAGES = np.zeros((12, 5, 4), dtype=np.uint8)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize(
    ("key", "payload", "fragment"),
    [
        ("x_train", _idx_bytes(_GOOD_IMAGES, magic=bytes([0, 0, 8, 1])), "bad magic number"),
        ("y_train", _idx_bytes(_GOOD_LABELS, magic=b"<htm"), "bad magic number"),
        ("y_train", b"", "bad magic number"),
        ("x_train", _idx_bytes(_GOOD_IMAGES)[:-1], "truncated"),
        ("x_train", _idx_bytes(_GOOD_IMAGES)[:10], "truncated header"),
        ("x_test", _idx_bytes(_GOOD_IMAGES[:6]) + b"\0", "trailing bytes"),
        ("y_train", _idx_bytes(_GOOD_LABELS[:11]), "count mismatch"),
        ("y_test", _idx_bytes(np.array([0, 1, 2, 3, 4, 10], dtype=np.uint8)), "out of range"),
        ("x_test", _idx_bytes(np.zeros((6, 4, 4), dtype=np.uint8)), "images are"),
    ],
)
def test_fashion_corrupt_files_name_file_and_problem(tmp_path, compress, key, payload, fragment):
    _fake_fashion(tmp_path, compress, **_corrupt(key, payload))
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert fragment in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_truncated_gzip_stream_is_a_data_error(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(_idx_bytes(_GOOD_LABELS))[:-12])
    with pytest.raises(DataError, match="labels.gz"):
        read_idx(path, ndim=1)


def test_missing_fashion_says_where_and_how_to_install(tmp_path):
    _fake_fashion(tmp_path, compress=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()  # one file short is still missing
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("fashion-mnist", data_dir=str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message and str(tmp_path / "fashion-mnist") in message
    assert "install it with `apt-get install dataset-fashion-mnist`" in message
    assert "set data-dir to a folder holding the IDX files" in message


def test_missing_fashion_with_empty_data_dir_lists_env_and_debian_folders(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "nowhere"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "debian"))
    with pytest.raises(DatasetMissingError) as info:
        load_dataset("fashion-mnist")
    assert str(tmp_path / "nowhere") in str(info.value)
    assert str(tmp_path / "debian") in str(info.value)


@pytest.mark.skipif(
    not all(path.is_file() for path in DEBIAN_FILES),
    reason=f"dataset-fashion-mnist not installed (no IDX files in {data.DEBIAN_FASHION_MNIST_DIR})",
)
def test_real_fashion_mnist_from_the_debian_package(monkeypatch):
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() == 1.0 and ds.x_train.min() == 0.0
    assert np.all(np.bincount(ds.y_train) == 6000) and np.all(np.bincount(ds.y_test) == 1000)


# -------------------------------------------------------------------------------- partitions


def _check_partition(parts: list[np.ndarray], n: int, k: int) -> None:
    assert len(parts) == k
    assert all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)  # sorted, no repeats
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))  # disjoint and covering


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=80),
    k_fraction=st.floats(0.0, 1.0),
    scheme=st.sampled_from(PARTITIONS),
    alpha=st.sampled_from([0.01, 0.5, 100.0]),
    seed=st.integers(0, 2**32),
)
def test_partitions_disjoint_covering_nonempty_sorted(labels, k_fraction, scheme, alpha, seed):
    labels = np.array(labels)
    k = max(1, round(k_fraction * len(labels)))
    parts = partition_indices(labels, k, scheme=scheme, alpha=alpha, seed=seed)
    _check_partition(parts, len(labels), k)


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_partitions_deterministic_per_seed(scheme):
    labels = load_dataset("digits").y_train
    a = partition_indices(labels, 7, scheme=scheme, alpha=0.3, seed=4)
    b = partition_indices(labels, 7, scheme=scheme, alpha=0.3, seed=4)
    c = partition_indices(labels, 7, scheme=scheme, alpha=0.3, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_partitions_are_near_equal():
    sizes = [len(p) for p in partition_indices(np.zeros(103, dtype=int), 10, scheme="iid")]
    assert max(sizes) - min(sizes) <= 1


def _mean_label_entropy(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    entropies = []
    for part in parts:
        p = np.bincount(labels[part], minlength=10) / len(part)
        p = p[p > 0]
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


def test_dirichlet_small_alpha_is_label_skewed():
    labels = load_dataset("digits").y_train
    def entropy(scheme: str, alpha: float = 0.5) -> float:
        return _mean_label_entropy(labels, partition_indices(labels, 10, scheme=scheme, alpha=alpha, seed=0))

    iid, skewed, flat = entropy("iid"), entropy("dirichlet", 0.1), entropy("dirichlet", 1000.0)
    assert skewed < 0.6 * iid
    assert flat > 0.95 * iid  # large alpha approaches iid


def test_dirichlet_repairs_empty_partitions():
    labels = np.zeros(50, dtype=int)  # one class, tiny alpha: most partitions would be empty in every draw
    parts = partition_indices(labels, 50, scheme="dirichlet", alpha=0.001, seed=0)
    _check_partition(parts, 50, 50)


def test_shards_give_about_two_labels_per_partition():
    labels = load_dataset("digits").y_train
    parts = partition_indices(labels, 10, scheme="shards", seed=0)
    distinct = [len(np.unique(labels[p])) for p in parts]
    assert np.mean(distinct) <= 3 and max(distinct) <= 4
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 2  # two equal-size shards each


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_partitions": 3, "scheme": "random"}, "valid choices: iid, dirichlet, shards"),
        ({"num_partitions": 0, "scheme": "iid"}, "between 1 and"),
        ({"num_partitions": 11, "scheme": "iid"}, "between 1 and the number of samples"),
        ({"num_partitions": 2.5, "scheme": "iid"}, "integer"),
        ({"num_partitions": 2, "scheme": "dirichlet", "alpha": 0.0}, "alpha"),
        ({"num_partitions": 2, "scheme": "dirichlet", "alpha": float("nan")}, "alpha"),
        ({"num_partitions": 2, "scheme": "iid", "seed": -3}, "seed"),
    ],
)
def test_partition_errors_explain(kwargs, fragment):
    with pytest.raises(DataError, match=fragment):
        partition_indices(np.arange(10) % 3, **kwargs)


def test_partition_rejects_non_integer_labels():
    with pytest.raises(DataError, match="1-D integer"):
        partition_indices(np.zeros((4, 2), dtype=int), 2, scheme="iid")
    with pytest.raises(DataError, match="1-D integer"):
        partition_indices(np.zeros(4), 2, scheme="iid")


def test_load_partition_returns_that_clients_train_samples():
    ds = load_dataset("digits")
    kwargs = {"scheme": "dirichlet", "alpha": 0.5, "seed": 0}
    parts = partition_indices(ds.y_train, 5, **kwargs)
    pieces = [load_partition(ds, pid, 5, **kwargs) for pid in range(5)]
    for (x, y), idx in zip(pieces, parts, strict=True):
        assert x.flags.writeable and x.flags.c_contiguous and x.dtype == np.float32
        np.testing.assert_array_equal(x, ds.x_train[idx])
        np.testing.assert_array_equal(y, ds.y_train[idx])
    assert sum(len(y) for _, y in pieces) == len(ds.y_train)


@pytest.mark.parametrize("pid", [-1, 5, 1.0])
def test_load_partition_rejects_bad_ids(pid):
    with pytest.raises(DataError, match="partition_id"):
        load_partition(load_dataset("digits"), pid, 5, scheme="iid", alpha=0.5, seed=0)


def test_load_partition_splits_once_per_labels_and_arguments(monkeypatch):
    data.clear_cache()
    ds = load_dataset("digits")
    calls = []
    real = data.partition_indices
    monkeypatch.setattr(data, "partition_indices", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    kwargs = {"scheme": "iid", "alpha": 0.5, "seed": 0}
    first = [load_partition(ds, pid, 1000, **kwargs) for pid in range(0, 1000, 97)]
    again = load_partition(ds, 97, 1000, **kwargs)
    assert calls == [1000]  # one split for every call with these arguments
    np.testing.assert_array_equal(again[1], first[1][1])
    again[0][:] = 0  # the caller's own copy: the next call is unaffected
    assert load_partition(ds, 97, 1000, **kwargs)[0].any()
    load_partition(ds, 0, 1000, **{**kwargs, "seed": 1})
    other = data.Dataset(ds.name, ds.x_train, ds.y_train.copy(), ds.x_test, ds.y_test, ds.num_classes)
    load_partition(other, 0, 1000, **kwargs)
    assert calls == [1000, 1000, 1000]  # another seed, another labels array: split again
