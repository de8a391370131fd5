"""plan_groups options (scope, floor, round_to, protect, aggregate), compact's checks, extension points."""
import copy
import math

import pytest
import surgery_nets as nets
import torch
from torch import nn

import prunekit
from prunekit.apply import masking
from prunekit.surgery import (
    build_groups,
    compact,
    group_scores,
    plan_groups,
    register_layer_handler,
    register_module_rule,
    slice_tensors,
)
from prunekit.zoo.models import VGGSmall

X = torch.randn(2, 3, 16, 16)


def _vgg(widths=(16, 24), hidden=32):
    torch.manual_seed(0)
    return nets.randomize_bn(VGGSmall(in_channels=3, widths=widths, hidden=hidden, input_size=16)).eval()


def _kept(plan):
    return {g["lead"]: g["channels"] - len(g["pruned"]) for g in plan.meta["groups"] if g["prunable"]}


def test_layer_scope_prunes_each_group_by_the_amount():
    plan = plan_groups(_vgg(), X, 0.5)
    assert _kept(plan) == {"features.0.weight": 8, "features.3.weight": 8, "features.7.weight": 12,
                           "features.10.weight": 12, "classifier.1.weight": 16}


def test_round_to_keeps_multiples_of_8():
    plan = plan_groups(_vgg(), X, 0.3, round_to=8)
    kept = _kept(plan)
    assert kept == {"features.0.weight": 16, "features.3.weight": 16, "features.7.weight": 24,
                    "features.10.weight": 24, "classifier.1.weight": 24}   # 11.2->16, 16.8->24, 22.4->24
    plan = plan_groups(_vgg(), X, 0.6, round_to=8)
    assert all(k % 8 == 0 for k in _kept(plan).values())
    slim = compact(_vgg(), plan, example_inputs=X)
    assert all(m.out_channels % 8 == 0 for m in slim.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError, match="round_to"):
        plan_groups(_vgg(), X, 0.3, round_to=0)


def test_protect_keeps_a_modules_channels():
    plan = plan_groups(_vgg(), X, 0.5, protect=["features.0", "classifier.*"])
    kept = _kept(plan)
    assert "features.0.weight" not in kept and "classifier.1.weight" not in kept
    assert "features.0.weight" not in plan.tensors
    assert plan.tensors["features.3.weight"].dim == 0        # its *input* channels are features.0's: kept
    assert "features.3.weight#dim1" not in plan.tensors
    assert any("protected (module features.0)" in n for n in plan.notes)


def test_global_scope_keeps_the_floor_and_hits_the_amount():
    model = nets.randomize_bn(nets.TinyResNet()).eval()
    plan = plan_groups(model, X, 0.9, scope="global", min_keep=0.25)
    groups = [g for g in plan.meta["groups"] if g["prunable"]]
    for g in groups:
        assert g["channels"] - len(g["pruned"]) >= math.ceil(0.25 * g["channels"]), g["lead"]
    pruned = sum(len(g["pruned"]) for g in groups)
    total = sum(g["channels"] for g in groups)
    assert pruned == sum(g["channels"] - math.ceil(0.25 * g["channels"]) for g in groups)  # floor everywhere
    assert any("floor" in n for n in plan.notes)
    plan = plan_groups(model, X, 0.3, scope="global", min_keep=0.25)
    sizes = [len(g["pruned"]) for g in plan.meta["groups"] if g["prunable"]]
    assert sum(sizes) == round(0.3 * total) and len(set(sizes)) > 1      # ranked across groups


@pytest.mark.parametrize("aggregate", ["sum", "mean", "max", "first"])
def test_aggregates_and_criteria(aggregate):
    model = _vgg()
    graph = build_groups(model, X)
    scores = group_scores(model, graph, aggregate=aggregate)
    assert set(scores) == {g.id for g in graph.prunable()}
    assert all(v.shape == (g.channels,) and bool((v >= 0).all()) for g in graph.prunable()
               for v in [scores[g.id]])
    plan = plan_groups(model, X, 0.5, aggregate=aggregate, criterion="random", seed=3, graph=graph)
    assert plan.meta["aggregate"] == aggregate
    with pytest.raises(ValueError, match="aggregate"):
        plan_groups(model, X, 0.5, aggregate="median", graph=graph)


def test_first_aggregate_uses_the_producer_only():
    model = _vgg()
    graph = build_groups(model, X)
    lead = graph.group_of("features.0.weight")[0]
    first = group_scores(model, graph, aggregate="first")[lead.id]
    w = model.features[0].weight.detach().double()
    assert torch.allclose(first, w.reshape(w.shape[0], -1).norm(dim=1))


def test_gradual_pruning_keeps_already_pruned_channels():
    model = _vgg()
    first = plan_groups(model, X, 0.25)
    masking.apply(model, first)
    second = plan_groups(model, X, 0.5)
    for name, tp in first.tensors.items():
        assert set(tp.pruned_idx) <= set(second.tensors[name].pruned_idx), name
    assert second.tensors["features.0.weight"].pruned_units == 8


