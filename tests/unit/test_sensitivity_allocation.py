"""allocation="sensitivity" for prunekit.prune: each layer probed alone with the criterion, least-cost sparsities."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from selflabel import self_labelled
from torch import nn

import prunekit
from prunekit.api import needs_data
from prunekit.apply import masking
from prunekit.select.probe import GRID, LossProbe, cost_curves, selection_trial


def _cnn(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(16 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        net[7].weight.mul_(50)   # confident logits: the dense loss on its own labels is low, pruning raises it
    return net


def _loss(model, data):
    with torch.no_grad():
        return sum(float(F.cross_entropy(model(x), y)) for x, y in data) / len(data)


def _prune(model, data, **options):
    uses_data = options.get("allocation") == "sensitivity" or needs_data(options["criterion"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prunekit.prune(model, 0.9, **({"data": data} if uses_data else {}), **options)


def _mean_sparsity(model, plan):
    sizes = {n: model.get_parameter(n).numel() for n in plan.tensors if n.endswith("weight")}
    return sum(plan.tensors[n].sparsity * s for n, s in sizes.items()) / sum(sizes.values())


@pytest.mark.parametrize("criterion,scope", [("l1", "layer"), ("wanda", "layer"), ("wanda", "row"),
                                             ("taylor", "layer"), ("sparsegpt", "layer")])
def test_it_meets_the_target_with_less_loss_than_uniform(criterion, scope):
    dense = _cnn()
    data = self_labelled(dense)
    losses, plans = {}, {}
    for allocation in ("uniform", "sensitivity"):
        model = copy.deepcopy(dense)
        plans[allocation] = _prune(model, data, criterion=criterion, scope=scope, allocation=allocation)
        losses[allocation] = _loss(model, data)
        assert _mean_sparsity(model, plans[allocation]) == pytest.approx(0.9, abs=2e-3)
    assert losses["sensitivity"] < losses["uniform"]
    sp = {n: tp.sparsity for n, tp in plans["sensitivity"].tensors.items() if n.endswith("weight")}
    assert sp["0.weight"] < 0.9 < sp["5.weight"] <= GRID[-1] + 1e-3   # the 72-weight conv is spared
    assert plans["sensitivity"].meta.get("allocation", "sensitivity") == "sensitivity"


def test_planning_leaves_the_model_as_it_was():
    model = _cnn()
    before = copy.deepcopy(model.state_dict())
    plan = prunekit.plan_pruning(model, 0.9, criterion="l1", allocation="sensitivity", data=self_labelled(model))
    assert plan.tensors and not masking.masks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_curves_start_at_the_current_sparsity_rise_monotonically_and_a_failing_trial_puts_the_layer_back():
    model = _cnn()
    data = self_labelled(model)
    prunekit.prune(model, 0.6, criterion="l1", scope="layer")           # masks already there: they count
    current = masking.masks(model)
    params = dict(model.named_parameters())
    scores = prunekit.criteria.compute_scores(model, list(current), "l1")
    curves = cost_curves(model, list(current), selection_trial(scores, "layer", current, params), LossProbe(data),
                         current)
    for name, pts in curves.items():
        assert pts[0] == (pytest.approx(0.6, abs=0.02), 0.0)
        assert [s for s, _ in pts[1:]] == [s for s in GRID if s > pts[0][0]]
        assert all(c1 >= c0 for (_, c0), (_, c1) in zip(pts, pts[1:]))
    before = {n: p.detach().clone() for n, p in params.items()}

    def failing(name, sparsity):
        if sparsity > 0.75:
            raise RuntimeError("trial failed")
        return params[name].detach() * 0

    with pytest.raises(RuntimeError, match="trial failed"):
        cost_curves(model, list(current), failing, LossProbe(data), current)
    assert all(torch.equal(before[n], p) for n, p in params.items())


@pytest.mark.parametrize("options,said", [
    (dict(criterion="l1"), "probes each layer's loss on calibration batches: pass data="),
    (dict(criterion="wanda", stats={}), "pass data="),
    (dict(criterion="l1", data=[torch.randn(4, 1, 8, 8)] * 2), "give batches of \\(x, y\\)"),
    (dict(criterion="l1", data=iter([])), "not a one-shot iterator"),
    (dict(criterion="l1", scope="global", data=[]), "scope='global' ranks every layer together"),
])
def test_requests_it_cannot_honour_are_refused_and_the_model_left_alone(options, said):
    model = _cnn()
    with pytest.raises(prunekit.PrunekitError, match=said):
        prunekit.prune(model, 0.9, allocation="sensitivity", **options)
    assert not masking.masks(model)


def test_an_int_amount_is_refused():
    model = _cnn()
    with pytest.raises(prunekit.PrunekitError, match="spreads a fraction"):
        prunekit.prune(model, 100, allocation="sensitivity", data=self_labelled(model))


def test_a_custom_loss_serves_the_probe_for_a_criterion_that_takes_no_gradient():
    model = _cnn()
    data = [x for x, _ in self_labelled(model)]
    with torch.no_grad():
        ref = [model(x) for x in data]
    plan = _prune(model, data, criterion="wanda", allocation="sensitivity",
                  loss_fn=lambda out, x: (out - model(x)).pow(2).mean() * 0 + out.pow(2).mean())
    assert _mean_sparsity(model, plan) == pytest.approx(0.9, abs=2e-3) and ref
