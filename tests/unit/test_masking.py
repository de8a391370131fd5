import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import prunekit
from prunekit.apply import masking


def test_masked_model_has_no_hooks_or_parametrizations(cnn):
    prunekit.prune(cnn, 0.7, scope="global")
    for m in cnn.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks
        assert not hasattr(m, "parametrizations")
        assert type(m.weight) is nn.Parameter if hasattr(m, "weight") else True


def test_masks_are_packed_bits(mlp):
    prunekit.prune(mlp, 0.5)
    buf = mlp[1].weight_mask
    assert buf.dtype == torch.uint8 and buf.numel() == (mlp[1].weight.numel() + 7) // 8


def test_deepcopy_keeps_masks_and_outputs(cnn):
    prunekit.prune(cnn, 0.6, pattern="structured", dim=0)
    twin = copy.deepcopy(cnn)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(cnn(x), twin(x))
    for name, keep in prunekit.apply.masks(cnn).items():
        assert torch.equal(keep, prunekit.apply.masks(twin)[name])


def test_state_dict_round_trip_into_fresh_model(mlp, mlp_factory):
    prunekit.prune(mlp, 0.8, scope="global")
    sd = mlp.state_dict()
    assert "1.weight_mask" in sd
    fresh = mlp_factory(seed=123)
    masking.load_state_dict(fresh, sd)
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), mlp(x))
    assert prunekit.apply.masks(fresh).keys() == prunekit.apply.masks(mlp).keys()
    # and plain load_state_dict into an already masked model works too
    other = copy.deepcopy(fresh)
    other.load_state_dict(sd)
    assert torch.equal(other(x), mlp(x))


def test_failed_state_dict_load_leaves_model_unchanged(mlp, mlp_factory):
    prunekit.prune(mlp, 0.5)
    sd = dict(mlp.state_dict())
    sd.pop("3.bias")
    fresh = mlp_factory()
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(RuntimeError):
        masking.load_state_dict(fresh, sd)
    assert not masking.is_masked(fresh)
    assert fresh.state_dict().keys() == before.keys()


def test_enforce_zeroes_weights_that_moved(mlp):
    prunekit.prune(mlp, 0.5)
    with torch.no_grad():
        mlp[1].weight.add_(1.0)
    masking.enforce(mlp)
    assert int((mlp[1].weight == 0).sum()) == mlp[1].weight.numel() // 2


def test_make_permanent_folds_masks(mlp):
    prunekit.prune(mlp, 0.5)
    zeros = int((mlp[1].weight == 0).sum())
    masking.make_permanent(mlp)
    assert not masking.is_masked(mlp)
    assert "1.weight_mask" not in mlp.state_dict()
    assert int((mlp[1].weight == 0).sum()) == zeros


def test_remove_with_restore_gives_back_original_weights(mlp):
    orig = mlp[1].weight.detach().clone()
    prunekit.prune(mlp, 0.5, keep_original=True)
    prunekit.prune(mlp, 0.8)  # composing keeps the originals up to date
    assert int((mlp[1].weight == 0).sum()) > 0
    masking.remove(mlp, restore=True)
    assert torch.equal(mlp[1].weight, orig)
    assert not masking.is_masked(mlp)


def test_restore_without_originals_is_an_error(mlp):
    prunekit.prune(mlp, 0.5)
    with pytest.raises(ValueError, match="keep_original=True"):
        masking.remove(mlp, restore=True)
    assert masking.is_masked(mlp)


def test_training_flag_is_never_changed(mlp, mlp_factory):
    for mode in (True, False):
        m = mlp_factory()
        m.train(mode)
        prunekit.prune(m, 0.5, scope="global")
        prunekit.plan_pruning(m, 0.7)
        masking.enforce(m)
        prunekit.apply.masks(m)
        assert m.training is mode and all(sub.training is mode for sub in m.modules())


