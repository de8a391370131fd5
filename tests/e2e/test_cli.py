"""The ``prunekit`` command line end to end, in subprocesses, on tiny settings.

The demo (the slowest part) runs twice in one module-scoped fixture: the second run must
reuse the cached dense model and give the same masks. ``prunekit prune`` runs once in
another fixture whose output feeds the eval and report tests.

Children get ``OMP_NUM_THREADS=1`` (unless already set): the models are tiny, and on a
busy 2-core machine two intra-op threads spin-wait and make the demo ~3x slower.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import prunekit
from prunekit.apply import masking
from prunekit.plan import Plan
from prunekit.pruners import PRUNERS

pytestmark = pytest.mark.slow

METHODS = ("oneshot_l1", "global_l1", "structured_l1", "surgery_l1", "wanda", "wanda_bc", "taylor", "sparsegpt",
           "random", "gradual_cubic")
TIMEOUT = 300
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _env(cache_dir=None):
    env = os.environ.copy()
    if cache_dir is not None:
        env["PRUNEKIT_CACHE_DIR"] = str(cache_dir)
    assert env.get("PRUNEKIT_CACHE_DIR"), "tests must never use the user's cache"
    env["PRUNEKIT_PROGRESS"] = "0"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def cli(args, cwd, env=None):
    """Run ``prunekit <args>`` in a subprocess; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "prunekit.cli.__main__", *map(str, args)], cwd=cwd,
                          env=env or _env(), capture_output=True, text=True, timeout=TIMEOUT)


def _ok(proc):
    assert proc.returncode == 0, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                                  f"stderr:\n{proc.stderr[-3000:]}")
    assert "Traceback" not in proc.stderr
    return proc


def _user_error(proc, *needles):
    """Exit 2, one clear line on stderr (no traceback) containing every needle."""
    assert proc.returncode == 2, (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-2000:]}\n"
                                  f"stderr:\n{proc.stderr[-2000:]}")
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _module_cache(tmp_path_factory):
    # module-scoped fixtures run before conftest's function-scoped autouse fixture: use the same dir
    return os.environ.get("PRUNEKIT_CACHE_DIR") or str(tmp_path_factory.getbasetemp() / "cache")


def _check_report(folder: Path):
    html = folder / "report.html"
    assert html.is_file() and (folder / "report.md").is_file() and (folder / "metrics.json").is_file()
    page = html.read_text(encoding="utf-8")
    assert "data:image/png;base64," in page, "figures must be embedded: the page is self-contained"
    srcs = re.findall(r'src="([^"]*)"', page)
    assert srcs and all(s.startswith("data:") for s in srcs), f"external resources in report.html: {srcs[:3]}"
    json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    pngs = sorted(folder.glob("*.png"))
    assert pngs, "no PNG figures written"
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC, png
    md = (folder / "report.md").read_text(encoding="utf-8")
    for ref in re.findall(r"\]\(([^)]+\.png)\)", md):  # markdown figures point at files that exist
        assert (folder / ref).is_file(), ref
    return page


# ----------------------------------------------------------------------------- demo

@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    env = _env(_module_cache(tmp_path_factory))
    runs = []
    for name in ("demo", "demo2"):  # same seed twice: the second reuses the cached dense model
        proc = cli(["demo", "--quick", "--out", cwd / name, "--seed", 0, "--no-progress"], cwd, env)
        runs.append((proc, cwd / name))
    return runs


def test_demo_runs_and_prints_every_method(demo_runs):
    for proc, _ in demo_runs:
        _ok(proc)
        rows = {line.split()[0] for line in proc.stdout.splitlines() if line.strip()}
        for name in ("dense",) + METHODS:
            assert name in rows, f"{name} missing from the results table:\n{proc.stdout}"


