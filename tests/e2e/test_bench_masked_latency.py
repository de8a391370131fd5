import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_masked_latency_quick_prints_json_lines():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "masked_latency.py"), "--quick"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert rows and all({"bench", "case", "metric", "value", "unit"} <= r.keys() for r in rows)
    peers = {r["peer"] for r in rows}
    assert peers == {"torch.nn.utils.prune", "dense"}
    for r in rows:
        assert r["metric"] == "latency_ms" and r["unit"] == "ms" and r["value"] > 0
        assert abs(r["ratio"] - r["peer_value"] / r["value"]) < 1e-9
        assert "sparsity=0.9/batch=" in r["case"]
