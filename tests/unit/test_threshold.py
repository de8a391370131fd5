import math

import pytest
import torch

import prunekit.select.threshold as T
from prunekit.bits import unpack_bits
from prunekit.criteria.score import Elementwise
from prunekit.select.threshold import kth_smallest, masks_from_threshold


def _sources(tensors):
    return [(lambda t=t: t) for t in tensors]


def _check_exact(tensors, k):
    srcs = _sources(tensors)
    thr = kth_smallest(srcs, k)
    keeps = [unpack_bits(bits, t.numel()) for (bits, _), t in zip(masks_from_threshold(srcs, thr), tensors)]
    counts = [n for _, n in masks_from_threshold(srcs, thr)]
    assert sum(counts) == k
    pruned_vals = torch.cat([t.reshape(-1)[~m.reshape(-1)] for t, m in zip(tensors, keeps)])
    kept_vals = torch.cat([t.reshape(-1)[m.reshape(-1)] for t, m in zip(tensors, keeps)])
    assert pruned_vals.numel() == k
    if k and kept_vals.numel():
        assert pruned_vals.max() <= kept_vals.min()
    if k:
        ref = torch.cat([t.reshape(-1) for t in tensors]).double().sort().values[k - 1]
        assert thr.value == float(ref) or (math.isinf(thr.value) and math.isinf(float(ref)))


@pytest.mark.parametrize("k", [0, 1, 7, 1000, 60000, 63150])
def test_exact_kth_on_mixed_tensors(k):
    torch.manual_seed(0)
    tensors = [torch.randn(200, 300).abs(), torch.randn(50), torch.zeros(100), torch.randn(3000)]
    _check_exact(tensors, k)


@pytest.mark.parametrize("k", [1, 100000, 150001, 300000])
def test_heavy_ties_prune_exactly_k(k):
    torch.manual_seed(1)
    _check_exact([torch.randint(0, 3, (100000,)).float() for _ in range(3)], k)


def test_minus_infinity_marks_already_pruned():
    t = torch.randn(1000)
    t[:100] = -math.inf
    for k in (50, 100, 101, 400):
        _check_exact([t], k)


@pytest.mark.parametrize("k", [1, 777, 30000, 60000])
def test_histogram_fallback_is_exact(monkeypatch, k):
    # a tiny gather budget forces the slow, always-terminating path
    monkeypatch.setattr(T, "_MAX_GATHER", 100)
    torch.manual_seed(2)
    _check_exact([torch.randn(200, 300).abs(), torch.randn(3000)], k)


def test_histogram_fallback_with_adjacent_floats(monkeypatch):
    monkeypatch.setattr(T, "_MAX_GATHER", 100)
    one = torch.tensor(1.0)
    nxt = float(torch.nextafter(one, torch.tensor(2.0)))
    t = torch.cat([torch.full((5000,), 1.0), torch.full((5000,), nxt)])
    for k in (1, 5000, 5001, 10000):
        _check_exact([t], k)


def test_elementwise_source_matches_plain_source():
    torch.manual_seed(3)
    w = [torch.randn(300, 500), torch.randn(1000)]
    plain = [(lambda t=t: t.abs()) for t in w]
    chunked = [Elementwise(t, lambda c, out: torch.abs(c, out=out)) for t in w]
    assert kth_smallest(plain, 12345) == kth_smallest(chunked, 12345)


def test_nan_and_bad_k_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        kth_smallest([lambda: torch.tensor([1.0, float("nan"), 2.0])], 1)
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\]"):
        kth_smallest([lambda: torch.ones(3)], 4)
