"""SparseGPT: the OBS core on small exact cases, and the layer-by-layer driver on small models."""
import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.apply import masking
from prunekit.criteria import calibrate
from prunekit.pruners.sparsegpt import obs_prune, record_calls, sparsegpt_prune
from prunekit.select.nm import check_nm

pytestmark = pytest.mark.usefixtures("one_thread")


def _correlated_inputs(n=256, cols=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, cols, generator=g)
    mix = torch.eye(cols) + 0.8 * torch.randn(cols, cols, generator=g) / cols ** 0.5
    scale = torch.linspace(0.2, 3.0, cols)  # features of very different size: what Wanda/OBS exploit
    return (base @ mix) * scale


def _hessian(x):
    return (x.T @ x).double() / x.shape[0]


def _error(x, w, w_new):
    return float(((x @ w.T - x @ w_new.T) ** 2).sum())


def test_zero_sparsity_leaves_the_weights_exactly_unchanged():
    x = _correlated_inputs()
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    new, keep, loss = obs_prune(w, _hessian(x), 0.0)
    assert torch.equal(new, w) and keep.all() and loss == 0.0


def test_reconstruction_beats_magnitude_and_wanda_masks_on_the_calibration_inputs():
    x = _correlated_inputs()
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    new, keep, _ = obs_prune(w, _hessian(x), 0.5)
    assert int((~keep).sum()) == 64 and (new[~keep] == 0).all()

    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    errors = {}
    for crit in ("l1", "wanda"):
        m = copy.deepcopy(model)
        prunekit.prune(m, 0.5, criterion=crit, scope="row", include_classifier=True,
                       stats=calibrate("wanda", m, [x]) if crit == "wanda" else None)
        errors[crit] = _error(x, w, m[0].weight.detach())
    ours = _error(x, w, new)
    assert ours < errors["wanda"] < errors["l1"], (ours, errors)
    # and no better than the least-squares optimum for its own mask (a sanity bound)
    best = torch.zeros_like(w)
    for r in range(w.shape[0]):
        best[r, keep[r]] = torch.linalg.lstsq(x[:, keep[r]].double(), x.double() @ w[r].double()).solution.float()
    assert _error(x, w, best) <= ours < 1.5 * _error(x, w, best)


def test_pruning_the_first_column_is_the_least_squares_optimum():
    # one pruned weight, in the first column: OBS updates every other weight of the row, exactly
    x = _correlated_inputs(cols=4)
    w = torch.tensor([[0.01, 1.0, -2.0, 0.5]])
    new, keep, _ = obs_prune(w, _hessian(x), 0.25, damp=0.0)
    assert keep.tolist() == [[False, True, True, True]]
    target = (x.double() @ w.double().T)
    best = torch.linalg.lstsq(x[:, 1:].double(), target).solution.T
    torch.testing.assert_close(new[:, 1:].double(), best, rtol=1e-4, atol=1e-5)


def test_damping_handles_dead_inputs_and_prunes_them_first():
    x = _correlated_inputs(cols=8)
    x[:, 3] = 0.0                                       # a dead input: H is singular
    w = torch.randn(4, 8, generator=torch.Generator().manual_seed(2)) + 3.0
    new, keep, _ = obs_prune(w, _hessian(x), 0.125)     # 4 of 32: exactly the dead column, free
    assert torch.isfinite(new).all()
    assert (~keep).nonzero()[:, 1].tolist() == [3, 3, 3, 3]
    torch.testing.assert_close(new[:, [0, 1, 2, 4, 5, 6, 7]], w[:, [0, 1, 2, 4, 5, 6, 7]])
    with pytest.raises(ValueError, match="damp"):
        obs_prune(w, torch.ones(8, 8, dtype=torch.float64), 0.5, damp=0.0)   # rank 1, no damping


def test_exact_total_over_uneven_blocks_and_nm_with_any_blocksize():
    x = _correlated_inputs(cols=40)
    w = torch.randn(10, 40, generator=torch.Generator().manual_seed(3))
    _, keep, _ = obs_prune(w, _hessian(x), 0.3, blocksize=7)
    assert int((~keep).sum()) == round(0.3 * 400)
    new, keep, _ = obs_prune(w, _hessian(x), nm=(2, 4), blocksize=6)   # blocks grow to whole groups
    assert check_nm(new, 2, 4) and (keep.reshape(-1, 4).sum(1) == 2).all()


def test_entries_pruned_before_stay_pruned():
    x = _correlated_inputs()
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(4))
    old = torch.ones(8, 16, dtype=torch.bool)
    old[:, 0] = False                                  # whole first column pruned before
    for kw in (dict(sparsity=0.25), dict(nm=(2, 4))):
        new, keep, _ = obs_prune(w, _hessian(x), keep=old, **kw)
        assert not keep[:, 0].any() and (new[:, 0] == 0).all()
        assert int((~keep).sum()) == (32 if "sparsity" in kw else 64)


