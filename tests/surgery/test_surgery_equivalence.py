"""The contract: masking.apply(model, plan) and compact(model, plan) compute the same outputs."""
import copy
import json

import pytest
import surgery_nets as nets
import torch
from torch import nn

from prunekit.apply import masking
from prunekit.plan import Plan
from prunekit.surgery import compact, compact_shapes, plan_groups, rebuild
from prunekit.zoo.models import LeNet5, VGGSmall


def _lenet():
    return LeNet5(input_size=16)


def _vgg():
    return VGGSmall(in_channels=3, widths=(8, 16), hidden=16, input_size=16, num_classes=5)


CASES = {  # name: (builder, input shape)
    "mlp": (nets.mlp, (3, 64)),
    "lenet5": (_lenet, (2, 1, 16, 16)),
    "vgg_bn": (_vgg, (2, 3, 16, 16)),
    "resnet": (nets.TinyResNet, (2, 3, 16, 16)),
    "mobilenet": (nets.TinyMobileNet, (2, 3, 16, 16)),
    "densenet": (nets.TinyDenseNet, (2, 3, 8, 8)),
    "se_block": (nets.SEBlock, (2, 3, 8, 8)),
}


def _build(name, seed=0):
    builder, shape = CASES[name]
    torch.manual_seed(seed)
    model = nets.randomize_bn(builder(), seed).eval()
    return model, torch.randn(*shape)


def _nparams(model):
    return sum(p.numel() for p in model.parameters())


def _prune_both(model, x, **kw):
    plan = plan_groups(model, x, kw.pop("amount", 0.4), **kw)
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    slim = compact(model, plan, example_inputs=x)
    return plan, masked, slim


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_masked_and_compacted_agree(name, scope):
    model, x = _build(name)
    before = copy.deepcopy(model.state_dict())
    plan, masked, slim = _prune_both(model, x, scope=scope)
    with torch.no_grad():
        ref = masked(x)
        out = slim(x)
        x2 = torch.randn_like(x)
        assert torch.allclose(masked(x2), slim(x2), atol=1e-5)
    assert torch.allclose(ref, out, atol=1e-5), (ref - out).abs().max()
    assert _nparams(slim) < _nparams(model)
    # the input model is untouched and the result is plain
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not any(k.endswith("_mask") for k in slim.state_dict())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in slim.modules())


@pytest.mark.parametrize("name", ["mlp", "lenet5", "vgg_bn", "resnet", "mobilenet", "densenet"])
def test_compacted_size_is_masked_nonzero_count(name):
    """Removing a slice removes exactly the entries the masks zero (rows and columns alike)."""
    model, x = _build(name)
    plan, masked, slim = _prune_both(model, x, amount=0.5)
    pruned = sum(int((~keep).sum()) for keep in masking.masks(masked).values())
    assert pruned > 0
    assert _nparams(slim) == _nparams(model) - pruned


def test_compacting_the_masked_model_gives_the_same_model():
    model, x = _build("resnet")
    plan, masked, slim = _prune_both(model, x)
    slim2 = compact(masked, plan)
    with torch.no_grad():
        assert torch.allclose(slim(x), slim2(x), atol=1e-6)
    assert masking.is_masked(masked) and not masking.is_masked(slim2)


def test_module_attributes_follow_the_slices():
    model, x = _build("mobilenet")
    _, _, slim = _prune_both(model, x, amount=0.5)
    for m in slim.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels
            assert m.weight.shape[1] * m.groups == m.in_channels
            if m.groups > 1:
                assert m.groups == m.in_channels == m.out_channels  # still depthwise
        elif isinstance(m, nn.BatchNorm2d):
            assert m.num_features == m.weight.shape[0] == m.running_mean.shape[0] == m.running_var.shape[0]
        elif isinstance(m, nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape)


@pytest.mark.parametrize("name", ["vgg_bn", "densenet", "lenet5"])
def test_rebuild_from_shapes_and_state_dict(name):
    model, x = _build(name)
    _, _, slim = _prune_both(model, x, amount=0.5)
    shapes = json.loads(json.dumps(compact_shapes(slim)))       # survives JSON
    fresh, _ = _build(name, seed=1)                               # same architecture, other weights
    rebuilt = rebuild(fresh, shapes)
    rebuilt.load_state_dict(slim.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), slim(x), atol=1e-6)
    assert compact_shapes(rebuilt) == compact_shapes(slim)


