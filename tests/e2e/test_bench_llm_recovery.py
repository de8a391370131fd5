"""benchmarks/llm_recovery.py --quick: the real SmolLM2-135M (two blocks pruned by SparseGPT), recovered by
distillation and by fine-tuning, beside a dense model given the same fine-tuning; JSON lines per
/work/shared/BENCHMARKS.md."""
import pytest
from benchjson import check_run, one, run_quick

pytestmark = pytest.mark.slow

BENCH = "llm_recovery"
PRUNED = "smollm2-135m-quick/sparsegpt/sparsity=0.5"
CONTROL = "smollm2-135m-quick/dense/recovered=ce"
UNITS = {"perplexity": "ppl", "ppl_ratio": "x", "time_s": "s", "sparsity": "frac"}


@pytest.fixture(scope="module")
def run():
    return run_quick("llm_recovery.py", timeout=900)


def test_every_line_follows_the_convention(records):
    control = [r for r in records if r["case"] == CONTROL]
    check_run([r for r in records if r["case"] != CONTROL], BENCH, UNITS,
              {f"{PRUNED}/recovered={k}" for k in ("0", "kl", "ce")})
    assert {r["metric"] for r in control} == {"perplexity", "ppl_ratio", "time_s"}


def test_recovered_models_keep_their_masks_and_are_quoted_beside_the_control(records):
    dense = {r["peer_value"] for r in records if r["metric"] == "perplexity"}
    assert len(dense) == 1 and 1.0 < dense.pop() < 1000.0
    control = one(records, CONTROL, "ppl_ratio")["value"]
    for kind in ("0", "kl", "ce"):
        case = f"{PRUNED}/recovered={kind}"
        assert one(records, case, "sparsity")["value"] == pytest.approx(0.5, abs=1e-6)   # masks held fixed
        ppl, ratio = one(records, case, "perplexity"), one(records, case, "ppl_ratio")
        assert ratio["value"] == pytest.approx(ppl["value"] / ppl["peer_value"])
        if kind != "0":
            assert ratio["peer"] == "dense+ce" and ratio["peer_value"] == control
    # next-token fine-tuning on Austen lowers perplexity on Austen, for the dense control and the pruned model
    assert control < 1.0
    assert one(records, f"{PRUNED}/recovered=ce", "ppl_ratio")["value"] < one(records, f"{PRUNED}/recovered=0",
                                                                             "ppl_ratio")["value"]
