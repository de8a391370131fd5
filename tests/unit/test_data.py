"""Tests for prunekit.data: safe unpickling, MNIST loading and caching, IDX, digits, TensorLoader."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from prunekit.zoo import data


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private cache dir, so tests never touch ~/.cache."""
    d = tmp_path / "cache"
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(d))
    return d


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory):
    """Build the MNIST cache once for the module (unpickling takes a few seconds)."""
    d = tmp_path_factory.mktemp("mnist_cache")
    data.load_mnist("test", cache_dir=d)
    return d


# --------------------------------------------------------------------------- unpickler
class _Evil:
    """Pickles to a call of os.system: what a tampered data file could contain."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        data.restricted_load(io.BytesIO(payload))
    assert not marker.exists()


def test_restricted_unpickler_refuses_other_globals():
    payload = pickle.dumps(Path("x"), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.restricted_load(io.BytesIO(payload))


def test_restricted_unpickler_loads_numpy_arrays():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    # Protocol 3 stores bytes natively (protocol 2 on Python 3 would need _codecs.encode).
    out = data.restricted_load(io.BytesIO(pickle.dumps((arr, np.array([1, 2])), protocol=3)))
    np.testing.assert_array_equal(out[0], arr)
    assert out[0].dtype == np.float32


def test_restricted_unpickler_maps_numpy1_module_path():
    # Pickles written by numpy 1 name numpy.core.multiarray; it must still resolve.
    obj = data.RestrictedUnpickler(io.BytesIO(b"")).find_class("numpy.core.multiarray", "_reconstruct")
    assert obj.__name__ == "_reconstruct"


# --------------------------------------------------------------------------- MNIST
def test_mnist_pkl_path_found():
    path = data.mnist_pkl_path()
    assert path.name == "mnist.pkl.gz" and path.is_file()


def test_mnist_loads_and_checks(mnist_cache):
    xtr, ytr = data.load_mnist("train", cache_dir=mnist_cache)
    xte, yte = data.load_mnist("test", cache_dir=mnist_cache)
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int64
    assert len(ytr) == 60000 and len(yte) == 10000
    assert set(np.unique(yte)) == set(range(10))
    x50, _ = data.load_mnist("train50k", cache_dir=mnist_cache)
    xval, _ = data.load_mnist("val", cache_dir=mnist_cache)
    assert len(x50) == 50000 and len(xval) == 10000
    np.testing.assert_array_equal(xval, xtr[50000:])
    # Mean pixel over all 70k is the well-known 33.3.
    mean = (xtr.astype(np.float64).sum() + xte.astype(np.float64).sum()) / (70000 * 784)
    assert abs(mean - 33.3) < 1.5
    assert list(mnist_cache.glob("*.npz"))


def test_mnist_unknown_split(mnist_cache):
    with pytest.raises(ValueError, match="train50k"):
        data.load_mnist("validation", cache_dir=mnist_cache)


def test_mnist_cache_reused_without_unpickling(mnist_cache, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("unpickled although the cache exists")

    monkeypatch.setattr(data, "_read_mnist_pkl", boom)
    monkeypatch.setattr(data, "restricted_load", boom)
    x, y = data.load_mnist("test", cache_dir=mnist_cache)
    assert x.shape == (10000, 28, 28)


def test_mnist_corrupt_cache_is_rebuilt(mnist_cache, cache_dir, monkeypatch):
    good = next(mnist_cache.glob("*.npz"))
    cache_dir.mkdir()
    bad = cache_dir / good.name
    bad.write_bytes(good.read_bytes()[:1000])  # a truncated zip
    calls = []
    real = data._read_mnist_pkl

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(data, "_read_mnist_pkl", counting)
    x, y = data.load_mnist("test")  # no cache_dir: found through $PRUNEKIT_CACHE_DIR
    assert calls, "corrupt cache should trigger a rebuild from the pickle"
    assert x.shape == (10000, 28, 28)
    with np.load(bad, allow_pickle=False) as z:
        assert z["images"].shape == (70000, 28, 28)
    assert not list(cache_dir.glob("*.tmp"))  # the atomic write left no temp file
    data.load_mnist("test")
    assert len(calls) == 1  # and the rebuilt cache is used from then on


def test_mnist_bad_data_rejected():
    x = np.zeros((70000, 28, 28), np.uint8)
    y = np.arange(70000, dtype=np.int64) % 10
    with pytest.raises(ValueError, match="mean pixel"):
        data._check_mnist(x, y, "fake")
    with pytest.raises(ValueError, match="0..9"):
        data._check_mnist(x + 33, y + 1, "fake")


def test_default_cache_dir_env(cache_dir):
    assert data.default_cache_dir() == cache_dir


def test_get_loaders_mnist(mnist_cache):
    train, test, info = data.get_loaders("mnist", batch_size=64, root=mnist_cache, limit_train=256, limit_test=100)
    assert info["num_classes"] == 10 and info["input_shape"] == (1, 28, 28)
    assert info["n_train"] == 256 and info["n_test"] == 100
    xb, yb = next(iter(train))
    assert xb.shape == (64, 1, 28, 28) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert len(train) == 4 and len(test) == 1
    # Normalised with the MNIST constants: background pixels map to -mean/std.
    assert xb.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    full_train, _, full_info = data.get_loaders("mnist", root=mnist_cache)
    assert full_info["n_train"] == 60000 and full_info["n_test"] == 10000
    assert data.example_batch(info, 3).shape == (3, 1, 28, 28)


def test_get_loaders_unknown():
    with pytest.raises(ValueError, match="digits"):
        data.get_loaders("cifar")


# --------------------------------------------------------------------------- IDX
def _write_idx(path: Path, arr: np.ndarray, code: int = 0x08, gz: bool = False) -> None:
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(">u1").tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _write_idx_dir(d: Path, gz: bool = False) -> tuple:
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (12, 5, 6), dtype=np.uint8)
    ytr = np.arange(12, dtype=np.uint8) % 3
    xte = rng.integers(0, 256, (4, 5, 6), dtype=np.uint8)
    yte = np.array([2, 1, 0, 1], dtype=np.uint8)
    sfx = ".gz" if gz else ""
    _write_idx(d / f"train-images-idx3-ubyte{sfx}", xtr, gz=gz)
    _write_idx(d / f"train-labels-idx1-ubyte{sfx}", ytr, gz=gz)
    _write_idx(d / f"t10k-images-idx3-ubyte{sfx}", xte, gz=gz)
    _write_idx(d / f"t10k-labels-idx1-ubyte{sfx}", yte, gz=gz)
    return xtr, ytr, xte, yte


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    xtr, ytr, xte, yte = _write_idx_dir(tmp_path, gz=gz)
    x, y = data.load_idx_dir(tmp_path, "train")
    np.testing.assert_array_equal(x, xtr)
    np.testing.assert_array_equal(y, ytr)
    assert y.dtype == np.int64
    x, y = data.load_idx_dir(tmp_path, "test")
    np.testing.assert_array_equal(x, xte)
    np.testing.assert_array_equal(y, yte)


def test_idx_get_loaders(tmp_path):
    _write_idx_dir(tmp_path)
    train, test, info = data.get_loaders(f"idx:{tmp_path}", batch_size=5)
    assert info["input_shape"] == (1, 5, 6) and info["num_classes"] == 3
    assert info["n_train"] == 12 and info["n_test"] == 4 and len(train) == 3
    xs = torch.cat([xb for xb, _ in train])
    assert abs(xs.mean().item()) < 1e-4 and xs.std().item() == pytest.approx(1.0, abs=0.05)


def test_idx_bad_magic(tmp_path):
    _write_idx_dir(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte"
    raw = bytearray(bad.read_bytes())
    raw[0:4] = b"\x12\x34\x08\x03"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*magic"):
        data.load_idx_dir(tmp_path, "train")


def test_idx_size_mismatch_and_wrong_kind(tmp_path):
    _write_idx_dir(tmp_path)
    f = tmp_path / "t10k-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.*size"):
        data.load_idx_dir(tmp_path, "test")
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((12, 2), np.uint8))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
        data.load_idx_dir(tmp_path, "train")


def test_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load_idx_dir(tmp_path, "train")


# --------------------------------------------------------------------------- digits
def test_digits_split():
    pytest.importorskip("sklearn")
    xtr, ytr = data.load_digits_split("train", seed=0)
    xte, yte = data.load_digits_split("test", seed=0)
    assert xtr.shape[1:] == (1, 8, 8) and xtr.dtype == np.float32
    assert len(xtr) + len(xte) == 1797 and len(xte) == 359
    assert xtr.min() >= 0.0 and xtr.max() <= 1.0
    again, _ = data.load_digits_split("train", seed=0)
    np.testing.assert_array_equal(again, xtr)
    other, _ = data.load_digits_split("train", seed=1)
    assert not np.array_equal(other, xtr)


def test_get_loaders_digits():
    pytest.importorskip("sklearn")
    train, test, info = data.get_loaders("digits", batch_size=32, limit_test=50)
    assert info["input_shape"] == (1, 8, 8) and info["num_classes"] == 10
    assert info["n_train"] == 1438 and info["n_test"] == 50
    xb, yb = next(iter(train))
    assert xb.shape == (32, 1, 8, 8) and yb.shape == (32,)


# --------------------------------------------------------------------------- TensorLoader
def _epoch_labels(loader) -> torch.Tensor:
    return torch.cat([yb for _, yb in loader])


def test_tensor_loader_deterministic_and_reshuffles():
    x = torch.arange(100, dtype=torch.float32).unsqueeze(1)
    y = torch.arange(100)
    a = data.TensorLoader(x, y, batch_size=16, shuffle=True, seed=3)
    b = data.TensorLoader(x, y, batch_size=16, shuffle=True, seed=3)
    a1, a2 = _epoch_labels(a), _epoch_labels(a)
    b1, b2 = _epoch_labels(b), _epoch_labels(b)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # same seed, same orders
    assert not torch.equal(a1, a2)  # a new order every epoch
    for order in (a1, a2):  # each example exactly once per epoch
        assert torch.equal(order.sort().values, y)
    c1 = _epoch_labels(data.TensorLoader(x, y, batch_size=16, shuffle=True, seed=4))
    assert not torch.equal(a1, c1)
    # x and y stay aligned after shuffling.
    for xb, yb in data.TensorLoader(x, y, batch_size=16, shuffle=True, seed=3):
        assert torch.equal(xb.squeeze(1).long(), yb)
    a.set_epoch(1)
    assert torch.equal(_epoch_labels(a), a2)


def test_tensor_loader_len_and_drop_last():
    x, y = torch.zeros(10, 2), torch.arange(10)
    loader = data.TensorLoader(x, y, batch_size=4)
    assert len(loader) == 3 and [len(yb) for _, yb in loader] == [4, 4, 2]
    assert torch.equal(_epoch_labels(loader), y)  # no shuffle: original order
    dropping = data.TensorLoader(x, y, batch_size=4, drop_last=True, shuffle=True)
    assert len(dropping) == 2 and [len(yb) for _, yb in dropping] == [4, 4]
    assert len(loader.dataset) == 10
    with pytest.raises(ValueError):
        data.TensorLoader(x, y[:5], batch_size=4)
