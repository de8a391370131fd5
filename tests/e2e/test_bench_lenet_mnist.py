"""benchmarks/lenet_mnist.py --quick: JSON lines only on stdout, per /work/shared/BENCHMARKS.md."""
import re
from pathlib import Path

import pytest
from benchjson import check_convention, run_quick

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "lenet_mnist.py"
UNITS = {"accuracy": "frac", "accuracy_drop_pp": "pp", "sparsity": "frac", "nonzeros": "count",
         "compression_ratio": "x", "compression_ratio_pruned": "x", "time_s": "s"}
METHODS = {"oneshot_l1", "global_l1", "structured_l1", "random", "iterative", "gradual_cubic"}
POINT = re.compile(r"^lenet300/(?P<method>[a-z0-9_]+)/sparsity=(?P<s>0\.\d+)/seed=(?P<seed>\d+)$")
MEDIAN = re.compile(r"^lenet300/(?P<method>[a-z0-9_]+)/sparsity=(?P<s>0\.\d+)/median$")
DENSE = re.compile(r"^lenet300/dense/(seed=(?P<seed>\d+)|median)$")
CONTROL = re.compile(r"^lenet300/dense_retrained/(seed=\d+|median)$")


@pytest.fixture(scope="module")
def run():
    return run_quick(SCRIPT.name)


def test_every_line_follows_the_convention(records):
    for rec in records:
        check_convention(rec, "lenet_mnist", UNITS)
        for key in ("n", "threads", "seed"):
            if key in rec:
                assert isinstance(rec[key], int) and not isinstance(rec[key], bool), rec
        assert (POINT.match(rec["case"]) or MEDIAN.match(rec["case"]) or DENSE.match(rec["case"])
                or CONTROL.match(rec["case"]) or rec["case"] == "lenet300/total"), rec["case"]


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
