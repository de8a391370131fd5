"""benchmarks/surgery_zoo.py --quick: timm resnet18 and convnext_atto at 64 px beside Torch-Pruning; JSON lines
per /work/shared/BENCHMARKS.md."""
import pytest
from benchjson import check_convention, one, run_quick

pytestmark = pytest.mark.slow

BENCH = "surgery_zoo"
UNITS = {"macs_ratio": "x", "params_ratio": "x", "speedup": "x", "plan_time_s": "s", "max_diff": "abs"}
CASES = {f"timm/{m}/sparsity=0.5/{mode}" for m in ("resnet18", "convnext_atto") for mode in ("exact", "residual")}


@pytest.fixture(scope="module")
def run():
    from prunekit.zoo.timm_compat import import_timm

    if import_timm() is None:
        pytest.skip("timm not installed")
    return run_quick("surgery_zoo.py", timeout=600)


def test_every_line_follows_the_convention(records):
    for r in records:
        check_convention(r, BENCH, UNITS)
        assert r["threads"] == 1 and r["seed"] == 0
    assert {r["case"] for r in records} == CASES
    for case in CASES:
        assert {r["metric"] for r in records if r["case"] == case} == set(UNITS)
        assert {r["batch"] for r in records if r["case"] == case and r["metric"] == "speedup"} == {1, 4}


def test_matches_torch_pruning_and_stays_exact(records):
    for case in CASES:
        macs = one(records, case, "macs_ratio")
        assert macs["peer"] == "torch-pruning"
        if macs["peer_value"] is None:    # the peer failed: the reason is given
            assert macs["peer_error"]
            continue
        if case.endswith("residual") or "resnet" in case:   # issue 12: at least 0.95x the peer's reduction
            assert macs["value"] >= 0.95 * macs["peer_value"], macs
        if case.endswith("exact"):
            assert one(records, case, "max_diff")["value"] < 1e-5   # exact mode: masked == compacted
    exact = one(records, "timm/convnext_atto/sparsity=0.5/exact", "macs_ratio")["value"]
    residual = one(records, "timm/convnext_atto/sparsity=0.5/residual", "macs_ratio")["value"]
    assert residual > 1.8 * exact   # the embedding width is what exact mode cannot prune on ConvNeXt
