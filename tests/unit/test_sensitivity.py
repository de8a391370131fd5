"""prunekit.sensitivity: per-layer curves, the model given back untouched, and the allocation."""
import copy
import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit.analysis import sensitivity
from prunekit.analysis.metrics import evaluate
from prunekit.analysis.sensitivity import SensitivityResult, allocation_plan, analyze, apply_allocation
from prunekit.apply import masking
from prunekit.report.figures import sensitivity_curves
from prunekit.zoo.data import TensorLoader

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def two_layers() -> nn.Module:
    """Two 10-weight layers whose weights are 1..10 (shuffled): pruning s of one removes the smallest."""
    net = nn.Sequential(nn.Linear(5, 2, bias=False), nn.Linear(2, 5, bias=False), nn.Linear(5, 1))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net[0].weight.copy_(torch.arange(1.0, 11.0)[torch.randperm(10, generator=g)].reshape(2, 5))
        net[1].weight.copy_(-torch.arange(1.0, 11.0)[torch.randperm(10, generator=g)].reshape(5, 2))
    return net


def weighted_loss(ref: nn.Module, weight_a: float = 10.0):
    """'Loss' = squared weight removed, layer 0 counting ``weight_a`` times more than layer 1."""
    w0, w1 = ref[0].weight.detach().clone(), ref[1].weight.detach().clone()

    def fn(model):
        with torch.no_grad():
            return float(weight_a * ((model[0].weight - w0) ** 2).sum() + ((model[1].weight - w1) ** 2).sum())
    return fn


NAMES = ["0.weight", "1.weight"]


def test_curves_are_exact_on_a_known_case():
    net = two_layers()
    res = analyze(net, weighted_loss(net), sparsities=(0.2, 0.4, 0.6, 0.8), names=NAMES, metric="loss")
    # pruning 2, 4, 6, 8 of the weights 1..10 removes 1+4, +9+16, +25+36, +49+64 of squared weight
    assert res.baseline == 0.0
    assert res.curves["1.weight"] == [5.0, 30.0, 91.0, 204.0]
    assert res.curves["0.weight"] == [50.0, 300.0, 910.0, 2040.0]
    assert res.params == {"0.weight": 10, "1.weight": 10}


def test_the_layer_that_matters_more_gets_less_sparsity_and_the_target_is_met_exactly():
    net = two_layers()
    res = analyze(net, weighted_loss(net), sparsities=(0.2, 0.4, 0.6, 0.8), names=NAMES, metric="loss")
    alloc = res.allocate(0.5, min_keep=0.0)
    # greedy on cost per weight: 1's segments (slopes 25, 125) before 0's first (250), then 1's rest (305, 565)
    assert alloc == pytest.approx({"0.weight": 0.2, "1.weight": 0.8})
    assert res.achieved(alloc) == pytest.approx(0.5)
    assert res.predicted_drop(alloc) == pytest.approx(50.0 + 204.0)
    # a target between grid points is met exactly too (interpolated), not within one grid step
    alloc = res.allocate(0.37, min_keep=0.0)
    assert res.achieved(alloc) == pytest.approx(0.37)
    assert alloc["0.weight"] < alloc["1.weight"]
    assert res.allocate(0.37, min_keep=0.0) == alloc  # deterministic


def test_allocation_is_optimal_against_every_grid_split():
    net = two_layers()
    res = analyze(net, weighted_loss(net, 3.0), sparsities=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
                  names=NAMES, metric="loss")
    alloc = res.allocate(0.6, min_keep=0.0)
    best = min(res.predicted_drop({"0.weight": a / 10, "1.weight": 1.2 - a / 10}) for a in range(3, 10))
    assert res.predicted_drop(alloc) <= best + 1e-9


def test_weights_min_keep_and_unreachable_targets():
    net = two_layers()
    res = analyze(net, weighted_loss(net), sparsities=(0.2, 0.4, 0.6, 0.8), names=NAMES, metric="loss")
    # only layer 0 counts: it alone must reach the target, the other one stays dense
    assert res.allocate(0.5, weights={"0.weight": 1.0, "1.weight": 0.0}, min_keep=0.0) == \
        pytest.approx({"0.weight": 0.5, "1.weight": 0.0})
    # min_keep=0.3 caps both layers at 0.7: layer 1 stops there, so layer 0 takes the rest
    assert res.allocate(0.65, min_keep=0.3) == pytest.approx({"0.weight": 0.6, "1.weight": 0.7})
    assert res.allocate(0.65, min_keep=3) == pytest.approx({"0.weight": 0.6, "1.weight": 0.7})  # a count: 3 of 10
    with pytest.raises(ValueError, match="cannot be reached"):
        res.allocate(0.65, min_keep=0.4)
    with pytest.raises(ValueError, match="cannot be reached"):
        res.allocate(0.85, min_keep=0.0)  # nothing measured beyond 0.8: no extrapolation
    with pytest.raises(ValueError, match="params, uniform"):
        res.allocate(0.5, weights="macs")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        res.allocate(1.2)


