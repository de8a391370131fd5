"""benchmarks/global_threshold.py --quick: JSON lines only on stdout, per /work/shared/BENCHMARKS.md."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "global_threshold.py"
REQUIRED = ("bench", "case", "metric", "value", "unit")
UNITS = {"time_s": "s", "extra_rss_frac": "frac", "peak_rss_mb": "MB", "size_bytes": "bytes"}
PEER = "torch.nn.utils.prune"


@pytest.fixture(scope="module")
def run():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def records(run):
    lines = run.stdout.splitlines()
    assert lines, "no output on stdout"
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"stdout line is not JSON: {line!r}")
        assert isinstance(rec, dict), line
        out.append(rec)
    return out


def test_every_line_follows_the_convention(records):
    for rec in records:
        for key in REQUIRED:
            assert key in rec, (key, rec)
        assert rec["bench"] == "global_threshold"
        assert isinstance(rec["case"], str) and rec["case"]
        assert isinstance(rec["value"], (int, float)) and not isinstance(rec["value"], bool)
        assert math.isfinite(rec["value"])
        if rec["metric"] in UNITS:
            assert rec["unit"] == UNITS[rec["metric"]], rec
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
