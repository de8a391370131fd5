"""prune(..., refit=True) and prune(..., steps=N): least-squares kept weights after masking, iterative pruning."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from selflabel import self_labelled
from torch import nn
from torch.func import functional_call

import prunekit
from prunekit.apply import masking
from prunekit.errors import PrunekitError
from prunekit.spec import Refinement

LAYERS = ("0.weight", "2.weight", "5.weight")   # conv, grouped conv, hidden Linear (the classifier stays dense)


def _cnn(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, groups=2),
                        nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        net[7].weight.mul_(20)   # confident logits: Taylor's gradients are not all near zero
    return net


def _prune(model, data, amount=0.8, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prunekit.prune(model, amount, data=data, **options)


def _state(model):
    """Everything a refusal must leave as it was: every tensor of the state_dict (masks included)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def _inputs(model, name, data):
    """What layer ``name`` reads on the calibration batches, in ``model`` as it is."""
    module = model.get_submodule(name.rpartition(".")[0])
    seen = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            for x, _ in data:
                model(x)
    finally:
        handle.remove()
    return module, torch.cat(seen)


def _output_error(module, weight, reference, x):
    with torch.no_grad():
        out = functional_call(module, {"weight": weight, "bias": module.bias}, (x,))
        ref = functional_call(module, {"weight": reference, "bias": module.bias}, (x,))
    return float((out - ref).pow(2).sum())


CASES = [dict(criterion="l1", scope="global"), dict(criterion="wanda", scope="row"),
         dict(criterion="taylor", scope="layer", allocation="magnitude")]


@pytest.mark.parametrize("options", CASES, ids=lambda o: o["criterion"])
def test_refit_lowers_each_layers_output_error_and_keeps_the_masks(options):
    dense = _cnn()
    data = self_labelled(dense)
    masked, refit = copy.deepcopy(dense), copy.deepcopy(dense)
    _prune(masked, data if options["criterion"] != "l1" else None, **options)
    plan = _prune(refit, data, refit=True, **options)
    m_masks, r_masks = masking.masks(masked), masking.masks(refit)
    assert m_masks.keys() == r_masks.keys() and all(torch.equal(m_masks[n], r_masks[n]) for n in m_masks)
    for name in LAYERS:
        w_dense, w_masked, w_refit = (m.get_parameter(name).detach() for m in (dense, masked, refit))
        assert bool((w_refit[~r_masks[name]] == 0).all())              # pruned entries stay exact zeros
        # on the inputs the layer reads in the refit model (earlier layers pruned and refit), its outputs are
        # closer to the dense layer's with the refit weights than with the masked ones
        module, x = _inputs(refit, name, data)
        err_masked = _output_error(module, w_masked, w_dense, x)
        err_refit = _output_error(module, w_refit, w_dense, x)
        assert err_refit <= err_masked * (1 + 1e-5), (name, err_refit, err_masked)
        rec = plan.meta["refit"]["layers"][name]
        assert rec["refit_error"] <= rec["masked_error"]
    # the big layers gain clearly (the 9-input first conv has little room), and so does the whole model
    module, x = _inputs(refit, "5.weight", data)
    assert _output_error(module, refit[5].weight, dense[5].weight, x) < \
        0.7 * _output_error(module, masked[5].weight, dense[5].weight, x)
    with torch.no_grad():
        logits_err = {k: sum(float(F.mse_loss(m(x), dense(x))) for x, _ in data) for k, m in
                      (("masked", masked), ("refit", refit))}
    assert logits_err["refit"] < logits_err["masked"]
    assert plan.meta["steps"] == 1 and plan.meta["refit"]["damp"] == 0.01


def test_refit_takes_conv1d_and_a_model_pruned_before():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14, 16), nn.ReLU(),
                        nn.Linear(16, 3))
    data = [(torch.randn(16, 4, 16), torch.randint(0, 3, (16,))) for _ in range(2)]
    prunekit.prune(net, 0.5, criterion="l1")               # masks from an earlier round stay pruned
    before = masking.masks(net)
    plan = _prune(net, data, 0.8, criterion="wanda", scope="row", refit=True)
    assert set(plan.meta["refit"]["layers"]) == {"0.weight", "3.weight"}
    for name, keep in masking.masks(net).items():
        assert not bool((keep & ~before[name]).any())          # nothing pruned before came back
        assert bool((net.get_parameter(name)[~keep] == 0).all())


def _failing_forward(after_calls):
    """A forward_fn that raises on call number ``after_calls``: a failure half-way through."""
    calls = {"n": 0}

    def forward(model, batch):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise RuntimeError("boom")
        return model(batch[0])

    return forward


@pytest.mark.parametrize("options,after_calls", [
    (dict(criterion="wanda", scope="row", refit=True), 8),                    # fails refitting the 2nd layer
    (dict(criterion="l1", scope="global", refit=True), 5),                    # magnitude: only the refit reads data
    (dict(criterion="wanda", scope="layer", steps=4), 7),                     # fails at step 3 of 4
], ids=["refit", "magnitude-refit", "steps"])
def test_a_failure_half_way_leaves_the_model_as_it_was(options, after_calls):
    model = _cnn()
    data = self_labelled(model)
    prunekit.prune(model, 0.3, criterion="l1", include=["2.weight"])   # a mask from before must survive as it was
    state = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        _prune(model, data, forward_fn=_failing_forward(after_calls), **options)
    assert _same_state(model, state)
    assert set(masking.masks(model)) == {"2.weight"}