def test_demo_writes_results_config_and_report(demo_runs):
    proc, out = demo_runs[0]
    _ok(proc)
    assert str(out / "report" / "report.html") in proc.stdout or "report.html" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    names = [m["name"] for m in results["methods"]]
    assert sorted(names) == sorted(METHODS) and len(names) == len(set(names))
    for m in results["methods"]:
        acc = m["final"]["accuracy"]
        assert isinstance(acc, float) and 0.0 <= acc <= 1.0, (m["name"], acc)
        assert re.fullmatch(r"[0-9a-f]{16}", m["masks_digest"]), m["masks_digest"]
        assert 0.0 < m["final"]["pruned_sparsity"] < 1.0
    assert 0.0 <= results["dense"]["accuracy"] <= 1.0
    assert results["dense"]["accuracy"] > 0.2, "the dense model did not learn at all"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["seed"] == 0 and config["model"] == "lenet300" and config["data"] == "mnist"
    assert [m["name"] for m in config["methods"]] == names
    page = _check_report(out / "report")
    for expected in ("tradeoff.png", "size_latency.png", "layer_sparsity.png"):
        assert (out / "report" / expected).is_file(), expected
    assert "prunekit demo" in page
    # issue 14: a recommendation by advise's rule, honest speedup columns, both sparsities, "before" once per layer
    assert page.index("<h2>Conclusion</h2>") < page.index("<h2>Summary</h2>") and "Recommended: " in page
    assert results["conclusion"]["recommended"] and results["conclusion"]["format"] == "prunekit.advice/1"
    assert "Speedup (theor.)" not in page and "<th>Measured speedup [IQR]</th>" in page
    assert "<th>Sparsity (whole model)</th>" in page and "<th>Sparsity (pruned layers)</th>" in page
    heat = sorted(p.name for p in (out / "report").glob("heatmap_*.png"))
    assert len(heat) == 2, heat  # the two default heat layers, one figure each (was one per method and layer)
    for m in results["methods"]:   # every point was timed against dense in alternation, with its spread
        assert m["final"]["speedup_q1"] <= m["final"]["speedup_measured"] <= m["final"]["speedup_q3"], m["name"]
        assert m["final"]["latency_q1_ms"] <= m["final"]["latency_ms"] <= m["final"]["latency_q3_ms"], m["name"]


def test_demo_second_run_reuses_the_dense_model_and_gives_the_same_masks(demo_runs):
    (p1, out1), (p2, out2) = demo_runs
    _ok(p1), _ok(p2)
    r1 = json.loads((out1 / "results.json").read_text())
    r2 = json.loads((out2 / "results.json").read_text())
    assert r2["dense"]["from_cache"] is True
    assert "reused from cache" in p2.stdout
    assert r1["dense"]["accuracy"] == r2["dense"]["accuracy"]
    d1 = {m["name"]: m["masks_digest"] for m in r1["methods"]}
    d2 = {m["name"]: m["masks_digest"] for m in r2["methods"]}
    assert d1 == d2
    assert len(set(d1.values())) == len(d1), "different methods should not give identical masks"


# ----------------------------------------------------------------------------- prune

