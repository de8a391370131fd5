"""benchmarks/llm_oneshot.py --quick: the real SmolLM2-135M (two decoder blocks pruned, a few tokens), JSON lines
per /work/shared/BENCHMARKS.md."""
import pytest
from benchjson import check_run, one, run_quick

pytestmark = pytest.mark.slow

BENCH = "llm_oneshot"
UNITS = {"perplexity": "ppl", "ppl_ratio": "x", "sparsity": "frac", "time_s": "s"}
CASES = {"smollm2-135m-quick/magnitude/sparsity=0.5", "smollm2-135m-quick/wanda/sparsity=0.5",
         "smollm2-135m-quick/sparsegpt/2:4"}


@pytest.fixture(scope="module")
def run():
    return run_quick("llm_oneshot.py", timeout=600)


def test_every_line_follows_the_convention(records):
    check_run(records, BENCH, UNITS, CASES)


def test_perplexity_against_dense_and_magnitude(records):
    dense = {r["peer_value"] for r in records if r["metric"] == "perplexity"}
    assert len(dense) == 1 and 1.0 < dense.pop() < 1000.0   # one dense baseline, a real language model
    for case in CASES:
        ppl, ratio = one(records, case, "perplexity"), one(records, case, "ppl_ratio")
        assert ppl["peer"] == "dense" and ratio["value"] == pytest.approx(ppl["value"] / ppl["peer_value"])
        assert ratio["value"] >= 0.9   # pruning two blocks does not make a trained model much better
        assert one(records, case, "sparsity")["value"] == pytest.approx(0.5, abs=1e-6)
    wanda = one(records, "smollm2-135m-quick/wanda/sparsity=0.5", "ppl_ratio")
    mag = one(records, "smollm2-135m-quick/magnitude/sparsity=0.5", "ppl_ratio")
    assert wanda["peer"] == "magnitude" and wanda["peer_value"] == mag["value"]
    assert wanda["value"] < mag["value"]   # activation-aware beats magnitude on a real LLM