# ----------------------------------------------------------------------------- compact's checks

def test_compact_refuses_unstructured_plans():
    model = nets.mlp()
    plan = prunekit.plan_pruning(model, 0.5)
    with pytest.raises(ValueError, match="masking.apply"):
        compact(model, plan)


def test_compact_reports_plans_without_their_coupled_slices():
    model = nets.mlp()
    plan = prunekit.plan_pruning(model, 0.5, pattern="structured", dim=0)   # rows only, no consumers
    with pytest.raises(ValueError, match="plan_groups"):
        compact(model, plan, example_inputs=torch.randn(2, 64))


def test_compact_refuses_a_model_of_another_shape():
    model = nets.mlp()
    x = torch.randn(2, 64)
    plan = plan_groups(model, x, 0.5)
    slim = compact(model, plan)
    with pytest.raises(ValueError, match="was made for"):
        compact(slim, plan)


# ----------------------------------------------------------------------------- extension points

class Scale(nn.Module):
    """A user layer with one weight per channel, applied by an op prunekit has no rule for (``x * scale``
    alone would be recognised as a layer scale)."""

    def __init__(self, channels):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return torch.addcmul(x, x, self.scale.view(1, -1, 1, 1))


def _scaled_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), Scale(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten())


def test_a_user_layer_is_unprunable_until_taught():
    grp = build_groups(_scaled_net(), X).group_of("0.weight")[0]
    assert not grp.prunable

    @register_module_rule(Scale)
    def scale_rule(prop, node, name, module):
        t = prop.tag(node.args[0])
        for s in (t.segs if t is not None else ()):
            prop.add(s.group, f"{name}.scale", 0, "channelwise", s)
        return prop.passthrough(node, node.args[0])

    @register_layer_handler(Scale)
    def scale_handler(module, cuts):
        slice_tensors(module, cuts)

    model = _scaled_net()
    plan = plan_groups(model, X, 0.5)
    assert plan.tensors["1.scale"].pruned_units == 4
    masked = copy.deepcopy(model)
    masking.apply(masked, plan)
    slim = compact(model, plan, example_inputs=X)
    assert slim[1].scale.shape == (4,)
    with torch.no_grad():
        assert torch.allclose(masked(X), slim(X), atol=1e-6)


def test_compact_reports_a_plan_that_prunes_the_outputs():
    model = nets.mlp()
    plan = prunekit.plan_pruning(model, 0.5, pattern="structured", dim=0, include=["5"])  # output rows
    with pytest.raises(ValueError, match="prunes the model's outputs"):
        compact(model, plan, example_inputs=torch.randn(2, 64))


def test_compact_names_a_layer_without_handler():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2))
    plan = prunekit.plan_pruning(model, 0.5, pattern="structured", dim=1, types=["Embedding"])
    with pytest.raises(ValueError, match=r"no layer handler for 0 \(Embedding\)"):
        compact(model, plan)


def test_compact_drops_hooks_and_masks():
    model = _vgg()
    model.features[0].register_forward_hook(lambda m, i, o: None)
    plan = plan_groups(model, X, 0.5)
    masking.apply(model, plan)
    slim = compact(model, plan)
    assert model.features[0]._forward_hooks and masking.is_masked(model)          # the input is untouched
    assert not any(m._forward_hooks for m in slim.modules()) and not masking.is_masked(slim)
    assert not any("_mask" in k for k in slim.state_dict())


def test_compact_checks_outputs_against_the_traced_shapes_without_rerunning_the_original():
    model = _scaled_net()
    plan = plan_groups(model, X, 0.5)
    assert plan.meta["io_shapes"]["outputs"] == list(model(X).shape)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    compact(model, plan, example_inputs=X)
    assert calls == []                           # the plan's recorded shapes were enough
    compact(model, plan, example_inputs=torch.cat([X, X]))
    assert calls == [1]                          # other input shapes: the original runs to compare
    plan.meta["io_shapes"]["outputs"] = [2, 99]  # a plan whose outputs were recorded otherwise is caught
    with pytest.raises(prunekit.PrunekitError, match="returns shapes"):
        compact(model, plan, example_inputs=X)


def test_compacted_model_shares_no_storage_with_the_original():
    """compact skips copying the tensors it replaces: none of the slim model's tensors may alias the user's."""
    for model in (_scaled_net(), VGGSmall()):
        model.eval()
        x = X if isinstance(model, nn.Sequential) else torch.randn(2, 1, 28, 28)
        slim = compact(model, plan_groups(model, x, 0.5), example_inputs=x)
        theirs = {t.data_ptr() for t in list(model.parameters()) + list(model.buffers()) if t.numel()}
        assert not any(t.data_ptr() in theirs for t in list(slim.parameters()) + list(slim.buffers()) if t.numel())
