"""benchmarks/llm_decode.py --quick: the real SmolLM2-135M (two blocks pruned 2:4 and converted), JSON lines per
/work/shared/BENCHMARKS.md, the roofline consistent with the bytes, and packed logits equal to the masked model's."""
import pytest
from benchjson import check_convention, run_quick

pytestmark = pytest.mark.slow

BENCH = "llm_decode"
UNITS = {"tokens_per_s": "tokens/s", "speedup": "x", "bytes_per_token": "bytes", "gbps": "GB/s", "perplexity": "ppl",
         "max_diff": "abs", "memory_bandwidth": "GB/s", "break_even": "frac"}


@pytest.fixture(scope="module")
def run():
    return run_quick("llm_decode.py", timeout=600)


def test_every_line_follows_the_convention(records):
    for r in records:
        check_convention(r, BENCH, UNITS)
        assert r["seed"] == 0 and r["threads"] >= 1, r
    cases = {r["case"] for r in records}
    model_cases = {c for c in cases if c.startswith("smollm2")}
    for case in model_cases:   # each model case has its timings; the full-model ones also perplexity and max_diff
        want = {"tokens_per_s", "speedup", "bytes_per_token", "gbps"}
        want |= set() if case.endswith("/decoder_only") else {"perplexity", "max_diff"}
        assert {r["metric"] for r in records if r["case"] == case} == want, case
    assert any(c.endswith("/2:4/fp32") for c in cases) and any(c.endswith("/2:4/bf16") for c in cases)
    assert any(c.endswith("/decoder_only") for c in cases)
    assert {f"layer/{s}/fp32" for s in ("576x576", "192x576", "1536x576", "576x1536")} <= cases


def test_roofline_bytes_and_logits(records):
    speedups = [r for r in records if r["metric"] == "speedup"]
    assert speedups and all(r["value"] > 0 and r["threads"] >= 1 for r in speedups)
    for r in speedups:
        nbytes = next(b for b in records if b["metric"] == "bytes_per_token" and b["case"] == r["case"])
        assert r["roofline"] == pytest.approx(nbytes["peer_value"] / nbytes["value"])
        assert nbytes["value"] <= nbytes["peer_value"]   # converted layers never read more than dense ones
    for r in records:
        if r["metric"] == "max_diff":   # float32: within 1e-4 of the logits' scale, like two dense forms
            tol = 1e-5 if r["dtype"] == "fp32" else 2e-2
            assert r["value"] <= tol * r["logit_scale"] and r["peer"] == "dense forms", r
        if r["metric"] == "memory_bandwidth":
            assert 0.1 < r["value"] < 10000
        if r["metric"] == "break_even":
            assert 0.0 <= r["value"] <= 1.0 and r["bound"] in ("exact", "below", "above")