@pytest.mark.parametrize("call,match", [
    (lambda m, d: prunekit.prune(m, 0.8, criterion="wanda", scope="row", refit=True), "data="),
    (lambda m, d: prunekit.prune(m, 0.8, criterion="taylor", steps=3), "data="),
    (lambda m, d: prunekit.prune(m, 0.8, criterion="sparsegpt", data=d, refit=True), "sparsegpt does not take refit"),
    (lambda m, d: prunekit.prune(m, 0.8, criterion="sparsegpt", data=d, steps=2), "sparsegpt does not take steps"),
    (lambda m, d: prunekit.prune(m, 0.8, criterion="wanda", data=d, refit=True, keep_original=True), "keep_original"),
    (lambda m, d: prunekit.prune(m, 0.8, criterion="wanda", data=d, refit=True, bias_correction=True),
     "bias_correction"),
    (lambda m, d: prunekit.prune(m, 0.8, criterion="l1", data=d, steps=4), "data-aware"),
    (lambda m, d: prunekit.prune(m, criterion="wanda", pattern="nm", data=d, steps=2), "pattern='nm'"),
    (lambda m, d: prunekit.prune(m, 100, criterion="wanda", data=d, steps=2), "not a fraction"),
    (lambda m, d: prunekit.prune(m, 0.8, criterion="wanda", data=d, steps=0), r"steps=0 must be an int >= 1"),
    (lambda m, d: prunekit.prune(m, 0.8, criterion="wanda", data=d, steps=2.0), "must be an int"),
    (lambda m, d: prunekit.prune(m, 0.8, criterion="wanda", data=d, refit="yes"), "True or False"),
    (lambda m, d: prunekit.prune(m, 0.8, criterion="l1", data=d, refit=True, loss_fn=F.cross_entropy), "loss_fn"),
    (lambda m, d: prunekit.plan_pruning(m, 0.8, criterion="wanda", data=d, refit=True), "plan_pruning"),
])
def test_requests_it_cannot_honour_are_refused_before_anything_changes(call, match):
    model = _cnn()
    data = self_labelled(model)
    state = _state(model)
    with pytest.raises(PrunekitError, match=match):
        call(model, data)
    assert _same_state(model, state) and not masking.is_masked(model)


def test_refinement_is_validated_in_one_place():
    assert not Refinement().active and Refinement(steps=2).active and Refinement(refit=True).active
    with pytest.raises(PrunekitError, match="steps=True"):
        Refinement(steps=True)


@pytest.mark.parametrize("options", [dict(criterion="taylor", scope="layer"),
                                     dict(criterion="taylor", scope="layer", allocation="magnitude"),
                                     dict(criterion="wanda", scope="row"),
                                     dict(criterion="taylor", scope="global")], ids=["layer", "alloc", "row", "global"])
def test_steps_reach_the_exact_target_with_other_masks_than_one_shot(options):
    dense = _cnn()
    data = self_labelled(dense)
    one, stepped = copy.deepcopy(dense), copy.deepcopy(dense)
    _prune(one, data, **options)
    p4 = _prune(stepped, data, steps=4, **options)
    m1, m4 = masking.masks(one), masking.masks(stepped)
    assert p4.meta["steps"] == 4 and p4.meta["allocation"] == options.get("allocation", "uniform")
    for name in LAYERS:  # per layer: the count of one shot (allocation included); global: ranked anew
        if options["scope"] != "global":
            assert int((~m4[name]).sum()) == int((~m1[name]).sum()), name
        assert p4.tensors[name].pruned_units == int((~m4[name]).sum())
    if options["scope"] == "global":  # the total is exact (per row, per layer: rounded as one shot rounds it)
        total = sum(m4[n].numel() for n in LAYERS)
        assert sum(int((~m4[n]).sum()) for n in LAYERS) == round(0.8 * total)
    assert any(not torch.equal(m1[n], m4[n]) for n in LAYERS)   # the statistics were collected again


def test_steps_are_deterministic_and_combine_with_refit():
    dense = _cnn()
    data = self_labelled(dense)
    digests = []
    for _ in range(2):
        model = copy.deepcopy(dense)
        plan = _prune(model, data, criterion="taylor", scope="layer", allocation="magnitude", steps=3, refit=True,
                      seed=7)
        digests.append((masking.digest(model), [model.get_parameter(n).detach().clone() for n in LAYERS]))
    assert digests[0][0] == digests[1][0]
    assert all(torch.equal(a, b) for a, b in zip(digests[0][1], digests[1][1]))
    assert plan.meta["steps"] == 3 and set(plan.meta["refit"]["layers"]) == set(LAYERS)


def test_one_step_without_refit_is_the_plain_prune():
    dense = _cnn()
    data = self_labelled(dense)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)
    pa = _prune(a, data, criterion="taylor", scope="layer")
    pb = _prune(b, data, criterion="taylor", scope="layer", steps=1, refit=False)
    assert masking.digest(a) == masking.digest(b) and "steps" not in pa.meta and "steps" not in pb.meta
