"""Data-aware criteria run inside experiments (the demo, prune CLI and report): calibration is automatic."""
import pytest

from prunekit.experiment import run_experiment

FT = {"epochs": 1, "lr": 0.05}


def _config(methods):
    return {"model": "mlp", "model_kwargs": {"in_features": 64, "hidden": [32, 16]}, "data": "digits",
            "limit_train": 300, "limit_test": 100, "seed": 0, "dense": {"epochs": 2, "lr": 0.05},
            "methods": methods}


def test_wanda_sparsegpt_and_taylor_surgery_run_in_an_experiment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))
    methods = [
        {"name": "wanda", "kind": "oneshot", "sparsities": [0.5], "prune": {"criterion": "wanda", "scope": "row"},
         "finetune": FT},
        {"name": "sparsegpt", "kind": "oneshot", "sparsities": [0.5], "prune": {"criterion": "sparsegpt"},
         "finetune": {"epochs": 0}},
        {"name": "taylor_surgery", "kind": "surgery", "sparsities": [0.5], "prune": {"criterion": "taylor"},
         "finetune": FT},
    ]
    results, _, models = run_experiment(_config(methods), progress=False)
    final = {m["name"]: m["final"] for m in results["methods"]}
    assert final["wanda"]["pruned_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert final["sparsegpt"]["pruned_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert final["taylor_surgery"]["compacted"] is True
    assert final["taylor_surgery"]["params"] < results["dense"]["params"]
    # every method is a point the report can plot
    assert all(0 <= f["accuracy"] <= 1 for f in final.values())


def test_sparsegpt_is_refused_where_it_cannot_work_before_any_training(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNEKIT_CACHE_DIR", str(tmp_path))
    bad = [{"name": "g", "kind": "gradual", "sparsities": [0.5], "prune": {"criterion": "sparsegpt"},
            "finetune": FT}]
    with pytest.raises(ValueError, match="sparsegpt"):
        run_experiment(_config(bad), progress=False)
    assert not list(tmp_path.glob("dense-*"))