def test_model_pruned_by_torch_is_refused_clearly(mlp, mlp_factory):
    plan = prunekit.plan_pruning(mlp_factory(), 0.5)
    torch_prune.l1_unstructured(mlp[1], "weight", 0.5)
    with pytest.raises(ValueError, match="torch.nn.utils.prune.remove"):
        prunekit.apply_plan(mlp, plan)
    with pytest.raises(ValueError, match="torch.nn.utils.prune.remove"):
        prunekit.prune(mlp, 0.5)


def test_plan_for_wrong_shape_is_refused_before_any_change(mlp):
    plan = prunekit.plan_pruning(nn.Sequential(nn.Flatten(), nn.Linear(64, 33), nn.Linear(33, 2)), 0.5)
    before = mlp[1].weight.detach().clone()
    with pytest.raises(ValueError, match="shape"):
        prunekit.apply_plan(mlp, plan)
    assert torch.equal(before, mlp[1].weight) and not masking.is_masked(mlp)


def test_masked_model_runs_the_plain_forward_path():
    # why masked models run at dense speed (benchmarks/masked_latency.py measures it): no hooks, no
    # reparametrisation, plain Parameters holding exact zeros, masks as 1-bit buffers only
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    plain = copy.deepcopy(m)
    prunekit.prune(m, 0.9, scope="global")
    for mod, ref in zip(m.modules(), plain.modules()):
        assert type(mod) is type(ref)
        assert not (mod._forward_hooks or mod._forward_pre_hooks or getattr(mod, "parametrizations", None))
        assert "forward" not in vars(mod)
    for name, p in m.named_parameters():
        assert type(p) is nn.Parameter, name
    for name, keep in masking.masks(m).items():
        w = m.get_parameter(name)
        assert torch.equal(w[~keep], torch.zeros_like(w[~keep]))
        buf = m.get_buffer(name + masking.MASK_SUFFIX)
        assert buf.dtype == torch.uint8 and buf.numel() == (w.numel() + 7) // 8
    x = torch.randn(8, 256)
    with torch.no_grad():
        for name, keep in masking.masks(m).items():
            plain.get_parameter(name).mul_(keep)
    assert torch.allclose(m(x), plain(x), atol=1e-6)  # the same function as a plain model with zeroed weights


def _own_loop(model, optimizer, steps=5, seed=0):
    """A user's plain training loop (no prunekit): SGD with momentum and weight decay revives pruned weights."""
    torch.manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 64)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_a_users_own_loop_revives_pruned_weights_and_keep_masks_prevents_it(mlp, tmp_path):
    # issue 11.2: 806 pruned entries non-zero after one epoch of SGD with momentum, then save/load differed
    prunekit.prune(mlp, 0.8)
    plain = copy.deepcopy(mlp)
    _own_loop(plain, torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3))
    assert sum(masking.revived(plain).values()) > 0          # what happens without the guard
    with pytest.raises(prunekit.PrunekitError, match="keep_masks"):
        prunekit.save(plain, tmp_path / "revived")            # refused: the reloaded model would differ
    assert not (tmp_path / "revived").exists()

    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    guard = prunekit.keep_masks(opt, mlp)
    _own_loop(mlp, opt)
    assert masking.revived(mlp) == {}
    for name, keep in masking.masks(mlp).items():              # momentum of pruned entries stays clean too
        buf = opt.state[mlp.get_parameter(name)]["momentum_buffer"]
        assert torch.equal(buf[~keep], torch.zeros_like(buf[~keep]))
    folder = prunekit.save(mlp, tmp_path / "kept")
    assert torch.equal(prunekit.load(folder, copy.deepcopy(mlp))(torch.ones(2, 64)), mlp(torch.ones(2, 64)))
    guard.remove()
    _own_loop(mlp, opt)
    assert masking.revived(mlp)                                # the hooks are really gone


def test_keep_masks_refuses_what_is_not_an_optimizer(mlp):
    prunekit.prune(mlp, 0.5)
    with pytest.raises(prunekit.PrunekitError, match="torch.optim.Optimizer"):
        prunekit.keep_masks(mlp, mlp)
