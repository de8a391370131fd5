"""What a new user's first runs leave behind and print (issue 14), on tiny settings (sklearn's 8x8 digits, a
small MLP: seconds), through ``prunekit.cli.__main__.main`` in this process: ``prunekit prune`` leaves nothing
in the working directory but the folder asked for (its resume checkpoints go once it finishes), records the
threads it ran with, and ``prunekit advise --no-progress`` draws no progress bar, even where bars are on.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

import prunekit
import prunekit.cli.prune as cli_prune
from prunekit.cli.__main__ import main
from prunekit.zoo.models import build_model

TINY = ["--model", "mlp", "--set", "model_kwargs={in_features: 64, hidden: [32]}", "--data", "digits",
        "--dense-epochs", "1", "--epochs", "1", "--limit-train", "600", "--limit-test", "200", "--no-progress"]
OUTPUTS = {"config.yaml", "model", "plan.json", "report", "results.json"}


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working directory; the cache (conftest) lives elsewhere."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert not str(os.environ["PRUNEKIT_CACHE_DIR"]).startswith(str(work))
    return work


def test_prune_leaves_only_the_requested_outputs(cwd, monkeypatch, capsys):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)   # --threads default: 1
    assert main(["prune", *TINY, "--out", "run"]) == 0
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]
    assert {p.name for p in (cwd / "run").iterdir()} == OUTPUTS   # no checkpoints/ once the run finished
    assert "pruned model: run/model" in capsys.readouterr().out
    results = json.loads((cwd / "run" / "results.json").read_text())
    assert results["env"]["torch_threads"] == 1 and results["config"]["threads"] == 1   # recorded


def test_prune_keeps_checkpoints_when_asked_and_records_its_threads(cwd):
    assert main(["prune", *TINY, "--out", "run", "--keep-checkpoints", "--threads", "2"]) == 0
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]
    assert {p.name for p in (cwd / "run").iterdir()} == OUTPUTS | {"checkpoints"}
    assert (cwd / "run" / "checkpoints" / "pruned-0.9.pt").is_file()   # (dense.pt too unless the cache had it)
    results = json.loads((cwd / "run" / "results.json").read_text())
    assert results["env"]["torch_threads"] == 2 and results["config"]["threads"] == 2


def test_an_interrupted_prune_keeps_its_checkpoints_for_resume(cwd, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_prune, "_write_outputs", killed)
    with pytest.raises(KeyboardInterrupt):
        main(["prune", *TINY, "--out", "run"])
    assert sorted(p.name for p in cwd.iterdir()) == ["run"]
    assert (cwd / "run" / "checkpoints" / "pruned-0.9.pt").is_file()


def test_advise_no_progress_draws_no_bar(cwd, monkeypatch, capsys):
    torch.manual_seed(0)
    prunekit.save(build_model("mlp", in_features=64, hidden=[32], num_classes=10), cwd / "model")
    monkeypatch.delenv("PRUNEKIT_PROGRESS", raising=False)   # bars on, as for a user: only the flag hides them
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)     # --threads default: 1
    assert main(["advise", "--checkpoint", "model", "--data", "digits", "--limit-test", "200", "--candidates",
                 "dense,unstructured:0.9", "--repeat", "1", "--out", "out", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "it/s" not in err and "%|" not in err and "\r" not in err, err
    assert "PRUNEKIT_PROGRESS" not in os.environ   # as it was before the command
    doc = json.loads((cwd / "out" / "advice.json").read_text())
    assert doc["settings"]["threads"] == 1   # the default, recorded
