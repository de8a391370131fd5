"""benchmarks/llm_oneshot.py --quick: the real SmolLM2-135M (two decoder blocks pruned, a few tokens), JSON lines
per /work/shared/BENCHMARKS.md."""
import pytest
from benchjson import check_convention, run_quick

pytestmark = pytest.mark.slow

BENCH = "llm_oneshot"
UNITS = {"perplexity": "ppl", "ppl_ratio": "x", "sparsity": "frac", "time_s": "s"}
CASES = {"smollm2-135m-quick/magnitude/sparsity=0.5", "smollm2-135m-quick/wanda/sparsity=0.5",
         "smollm2-135m-quick/sparsegpt/2:4"}


@pytest.fixture(scope="module")
def run():
    return run_quick("llm_oneshot.py", timeout=600)


def _one(records, case, metric):
    hits = [r for r in records if r["case"] == case and r["metric"] == metric]
    assert len(hits) == 1, (case, metric, hits)
    return hits[0]


def test_every_line_follows_the_convention(records):
    for r in records:
        check_convention(r, BENCH, UNITS)
        assert r["seed"] == 0 and r["threads"] >= 1
    assert {r["case"] for r in records} == CASES
    for case in CASES:
        assert {r["metric"] for r in records if r["case"] == case} == set(UNITS)


def test_perplexity_against_dense_and_magnitude(records):
    dense = {r["peer_value"] for r in records if r["metric"] == "perplexity"}
    assert len(dense) == 1 and 1.0 < dense.pop() < 1000.0   # one dense baseline, a real language model
    for case in CASES:
        ppl, ratio = _one(records, case, "perplexity"), _one(records, case, "ppl_ratio")
        assert ppl["peer"] == "dense" and ratio["value"] == pytest.approx(ppl["value"] / ppl["peer_value"])
        assert ratio["value"] >= 0.9   # pruning two blocks does not make a trained model much better
        assert _one(records, case, "sparsity")["value"] == pytest.approx(0.5, abs=1e-6)
    wanda = _one(records, "smollm2-135m-quick/wanda/sparsity=0.5", "ppl_ratio")
    mag = _one(records, "smollm2-135m-quick/magnitude/sparsity=0.5", "ppl_ratio")
    assert wanda["peer"] == "magnitude" and wanda["peer_value"] == mag["value"]
    assert wanda["value"] < mag["value"]   # activation-aware beats magnitude on a real LLM
