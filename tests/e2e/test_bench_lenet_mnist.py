"""benchmarks/lenet_mnist.py --quick: JSON lines only on stdout, per /work/shared/BENCHMARKS.md."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "lenet_mnist.py"
REQUIRED = ("bench", "case", "metric", "value", "unit")
UNITS = {"accuracy": "frac", "accuracy_drop_pp": "pp", "sparsity": "frac", "nonzeros": "count",
         "compression_ratio": "x", "compression_ratio_pruned": "x", "time_s": "s"}
METHODS = {"oneshot_l1", "global_l1", "structured_l1", "random", "iterative", "gradual_cubic"}
POINT = re.compile(r"^lenet300/(?P<method>[a-z0-9_]+)/sparsity=(?P<s>0\.\d+)/seed=(?P<seed>\d+)$")
MEDIAN = re.compile(r"^lenet300/(?P<method>[a-z0-9_]+)/sparsity=(?P<s>0\.\d+)/median$")
DENSE = re.compile(r"^lenet300/dense/(seed=(?P<seed>\d+)|median)$")


@pytest.fixture(scope="module")
def run():
    # env copied so that the test's private PRUNEKIT_CACHE_DIR (conftest) applies to the child
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))
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
        assert rec["bench"] == "lenet_mnist"
        assert isinstance(rec["case"], str) and rec["case"]
        assert isinstance(rec["value"], (int, float)) and not isinstance(rec["value"], bool)
        assert math.isfinite(rec["value"]), rec
        if rec["metric"] in UNITS:
            assert rec["unit"] == UNITS[rec["metric"]], rec
        for key in ("n", "threads", "seed"):
            if key in rec:
                assert isinstance(rec[key], int) and not isinstance(rec[key], bool), rec
        assert (POINT.match(rec["case"]) or MEDIAN.match(rec["case"]) or DENSE.match(rec["case"])
                or rec["case"] == "lenet300/total"), rec["case"]


def test_required_metrics_and_every_method(records):
    metrics = {r["metric"] for r in records}
    assert {"accuracy", "accuracy_drop_pp"} <= metrics
    methods = {POINT.match(r["case"])["method"] for r in records if POINT.match(r["case"])}
    assert methods == METHODS


def test_points_have_seed_in_case_and_key(records):
    points = [r for r in records if POINT.match(r["case"])]
    assert points
    for r in points:
        m = POINT.match(r["case"])
        assert r["seed"] == int(m["seed"]) == 0  # --quick: one seed, the default first seed 0
        assert 0.0 < float(m["s"]) < 1.0


def test_values_in_range_and_drop_consistent(records):
    dense = {int(DENSE.match(r["case"])["seed"]): r["value"] for r in records
             if r["metric"] == "accuracy" and DENSE.match(r["case"]) and DENSE.match(r["case"])["seed"]}
    assert set(dense) == {0}
    acc = {r["case"]: r["value"] for r in records if r["metric"] == "accuracy"}
    for r in records:
        if r["metric"] == "accuracy":
            assert 0.0 <= r["value"] <= 1.0, r
        if r["metric"] == "sparsity":
            assert 0.0 <= r["value"] < 1.0, r
        if r["metric"] == "accuracy_drop_pp":
            assert -100.0 <= r["value"] <= 100.0, r
            m = POINT.match(r["case"])
            if m:
                want = 100.0 * (dense[int(m["seed"])] - acc[r["case"]])
                assert r["value"] == pytest.approx(want, abs=1e-3), r
        if r["metric"] in ("compression_ratio", "compression_ratio_pruned"):
            assert r["value"] >= 1.0, r


def test_targets_are_reached(records):
    """Unstructured points reach their target over the pruned layers (fc1, fc2): 95% is 20x there."""
    for r in records:
        m = POINT.match(r["case"])
        if m and r["metric"] == "sparsity" and m["method"] != "structured_l1":
            assert r["value"] == pytest.approx(float(m["s"]), abs=1e-3), r
        if m and r["metric"] == "compression_ratio_pruned" and m["s"] == "0.95":
            assert r["value"] == pytest.approx(20.0, rel=1e-3), r


def test_medians_have_n(records):
    medians = [r for r in records if MEDIAN.match(r["case"]) or r["case"] == "lenet300/dense/median"]
    assert medians
    assert {r["metric"] for r in medians} >= {"accuracy", "accuracy_drop_pp"}
    for r in medians:
        assert r["n"] == 1
        assert "seed" not in r
