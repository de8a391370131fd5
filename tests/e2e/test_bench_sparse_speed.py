"""benchmarks/sparse_speed.py --quick: JSON lines only on stdout, per /work/shared/BENCHMARKS.md."""
import re

import pytest
from benchjson import check_convention, run_quick

UNITS = {"size_ratio": "x", "latency_ms": "ms", "speedup": "x", "break_even_sparsity": "frac"}
QUICK_BATCHES = [1, 8]
QUICK_SPARSITIES = ["0.5", "0.9"]


@pytest.fixture(scope="module")
def run():
    return run_quick("sparse_speed.py")


def test_every_line_follows_the_convention(records):
    for r in records:
        check_convention(r, "sparse_speed", UNITS)
        assert r["metric"] in UNITS, r
        assert r["value"] > 0 and isinstance(r["threads"], int) and r["threads"] >= 1, r
        if "peer" in r:
            assert r["peer"] == "dense" and r["peer_value"] > 0, r
    assert {r["metric"] for r in records} == set(UNITS)


def one(records, case, metric):
    hits = [r for r in records if r["case"] == case and r["metric"] == metric]
    assert len(hits) == 1, (case, metric, hits)
    return hits[0]


def test_size_ratio_meets_the_goal_at_90_percent(records):
    sizes = [r for r in records if r["metric"] == "size_ratio"]
    assert sorted(r["case"].split("=")[1] for r in sizes) == QUICK_SPARSITIES
    for r in sizes:
        assert r["value"] == pytest.approx(r["dense_bytes"] / r["compressed_bytes"])
        if r["case"].endswith("sparsity=0.9"):
            assert r["value"] >= 5.0, r  # bytes, not timings: deterministic
        else:
            assert 1.5 < r["value"] < 2.5, r  # 50%: about 32 / (1 + 16) bits per weight


def test_end_to_end_latency_and_speedup_agree(records):
    cases = sorted({r["case"] for r in records if r["metric"] == "latency_ms"})
    assert len(cases) == len(QUICK_SPARSITIES) * len(QUICK_BATCHES)
    for case in cases:
        m = re.fullmatch(r"mlp4x(\d+)/sparsity=([\d.]+)/batch=(\d+)", case)
        assert m, case
        lat, speed = one(records, case, "latency_ms"), one(records, case, "speedup")
        assert lat["batch"] == speed["batch"] == int(m.group(3))
        assert lat["ratio"] == pytest.approx(lat["peer_value"] / lat["value"])
        assert speed["value"] == pytest.approx(lat["ratio"]) and speed["peer_value"] == 1.0
        assert lat["dense_form"] in ("linear", "addmm_t", "matmul_t")
        assert 0 <= lat["layers_sparse"] <= 4 and lat["n"] >= 3
        kernels = [k for k in lat["kernels"].split(",") if k]
        assert set(kernels) <= {"linear", "mm", "native", "native_simd"} and bool(kernels) == (lat["layers_sparse"] > 0), lat


def test_break_even_per_layer_shape_and_batch(records):
    breaks = [r for r in records if r["metric"] == "break_even_sparsity"]
    assert sorted(r["batch"] for r in breaks) == QUICK_BATCHES
    for r in breaks:
        assert re.fullmatch(r"linear(\d+)x\1/batch=\d+", r["case"]), r
        assert r["bound"] in ("exact", "below", "above")
        assert 0.5 <= r["value"] <= 0.9
        shape = r["case"].split("/")[0]
        layer = [x for x in records if x["metric"] == "speedup" and x["case"].startswith(shape + "/sparsity=")
                 and x["batch"] == r["batch"]]
        assert len(layer) == len(QUICK_SPARSITIES)
        by_sparsity = {float(x["case"].split("=")[1].split("/")[0]): x for x in layer}
        for x in layer:
            assert x["value"] == pytest.approx(x["dense_ms"] / x["sparse_ms"])
        # the bound must agree with the per-sparsity speedups it was computed from
        fast = [s for s, x in by_sparsity.items() if x["value"] >= 1.0]
        if r["bound"] == "above":
            assert by_sparsity[max(by_sparsity)]["value"] < 1.0
        elif r["bound"] == "below":
            assert len(fast) == len(by_sparsity)
        else:
            assert min(by_sparsity) < r["value"] <= max(by_sparsity)
