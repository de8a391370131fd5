"""Your own model and data from the command line: the up-front checks of --model, --data, --checkpoint and the
data options, and a factory model on a .npz file through prune, eval (--trust-factory) and a state_dict
checkpoint."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from prunekit.cli import _names
from prunekit.cli.__main__ import main
from prunekit.cli._common import check_checkpoint, check_data, check_model
from prunekit.errors import PrunekitError
from prunekit.zoo import sources, userdata

FACTORY = """
from pathlib import Path
from torch import nn

Path(__file__).with_name("ran.marker").write_text("ran")

def make(num_classes=10, in_features=4):
    return nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, num_classes))
"""


def test_the_cli_lists_of_forms_match_the_readers():
    from prunekit.deploy.io import TORCH_SUFFIXES

    assert _names.MODEL_FORMS == sources.FORMS
    assert _names.DATA_FORMS == userdata.FORMS
    assert set(_names.WEIGHT_SUFFIXES) <= set(TORCH_SUFFIXES) | {".safetensors"}


def test_check_data_takes_folders_and_files_and_names_the_forms(tmp_path):
    (tmp_path / "imgs").mkdir()
    check_data(str(tmp_path / "imgs"), {"input_size": "32"})
    with pytest.raises(PrunekitError, match="does not exist\\); allowed: mnist, digits, idx:<dir>, an image folder"):
        check_data(str(tmp_path / "missing.csv"))
    with pytest.raises(PrunekitError, match="neither a folder nor a file of type .npz, .pt, .csv"):
        check_data(str(tmp_path / "data.txt"))
    with pytest.raises(PrunekitError, match="not the bundled dataset 'mnist'"):
        check_data("mnist", {"mean": "0.5"})
    with pytest.raises(PrunekitError, match="input_size='a' must be H or H,W"):
        check_data(str(tmp_path / "imgs"), {"input_size": "a"})


def test_check_model_and_checkpoint(tmp_path):
    check_model("timm:resnet18")
    with pytest.raises(PrunekitError, match="unknown model 'lenet9'.*timm:NAME, hf:DIR"):
        check_model("lenet9")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_model(f"{tmp_path}/net.py:make")
    with pytest.raises(PrunekitError, match="unsupported file type '.pkl'; allowed: .*\\.safetensors, \\.pt, \\.pth"):
        check_checkpoint(tmp_path / "w.pkl")
    (tmp_path / "folder").mkdir()
    with pytest.raises(PrunekitError, match="without model.json"):
        check_checkpoint(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match="not found"):
        check_checkpoint(tmp_path / "w.pt")


def test_prune_refuses_bad_data_before_any_work(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", features=np.zeros((8, 4)))
    out = tmp_path / "run"
    assert main(["prune", "--model", "mlp", "--data", str(tmp_path / "d.npz"), "--out", str(out)]) == 2
    assert "expected the arrays x and y" in capsys.readouterr().err and not out.exists()
    assert main(["prune", "--model", "mlp", "--data", "digits", "--mean", "0.5", "--std", "0.2",
                 "--out", str(out)]) == 2
    assert "not the bundled dataset 'digits'" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow  # three commands in-process: ~10 s
def test_factory_model_on_npz_through_prune_eval_and_a_checkpoint(tmp_path, capsys, one_thread):
    (tmp_path / "net.py").write_text(textwrap.dedent(FACTORY))
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    np.savez(tmp_path / "d.npz", x=(rng.normal(size=(60, 4)) + y[:, None] * 2).astype(np.float32), y=y)
    common = ["--data", str(tmp_path / "d.npz"), "--dense-epochs", "2", "--epochs", "0", "--batch-size", "8",
              "--sparsity", "0.5", "--no-progress"]
    assert main(["prune", "--model", f"{tmp_path}/net.py:make", *common, "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    spec = json.loads((tmp_path / "run" / "model" / "model.json").read_text())
    assert spec["model"] == {"name": f"{tmp_path}/net.py:make", "kwargs": {"num_classes": 3}}
    marker = tmp_path / "ran.marker"
    marker.unlink()
    # a fresh module cache, as in a new process: eval must refuse before the file is imported
    for key in [k for k in list(__import__("sys").modules) if k.startswith("prunekit_factory_")]:
        del __import__("sys").modules[key]
    assert main(["eval", str(tmp_path / "run" / "model"), "--json"]) == 2
    assert "--trust-factory" in capsys.readouterr().err and not marker.exists()
    assert main(["eval", str(tmp_path / "run" / "model"), "--json", "--trust-factory"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["accuracy"] > 0.5 and row["sparsity"] > 0.2   # 50% of the hidden layer (the head is spared)
    # the same architecture from a plain state_dict file (weights_only): no dense training
    model = sources.from_source(f"{tmp_path}/net.py:make", num_classes=3)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    assert main(["prune", "--model", f"{tmp_path}/net.py:make", "--checkpoint", str(tmp_path / "w.pth"), *common,
                 "--out", str(tmp_path / "run2")]) == 0
    results = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert results["dense"]["from_cache"] is True and results["data"]["num_classes"] == 3
