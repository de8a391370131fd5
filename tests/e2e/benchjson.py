"""Running a benchmark script with --quick and reading its JSON lines (../shared/BENCHMARKS.md)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ("bench", "case", "metric", "value", "unit")


def run_quick(script: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> --quick``; env copied so the tests' private cache dir applies."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def json_records(stdout: str):
    """Every stdout line as a dict; fails the test on anything that is not a JSON object."""
    lines = stdout.splitlines()
    assert lines, "no output on stdout"
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"stdout line is not JSON: {line!r}")
        assert isinstance(rec, dict), line
        out.append(rec)
    return out


def check_convention(rec, bench: str, units) -> None:
    """The keys, types and units every JSON line must have."""
    for key in REQUIRED:
        assert key in rec, (key, rec)
    assert rec["bench"] == bench
    assert isinstance(rec["case"], str) and rec["case"]
    assert isinstance(rec["value"], (int, float)) and not isinstance(rec["value"], bool)
    assert math.isfinite(rec["value"]), rec
    if rec["metric"] in units:
        assert rec["unit"] == units[rec["metric"]], rec


def one(records, case: str, metric: str):
    """The single record of ``case`` and ``metric`` (fails the test if there are none or several)."""
    hits = [r for r in records if r["case"] == case and r["metric"] == metric]
    assert len(hits) == 1, (case, metric, hits)
    return hits[0]


def check_run(records, bench: str, units, cases) -> None:
    """Every line follows the convention with seed 0 and a thread count, the run has exactly ``cases``, and every
    case reports every metric of ``units``."""
    for r in records:
        check_convention(r, bench, units)
        assert r["seed"] == 0 and r["threads"] >= 1, r
    assert {r["case"] for r in records} == set(cases)
    for case in cases:
        assert {r["metric"] for r in records if r["case"] == case} == set(units), case
