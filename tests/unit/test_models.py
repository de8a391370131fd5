"""Tests for prunekit.models: shapes, parameter counts, the registry and model specs."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from prunekit.zoo import models


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _last_layer(model: nn.Module) -> nn.Module:
    return [m for _, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]


@pytest.mark.parametrize(
    "model",
    [
        models.LeNet300100(),
        models.LeNet5(),
        models.VGGSmall(),
        models.MLP(784),
    ],
    ids=["lenet300", "lenet5", "vgg_small", "mlp"],
)
def test_mnist_shapes(model):
    model.eval()
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    last = _last_layer(model)
    assert isinstance(last, nn.Linear) and last.out_features == 10


def test_lenet300_accepts_flat_input():
    model = models.LeNet300100()
    assert model(torch.randn(2, 784)).shape == (2, 10)


@pytest.mark.parametrize(
    "model",
    [
        models.VGGSmall(input_size=8, num_classes=7),
        models.MLP(64, hidden=(32,), num_classes=7),
        models.LeNet300100(in_features=64, num_classes=7),
    ],
    ids=["vgg_small", "mlp", "lenet300"],
)
def test_digits_shapes(model):
    model.eval()
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 7)


def test_param_counts():
    assert _n_params(models.LeNet5()) == 431080
    assert _n_params(models.LeNet300100()) == 266610


def test_lenet5_other_input_size():
    model = models.LeNet5(in_channels=3, input_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="input_size"):
        models.LeNet5(input_size=12)


def test_vgg_structure():
    model = models.VGGSmall(widths=(8, 16), bn=True)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.features) == 4
    no_bn = models.VGGSmall(widths=(8, 16), bn=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())
    with pytest.raises(ValueError, match="too small"):
        models.VGGSmall(input_size=4)


def test_deterministic_construction():
    torch.manual_seed(0)
    a = models.build_model("vgg_small", widths=[8, 16])
    torch.manual_seed(0)
    b = models.build_model("vgg_small", widths=[8, 16])
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_registry_names():
    assert set(models.MODELS.names()) >= {"lenet300", "lenet5", "vgg_small", "mlp"}


def test_build_model_spec_round_trip():
    model = models.build_model("vgg_small", input_size=8, widths=(8, 16), num_classes=5)
    spec = models.model_spec(model)
    assert spec == {"name": "vgg_small", "kwargs": {"input_size": 8, "widths": [8, 16], "num_classes": 5}}
    rebuilt_spec = json.loads(json.dumps(spec))
    torch.manual_seed(1)
    rebuilt = models.build_model(rebuilt_spec["name"], **rebuilt_spec["kwargs"])
    assert models.model_spec(rebuilt) == spec
    rebuilt.load_state_dict(model.state_dict())  # same architecture
    assert rebuilt(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    spec["kwargs"]["num_classes"] = 99  # returned spec is a copy
    assert models.model_spec(model)["kwargs"]["num_classes"] == 5


def test_model_spec_none_for_plain_model():
    assert models.model_spec(models.LeNet5()) is None


def test_build_model_rejects_non_json_kwargs():
    with pytest.raises(TypeError, match="JSON"):
        models.build_model("mlp", in_features=64, hidden=(torch.tensor(3),))
    with pytest.raises(TypeError, match="JSON"):
        models.build_model("mlp", in_features=float("nan"))


def test_build_model_bad_kwarg_names_model():
    with pytest.raises(TypeError, match="lenet5"):
        models.build_model("lenet5", depth=3)


def test_unknown_model_lists_known():
    with pytest.raises(KeyError) as exc:
        models.build_model("resnet9000")
    msg = str(exc.value)
    for name in ("lenet300", "lenet5", "vgg_small", "mlp"):
        assert name in msg


@pytest.mark.parametrize("name,kwargs", [("resnet18_cifar", {"widths": [8, 16, 32, 64]}),
                                         ("mobilenetv2_cifar", {"stem": 8, "last": 64})])
def test_cifar_reference_nets(name, kwargs):
    from prunekit.zoo.models import build_model, model_spec

    model = build_model(name, num_classes=7, **kwargs).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert model_spec(model)["name"] == name
    gray = build_model(name, num_classes=10, in_channels=1, **kwargs).eval()
    assert gray(torch.randn(1, 1, 32, 32)).shape == (1, 10)
