"""Global channel ranking compares layers fairly (issue 14): ``plan_groups(..., scope="global")`` divides each
group's scores by the group's mean (``relative``, on by default for global scope), so on a small CNN it removes
conv channels and about as many MACs as per-layer pruning, where raw Ln norms (a 3x3 conv's weights are far larger
than a wide Linear's) left the first conv whole and emptied other layers."""
import pytest
import surgery_nets as nets
import torch

from prunekit.analysis.metrics import count_macs
from prunekit.surgery import compact, plan_groups
from prunekit.surgery.criteria import relative_scores
from prunekit.zoo.models import build_model

X = torch.randn(2, 1, 28, 28)


def _net(name):
    torch.manual_seed(0)
    model = build_model(name)
    return (nets.randomize_bn(model) if name == "vgg_small" else model).eval()


def _widths(model):
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}


def _macs_cut(model, plan):
    slim = compact(model, plan, X)
    return 1 - count_macs(slim, X[:1])["dense"] / count_macs(model, X[:1])["dense"], slim


@pytest.mark.parametrize("name", ["lenet5", "vgg_small"])
def test_global_removes_conv_channels_and_as_many_macs_as_per_layer(one_thread, name):
    model = _net(name)
    layer_cut, _ = _macs_cut(model, plan_groups(model, X, 0.5, scope="layer"))
    plan = plan_groups(model, X, 0.5, scope="global")
    assert plan.meta["relative"] is True
    global_cut, slim = _macs_cut(model, plan)
    before, after = _widths(model), _widths(slim)
    for conv, width in before.items():   # every conv loses channels, none is emptied to its floor
        assert 0.2 * width <= after[conv] < width, (conv, width, after[conv])
    assert abs(global_cut - layer_cut) < 0.1, (global_cut, layer_cut)   # e.g. LeNet-5: -72% vs -72%
    assert global_cut > 0.6


@pytest.mark.parametrize("name", ["lenet5", "vgg_small"])
def test_raw_global_scores_are_what_the_issue_saw(one_thread, name):
    """relative=False keeps the old ranking: far fewer MACs removed (LeNet-5's first conv stays whole)."""
    model = _net(name)
    layer_cut, _ = _macs_cut(model, plan_groups(model, X, 0.5, scope="layer"))
    plan = plan_groups(model, X, 0.5, scope="global", relative=False)
    assert plan.meta["relative"] is False
    raw_cut, slim = _macs_cut(model, plan)
    assert raw_cut < layer_cut - 0.15, (raw_cut, layer_cut)
    if name == "lenet5":
        assert _widths(slim)["features.0"] == _widths(model)["features.0"]


def test_relative_does_not_change_per_layer_ranking(one_thread):
    model = _net("vgg_small")
    a = plan_groups(model, X, 0.5, scope="layer")
    b = plan_groups(model, X, 0.5, scope="layer", relative=True)
    assert a.meta["relative"] is False
    assert {k: t.pruned_idx for k, t in a.tensors.items()} == {k: t.pruned_idx for k, t in b.tensors.items()}


def test_relative_scores_are_over_the_group_mean():
    out = relative_scores({0: torch.tensor([1.0, 3.0], dtype=torch.float64),
                           1: torch.tensor([10.0, 30.0, 20.0], dtype=torch.float64),
                           2: torch.zeros(4, dtype=torch.float64)})
    assert out[0].tolist() == [0.5, 1.5] and out[1].tolist() == [0.5, 1.5, 1.0]
    assert out[2].tolist() == [0.0] * 4