def test_bad_arguments():
    w, h = torch.ones(2, 4), torch.eye(4, dtype=torch.float64)
    for kw, match in [(dict(), "exactly one"), (dict(sparsity=0.5, nm=(2, 4)), "exactly one"),
                      (dict(sparsity=1.0), "fraction"), (dict(sparsity=2), "fraction"),
                      (dict(nm=(4, 2)), "0 < N < M"), (dict(sparsity=0.5, blocksize=0), "blocksize"),
                      (dict(sparsity=0.5, damp=-1), "damp")]:
        with pytest.raises(ValueError, match=match):
            obs_prune(w, h, **kw)
    with pytest.raises(ValueError, match="hessian"):
        obs_prune(w, torch.eye(3), 0.5)


# ----------------------------------------------------------------------------- the model driver

def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def _batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 16, generator=g) for _ in range(n)]


def test_layers_are_pruned_in_order_on_inputs_of_the_already_pruned_model():
    model, data = _mlp(), _batches()
    ref = copy.deepcopy(model)
    plan = sparsegpt_prune(model, data, 0.5, names=["0.weight", "2.weight"])
    x = torch.cat(data)
    w0, k0, _ = obs_prune(ref[0].weight, _hessian(x), 0.5)
    with torch.no_grad():
        ref[0].weight.copy_(w0)
        h2 = torch.relu(ref[0](x))                      # the input of layer 2 after layer 0 is pruned
    w2, k2, _ = obs_prune(ref[2].weight, _hessian(h2), 0.5)
    torch.testing.assert_close(model[0].weight, w0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model[2].weight, w2, rtol=1e-4, atol=1e-5)
    masks = prunekit.apply.masks(model)
    assert torch.equal(masks["0.weight"], k0) and torch.equal(masks["2.weight"], k2)
    assert prunekit.apply.global_sparsity(model, ["0.weight", "2.weight"]) == 0.5
    assert plan.meta["criterion"] == "sparsegpt" and set(plan.meta["obs_loss"]) == {"0.weight", "2.weight"}


def test_result_is_a_normal_masked_model_and_the_state_is_kept():
    model = _mlp().train()
    plan = prunekit.prune(model, pattern="nm", nm=(2, 4), criterion="sparsegpt", data=_batches())
    assert model.training and all(m.training for m in model.modules())
    assert set(plan.tensors) == {"0.weight", "2.weight"}          # the classifier is excluded by default
    twin = _mlp(seed=5)
    masking.load_state_dict(twin, copy.deepcopy(model.state_dict()))
    assert check_nm(twin[0].weight, 2, 4) and check_nm(twin[2].weight, 2, 4)
    prunekit.finetune(model, [(x, torch.zeros(32, dtype=torch.long)) for x in _batches(2)], epochs=1, lr=0.1)
    assert check_nm(model[0].weight, 2, 4)


def test_layers_reading_the_same_tensor_share_one_pass():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.o = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.shared = nn.Linear(8, 8)

        def forward(self, x):
            y = self.o(self.q(x) * self.k(x))
            return self.shared(self.shared(y))          # used twice: never grouped, sees both calls

    model = Attn()
    targets = {n: model.get_submodule(n) for n in ("q", "k", "o", "shared")}
    groups, count = record_calls(model, {f"{n}.weight": m for n, m in targets.items()}, torch.randn(2, 8),
                                  lambda m, b: m(b))
    assert groups == [["q.weight", "k.weight"], ["o.weight"], ["shared.weight"]]
    assert count["shared.weight"] == 2
    sparsegpt_prune(model, [torch.randn(4, 8)], 0.5, names=list(count))
    assert prunekit.apply.global_sparsity(model, list(count)) == 0.5


def test_failures_leave_the_model_untouched():
    model, data = _mlp(), _batches()
    before = copy.deepcopy(model.state_dict())
    calls = {"n": 0}

    def flaky(m, batch):
        calls["n"] += 1
        if calls["n"] > 2:     # 1 call records the layer order, 1 pass per layer: fails on the second
            raise RuntimeError("data went away")
        return m(batch)

    with pytest.raises(RuntimeError, match="went away"):
        sparsegpt_prune(model, data[:1], 0.5, forward_fn=flaky)
    assert not masking.is_masked(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="never reached 4.weight"):
        sparsegpt_prune(model, data, 0.5, names=["0.weight", "4.weight"], forward_fn=lambda m, b: m[:3](b))
    with pytest.raises(ValueError, match="Linear, Conv1d, Conv2d"):
        sparsegpt_prune(nn.Sequential(nn.Conv3d(1, 2, 3)), data, 0.5, names=["0.weight"])
    with pytest.raises(ValueError, match="more than once"):
        sparsegpt_prune(model, iter(data), 0.5)
    assert not masking.is_masked(model)