RECIPE = {
    "model": "lenet300", "data": "mnist", "limit_train": 1000, "limit_test": 300,
    "dense": {"epochs": 1},
    "method": {"sparsity": 0.8, "scope": "global", "criterion": "l1"},
    "finetune": {"epochs": 1},
}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("prune")
    env = _env(_module_cache(tmp_path_factory))
    (cwd / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    proc = cli(["prune", "--recipe", "recipe.yaml", "--sparsity", 0.7, "--out", "run", "--no-progress"], cwd, env)
    return proc, cwd, cwd / "run"


def test_prune_writes_model_plan_config_results_and_report(pruned):
    proc, _, out = pruned
    _ok(proc)
    for rel in ("model/model.safetensors", "model/model.json", "plan.json", "config.yaml", "results.json",
                "report/report.html"):
        assert (out / rel).is_file(), rel
    _check_report(out / "report")

    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["method"]["sparsity"] == 0.7  # the flag wins over the recipe's 0.8
    assert config["method"]["scope"] == "global" and config["method"]["criterion"] == "l1"
    assert config["model"] == "lenet300" and config["data"] == "mnist"
    assert config["limit_train"] == 1000 and config["limit_test"] == 300
    assert config["dense"]["epochs"] == 1 and config["finetune"]["epochs"] == 1
    assert config["dense"]["lr"] > 0 and config["finetune"]["lr"] > 0  # defaults filled in

    results = json.loads((out / "results.json").read_text())
    (method,) = results["methods"]
    final = method["final"]
    assert final["target_sparsity"] == pytest.approx(0.7)
    assert final["pruned_sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert 0.0 <= final["accuracy"] <= 1.0

    # the saved model and the saved plan carry the same ~70% masks
    model = prunekit.load(out / "model")
    masks = prunekit.apply.masks(model)
    assert masks
    pruned_n = sum(int((~k).sum()) for k in masks.values())
    total = sum(k.numel() for k in masks.values())
    assert pruned_n / total == pytest.approx(0.7, abs=1e-3)
    assert prunekit.apply.global_sparsity(model) == pytest.approx(0.7, abs=1e-3)
    plan = Plan.load(out / "plan.json")
    fresh = prunekit.load(out / "model")
    masking.remove(fresh)
    prunekit.apply_plan(fresh, plan)
    for name, keep in prunekit.apply.masks(fresh).items():
        assert torch.equal(keep, masks[name]), name


def test_eval_prints_consistent_json(pruned):
    proc, cwd, out = pruned
    _ok(proc)
    ev = _ok(cli(["eval", out / "model", "--limit-test", 300, "--json"], cwd))
    res = json.loads(ev.stdout)
    for key in ("accuracy", "params", "nonzeros", "macs", "size_bytes", "latency_ms"):
        assert key in res, key
    assert 0.0 <= res["accuracy"] <= 1.0 and res["latency_ms"] > 0 and res["size_bytes"] > 0
    model = prunekit.load(out / "model")
    params = sum(p.numel() for p in model.parameters())
    masks = prunekit.apply.masks(model)
    pruned_n = sum(int((~k).sum()) for k in masks.values())
    targeted = sum(k.numel() for k in masks.values())
    assert res["params"] == params
    assert pruned_n / targeted == pytest.approx(0.7, abs=1e-3)
    # nonzeros: everything but the pruned entries (a trained weight is almost never exactly 0)
    assert params - pruned_n - 10 <= res["nonzeros"] <= params - pruned_n
    assert res["macs"] > 0 and res.get("macs_effective", 0) < res["macs"]
    # the saved model reproduces the accuracy measured by prune on the same test subset
    results = json.loads((out / "results.json").read_text())
    assert res["accuracy"] == pytest.approx(results["methods"][0]["final"]["accuracy"], abs=1e-9)


def test_report_re_renders_a_run(pruned):
    proc, cwd, out = pruned
    _ok(proc)
    for name in ("report.html", "report.md", "metrics.json"):
        (out / "report" / name).unlink()
    rep = _ok(cli(["report", "run"], cwd))
    assert "report.html" in rep.stdout
    _check_report(out / "report")
    _ok(cli(["report", out / "results.json", "--out", cwd / "elsewhere"], cwd))
    _check_report(cwd / "elsewhere")


# ----------------------------------------------------------------------------- env

def test_env_prints_versions(tmp_path):
    text = _ok(cli(["env"], tmp_path)).stdout
    assert torch.__version__ in text and prunekit.__version__ in text
    info = json.loads(_ok(cli(["env", "--json"], tmp_path)).stdout)
    assert info["torch"] == torch.__version__ and info["prunekit"] == prunekit.__version__
    assert info["cache_dir"] == os.environ["PRUNEKIT_CACHE_DIR"]


def test_console_script_is_installed(tmp_path):
    script = Path(sys.executable).with_name("prunekit")
    if not script.exists():
        pytest.skip("no prunekit console script next to sys.executable")
    proc = subprocess.run([str(script), "env", "--json"], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert json.loads(_ok(proc).stdout)["torch"] == torch.__version__


# ----------------------------------------------------------------------------- bad input

def test_sparsity_out_of_range_is_a_clear_error(pruned):
    _, cwd, _ = pruned  # same recipe: the dense model is cached
    proc = cli(["prune", "--recipe", "recipe.yaml", "--sparsity", 1.5, "--out", "bad", "--no-progress"], cwd)
    _user_error(proc, "[0, 1)", "1.5")
    assert not (cwd / "bad").exists(), "a failed run must not leave an output folder"


@pytest.mark.parametrize("field,allowed", [({"bogus": 1}, ["model", "method", "finetune"]),
                                           ({"method": {"bogus": 1}}, ["method.sparsity", "method.criterion"])],
                         ids=["top", "nested"])
def test_unknown_recipe_field_names_the_allowed_ones(tmp_path, field, allowed):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({**RECIPE, **field}))
    line = _user_error(cli(["prune", "--recipe", "r.yaml", "--no-progress"], tmp_path), "bogus", *allowed)
    assert "allowed" in line


def test_unknown_criterion_lists_the_known_ones(pruned):
    _, cwd, _ = pruned
    proc = cli(["prune", "--recipe", "recipe.yaml", "--criterion", "nope", "--out", "bad2", "--no-progress"], cwd)
    _user_error(proc, "nope", *prunekit.criteria.CRITERIA.names(), *PRUNERS.names())  # sparsegpt too


def test_eval_of_a_missing_folder_exits_2(tmp_path):
    _user_error(cli(["eval", tmp_path / "no_such_model", "--json"], tmp_path), "no_such_model")
    _user_error(cli(["report", tmp_path / "no_such_run"], tmp_path), "no_such_run")


def test_bad_flag_value_and_missing_command_exit_2(tmp_path):
    proc = cli(["prune", "--sparsity", "abc"], tmp_path)
    assert proc.returncode == 2 and "invalid float value" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli([], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_bad_method_fails_before_training_the_dense_model(pruned):
    _, cwd, _ = pruned
    cache = Path(os.environ["PRUNEKIT_CACHE_DIR"])
    before = set(cache.glob("dense-*"))
    # a seed no other test uses: a dense model for it could only come from this run
    proc = cli(["prune", "--recipe", "recipe.yaml", "--seed", 4242, "--limit-train", 100, "--sparsity", 1.5,
                "--out", "bad3", "--no-progress"], cwd)
    _user_error(proc, "[0, 1)")
    assert set(cache.glob("dense-*")) == before, "a dense model was trained before the input was validated"


def test_recipe_model_kwargs_are_accepted(tmp_path):
    recipe = {"model": "mlp", "model_kwargs": {"in_features": 64, "hidden": [16]}, "data": "digits",
              "limit_train": 300, "limit_test": 100, "dense": {"epochs": 1},
              "method": {"sparsity": 0.5}, "finetune": {"epochs": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    _ok(cli(["prune", "--recipe", "r.yaml", "--out", "run", "--no-progress"], tmp_path))
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["model_kwargs"] == {"in_features": 64, "hidden": [16]}
    model = prunekit.load(tmp_path / "run" / "model")
    assert prunekit.apply.global_sparsity(model) == pytest.approx(0.5, abs=1e-2)


def test_prune_with_bias_correction_moves_only_the_pruned_layers_biases(tmp_path):
    recipe = {"model": "mlp", "model_kwargs": {"in_features": 64, "hidden": [32, 16]}, "data": "digits",
              "limit_train": 300, "limit_test": 100, "dense": {"epochs": 1},
              "method": {"sparsity": 0.5, "criterion": "wanda", "scope": "row"}, "finetune": {"epochs": 0}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    runs = {}
    for name, extra in (("plain", []), ("bc", ["--bias-correction"])):
        _ok(cli(["prune", "--recipe", "r.yaml", "--out", name, "--no-progress", "--seed", 5, *extra], tmp_path))
        runs[name] = prunekit.load(tmp_path / name / "model").state_dict()
    config = yaml.safe_load((tmp_path / "bc" / "config.yaml").read_text())
    assert config["method"]["bias_correction"] is True
    plain, bc = runs["plain"], runs["bc"]
    weights = [k for k in plain if k.endswith(".weight") and not k.endswith("_mask")]
    assert all(torch.equal(plain[k], bc[k]) for k in weights)  # the same masks, the same kept weights
    moved = sorted(k for k in plain if k.endswith(".bias") and not torch.equal(plain[k], bc[k]))
    masked = sorted(k.replace(".weight_mask", ".bias") for k in plain if k.endswith(".weight_mask"))
    assert moved == masked and moved  # every pruned layer's bias moved, the classifier's did not
    proc = cli(["prune", "--recipe", "r.yaml", "--out", "bad", "--no-progress", "--bias-correction",
                "--schedule", "surgery"], tmp_path)
    _user_error(proc, "bias_correction")


def test_prune_with_surgery_saves_the_compacted_model_and_its_plan(tmp_path):
    recipe = {"model": "mlp", "model_kwargs": {"in_features": 64, "hidden": [32, 16]}, "data": "digits",
              "limit_train": 300, "limit_test": 100, "dense": {"epochs": 1},
              "method": {"sparsity": 0.5, "kind": "surgery", "scope": "layer"}, "finetune": {"epochs": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    _ok(cli(["prune", "--recipe", "r.yaml", "--out", "run", "--no-progress", "--seed", 3], tmp_path))
    model = prunekit.load(tmp_path / "run" / "model")
    widths = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [16, 8, 10]                      # hidden layers halved, classifier kept
    assert not prunekit.apply.masks(model)                   # physically smaller, no masks
    plan = prunekit.Plan.load(tmp_path / "run" / "plan.json")
    assert plan.meta["applier"] == "surgery" and plan.tensors["classifier.1.weight"].pruned_units == 16
    final = json.loads((tmp_path / "run" / "results.json").read_text())["methods"][0]["final"]
    assert final["compacted"] is True and final["params"] == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert model(torch.randn(2, 64)).shape == (2, 10)


@pytest.mark.slow
def test_prune_under_torchrun_with_two_processes(tmp_path):
    """DDP fine-tuning from the CLI: rank 0 alone writes and prints; masks hold on the saved model."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not next to this python")
    recipe = {"model": "mlp", "model_kwargs": {"in_features": 64, "hidden": [32]}, "data": "digits",
              "limit_train": 400, "limit_test": 100, "dense": {"epochs": 1}, "method": {"sparsity": 0.5},
              "finetune": {"epochs": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PRUNEKIT_CACHE_DIR": str(tmp_path / "cache"), "PRUNEKIT_PROGRESS": "0"}
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "prunekit.cli", "prune",
                           "--recipe", "r.yaml", "--out", "run", "--no-progress", "--checkpoint-every", "2"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("pruned model:") == 1
    model = prunekit.load(tmp_path / "run" / "model")
    assert prunekit.apply.global_sparsity(model) == pytest.approx(0.5, abs=1e-2)


def test_surgery_with_an_nm_pattern_is_refused_before_training(pruned):
    # issue 11.5: --schedule surgery --pattern nm exited 0 having done structured surgery
    _, cwd, _ = pruned
    cache = Path(os.environ["PRUNEKIT_CACHE_DIR"])
    before = set(cache.glob("dense-*"))
    proc = cli(["prune", "--recipe", "recipe.yaml", "--seed", 4243, "--limit-train", 100, "--schedule", "surgery",
                "--pattern", "nm", "--out", "bad_nm", "--no-progress"], cwd)
    _user_error(proc, "pattern 'nm' cannot be honoured")
    assert set(cache.glob("dense-*")) == before


def test_eval_uses_the_data_the_model_was_trained_on(pruned, tmp_path):
    # issue 11.8: a model trained on other data was scored on MNIST by default, without a word
    proc, cwd, out = pruned
    _ok(proc)
    spec = json.loads((out / "model" / "model.json").read_text())
    assert spec["metadata"]["data"]["name"] == "mnist" and spec["metadata"]["data"]["input_shape"] == [1, 28, 28]
    other = tmp_path / "digits_model"   # the same weights, recorded as trained on 8x8 digits
    shutil.copytree(out / "model", other)
    spec["metadata"]["data"] = {**spec["metadata"]["data"], "name": "digits", "input_shape": [1, 8, 8]}
    (other / "model.json").write_text(json.dumps(spec))
    refused = cli(["eval", other, "--data", "mnist", "--limit-test", 50], cwd)
    _user_error(refused, "trained on digits")
    ok = _ok(cli(["eval", out / "model", "--limit-test", 50], cwd))      # default: the recorded mnist, no note
    assert "note" not in ok.stderr
    spec["metadata"]["data"] = {**spec["metadata"]["data"], "name": "idx:/elsewhere/fashion", "input_shape": [1, 28, 28]}
    (other / "model.json").write_text(json.dumps(spec))
    noted = _ok(cli(["eval", other, "--data", "mnist", "--limit-test", 50], cwd))  # same shape: said, not refused
    assert "trained on idx:/elsewhere/fashion, evaluating on mnist" in noted.stderr


@pytest.mark.parametrize("flags,said", [(["--pattern", "nm", "--nm", "4:4"], "0 < N < M"),
                                        (["--pattern", "structured", "--dim", 5], "dim=5 is out of range"),
                                        (["--model", "resnet18_cifar"], "cannot take mnist inputs of shape [1, 28, 28]")])
def test_pattern_options_are_checked_before_training(pruned, flags, said):
    # issue 11.6: --nm 4:4 and --dim 5 were only rejected after the dense model trained
    _, cwd, _ = pruned
    cache = Path(os.environ["PRUNEKIT_CACHE_DIR"])
    before = set(cache.glob("dense-*"))
    proc = cli(["prune", "--recipe", "recipe.yaml", "--seed", 4244, "--limit-train", 100, *flags,
                "--out", "bad_flags", "--no-progress"], cwd)
    _user_error(proc, said)
    assert set(cache.glob("dense-*")) == before


def test_allocation_from_the_command_line(pruned):
    _, cwd, _ = pruned   # the same recipe and seed: the cached dense model
    out = _ok(cli(["prune", "--recipe", "recipe.yaml", "--criterion", "taylor", "--scope", "layer", "--allocation",
                   "magnitude", "--epochs", 1, "--out", "alloc", "--no-progress"], cwd))
    assert out.returncode == 0
    plan = Plan.load(cwd / "alloc" / "plan.json")
    sparsities = {n: tp.sparsity for n, tp in plan.tensors.items()}
    assert len(set(round(s, 2) for s in sparsities.values())) > 1   # per-layer, not uniform
    masked = prunekit.load(cwd / "alloc" / "model")
    assert prunekit.apply.global_sparsity(masked) == pytest.approx(0.8, abs=1e-2)


def test_sparsegpt_runs_from_the_command_line_with_default_options(pruned, tmp_path):
    # issue 14: `prunekit prune --criterion sparsegpt` failed: the CLI's default scope (global) was refused
    _, cwd, _ = pruned
    recipe = {k: v for k, v in RECIPE.items() if k != "method"}
    (cwd / "sg.yaml").write_text(yaml.safe_dump(recipe))
    _ok(cli(["prune", "--recipe", "sg.yaml", "--criterion", "sparsegpt", "--sparsity", 0.5, "--epochs", 1,
             "--out", "sg", "--no-progress"], cwd))
    plan = Plan.load(cwd / "sg" / "plan.json")
    assert plan.tensors and all(tp.sparsity == pytest.approx(0.5, abs=0.01) for tp in plan.tensors.values())
    explicit = cli(["prune", "--recipe", "sg.yaml", "--criterion", "sparsegpt", "--scope", "global", "--out", "sg2",
                    "--no-progress"], cwd)
    _user_error(explicit, "scope 'layer' or 'row'")  # an explicit request it cannot honour is still refused