def test_uniform_weights_count_layers_not_parameters():
    res = SensitivityResult("loss", 0.0, [0.5, 0.9], {"0.weight": [1.0, 2.0], "1.weight": [1.0, 2.0]},
                            {"0.weight": 200, "1.weight": 20})
    alloc = res.allocate(0.7, weights="uniform", min_keep=0.0)
    assert (alloc["0.weight"] + alloc["1.weight"]) / 2 == pytest.approx(0.7)
    assert res.achieved(alloc, "uniform") == pytest.approx(0.7)
    assert res.achieved(alloc) != pytest.approx(0.7)  # weighted by parameters it is another number


def test_noise_never_makes_more_pruning_look_better():
    res = SensitivityResult("accuracy", 0.9, [0.5, 0.7, 0.9], {"a": [0.91, 0.85, 0.88]}, {"a": 100})
    xs, ys = zip(*res.cost_curve("a"))
    assert xs == (0.0, 0.5, 0.7, 0.9) and ys == pytest.approx((0.0, 0.0, 0.05, 0.05))


def _masked_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    prunekit.prune(net, 0.3, include="1.weight", keep_original=True)   # originals kept: restore must still work
    prunekit.prune(net, 0.6, include="3.weight")
    net.eval()
    return net


def _loader(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorLoader(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g), 16)


def _snapshot(net):
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    bufs = {f"{mn}.{bn}": b.clone() for mn, m in net.named_modules() for bn, b in m._buffers.items()}
    return sd, bufs, [list(m._buffers) for m in net.modules()], [m.training for m in net.modules()]


def test_the_model_is_given_back_unchanged_with_its_masks_and_kept_originals():
    net = _masked_net()
    before = _snapshot(net)
    ref = copy.deepcopy(net)
    res = analyze(net, _loader(), sparsities=(0.2, 0.5, 0.9), names=["1.weight", "3.weight", "5.weight"])
    after = _snapshot(net)
    assert before[0].keys() == after[0].keys() and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1].keys() == after[1].keys() and all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    assert before[2:] == after[2:]
    # the kept originals (non-persistent buffers, compared above too) still restore the unpruned layer
    masking.remove(net[1], restore=True)
    masking.remove(ref[1], restore=True)
    assert torch.equal(net[1].weight, ref[1].weight) and int((net[1].weight == 0).sum()) == 0
    # a layer's masks count: at 0.2 the layer already 0.3 (or 0.6) sparse is not pruned further
    assert res.base_sparsity["1.weight"] == pytest.approx(0.3, abs=1 / 192)
    assert res.curves["1.weight"][0] == res.baseline and res.curves["3.weight"][:2] == [res.baseline] * 2


def test_the_model_is_given_back_when_the_evaluation_fails():
    net = _masked_net()
    before = _snapshot(net)
    calls = []

    def flaky(model):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("evaluation broke")
        return 0.5

    with pytest.raises(RuntimeError, match="evaluation broke"):
        analyze(net, flaky, sparsities=(0.5, 0.9))
    after = _snapshot(net)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0]) and before[2:] == after[2:]


def test_loader_and_function_give_the_same_curves_and_runs_are_deterministic():
    net = _masked_net()
    loader = _loader()
    a = analyze(net, loader, sparsities=(0.5, 0.9), criterion="random", seed=3, metric="loss")
    b = analyze(net, lambda m: evaluate(m, loader), sparsities=(0.5, 0.9), criterion="random", seed=3,
                metric="loss")
    assert a.curves == b.curves and a.baseline == b.baseline == evaluate(net, loader)["loss"]
    assert a == analyze(net, loader, sparsities=(0.5, 0.9), criterion="random", seed=3, metric="loss")
    c = analyze(net, loader, sparsities=(0.5, 0.9), criterion="random", seed=4, metric="loss")
    assert c.curves != a.curves  # the seed reaches the criterion
    acc = analyze(net, loader, sparsities=(0.5,))
    assert acc.baseline == evaluate(net, loader)["accuracy"] and acc.higher_is_better and not a.higher_is_better


def test_structured_pattern_prunes_rows_and_their_biases():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    bias = net[0].bias.detach().clone()
    seen = []

    def fn(model):
        seen.append((int((model[0].weight.abs().sum(1) == 0).sum()), int((model[0].bias == 0).sum())))
        return 1.0

    analyze(net, fn, sparsities=(0.25, 0.5), names=["0.weight"], pattern="structured", dim=0)
    assert seen == [(0, 0), (2, 2), (4, 4)]
    assert torch.equal(net[0].bias, bias) and not masking.is_masked(net)


def test_json_round_trip_and_plot(tmp_path):
    net = two_layers()
    res = analyze(net, weighted_loss(net), sparsities=(0.2, 0.6), names=NAMES, metric="loss")
    again = SensitivityResult.from_json(res.to_json())
    assert again == res
    res.save(tmp_path / "s.json")
    assert SensitivityResult.load(tmp_path / "s.json") == res
    path = sensitivity_curves(res.to_dict(), tmp_path / "figs" / "s.png", res.allocate(0.4, min_keep=0.0))
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000
    with pytest.raises(ValueError, match="sensitivity"):
        SensitivityResult.from_json('{"format": "prunekit.plan/1"}')
    with pytest.raises(ValueError, match="malformed"):
        SensitivityResult.from_json(res.to_json().replace('"params"', '"parms"'))


