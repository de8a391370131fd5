"""Per-layer sparsity allocation for layer/row-ranked criteria: magnitude (global |w| ranking) and OWL."""
import warnings

import pytest
import torch
from torch import nn

import prunekit
from prunekit.select.allocation import OWL_LAMBDA, owl_allocation


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))


DATA = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(3)]


def _per_layer(plan):
    return {n: tp.sparsity for n, tp in plan.tensors.items() if n.endswith("weight")}


@pytest.mark.parametrize("criterion,scope", [("l1", "layer"), ("taylor", "layer"), ("random", "layer"),
                                             ("sparsegpt", "layer")])
def test_magnitude_allocation_gives_the_per_layer_sparsities_of_global_magnitude(criterion, scope):
    reference = _per_layer(prunekit.plan_pruning(_cnn(), 0.9, scope="global"))
    data = {"data": DATA} if prunekit.api.needs_data(criterion) else {}
    plan = prunekit.prune(_cnn(), 0.9, criterion=criterion, scope=scope, allocation="magnitude", **data)
    assert _per_layer(plan) == pytest.approx(reference, abs=1e-3)
    assert reference["0.weight"] < 0.5 < 0.9 < reference["5.weight"]  # the small conv keeps most of its weights


def test_wanda_per_row_with_magnitude_allocation_keeps_the_first_conv():
    uniform = prunekit.prune(_cnn(), 0.9, criterion="wanda", scope="row", data=DATA)
    allocated = prunekit.prune(_cnn(), 0.9, criterion="wanda", scope="row", allocation="magnitude", data=DATA)
    assert _per_layer(uniform)["0.weight"] > 0.85 and _per_layer(allocated)["0.weight"] < 0.3
    sizes = {n: p.numel() for n, p in _cnn().named_parameters() if n in _per_layer(allocated)}
    total = sum(_per_layer(allocated)[n] * s for n, s in sizes.items()) / sum(sizes.values())
    assert total == pytest.approx(0.9, abs=2e-3)


def test_owl_gives_tensors_with_more_outliers_lower_sparsity_at_the_same_mean():
    torch.manual_seed(0)
    calm = torch.rand(64, 64)                  # no score above 5x the mean
    spiky = torch.rand(64, 64)
    spiky[:, :3] = 100.0                       # a few outlier columns, as in LLM activations
    alloc = owl_allocation({"calm": calm, "spiky": spiky}, 0.5, {"calm": 4096, "spiky": 4096})
    assert alloc["spiky"] < 0.5 < alloc["calm"]
    assert alloc["calm"] - alloc["spiky"] == pytest.approx(2 * OWL_LAMBDA)
    assert (alloc["calm"] + alloc["spiky"]) / 2 == pytest.approx(0.5)


@pytest.mark.parametrize("options,said", [
    (dict(allocation="nope"), "unknown allocation 'nope'; allowed: uniform, magnitude, owl"),
    (dict(allocation="magnitude", scope="global"), "scope='global' ranks every layer together"),
    (dict(allocation="owl", pattern="nm"), "pattern 'nm' fixes them"),
])
def test_allocation_requests_that_cannot_be_honoured_are_refused(options, said):
    model = _cnn()
    with pytest.raises(prunekit.PrunekitError, match=said.replace("(", r"\(").replace(")", r"\)")):
        prunekit.prune(model, 0.9, **options)
    assert not prunekit.apply.masks(model)


def test_owl_is_refused_by_sparsegpt_with_the_reason():
    with pytest.raises(prunekit.PrunekitError, match="owl needs per-entry scores"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prunekit.prune(_cnn(), 0.9, criterion="sparsegpt", allocation="owl", data=DATA)