@pytest.mark.parametrize("kwargs,match", [
    (dict(), "needs calibration data"),
    (dict(data=[torch.ones(1, 16)], keep_original=True), "keep_original"),
    (dict(data=[torch.ones(1, 16)], pattern="structured"), "pattern"),
    (dict(data=[torch.ones(1, 16)], scope="global"), "scope"),
    (dict(data=[torch.ones(1, 16)], min_keep=0.1), "min_keep"),
])
def test_prune_with_criterion_sparsegpt_checks_its_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        prunekit.prune(_mlp(), 0.5, criterion="sparsegpt", **kwargs)


# ----------------------------------------------------------------------------- convolutions (im2col Hessian)

CONVS = {
    "plain": lambda: nn.Conv2d(8, 16, 3, padding=1),
    "strided_dilated_grouped": lambda: nn.Conv2d(8, 16, 3, stride=2, dilation=2, padding=2, groups=4),
    "depthwise": lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8),
    "conv1d": lambda: nn.Conv1d(8, 12, 5, padding=2, groups=2),
}


_MIX = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1)))[0] * torch.linspace(2, 0.1, 8)


def _conv_input(conv, n=6):
    """Correlated like real features: smooth in space, channels mixed with unequal scales."""
    if isinstance(conv, nn.Conv2d):
        x = nn.functional.interpolate(torch.randn(n, 8, 5, 5), size=10, mode="bilinear", align_corners=False)
    else:
        x = nn.functional.interpolate(torch.randn(n, 8, 10), size=30, mode="linear", align_corners=False)
    return torch.einsum("ij,nj...->ni...", _MIX, x)


@pytest.mark.parametrize("kind", list(CONVS))
def test_a_conv_seen_as_matrices_computes_the_conv(kind):
    from prunekit.pruners.sparsegpt import as_matrix, from_matrix, layer_features

    torch.manual_seed(0)
    conv = CONVS[kind]()
    x = _conv_input(conv)
    X, W = layer_features(conv, x), as_matrix(conv, conv.weight.detach())
    y = nn.functional.conv2d if isinstance(conv, nn.Conv2d) else nn.functional.conv1d
    ref = y(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    g, out_g = conv.groups, conv.out_channels // conv.groups
    ref = ref.reshape(ref.shape[0], g, out_g, -1).permute(1, 0, 3, 2).reshape(g, -1, out_g)
    assert torch.allclose(X @ W.transpose(1, 2), ref, atol=1e-5)
    assert torch.equal(from_matrix(conv, W, tuple(conv.weight.shape)), conv.weight.detach())


@pytest.mark.parametrize("kind", list(CONVS))
def test_sparsegpt_prunes_convs_and_reconstructs_better_than_magnitude(kind):
    torch.manual_seed(0)
    dense = nn.Sequential(CONVS[kind](), nn.ReLU())
    conv = dense[0]
    data = [_conv_input(conv, 8) for _ in range(4)]
    x = _conv_input(conv, 8)
    errors = {}
    for crit in ("l1", "sparsegpt"):  # both with the same share in every output row (a depthwise group is one)
        m = copy.deepcopy(dense)
        plan = prunekit.prune(m, 0.6, criterion=crit, include_classifier=True, scope="row",
                              **({"data": data} if crit == "sparsegpt" else {}))
        assert list(plan.tensors) == ["0.weight"]
        kept = masking.masks(m)["0.weight"]
        assert abs(float((~kept).float().mean()) - 0.6) <= kept.shape[0] / kept.numel()  # exact per row/group
        assert torch.equal(m[0].weight[~kept], torch.zeros_like(m[0].weight[~kept]))
        errors[crit] = float((m(x) - dense(x)).pow(2).mean())
    assert errors["sparsegpt"] < errors["l1"]


def test_sparsegpt_nm_on_a_conv_groups_input_channels_at_each_tap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    data = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    with pytest.warns(UserWarning, match="skipped 0.weight: N:M needs the input dimension \\(3\\)"):
        plan = prunekit.prune(model, criterion="sparsegpt", pattern="nm", nm=(2, 4), data=data)
    assert list(plan.tensors) == ["2.weight"] and check_nm(model[2].weight, 2, 4)
    assert any("skipped 0.weight" in n for n in plan.notes)