def test_bad_input_is_rejected_before_anything_changes():
    net = _masked_net()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="accuracy, top5, loss"):
        analyze(net, _loader(), metric="f1")
    with pytest.raises(ValueError, match="unstructured, structured"):
        analyze(net, _loader(), pattern="nm")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        analyze(net, _loader(), sparsities=(0.5, 1.0))
    with pytest.raises(KeyError, match="did you mean"):
        analyze(net, _loader(), names=["1.weigth"])
    with pytest.raises(KeyError, match="unknown criterion"):
        analyze(net, _loader(), criterion="nope")
    with pytest.raises(ValueError, match="dim, norm, normalize"):
        analyze(net, _loader(), min_keep=0.1)
    with pytest.raises(TypeError, match="loader"):
        analyze(net, 42)
    with pytest.raises(ValueError, match="finite"):
        analyze(net, lambda m: math.nan, sparsities=(0.5,))
    assert all(torch.equal(sd[k], v) for k, v in net.state_dict().items())


def test_apply_allocation_prunes_each_layer_by_its_own_amount():
    net = _masked_net()
    res = analyze(net, _loader(), sparsities=(0.5, 0.7, 0.9))
    alloc = res.allocate(0.75)
    plan = allocation_plan(net, alloc)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), _masked_net().state_dict().values()))
    apply_allocation(net, alloc)
    params = dict(net.named_parameters())
    for name, s in alloc.items():
        n = params[name].numel()
        assert prunekit.apply.global_sparsity(net, [name]) == pytest.approx(s, abs=1.0 / n + 1e-9)
        assert plan.tensors[name].pruned_units == int((params[name] == 0).sum())
    assert prunekit.apply.global_sparsity(net, list(alloc)) == pytest.approx(0.75, abs=len(alloc) / 300)
    with pytest.raises(KeyError):
        apply_allocation(net, {"nope.weight": 0.5})


# ------------------------------------------------------------------ data-aware trials (Wanda per row, bias correction)
def _wanda_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 8), nn.GELU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    data = [torch.randn(16, 6, generator=g) + 1.0 for _ in range(3)]
    from prunekit.criteria import calibrate
    return model, data, calibrate("wanda", model, data, ["0.weight", "2.weight"])


def test_wanda_row_trials_with_bias_correction_leave_the_model_as_it_was():
    model, data, stats = _wanda_setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def evaluate(m):
        w = m[0].weight.detach()
        zeros_per_row = (w == 0).sum(1)
        seen.append((int(zeros_per_row.min()), int(zeros_per_row.max()), m[0].bias.detach().clone()))
        with torch.no_grad():
            return -float(sum(m(x).abs().mean() for x in data))

    res = sensitivity.analyze(model, evaluate, sparsities=(0.5,), criterion="wanda", names=["0.weight"],
                              metric="loss", stats=stats, scope="row", bias_correction=True)
    assert res.meta["scope"] == "row" and res.meta["bias_correction"] is True
    _, (lo, hi, bias) = seen  # baseline, then the trial: every row lost exactly half (3 of 6)
    assert lo == hi == 3
    assert not torch.equal(bias, before["0.bias"])  # the trial was corrected ...
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # ... and undone


def test_apply_allocation_matches_prune_with_the_same_options():
    model, data, stats = _wanda_setup()
    twin = copy.deepcopy(model)
    plan = sensitivity.apply_allocation(model, {"0.weight": 0.5, "2.weight": 0.25}, criterion="wanda",
                                        stats=stats, scope="row", bias_correction=True)
    assert plan.meta["bias_correction"] == ["0.bias", "2.bias"] and plan.meta["scope"] == "row"
    # the same statistics (of the dense model) for both layers, as one allocation uses them
    prunekit.prune(twin, 0.5, criterion="wanda", scope="row", include="0", stats=stats, bias_correction=True)
    prunekit.prune(twin, 0.25, criterion="wanda", scope="row", include="2", stats=stats, bias_correction=True)
    for k in ("0.weight", "0.bias", "2.weight", "2.bias"):
        assert torch.allclose(model.state_dict()[k], twin.state_dict()[k], atol=1e-6), k
    assert int((model[2].weight == 0).sum(1).max()) == 3  # a quarter of 12 inputs in every row


def test_data_aware_options_are_checked():
    model, data, stats = _wanda_setup()
    with pytest.raises(ValueError, match="bias_correction needs stats"):
        sensitivity.analyze(model, lambda m: 1.0, sparsities=(0.5,), names=["0.weight"], bias_correction=True)
    with pytest.raises(ValueError, match="scope='row'"):
        sensitivity.analyze(model, lambda m: 1.0, sparsities=(0.5,), names=["0.weight"], scope="row",
                            pattern="structured")
    with pytest.raises(ValueError, match="scope"):
        sensitivity.allocation_plan(model, {"0.weight": 0.5}, scope="global")
