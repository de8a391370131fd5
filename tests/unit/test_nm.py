"""N:M validator (prunekit.nm), and every criterion producing valid N:M masks."""
import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.analysis.nm_check import validate_nm
from prunekit.criteria import calibrate
from prunekit.pruners.sparsegpt import sparsegpt_prune
from prunekit.select.nm import check_nm, max_nonzeros, nm_pattern
from prunekit.zoo.data import TensorLoader

pytestmark = pytest.mark.usefixtures("one_thread")


def test_check_nm_counts_non_zeros_per_group_of_m_along_the_input_dim():
    t = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0],
                      [0.0, 5.0, 0.0, 0.0, 6.0, 0.0, 0.0, 0.0]])
    assert check_nm(t, 2, 4)
    assert not check_nm(t, 1, 4)                  # row 0 has two non-zeros in its first group
    assert check_nm(t, 4, 8) and not check_nm(t, 3, 8)
    assert not check_nm(t, 2, 3)                  # 8 is not a multiple of 3: no N:3 claim
    assert check_nm(t.T, 2, 4, dim=0) and not check_nm(t.T, 2, 4)  # transposed: (8, 2), last dim of 2
    with pytest.raises(ValueError, match="0 < N < M"):
        check_nm(t, 4, 4)


def test_conv_weights_are_grouped_along_input_channels_at_each_tap():
    w = torch.zeros(2, 4, 3, 3)
    w[:, :2] = 1.0              # channels 0 and 1 of every tap: 2 of 4 non-zero along dim 1
    assert check_nm(w, 2, 4)
    assert not check_nm(w, 2, 4, dim=-1) and max_nonzeros(w, 3, dim=-1) == 3


def test_nm_pattern_reports_the_tightest_pattern():
    two_four = torch.tensor([[1.0, 1.0, 0.0, 0.0] * 4])
    assert nm_pattern(two_four) == (2, 4)          # 4:8 holds too, but 2:4 is as dense and stronger
    four_eight = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0] * 2])
    assert nm_pattern(four_eight) == (4, 8)        # 3 of the first 4: not 2:4
    one_eight = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0] * 2])
    assert nm_pattern(one_eight) == (1, 8)         # sparser than 1:4, which it also satisfies
    assert nm_pattern(torch.ones(3, 16)) is None   # dense
    assert nm_pattern(torch.ones(3, 6)) is None    # no M in (4, 8, ...) divides 6
    assert nm_pattern(torch.zeros(2, 8)) == (1, 8)    # all zero: every 1:M holds (N >= 1, the one N:M rule)


def test_validate_nm_lists_offending_tensors_with_the_reason(mlp):
    prunekit.prune(mlp, pattern="nm", nm=(2, 4))
    assert validate_nm(mlp, 2, 4) == {}
    assert validate_nm(mlp, 4, 8) == {}            # 2:4 implies 4:8
    bad = validate_nm(mlp, 1, 4)
    assert set(bad) == {"1.weight", "3.weight"} and "more than 1" in bad["1.weight"]
    dense = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 6))
    bad = validate_nm(dense, 2, 4)                 # no masks: every weight matrix is checked
    assert set(bad) == {"0.weight", "1.weight"}
    assert "not a multiple" in validate_nm(dense, 2, 8, names=["1.weight"])["1.weight"]
    with pytest.raises(KeyError):
        validate_nm(dense, 2, 4, names=["2.weight"])


# ----------------------------------------------------------------------------- every criterion gives N:M

def _loader(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorLoader(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g),
                        batch_size=16)


def _prune_nm(model, criterion, nm, include=None):
    loader = _loader()
    if criterion == "sparsegpt":
        return sparsegpt_prune(model, loader, nm=nm, names=prunekit.targets.select_targets(model, include=include))
    stats = None
    if criterion in ("taylor", "wanda"):
        stats = calibrate(criterion, model, loader, prunekit.targets.select_targets(model, include=include))
    return prunekit.prune(model, pattern="nm", nm=nm, criterion=criterion, include=include, stats=stats)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)], ids=["2:4", "4:8"])
@pytest.mark.parametrize("criterion", ["l1", "random", "taylor", "wanda", "sparsegpt"])
def test_every_criterion_produces_valid_nm(mlp_factory, criterion, nm):
    model = mlp_factory(0)
    plan = _prune_nm(model, criterion, nm)
    n, m = nm
    assert set(plan.tensors) == {"1.weight", "3.weight"}
    assert validate_nm(model, n, m) == {}
    for name, keep in prunekit.apply.masks(model).items():
        assert (keep.reshape(-1, m).sum(1) == n).all(), name      # exactly N kept per group
        assert nm_pattern(dict(model.named_parameters())[name]) is not None


@pytest.mark.parametrize("criterion", ["l1", "taylor", "wanda"])
def test_nm_on_convolutions(cnn_factory, criterion):
    model = cnn_factory(0)
    _prune_nm(model, criterion, (2, 4), include="2")   # conv 8 -> 16 channels
    assert validate_nm(model, 2, 4) == {} and check_nm(model[2].weight, 2, 4)


def test_nm_keeps_weights_pruned_before(mlp):
    before = copy.deepcopy(mlp)
    prunekit.prune(mlp, 0.9, include="1")
    old = prunekit.apply.masks(mlp)["1.weight"]
    prunekit.prune(mlp, pattern="nm", nm=(2, 4), include="1", criterion="l1")
    new = prunekit.apply.masks(mlp)["1.weight"]
    assert not (new & ~old).any() and check_nm(mlp[1].weight, 2, 4)
    assert validate_nm(before, 2, 4, names=["1.weight"])          # the untouched copy is dense
