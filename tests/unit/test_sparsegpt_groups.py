"""SparseGPT on a grouped (depthwise) conv: the layer's sparsity is spread over its groups by OBS saliency."""
import copy
import warnings

import pytest
import torch
from torch import nn

import prunekit
from prunekit.apply import masking
from prunekit.pruners.sparsegpt import as_matrix, group_sparsities, layer_features


def _depthwise_and_data(seed=0):
    """A depthwise conv whose channels carry very different signal: inputs scaled 3 down to 0.01."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    scale = torch.logspace(0.5, -2, 8).reshape(1, 8, 1, 1)
    data = [torch.randn(8, 8, 10, 10) * scale for _ in range(4)]
    return nn.Sequential(conv), data


def _prune(scope):
    model, data = _depthwise_and_data()
    dense = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prunekit.prune(model, 0.6, criterion="sparsegpt", scope=scope, include_classifier=True, data=data)
    keep = masking.masks(model)["0.weight"]
    with torch.no_grad():
        return keep, float((model(data[0]) - dense(data[0])).pow(2).mean())


def test_groups_share_the_layer_target_by_saliency_and_reconstruct_better():
    keep, err_layer = _prune("layer")
    per_channel = (~keep).reshape(8, -1).float().mean(1)
    assert int((~keep).sum()) == round(0.6 * keep.numel())               # the layer total is exact
    assert per_channel[0] < 0.6 < per_channel[-1]                        # the loud channel keeps more
    assert bool((keep.reshape(8, -1).sum(1) >= 1).all())                 # no channel is emptied
    keep_row, err_row = _prune("row")
    assert torch.allclose((~keep_row).reshape(8, -1).float().mean(1), torch.full((8,), 5 / 9))  # uniform
    assert err_layer < 0.5 * err_row


def test_group_sparsities_keep_earlier_pruned_weights_pruned_and_count_them():
    model, data = _depthwise_and_data()
    conv = model[0]
    X = layer_features(conv, data[0])
    H = X.transpose(1, 2) @ X / X.shape[1]
    mats = as_matrix(conv, conv.weight.detach())
    keeps = torch.ones_like(mats, dtype=torch.bool)
    keeps[0, 0, :4] = False                                              # 4 weights of the loud channel gone
    shares = group_sparsities(mats, H, 0.5, 0.01, keeps)
    assert shares[0] >= 4 / 9
    assert sum(s * 9 for s in shares) == pytest.approx(round(0.5 * 72))
    assert all(s < 1.0 for s in shares)


def test_an_unknown_scope_is_refused():
    model, data = _depthwise_and_data()
    with pytest.raises(prunekit.PrunekitError, match="scope"):
        prunekit.pruners.sparsegpt.sparsegpt_prune(model, data, 0.5, scope="global", names=["0.weight"])