def test_rebuild_refuses_another_architecture():
    model, x = _build("vgg_bn")
    _, _, slim = _prune_both(model, x)
    with pytest.raises(ValueError, match="rebuild needs the architecture"):
        rebuild(nets.mlp(), compact_shapes(slim))


def test_plan_round_trips_through_json():
    model, x = _build("mlp")
    plan, masked, slim = _prune_both(model, x)
    assert any("#dim" in k for k in plan.tensors)   # hidden layers lose rows and columns
    again = Plan.from_json(plan.to_json())
    assert list(again.tensors) == list(plan.tensors)
    masked2 = copy.deepcopy(model)
    masking.apply(masked2, again)
    with torch.no_grad():
        assert torch.allclose(masked2(x), masked(x))
        assert torch.allclose(compact(model, again)(x), slim(x))


def test_compacted_model_saves_and_loads_as_slim_builtin(tmp_path):
    import prunekit
    from prunekit.zoo.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet5").eval()
    x = torch.randn(2, 1, 28, 28)
    plan = plan_groups(model, x, 0.5)
    slim = compact(model, plan, x)
    prunekit.save(slim, tmp_path / "slim")
    back = prunekit.load(tmp_path / "slim")
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in slim.parameters())
    assert torch.allclose(back(x), slim(x), atol=1e-6)


class _SamePadConv(nn.Conv2d):
    """EfficientNet-Lite's Conv2dStaticSamePadding, in short: pads, then calls F.conv2d (a rule-less function)."""

    def forward(self, x):
        pad = self.kernel_size[0] // 2
        return nn.functional.conv2d(nn.functional.pad(x, (pad, pad, pad, pad)), self.weight, self.bias, self.stride)


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 0.5


class _SubclassNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = _SamePadConv(3, 16, 3)
        self.bn = nn.BatchNorm2d(16)
        self.conv = _SamePadConv(16, 16, 3)
        self.fc1, self.fc2 = _ScaledLinear(16, 32), _ScaledLinear(32, 4)

    def forward(self, x):
        x = self.conv(torch.relu(self.bn(self.stem(x)))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def test_conv_and_linear_subclasses_are_handled_as_their_base_class():
    # issue 12: EfficientNet-Lite's padding conv subclass gave "no prunable group"
    torch.manual_seed(0)
    model, x = _SubclassNet().eval(), torch.randn(2, 3, 12, 12)
    plan, masked, slim = _prune_both(model, x, amount=0.5)
    assert {"stem.weight", "conv.weight", "fc1.weight"} <= set(plan.tensors)
    assert type(slim.stem) is _SamePadConv and slim.stem.out_channels == 8 and slim.fc1.out_features == 16
    with torch.no_grad():
        assert torch.allclose(masked(x), slim(x), atol=1e-5)


class _LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: channels first, normalised by F.layer_norm after a permute."""

    def forward(self, x):
        y = nn.functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias)
        return y.permute(0, 3, 1, 2)


class _LayerScaleBlock(nn.Module):
    """A ConvNeXt-style residual block in miniature: layer scale and a channel LayerNorm called functionally."""

    def __init__(self, c=8):
        super().__init__()
        self.dw, self.norm = nn.Conv2d(c, c, 3, padding=1, groups=c), _LayerNorm2d(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        y = self.norm(self.dw(x)).permute(0, 2, 3, 1)
        y = self.fc2(torch.relu(self.fc1(y))).permute(0, 3, 1, 2)
        return x + y.mul(self.gamma.reshape(1, -1, 1, 1))


class _LayerScaleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 8, 3, padding=1), _LayerScaleBlock(), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_layer_scale_parameters_follow_their_channels():
    torch.manual_seed(0)
    model, x = _LayerScaleNet().eval(), torch.randn(2, 3, 8, 8)
    plan, masked, slim = _prune_both(model, x, amount=0.5)
    assert "block.fc1.weight" in plan.tensors and slim.block.fc1.out_features == 16   # the MLP hidden width
    with torch.no_grad():
        assert torch.allclose(masked(x), slim(x), atol=1e-5)
    # with exact=False the residual stream goes too, the layer scale and the norm's weights with it
    plan = plan_groups(model, x, 0.5, exact=False)
    assert any("a LayerNorm normalises over" in n and "masked and compacted models differ" in n for n in plan.notes)
    slim = compact(model, plan, example_inputs=x)
    assert slim.stem.out_channels == 4 and slim.block.gamma.shape == (4,) and slim.block.norm.weight.shape == (4,)
    assert slim(x).shape == (2, 4)
