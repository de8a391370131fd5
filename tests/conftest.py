"""Shared fixtures: small deterministic models, a private cache dir, no progress bars."""
import os

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _quiet_and_private(tmp_path_factory, monkeypatch):
    # tests never touch the user's cache and never draw progress bars
    monkeypatch.setenv("PRUNEKIT_PROGRESS", "0")
    if "PRUNEKIT_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny kernels only spin-wait on a second thread of a busy machine
    (several times slower); the previous setting comes back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                         nn.Linear(16, 10))


def make_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 10))


@pytest.fixture
def mlp():
    return make_mlp()


@pytest.fixture
def cnn():
    return make_cnn()


@pytest.fixture
def mlp_factory():
    return make_mlp


@pytest.fixture
def cnn_factory():
    return make_cnn


def _fake_time(times, key, batch):
    """``times(key, batch)``; packed formats (and whole-model options) a test's table does not list are never
    the fastest, so tables written before them keep their meaning."""
    try:
        return times(key, batch)
    except KeyError:
        if key == "model:as measured":
            return 1.0
        if key.startswith(("packed_", "model:")):
            return 1e9
        raise


@pytest.fixture
def fake_ladder(monkeypatch):
    """Replace prunekit.deploy.sparse's timer by ``times(key, batch) -> ms`` and record the batch of every candidate
    set timed; returns that list. Keys: "d_<dense form>" and "<sparse kernel>" for one layer, and
    "model:<option>" ("as measured", "native", "native_simd") for the whole-model native-loop check."""
    from prunekit.deploy import sparse
    calls = []
    real = sparse._linear_candidates

    def spy(w, b, x2, **kw):
        calls.append(x2.shape[0])
        return real(w, b, x2, **kw)

    def install(times):
        def timer(fns, repeat, warmup=2, evict=None):
            for f in fns.values():  # still run them: the code paths must work
                f()
            whole = "as measured" in fns
            return {k: _fake_time(times, f"model:{k}" if whole else k.removeprefix("s_"), calls[-1] if calls else None)
                    for k in fns}
        monkeypatch.setattr(sparse, "_median_ms", timer)
        monkeypatch.setattr(sparse, "_linear_candidates", spy)
        return calls
    return install
