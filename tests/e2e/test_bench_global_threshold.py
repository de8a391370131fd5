"""benchmarks/global_threshold.py --quick: JSON lines only on stdout, per /work/shared/BENCHMARKS.md."""
from pathlib import Path

import pytest
from benchjson import check_convention, run_quick

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "global_threshold.py"
UNITS = {"time_s": "s", "extra_rss_frac": "frac", "peak_rss_mb": "MB", "size_bytes": "bytes"}
PEER = "torch.nn.utils.prune"


@pytest.fixture(scope="module")
def run():
    return run_quick(SCRIPT.name)


def test_every_line_follows_the_convention(records):
    for rec in records:
        check_convention(rec, "global_threshold", UNITS)
        if "peer" in rec:
            assert "peer_value" in rec and "ratio" in rec, rec
        for key in ("n", "threads", "seed"):
            if key in rec:
                assert isinstance(rec[key], int), rec


def test_required_metrics_present_with_peer(records):
    metrics = {r["metric"] for r in records}
    assert {"time_s", "extra_rss_frac", "peak_rss_mb"} <= metrics
    for metric in ("time_s", "extra_rss_frac", "peak_rss_mb"):
        assert any(r["metric"] == metric and r.get("peer") == PEER for r in records), metric


def test_time_lines_have_peer_and_consistent_ratio(records):
    timed = [r for r in records if r["metric"] == "time_s" and not r["case"].endswith("/plan_only")]
    assert timed
    for r in timed:
        assert r["peer"] == PEER
        assert r["value"] > 0 and r["peer_value"] > 0
        assert r["ratio"] == pytest.approx(r["peer_value"] / r["value"], rel=1e-6)
        assert r["n"] >= 2 and r["threads"] >= 1 and r["seed"] == 0
        assert r["case"].endswith("/amount=0.5")


def test_memory_lines(records):
    for r in records:
        if r["metric"] == "peak_rss_mb":
            assert r["value"] > 0
        if r["metric"] in ("peak_rss_mb", "extra_rss_frac") and "peer" in r and r["ratio"] is not None:
            assert r["ratio"] == pytest.approx(r["peer_value"] / r["value"], rel=1e-6)


def test_no_correctness_warnings(run):
    # both methods prune exactly round(0.5 * N) weights and agree up to ties
    assert "WARNING" not in run.stderr, run.stderr[-3000:]
