"""benchmarks/structured_accuracy.py --quick: JSON lines per /work/shared/BENCHMARKS.md, the peer in the same run."""
import importlib.util

import pytest
from benchjson import check_convention, run_quick

UNITS = {"accuracy": "frac", "accuracy_drop_pp": "pp", "macs": "count", "params": "count", "time_s": "s"}
HAS_TP = importlib.util.find_spec("torch_pruning") is not None


@pytest.fixture(scope="module")
def run():
    return run_quick("structured_accuracy.py")


def test_lines_follow_the_convention(records):
    for r in records:
        check_convention(r, "structured_accuracy", UNITS)
        assert r["metric"] in UNITS and r["value"] >= 0
    dense = {r["metric"]: r["value"] for r in records if r["case"] == "vgg_mnist/dense/seed=0"}
    assert set(dense) == {"accuracy", "macs", "params"} and 0 < dense["accuracy"] <= 1
    pruned = [r for r in records if r["case"] == "vgg_mnist/ratio=0.5/seed=0"]
    by_metric = {r["metric"]: r for r in pruned}
    assert {"accuracy", "macs", "params", "time_s"} <= set(by_metric)
    assert by_metric["macs"]["value"] < dense["macs"] and by_metric["params"]["value"] < dense["params"]
    if "accuracy_drop_pp" in by_metric:
        drop = by_metric["accuracy_drop_pp"]["value"]
        assert abs(drop - 100 * (dense["accuracy"] - by_metric["accuracy"]["value"])) < 1e-9


@pytest.mark.skipif(not HAS_TP, reason="torch-pruning (benchmark-only peer) not installed")
def test_torch_pruning_is_measured_side_by_side(records):
    pruned = {r["metric"]: r for r in records if r["case"] == "vgg_mnist/ratio=0.5/seed=0"}
    for metric in ("accuracy", "macs", "params", "time_s"):
        r = pruned[metric]
        assert r["peer"] == "torch-pruning" and r["peer_value"] > 0
        want = r["value"] / r["peer_value"] if metric == "accuracy" else r["peer_value"] / r["value"]
        assert abs(r["ratio"] - want) < 1e-9
    # same criterion, ratio and round_to: the same channels count, so the same MACs
    assert pruned["macs"]["value"] == pruned["macs"]["peer_value"]


def test_taylor_is_compared_with_l1_in_the_same_run(records):
    l1 = {r["metric"]: r for r in records if r["case"] == "vgg_mnist/ratio=0.5/seed=0"}
    taylor = {r["metric"]: r for r in records if r["case"] == "vgg_mnist/taylor/ratio=0.5/seed=0"}
    assert taylor["accuracy"]["peer"] == "l1"
    assert taylor["accuracy"]["peer_value"] == l1["accuracy"]["value"]
    assert 0 < taylor["accuracy"]["value"] <= 1
