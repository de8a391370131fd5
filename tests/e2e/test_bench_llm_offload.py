"""benchmarks/llm_offload.py --quick: a tiny random Llama written in shards, pruned streamed in a child process
(wanda and sparsegpt), checked bit for bit against sequential_prune in memory; JSON lines per
/work/shared/BENCHMARKS.md."""
import pytest
from benchjson import check_run, one, run_quick

BENCH = "llm_offload"
UNITS = {"peak_rss_frac": "frac", "peak_rss_mb": "MB", "time_s": "s", "size_bytes": "bytes", "identical": "frac"}
CASES = {"llama-quick/wanda/sparsity=0.5", "llama-quick/sparsegpt/sparsity=0.5"}


@pytest.fixture(scope="module")
def run():
    return run_quick("llm_offload.py", timeout=300)


def test_every_line_follows_the_convention(records):
    check_run(records, BENCH, UNITS, CASES)
    assert all(r["layers"] == 4 for r in records)


def test_memory_is_reported_against_the_model_size(records):
    for case in CASES:
        size = one(records, case, "size_bytes")["value"]
        mb = one(records, case, "peak_rss_mb")["value"]
        assert 100_000 < size < 10_000_000 and 50 < mb < 4000  # a tiny model: the process itself dominates
        assert one(records, case, "peak_rss_frac")["value"] == pytest.approx(mb * 1e6 / size)
        t = one(records, case, "time_s")
        assert t["value"] > 0 and t["n"] == 1


def test_streamed_output_equals_the_in_memory_run(records):
    for case in CASES:
        r = one(records, case, "identical")
        assert r["value"] == 1.0 and r["peer_value"] == 1.0 and r["ratio"] == 1.0
