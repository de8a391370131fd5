"""benchmarks/llm_structured.py --quick: the real SmolLM2-135M loses a KV group per layer, a quarter of its SwiGLU
neurons, or 8 of its 30 layers (few tokens); JSON lines per /work/shared/BENCHMARKS.md."""
import pytest
from benchjson import check_convention, one, run_quick

pytestmark = pytest.mark.slow

BENCH = "llm_structured"
UNITS = {"perplexity": "ppl", "ppl_ratio": "x", "params": "count", "tokens_per_s": "tokens/s", "speedup": "x",
         "max_diff": "abs", "max_diff_fp64": "abs", "time_s": "s"}
RECOVERED = "smollm2-135m-quick/depth/0.27/recovered=1"   # --quick distils the depth case only
CASES = {"smollm2-135m-quick/heads/0.33/recovered=0", "smollm2-135m-quick/ffn/0.25/recovered=0",
         "smollm2-135m-quick/depth/0.27/recovered=0"}


@pytest.fixture(scope="module")
def run():
    return run_quick("llm_structured.py", timeout=900)


def test_every_line_follows_the_convention(records):
    for r in records:
        check_convention(r, BENCH, UNITS)
        assert r["seed"] == 0 and r["threads"] >= 1, r
    assert {r["case"] for r in records} == CASES | {RECOVERED}
    for case in CASES:
        assert {r["metric"] for r in records if r["case"] == case} == set(UNITS) - {"time_s"}, case
    assert {r["metric"] for r in records if r["case"] == RECOVERED} == {"perplexity", "ppl_ratio", "params", "time_s"}


def test_distillation_recovers_the_depth_pruned_model(records):
    before = one(records, RECOVERED.replace("recovered=1", "recovered=0"), "perplexity")
    after = one(records, RECOVERED, "perplexity")
    assert after["peer_value"] == before["peer_value"]                  # the same dense baseline
    assert after["value"] < before["value"]                             # two steps of distillation already help
    assert one(records, RECOVERED, "params")["value"] == one(records, before["case"], "params")["value"]
    assert one(records, RECOVERED, "time_s")["steps"] == 2


def test_pruned_models_are_smaller_exact_and_measured_against_dense(records):
    dense_ppl = {r["peer_value"] for r in records if r["metric"] == "perplexity"}
    dense_params = {r["peer_value"] for r in records if r["metric"] == "params"}
    assert len(dense_ppl) == 1 and 1.0 < dense_ppl.pop() < 1000.0      # one dense baseline, a real language model
    assert dense_params == {134515008}                                  # SmolLM2-135M, tied embeddings counted once
    for case in CASES:
        ppl, ratio = one(records, case, "perplexity"), one(records, case, "ppl_ratio")
        assert ppl["peer"] == "dense" and ratio["value"] == pytest.approx(ppl["value"] / ppl["peer_value"])
        assert ratio["value"] > 1.0                                     # no retraining: a trained model gets worse
        params = one(records, case, "params")
        assert params["peer"] == "dense" and params["value"] < 0.95 * params["peer_value"]
        speed = one(records, case, "tokens_per_s")
        assert speed["peer"] == "dense" and speed["batch"] == 1 and speed["value"] > 0
        assert one(records, case, "speedup")["value"] == pytest.approx(speed["value"] / speed["peer_value"])
        assert one(records, case, "max_diff_fp64")["value"] < 1e-8      # masked and compacted compute the same
        assert one(records, case, "max_diff")["value"] < 1e-3           # ... up to float32 rounding
    depth = "smollm2-135m-quick/depth/0.27/recovered=0"
    assert one(records, depth, "params")["value"] < one(records, "smollm2-135m-quick/ffn/0.25/recovered=0",
                                                           "params")["value"]
