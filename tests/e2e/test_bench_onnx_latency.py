"""benchmarks/onnx_latency.py --quick: JSON lines only on stdout, per /work/shared/BENCHMARKS.md."""
import pytest
from benchjson import check_convention, run_quick

pytestmark = pytest.mark.slow  # a subprocess that imports torch, exports and times two models: ~10 s

UNITS = {"latency_ms": "ms", "cpu_ms": "ms", "speedup": "x", "max_abs_diff": "abs", "size_bytes": "bytes"}
BATCHES = [1, 4]


@pytest.fixture(scope="module")
def run():
    pytest.importorskip("onnxruntime")
    return run_quick("onnx_latency.py")


def _index(records):
    """{(case, metric, batch, peer): record}, failing on duplicates."""
    out = {}
    for r in records:
        key = (r["case"], r["metric"], r.get("batch"), r.get("peer"))
        assert key not in out, key
        out[key] = r
    return out


def test_every_line_follows_the_convention(records):
    for r in records:
        check_convention(r, "onnx_latency", UNITS)
        assert r["metric"] in UNITS, r
        assert r["value"] >= 0, r
        assert r["case"].endswith("/dense") or "/ratio=" in r["case"], r
        if r["metric"] in ("latency_ms", "cpu_ms", "speedup", "max_abs_diff"):
            assert r["batch"] in BATCHES, r
        if "peer" in r:
            assert r["peer"] in ("dense", "torch"), r
            higher_is_better = r["metric"] == "speedup"
            expected = r["value"] / r["peer_value"] if higher_is_better else r["peer_value"] / r["value"]
            assert abs(r["ratio"] - expected) < 1e-9, r
    assert {r["metric"] for r in records} == set(UNITS)


def test_numbers_fit_together(records):
    idx = _index(records)
    models = {r["case"].split("/")[0] for r in records}
    assert models == {"vgg_tiny"}
    for model in models:
        dense_size = idx[(f"{model}/dense", "size_bytes", None, None)]["value"]
        pruned = sorted({r["case"] for r in records if r["case"].startswith(f"{model}/ratio=")})
        assert pruned == [f"{model}/ratio=0.5"]
        for case in pruned:
            size = idx[(case, "size_bytes", None, "dense")]
            assert size["peer_value"] == dense_size and size["value"] < 0.6 * dense_size  # half the channels
        for b in BATCHES:
            dense = idx[(f"{model}/dense", "latency_ms", b, "torch")]
            assert dense["value"] > 0 and dense["peer_value"] > 0
            assert idx[(f"{model}/dense", "max_abs_diff", b, None)]["value"] <= 1e-4
            for case in pruned:
                assert idx[(case, "max_abs_diff", b, None)]["value"] <= 1e-4
                vs_dense = idx[(case, "latency_ms", b, "dense")]
                vs_torch = idx[(case, "latency_ms", b, "torch")]
                assert vs_dense["peer_value"] == dense["value"] and vs_torch["value"] == vs_dense["value"]
                speedup = idx[(case, "speedup", b, None)]["value"]
                assert abs(speedup - dense["value"] / vs_dense["value"]) < 1e-9
                torch_speedup = idx[(case, "speedup", b, "torch")]
                assert torch_speedup["value"] == speedup
                assert abs(torch_speedup["peer_value"] - dense["peer_value"] / vs_torch["peer_value"]) < 1e-9
                cpu_dense = idx[(f"{model}/dense", "cpu_ms", b, "torch")]
                cpu = idx[(case, "cpu_ms", b, "dense")]
                assert cpu["peer_value"] == cpu_dense["value"] > 0 and idx[(case, "cpu_ms", b, "torch")]["value"] > 0
