"""Built-in reference models and a registry to build them by name.

Every model is a plain ``nn.Module`` made of ``features`` (convolutions, when it
has any) and ``classifier`` (``nn.Sequential`` starting with ``nn.Flatten``).
The output layer is always the last ``nn.Linear`` in ``named_modules()`` order,
which is how pruning code recognises (and spares) the classifier head.
ReLUs are not in-place: hooks that keep a layer's output (activation-based
criteria) would otherwise see it overwritten.

``build_model`` records how a model was built (``model._prunekit_spec``) so a
saved checkpoint can say how to rebuild the architecture.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunekit._util import json_safe
from prunekit.errors import InvalidTypeError, PrunekitError
from prunekit.registry import Registry
from prunekit.zoo.sources import build_source, is_source

__all__ = ["MODELS", "LeNet300100", "LeNet5", "MLP", "VGGSmall", "build_model", "model_spec"]

MODELS = Registry("model")


def _mlp_layers(in_features: int, hidden: Sequence[int], num_classes: int) -> List[nn.Module]:
    """Flatten, then Linear+ReLU for each hidden width, then the output Linear."""
    layers: List[nn.Module] = [nn.Flatten()]
    width = int(in_features)
    for h in hidden:
        layers += [nn.Linear(width, int(h)), nn.ReLU()]
        width = int(h)
    layers.append(nn.Linear(width, int(num_classes)))
    return layers


@MODELS.register("mlp")
class MLP(nn.Module):
    """Generic fully connected classifier; accepts (N, in_features) or any (N, ...) that flattens to it."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (256, 128), num_classes: int = 10):
        super().__init__()
        self.classifier = nn.Sequential(*_mlp_layers(in_features, hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


@MODELS.register("lenet300")
class LeNet300100(nn.Module):
    """LeNet-300-100 (784-300-100-10 with ReLU), the MLP of Han et al. 2015; 266,610 parameters."""

    def __init__(self, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.classifier = nn.Sequential(*_mlp_layers(in_features, (300, 100), num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


@MODELS.register("lenet5")
class LeNet5(nn.Module):
    """Caffe's LeNet-5 as pruned in Han et al. 2015 (431,080 parameters at 28x28).

    conv 20@5x5 -> maxpool 2 -> conv 50@5x5 -> maxpool 2 -> fc 500 -> ReLU -> fc.
    Like the Caffe model there is no nonlinearity after the convolutions.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        super().__init__()
        side = ((int(input_size) - 4) // 2 - 4) // 2  # two valid 5x5 convs, each followed by a 2x2 pool
        if side < 1:
            raise PrunekitError(f"LeNet5 needs input_size >= 16, got {input_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 20, kernel_size=5),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, kernel_size=5),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(50 * side * side, 500),
            nn.ReLU(),
            nn.Linear(500, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _vgg_stage(in_ch: int, out_ch: int, bn: bool) -> List[nn.Module]:
    """Two conv3x3(-BN)-ReLU blocks then a 2x2 max pool."""
    layers: List[nn.Module] = []
    for c_in in (in_ch, out_ch):
        # A conv bias is redundant right before BatchNorm (BN's shift replaces it).
        layers.append(nn.Conv2d(c_in, out_ch, kernel_size=3, padding=1, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU())
    layers.append(nn.MaxPool2d(2))
    return layers


@MODELS.register("vgg_small")
class VGGSmall(nn.Module):
    """Small VGG-style CNN: per stage two conv3x3-BN-ReLU and a maxpool; global avg pool; 2-layer head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28,
                 widths: Sequence[int] = (32, 64, 128), bn: bool = True, hidden: int = 128):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if not widths:
            raise PrunekitError("VGGSmall needs at least one stage width")
        if int(input_size) // 2 ** len(widths) < 1:
            raise PrunekitError(f"input_size {input_size} is too small for {len(widths)} 2x2 poolings")
        layers: List[nn.Module] = []
        for c_in, c_out in zip((in_channels,) + widths[:-1], widths):
            layers += _vgg_stage(c_in, c_out, bn)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(widths[-1], hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


# --------------------------------------------------------------------------- build by name
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


@MODELS.register("resnet18_cifar")
class ResNetCIFAR(nn.Module):
    """CIFAR-style ResNet (default ResNet-18): 3x3 stem, basic blocks [2, 2, 2, 2], widths 64-512."""

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (64, 128, 256, 512),
                 blocks: Sequence[int] = (2, 2, 2, 2), in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, (w, nb) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(nb):
                stage.append(BasicBlock(cin, w, stride=2 if (i > 0 and j == 0) else 1))
                cin = w
            layers.append(nn.Sequential(*stage))
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, residual when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: List[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


@MODELS.register("mobilenetv2_cifar")
class MobileNetV2CIFAR(nn.Module):
    """MobileNetV2 (width 1.0) for 32x32 inputs: stride-1 stem and first strided stage at stride 1."""

    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1))  # (expand, out channels, blocks, first stride)

    def __init__(self, num_classes: int = 10, cfg=CFG, stem: int = 32, last: int = 1280, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                  nn.ReLU6())
        blocks, cin = [], stem
        for t, c, nb, s in cfg:
            for j in range(nb):
                blocks.append(InvertedResidual(cin, c, s if j == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.head(self.blocks(self.stem(x)))))


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model ``name`` and record ``{"name", "kwargs"}`` on it.

    The spec is checked before building so a model that could not be saved is never
    returned. Unknown names raise ``KeyError`` listing the known ones. A name with a colon is a
    model source (``timm:resnet18``, ``hf:DIR``, ``file.py:function``: :mod:`prunekit.zoo.sources`);
    this is what loading a saved spec calls, so a factory (code) is only built when trusted.
    """
    if is_source(name):
        return build_source(name, **kwargs)
    cls = MODELS.get(name)
    safe_kwargs = {k: json_safe(v, f"build_model({name!r}) argument {k}") for k, v in kwargs.items()}
    try:
        model = cls(**kwargs)
    except TypeError as e:
        raise InvalidTypeError(f"cannot build model {name!r} with {kwargs}: {e}") from e
    model._prunekit_spec = {"name": name, "kwargs": safe_kwargs}
    return model


def model_spec(model: nn.Module) -> Optional[Dict[str, Any]]:
    """The ``{"name", "kwargs"}`` recorded by :func:`build_model`, or None (a copy: safe to edit)."""
    spec = getattr(model, "_prunekit_spec", None)
    return copy.deepcopy(spec) if spec is not None else None
