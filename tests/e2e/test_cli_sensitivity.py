"""``prunekit sensitivity`` end to end on tiny settings: one run in a subprocess (the real command), the
others through ``prunekit.cli.__main__.main`` in this process (starting Python and torch again per case
costs more than the cases themselves)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import prunekit
import prunekit.zoo.data
from prunekit.analysis.sensitivity import SensitivityResult
from prunekit.cli.__main__ import main
from prunekit.plan import Plan
from prunekit.zoo.models import build_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = ["classifier.1.weight", "classifier.3.weight"]


def _env(cache_dir):
    env = os.environ.copy()
    env.update(PRUNEKIT_CACHE_DIR=str(cache_dir), PRUNEKIT_PROGRESS="0")
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny models: a second spinning thread only slows a busy machine
    return env


def cli(args, cwd, cache_dir):
    return subprocess.run([sys.executable, "-m", "prunekit.cli.__main__", "sensitivity", *map(str, args)], cwd=cwd,
                          env=_env(cache_dir), capture_output=True, text=True, timeout=300)


def _ok(proc):
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\n"
                                  f"stderr:\n{proc.stderr[-3000:]}")
    assert "Traceback" not in proc.stderr
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sens")
    proc = cli(["--quick", "--sparsities", "0.5,0.8,0.95", "--target", "0.8", "--out", "run", "--seed", 0,
                "--no-progress"], cwd, cwd / "cache")
    return proc, cwd / "run"


@pytest.mark.slow
def test_writes_curves_plot_allocation_and_plan(quick_run):
    proc, out = quick_run
    _ok(proc)
    res = SensitivityResult.load(out / "sensitivity.json")
    assert res.sparsities == [0.5, 0.8, 0.95] and list(res.curves) == LAYERS  # LeNet-300-100 without its classifier
    assert res.params == {"classifier.1.weight": 784 * 300, "classifier.3.weight": 300 * 100}
    assert (out / "sensitivity.png").read_bytes()[:8] == PNG_MAGIC
    alloc = json.loads((out / "allocation.json").read_text())
    assert alloc["target"] == 0.8 and alloc["achieved"] == pytest.approx(0.8)
    assert set(alloc["sparsities"]) == set(LAYERS) and alloc["sparsities"] == res.allocate(0.8, min_keep=0.01)
    assert set(alloc["measured"]) == {"allocated", "uniform_layer", "global_magnitude"}
    assert all(0.0 <= v <= 1.0 for v in alloc["measured"].values())
    assert alloc["threads"] == int(_env(None)["OMP_NUM_THREADS"])   # OMP_NUM_THREADS set: torch's count, recorded
    # the plan prunes a fresh LeNet to the allocation, layer by layer
    plan = Plan.load(out / "plan.json")
    net = build_model("lenet300")
    prunekit.apply_plan(net, plan)
    for name, s in alloc["sparsities"].items():
        assert prunekit.apply.global_sparsity(net, [name]) == pytest.approx(s, abs=1e-4)
    assert prunekit.apply.global_sparsity(net, LAYERS) == pytest.approx(0.8, abs=1e-4)


@pytest.mark.slow
def test_prints_the_table(quick_run):
    proc, _ = quick_run
    for needle in ("classifier.1.weight", "classifier.3.weight", "s=0.95", "allocated", "global_magnitude",
                   "predicted drop", "sensitivity.png"):
        assert needle in proc.stdout, needle


def test_a_saved_checkpoint_on_digits_is_analysed_and_is_deterministic(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))   # private: other tests fill the shared one
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[32, 16], num_classes=10)
    prunekit.save(model, tmp_path / "ckpt")
    args = ["--checkpoint", tmp_path / "ckpt", "--data", "digits", "--sparsities", "0.5,0.9", "--target", 0.6,
            "--metric", "loss", "--criterion", "random", "--seed", 3, "--no-progress", "--include-classifier"]
    assert main(["sensitivity", *map(str, args), "--out", "a"]) == 0
    assert main(["sensitivity", *map(str, args), "--out", "b"]) == 0
    assert "classifier.5.weight" in capsys.readouterr().out
    a, b = (SensitivityResult.load(tmp_path / d / "sensitivity.json") for d in ("a", "b"))
    assert a == b and a.metric == "loss" and a.meta["criterion"] == "random"
    assert list(a.curves) == ["classifier.1.weight", "classifier.3.weight", "classifier.5.weight"]
    assert (tmp_path / "a" / "plan.json").read_text() == (tmp_path / "b" / "plan.json").read_text()
    assert not list(prunekit.zoo.data.default_cache_dir().glob("dense-*"))  # nothing was trained


def test_wanda_with_bias_correction_analyses_per_row_and_corrects_the_allocation(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[32, 16], num_classes=10)
    prunekit.save(model, tmp_path / "ckpt")
    args = ["--checkpoint", tmp_path / "ckpt", "--data", "digits", "--sparsities", "0.25,0.5,0.75", "--target", 0.5,
            "--criterion", "wanda", "--bias-correction", "--seed", 0, "--no-progress", "--out", "w"]
    assert main(["sensitivity", *map(str, args)]) == 0
    res = SensitivityResult.load(tmp_path / "w" / "sensitivity.json")
    assert res.meta["criterion"] == "wanda" and res.meta["scope"] == "row" and res.meta["bias_correction"] is True
    alloc = json.loads((tmp_path / "w" / "allocation.json").read_text())
    assert alloc["scope"] == "row" and alloc["bias_correction"] is True
    assert set(alloc["measured"]) == {"allocated", "uniform_layer", "global_magnitude"}
    plan = Plan.load(tmp_path / "w" / "plan.json")
    for name, s in alloc["sparsities"].items():
        tp = plan.tensors[name]
        keep = tp.keep_mask()
        per_row = (~keep).sum(1)
        assert int(per_row.max()) - int(per_row.min()) <= 1, name  # Wanda's rule: the same share in every row
        assert tp.sparsity == pytest.approx(s, abs=1.0 / keep.shape[1])


@pytest.mark.parametrize("args, needle", [
    (["--pattern", "nm"], "unstructured, structured"),
    (["--sparsities", "0.5,1.2"], "(0, 1)"),
    (["--sparsities", "half"], "comma-separated"),
    (["--target", "1.0"], "[0, 1)"),
    (["--criterion", "nope"], "unknown criterion"),
])
def test_bad_input_is_one_clear_line_before_any_training(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path / "cache"))   # private: other tests fill the shared one
    assert main(["sensitivity", "--quick", "--no-progress", "--out", "run", *args]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("prunekit sensitivity: error:"), err
    assert not list(prunekit.zoo.data.default_cache_dir().glob("dense-*"))
    assert not (tmp_path / "run").exists()
