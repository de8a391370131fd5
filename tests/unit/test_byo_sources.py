"""Model sources (prunekit.zoo.sources): timm, Hugging Face folders, factory files and modules; their save/load
round trips, and that a saved factory's code never runs on load unless the caller trusts it."""
from __future__ import annotations

import importlib.util
import json
import shutil
import textwrap

import pytest
import torch

import prunekit
from prunekit.errors import PrunekitError, UnknownNameError
from prunekit.zoo import sources
from prunekit.zoo.models import build_model
from prunekit.zoo.timm_compat import import_timm

needs_timm = pytest.mark.skipif(import_timm() is None, reason="timm not installed")
needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers not installed")

FACTORY = """
from pathlib import Path
from torch import nn

Path(__file__).with_name("imported.marker").write_text("the factory's file ran")  # proves the code ran

def make(num_classes=10, in_channels=1, hidden=8):
    return nn.Sequential(nn.Conv2d(in_channels, hidden, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(hidden, num_classes))

def not_a_model():
    return 42
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "code" / "mynet.py"
    path.parent.mkdir()
    path.write_text(textwrap.dedent(FACTORY))
    return path


def _same_outputs(a, b, x):
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-6)


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("ref, message", [
    ("timm:", "give the timm model name"),
    ("hf:/nonexistent/folder", "not a local Hugging Face folder"),
    ("model.py:", "is not a function name"),
    ("my-package:make", "neither a .py file nor a module name"),
])
def test_malformed_sources_are_refused_naming_the_forms(ref, message):
    with pytest.raises(PrunekitError, match=message) as e:
        sources.parse_source(ref)
    assert "timm:NAME, hf:DIR" in str(e.value)


def test_a_missing_factory_file_is_said(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sources.parse_source(f"{tmp_path}/nope.py:make")


def test_sources_parse_to_canonical_refs(factory_file, monkeypatch):
    monkeypatch.chdir(factory_file.parent)
    src = sources.parse_source("mynet.py:make")
    assert (src.kind, src.ref, src.runs_user_code) == ("file", f"{factory_file}:make", True)
    assert sources.parse_source("pkg.sub:build") == sources.ModelSource("module", "pkg.sub", "build")
    assert sources.parse_source("timm:resnet18").ref == "timm:resnet18"
    assert not sources.is_source("lenet300") and sources.is_source("timm:resnet18")


# ----------------------------------------------------------------------------- timm
@needs_timm
def test_timm_model_round_trips_through_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = build_model("timm:test_resnet", num_classes=3, in_chans=1)
    assert model._prunekit_spec == {"name": "timm:test_resnet", "kwargs": {"num_classes": 3, "in_chans": 1}}
    prunekit.prune(model, 0.5)
    prunekit.save(model, tmp_path / "m", compressed=True)
    spec = json.loads((tmp_path / "m" / "model.json").read_text())["model"]
    assert spec["name"] == "timm:test_resnet"
    back = prunekit.load(tmp_path / "m")   # a library: rebuilt without any opt-in
    assert type(back).__name__ == type(model).__name__
    assert _same_outputs(model, back, torch.randn(2, 1, 32, 32))


@needs_timm
def test_timm_unknown_names_and_downloads_are_refused():
    with pytest.raises(UnknownNameError, match="unknown timm model 'resnet1888'"):
        build_model("timm:resnet1888")
    with pytest.raises(PrunekitError, match="pretrained not allowed.*--checkpoint"):
        build_model("timm:test_resnet", pretrained=True)


@needs_timm
def test_timm_takes_classes_and_channels_from_the_data():
    info = {"num_classes": 4, "input_shape": (1, 16, 16)}
    assert sources.data_kwargs("timm:test_resnet", info) == {"num_classes": 4, "in_chans": 1}
    assert sources.data_kwargs("lenet5", info) == {"num_classes": 4}
    assert sources.data_kwargs("timm:test_resnet", {"num_classes": 2, "input_shape": (5,)}) == {"num_classes": 2}


@needs_timm
def test_a_spec_that_disagrees_with_the_weights_is_refused_before_building(tmp_path):
    prunekit.save(build_model("timm:test_resnet", num_classes=3), tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "model.json").read_text())
    doc["model"]["kwargs"]["num_classes"] = 10 ** 7   # a huge head: must fail on the meta twin, not allocate
    (tmp_path / "m" / "model.json").write_text(json.dumps(doc))
    with pytest.raises(PrunekitError, match="does not match the saved tensors"):
        prunekit.load(tmp_path / "m")


# ----------------------------------------------------------------------------- factories
def test_a_saved_factory_model_is_refused_without_opt_in_and_runs_no_code(factory_file, tmp_path):
    model = sources.from_source(f"{factory_file}:make", num_classes=3)   # naming it is asking for it
    marker = factory_file.with_name("imported.marker")
    assert marker.is_file()
    prunekit.save(model, tmp_path / "m")
    marker.unlink()
    for key in [k for k in list(__import__("sys").modules) if k.startswith("prunekit_factory_")]:
        del __import__("sys").modules[key]   # a fresh process: the file is not imported yet
    with pytest.raises(sources.UntrustedCodeError, match="trust_code=True.*--trust-factory"):
        prunekit.load(tmp_path / "m")
    assert not marker.exists()   # refused before the file was imported
    back = prunekit.load(tmp_path / "m", trust_code=True)
    assert marker.is_file() and _same_outputs(model, back, torch.randn(2, 1, 8, 8))
    mine = prunekit.load(tmp_path / "m", sources.from_source(f"{factory_file}:make", num_classes=3))
    assert _same_outputs(model, mine, torch.randn(2, 1, 8, 8))


def test_trust_is_for_the_named_factory_only(factory_file, tmp_path):
    other = factory_file.with_name("other.py")
    other.write_text(textwrap.dedent(FACTORY))
    with sources.trusting([f"{factory_file}:make"]):
        assert isinstance(build_model(f"{factory_file}:make"), torch.nn.Module)
        with pytest.raises(sources.UntrustedCodeError):
            build_model(f"{other}:make")


def test_factory_errors_name_the_problem(factory_file):
    with pytest.raises(UnknownNameError, match="no function 'missing'.*make"):
        sources.from_source(f"{factory_file}:missing")
    with pytest.raises(PrunekitError, match="returned a int, not a torch nn.Module"):
        sources.from_source(f"{factory_file}:not_a_model")
    with pytest.raises(PrunekitError, match="cannot build model.*unexpected keyword"):
        sources.from_source(f"{factory_file}:make", depth=3)
    with pytest.raises(PrunekitError, match="not JSON-safe"):
        sources.from_source(f"{factory_file}:make", hidden=object())


def test_module_factory_and_its_data_arguments(factory_file, monkeypatch):
    monkeypatch.syspath_prepend(str(factory_file.parent))
    model = sources.from_source("mynet:make", num_classes=5, in_channels=3)
    assert model._prunekit_spec == {"name": "mynet:make", "kwargs": {"num_classes": 5, "in_channels": 3}}
    with sources.trusting(["mynet:make"]):   # only the arguments its signature has
        assert sources.data_kwargs("mynet:make", {"num_classes": 2, "input_shape": (3, 8, 8)}) == \
            {"num_classes": 2, "in_channels": 3}
    with pytest.raises(PrunekitError, match="cannot import module 'no_such_module_xyz'"):
        sources.from_source("no_such_module_xyz:make")


# ----------------------------------------------------------------------------- Hugging Face folders
@needs_hf
def test_hf_image_folder_round_trips_without_the_folder(tmp_path):
    import transformers

    cfg = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                 image_size=8, patch_size=4, num_channels=3, num_labels=2)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(cfg).save_pretrained(tmp_path / "vit")
    model = build_model(f"hf:{tmp_path / 'vit'}", num_labels=3)   # a new 3-class head on the folder's weights
    x = torch.randn(2, 3, 8, 8)
    assert model.task == "image-classification" and model.eval()(x).shape == (2, 3)
    assert len(model._prunekit_spec["kwargs"]["config"]["id2label"]) == 3
    prunekit.save(model, tmp_path / "saved")
    shutil.rmtree(tmp_path / "vit")   # the spec records the config: the folder is not needed to load
    assert _same_outputs(model, prunekit.load(tmp_path / "saved"), x)


@needs_hf
def test_hf_sequence_config_and_remote_code_refused(tmp_path):
    import transformers

    transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, num_labels=4).save_pretrained(tmp_path / "bert")
    model = build_model(f"hf:{tmp_path / 'bert'}")
    assert model.task == "sequence-classification"
    assert model.eval()(torch.randint(0, 50, (2, 5))).shape == (2, 4)
    doc = json.loads((tmp_path / "bert" / "config.json").read_text())
    doc["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (tmp_path / "bert" / "config.json").write_text(json.dumps(doc))
    with pytest.raises(PrunekitError, match="custom code.*never runs"):
        build_model(f"hf:{tmp_path / 'bert'}")
