"""prunekit.biascorr: bias correction keeps each pruned layer's mean output, computed from calibration means."""
import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.apply import biascorr
from prunekit.criteria import calibrate, collect


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def offset_batches(n=4, rows=16, features=6, seed=0, offset=2.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, features, generator=g) + offset for _ in range(n)]  # not centred: the shift matters


def test_exact_small_case():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.25, -1.5]]))
        lin.bias.copy_(torch.tensor([0.1, -0.2]))
    data = [torch.tensor([[1.0, 2.0, 4.0], [3.0, 0.0, 2.0]])]  # E[x] = (2, 1, 3)
    plan = prunekit.prune(lin, 0.5, include_classifier=True, data=data, bias_correction=True)
    # magnitude removes the three smallest |w| of six: 1.0 and 0.5 (row 0), 0.25 (row 1)
    assert torch.equal(lin.weight.detach(), torch.tensor([[0.0, -2.0, 0.0], [3.0, 0.0, -1.5]]))
    want = torch.tensor([0.1 + 1.0 * 2 + 0.5 * 3, -0.2 + 0.25 * 1])
    assert torch.allclose(lin.bias.detach(), want, atol=1e-6)
    assert plan.meta["bias_correction"] == ["bias"]


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(6, 5), (16, 6)),
    (lambda: nn.Conv2d(4, 6, 1, groups=2), (3, 4, 7, 7)),  # 1x1: every position reads the channel mean
    (lambda: nn.Conv1d(4, 3, 1), (5, 4, 9)),
])
def test_mean_output_is_kept(make, shape):
    torch.manual_seed(0)
    layer = make()
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(*shape, generator=g) + 1.5 for _ in range(3)]
    dense = copy.deepcopy(layer)
    prunekit.prune(layer, 0.6, include_classifier=True, data=data, bias_correction=True)
    assert prunekit.apply.global_sparsity(layer, ["weight"]) == pytest.approx(0.6, abs=0.05)
    dims = [0] + list(range(2, len(shape))) if len(shape) > 2 else [0]
    with torch.no_grad():
        got = torch.stack([layer(x).mean(dims) for x in data]).mean(0)
        want = torch.stack([dense(x).mean(dims) for x in data]).mean(0)
    assert torch.allclose(got, want, atol=1e-5)
    without = copy.deepcopy(dense)
    prunekit.prune(without, 0.6, include_classifier=True)
    with torch.no_grad():
        drift = (torch.stack([without(x).mean(dims) for x in data]).mean(0) - want).abs().max()
    assert drift > 1e-3  # the correction did something the plain pruning does not


def test_wanda_needs_one_calibration_pass(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    calls = []
    model[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    data = offset_batches()
    plan = prunekit.prune(model, 0.5, criterion="wanda", scope="row", data=data, bias_correction=True)
    assert len(calls) == len(data)  # wanda's statistics carry the input means too
    assert plan.meta["bias_correction"] == ["0.bias"]
    with collect("wanda", model, ["0.weight"]) as st:
        model(torch.ones(2, 6))
    assert torch.allclose(biascorr.input_means(st, "0.weight"), torch.ones(6, dtype=torch.float32))


def test_improves_the_reconstruction_of_a_pruned_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    data = offset_batches(features=6)
    x = torch.cat(offset_batches(seed=5, features=6))
    with torch.no_grad():
        want = model(x)
    errs = {}
    for bc in (False, True):
        m = copy.deepcopy(model)
        prunekit.prune(m, 0.7, data=data if bc else None, bias_correction=bc)
        with torch.no_grad():
            errs[bc] = float((m(x) - want).pow(2).mean())
    assert errs[True] < 0.8 * errs[False]


def test_layers_without_bias_are_noted_and_still_pruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    plan = prunekit.prune(model, 0.5, data=offset_batches(), bias_correction=True)
    assert plan.meta["bias_correction"] == ["2.bias"]
    assert any("0 has no bias" in n for n in plan.notes)
    assert float((model[0].weight == 0).float().mean()) == pytest.approx(0.5)


def test_bad_requests_leave_the_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    before = state(model)
    with pytest.raises(ValueError, match="needs calibration data"):
        prunekit.prune(model, 0.5, bias_correction=True)
    with pytest.raises(ValueError, match="keep_original"):
        prunekit.prune(model, 0.5, data=offset_batches(), bias_correction=True, keep_original=True)
    with pytest.raises(ValueError, match="sparsegpt"):
        prunekit.prune(model, 0.5, criterion="sparsegpt", data=offset_batches(), bias_correction=True)
    with pytest.raises(ValueError, match="loss_fn"):
        prunekit.prune(model, 0.5, data=offset_batches(), loss_fn=nn.functional.mse_loss, bias_correction=True)
    taylor_only = calibrate("taylor", model, [(x, torch.zeros(16, dtype=torch.long)) for x in offset_batches()])
    with pytest.raises(ValueError, match="input means of 0.weight"):  # taylor stats hold no means
        prunekit.prune(model, 0.5, criterion="taylor", stats=taylor_only, bias_correction=True)
    assert same(before, state(model)) and not prunekit.apply.masking.is_masked(model)


def test_input_mean_collector_refuses_other_parameters():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(ValueError, match="LayerNorm"):
        calibrate("input_mean", model, [torch.randn(2, 3)], ["1.weight"])


def test_structured_rows_keep_their_bias_at_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    plan = prunekit.prune(model, 0.5, pattern="structured", dim=0, data=offset_batches(), bias_correction=True)
    gone = plan.tensors["0.weight"].pruned_idx
    assert len(gone) == 4 and torch.equal(model[0].bias[gone].detach(), torch.zeros(4))
    assert plan.meta["bias_correction"] == ["0.bias"]
