"""``prunekit advise`` end to end on digits (seconds): one run in a subprocess (the real command), the others
through ``prunekit.cli.__main__.main`` in this process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import prunekit
from prunekit.advise import Advice
from prunekit.cli.__main__ import main
from prunekit.zoo.models import build_model

MLP = ["--model", "mlp", "--set", "model_kwargs={in_features: 64, hidden: [64, 32]}", "--data", "digits"]
CANDIDATES = "dense,structured:0.5,unstructured:0.9,nm:2:4"


def _env(cache_dir):
    env = os.environ.copy()
    env.update(PRUNEKIT_CACHE_DIR=str(cache_dir), PRUNEKIT_PROGRESS="0")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: a second spinning thread only slows a busy machine
    return env


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("advise")
    args = [*MLP, "--dense-epochs", "3", "--candidates", CANDIDATES, "--budget", "5", "--batch", "1,32",
            "--repeat", "3", "--threads", "1", "--seed", "0", "--out", "run", "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "prunekit.cli.__main__", "advise", *args], cwd=cwd,
                          env=_env(cwd / "cache"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    return proc, cwd / "run"


def test_writes_advice_json_and_markdown(run):
    _, out = run
    a = Advice.from_json((out / "advice.json").read_text())
    assert a.target == "cpu" and a.rank_by == "latency_ms" and a.measured and a.batches == [1, 32]
    assert [r["name"] for r in a.candidates] == ["dense", "structured 50%", "unstructured 90%", "2:4"]
    assert all(r["status"] == "ok" and len(r["batches"]) == 2 for r in a.candidates)
    assert a.settings["threads"] == 1 and a.settings["seed"] == 0 and a.budget_pp == 5.0
    dense = a.candidate("dense")
    assert 0.5 < dense["metric_value"] <= 1.0 and dense["params"] == 64 * 64 + 64 + 64 * 32 + 32 + 32 * 10 + 10
    for r in a.candidates:
        assert r["speedup"] == pytest.approx(dense["latency_ms"] / r["latency_ms"])
    rec = a.candidate(a.recommended)
    ok = [r for r in a.candidates if r["within_budget"]]
    assert rec in ok and rec["latency_ms"] <= min(r["latency_ms"] for r in ok) * (1 + a.settings["latency_tie"])
    md = (out / "advice.md").read_text()
    assert md.startswith("# prunekit advise: cpu") and f"**Recommended: {a.recommended}.**" in md


def test_prints_the_table_and_the_recommendation(run):
    proc, out = run
    a = Advice.from_json((out / "advice.json").read_text())
    for needle in ("candidate", "ms@1", "x@32", "macs_effective", "structured 50%", "2:4",
                   f"recommended: {a.recommended}", f"why: {a.reason}", "advice.json", "advice.md"):
        assert needle in proc.stdout, needle


def test_checkpoint_and_sparse_target(tmp_path, capsys):
    torch.manual_seed(0)
    net = build_model("mlp", in_features=64, hidden=[32], num_classes=10)
    prunekit.save(net, tmp_path / "model")
    code = main(["advise", "--checkpoint", str(tmp_path / "model"), "--data", "digits", "--target", "sparse",
                 "--candidates", "unstructured:0.5,nm:2:4", "--budget", "100", "--repeat", "1", "--threads", "1",
                 "--out", str(tmp_path / "out"), "--no-progress"])
    assert code == 0
    doc = json.loads((tmp_path / "out" / "advice.json").read_text())
    assert doc["rank_by"] == "macs_effective" and doc["target"] == "sparse"
    assert "not the target's" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--target", "gpu"], "run advise on the GPU machine"),
    (["--candidates", "structured:2"], "fraction in (0, 1)"),
    (["--batch", "1,x"], "--batch '1,x' must be comma-separated positive ints"),
    (["--budget", "-1"], "--budget -1.0 must be >= 0"),
])
def test_bad_input_fails_fast_with_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["advise", *MLP, "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written
