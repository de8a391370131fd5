"""benchmarks/masked_latency.py --quick: JSON lines only on stdout, per /work/shared/BENCHMARKS.md."""
from benchjson import check_convention, json_records, run_quick


def test_masked_latency_quick_prints_json_lines():
    rows = json_records(run_quick("masked_latency.py").stdout)
    for r in rows:
        check_convention(r, "masked_latency", {"latency_ms": "ms"})
        assert r["metric"] == "latency_ms" and r["value"] > 0
        assert abs(r["ratio"] - r["peer_value"] / r["value"]) < 1e-9
        assert "sparsity=0.9/batch=" in r["case"]
    assert {r["peer"] for r in rows} == {"torch.nn.utils.prune", "dense"}
