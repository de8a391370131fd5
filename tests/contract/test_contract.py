"""Contract tests over the registries (timm style): every registered criterion and schedule
must honour the same promises, so a newly registered one is tested without writing a test.

Grid: criterion (``prunekit.criteria.CRITERIA.names()``) x scope (layer, global) x pattern
(unstructured, structured dim 0, structured dim 1, and N:M 2:4 once per criterion, since
N:M ignores the scope) x model (a small MLP and a small CNN from ``tests/conftest.py``).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import prunekit
from prunekit.apply import masking
from prunekit.plan import Plan
from prunekit.select.amount import resolve_floor
from prunekit.zoo.data import TensorLoader

AMOUNT = 0.6
MIN_KEEP = 0.01  # prunekit's default floor: global ranking never empties a tensor
SEED = 7

# Criteria that need statistics (data-aware ones) get them here: name -> fn(model, names) -> stats.
# The built-in ones need nothing; a new data-aware criterion adds an entry.
def _calibrated(kind):
    """Statistics from a few labelled batches (the tests' _loader), collected by prunekit itself."""
    from prunekit.criteria import calibrate
    return lambda model, names: calibrate(kind, model, _loader(n=32), names)


CRITERION_STATS = {"taylor": _calibrated("taylor"), "wanda": _calibrated("wanda")}

# pattern name -> kwargs of prunekit.prune
PATTERNS = {
    "unstructured": {"pattern": "unstructured"},
    "structured0": {"pattern": "structured", "dim": 0},
    "structured1": {"pattern": "structured", "dim": 1},
    "nm24": {"pattern": "nm", "nm": (2, 4)},
}


def _cases():
    out = []
    for crit in prunekit.criteria.CRITERIA.names():
        for model in ("mlp", "cnn"):
            for pattern in ("unstructured", "structured0", "structured1"):
                for scope in ("layer", "global"):
                    out.append(pytest.param(crit, scope, pattern, model,
                                            id=f"{crit}-{scope}-{pattern}-{model}"))
            out.append(pytest.param(crit, "layer", "nm24", model, id=f"{crit}-nm24-{model}"))
    return out


CASES = _cases()


_FACTORIES = {}



@pytest.fixture(autouse=True)
def _factories(mlp_factory, cnn_factory):
    """The shared small models of tests/conftest.py (an MLP and a CNN on 1x8x8 inputs)."""
    _FACTORIES.update(mlp=mlp_factory, cnn=cnn_factory)


def _make(model_name, seed=0):
    return _FACTORIES[model_name](seed)


def _prune_kwargs(crit, scope, pattern, model_name, seed=SEED):
    kw = dict(PATTERNS[pattern], criterion=crit, scope=scope, seed=seed, min_keep=MIN_KEEP)
    if pattern == "nm24" and model_name == "cnn":
        kw["include"] = "2"  # the first conv has 1 input channel: not a multiple of 4
    return kw


def _stats(crit, model, kw):
    fn = CRITERION_STATS.get(crit)
    if fn is None:
        return {}
    return {"stats": fn(model, prunekit.targets.select_targets(model, include=kw.get("include")))}


def _do_prune(model, crit, scope, pattern, model_name, seed=SEED, amount=AMOUNT):
    kw = _prune_kwargs(crit, scope, pattern, model_name, seed)
    kw.update(_stats(crit, model, kw))
    return prunekit.prune(model, None if pattern == "nm24" else amount, **kw)


def _inputs(n=4, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _loader(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return TensorLoader(x, y, batch_size=16, shuffle=True, seed=seed)


def _params(model):
    return dict(model.named_parameters())


def _slices(keep, dim):
    """(n_slices, rest) view of a keep mask along ``dim``."""
    return keep.movedim(dim, 0).reshape(keep.shape[dim], -1)


def _nm_groups(t, m=4):
    """Groups of m consecutive entries along the input dimension (conv: input channels at one tap)."""
    s = t.movedim(1, -1) if t.dim() > 2 else t
    assert s.shape[-1] % m == 0
    return s.reshape(-1, m)


def _assert_same_masks(a, b):
    ma, mb = prunekit.apply.masks(a), prunekit.apply.masks(b)
    assert ma.keys() == mb.keys()
    for name in ma:
        assert torch.equal(ma[name], mb[name]), name


def _assert_pruned_are_zero(model):
    params = _params(model)
    masks = prunekit.apply.masks(model)
    assert masks, "the model carries no masks"
    for name, keep in masks.items():
        assert keep.shape == params[name].shape
        assert (params[name].detach()[~keep] == 0).all(), f"{name}: a pruned entry is not zero"


# ----------------------------------------------------------------------------- sparsity

@pytest.mark.parametrize("crit,scope,pattern,model_name", CASES)
def test_achieved_sparsity_matches_the_target(crit, scope, pattern, model_name):
    model = _make(model_name)
    plan = _do_prune(model, crit, scope, pattern, model_name)
    names = plan.meta["targets"]
    masks = prunekit.apply.masks(model)
    params = _params(model)
    assert set(names) <= set(masks), "every targeted tensor must carry a mask"
    _assert_pruned_are_zero(model)

    if pattern == "nm24":
        for name in names:
            keep, w = masks[name], params[name].detach()
            assert (_nm_groups(keep).sum(dim=1) == 2).all(), f"{name}: a group keeps other than 2 of 4"
            assert ((_nm_groups(w) != 0).sum(dim=1) <= 2).all(), f"{name}: a group has > 2 non-zeros"
            assert int((~keep).sum()) == keep.numel() // 2
        return

    # units per targeted tensor, and how many of them are pruned
    units, pruned = {}, {}
    for name in names:
        keep = masks[name]
        if pattern == "unstructured":
            units[name], pruned[name] = keep.numel(), int((~keep).sum())
        else:
            dim = PATTERNS[pattern]["dim"]
            sl = _slices(keep, dim)
            kept_all, pruned_all = sl.all(dim=1), (~sl).all(dim=1)
            assert bool((kept_all | pruned_all).all()), f"{name}: a slice is only partly pruned"
            units[name], pruned[name] = sl.shape[0], int(pruned_all.sum())
        assert plan.tensors[name].pruned_units == pruned[name]
    floors = {n: resolve_floor(MIN_KEEP, u) for n, u in units.items()}

    if scope == "layer":
        for name in names:
            want = min(AMOUNT * units[name], units[name] - floors[name])
            assert abs(pruned[name] - want) <= 1, (name, pruned[name], want)
    else:
        total = sum(units.values())
        want = min(AMOUNT * total, sum(units[n] - floors[n] for n in names))
        assert abs(sum(pruned.values()) - want) <= 1, (pruned, want)
        for name in names:  # the per-layer floor holds in global ranking
            assert units[name] - pruned[name] >= floors[name], name

    if pattern == "structured0":  # rows removed from a weight take their bias entries along
        for name in names:
            bias = name[: -len("weight")] + "bias"
            if bias in masks:
                w_rows = _slices(masks[name], 0).all(dim=1)
                assert torch.equal(masks[bias], w_rows), bias


# ----------------------------------------------------------------------------- copies

@pytest.mark.parametrize("crit,scope,pattern,model_name", CASES)
def test_masks_survive_deepcopy_and_state_dict(crit, scope, pattern, model_name):
    model = _make(model_name)
    _do_prune(model, crit, scope, pattern, model_name)
    model.eval()
    x = _inputs()
    with torch.no_grad():
        ref = model(x)

    twin = copy.deepcopy(model)
    _assert_same_masks(model, twin)
    with torch.no_grad():
        assert torch.equal(twin(x), ref)
    masking.enforce(twin)  # the copied masks are live, not just copied zeros
    with torch.no_grad():
        assert torch.equal(twin(x), ref)

    fresh = _make(model_name, seed=123)  # different weights, no masks
    assert not masking.is_masked(fresh)
    masking.load_state_dict(fresh, model.state_dict())
    fresh.eval()
    _assert_same_masks(model, fresh)
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
    # the restored masks keep working: weights moved off zero are zeroed again
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(0.5)
    masking.enforce(fresh)
    _assert_pruned_are_zero(fresh)


# ----------------------------------------------------------------------------- modes

def _every_flag(model):
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("crit,scope,pattern,model_name", CASES)
@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
def test_pruning_calls_keep_the_training_flag(crit, scope, pattern, model_name, mode):
    model = _make(model_name).train(mode)
    flags = _every_flag(model)
    kw = _prune_kwargs(crit, scope, pattern, model_name)
    kw.update(_stats(crit, model, kw))
    amount = None if pattern == "nm24" else AMOUNT

    def check(m, what):
        assert m.training is mode and _every_flag(m) == flags, f"{what} changed the training flag"

    plan = prunekit.plan_pruning(model, amount, **kw)
    check(model, "plan_pruning")
    prunekit.apply_plan(model, plan)
    check(model, "apply")
    prunekit.prune(model, amount, **kw)
    check(model, "prune")
    prunekit.apply.masks(model), prunekit.apply.global_sparsity(model), masking.sparsity(model)
    check(model, "masks / global_sparsity / sparsity")
    prunekit.apply.enforce(model)
    check(model, "enforce")
    check(copy.deepcopy(model), "deepcopy")
    fresh = _make(model_name, seed=1).train(mode)
    masking.load_state_dict(fresh, model.state_dict())
    check(fresh, "masking.load_state_dict")


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
def test_other_calls_keep_the_training_flag(model_name, mode, tmp_path):
    """The calls whose behaviour does not depend on the criterion or pattern, once per model and mode."""
    from prunekit.analysis.metrics import evaluate, summarize
    from prunekit.apply.masking import current_plan

    model = _make(model_name).train(mode)
    flags = _every_flag(model)
    loader = _loader(n=16)

    def check(m, what):
        assert m.training is mode and _every_flag(m) == flags, f"{what} changed the training flag"

    prunekit.prune(model, 0.5, pattern="structured", dim=0)
    prunekit.prune(model, 0.7, scope="global")
    check(model, "prune")
    current_plan(model)
    check(model, "current_plan")
    prunekit.finetune(model, loader, max_steps=1, lr=0.01)
    check(model, "finetune")
    evaluate(model, loader)
    summarize(model, _inputs(1), loader, latency=False)
    check(model, "evaluate / summarize")
    prunekit.save(model, tmp_path / "m", compressed=True)
    check(model, "save")
    other = _make(model_name, seed=2).train(mode)
    prunekit.load(tmp_path / "m", other)
    check(other, "load")
    twin = copy.deepcopy(model)
    prunekit.apply.make_permanent(twin)
    check(twin, "make_permanent")
    twin = copy.deepcopy(model)
    prunekit.apply.remove(twin)
    check(twin, "remove")


@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
def test_scheduled_pruning_keeps_the_training_flag(model_name, mode):
    loader = _loader(n=32)
    model = _make(model_name).train(mode)
    prunekit.train.gradual_prune(model, loader, final=0.5, epochs=2, prune_epochs=1, every=1, lr=0.01)
    assert model.training is mode and all(f is mode for f in _every_flag(model))
    model = _make(model_name).train(mode)
    prunekit.train.iterative_prune(model, loader, sparsities=[0.3, 0.5], lr=0.01)
    assert model.training is mode and all(f is mode for f in _every_flag(model))


def test_finetune_restores_every_submodule_flag():
    model = _make("cnn").train()
    model[0].eval()  # e.g. a frozen layer
    flags = _every_flag(model)
    prunekit.finetune(model, _loader(n=16), max_steps=1)
    assert _every_flag(model) == flags


# ----------------------------------------------------------------------------- fine-tuning

@pytest.mark.parametrize("crit,scope,pattern,model_name", CASES)
def test_pruned_weights_stay_zero_through_finetune(crit, scope, pattern, model_name):
    model = _make(model_name)
    _do_prune(model, crit, scope, pattern, model_name)
    masks_before = prunekit.apply.masks(model)
    kept_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # momentum and weight decay are what push pruned weights off zero
    state = prunekit.finetune(model, _loader(), epochs=2, max_steps=3, lr=0.1, optimizer="sgd",
                              momentum=0.9, weight_decay=0.05)
    assert state.step == 3
    _assert_pruned_are_zero(model)
    masks_after = prunekit.apply.masks(model)
    assert masks_after.keys() == masks_before.keys()
    for name in masks_before:
        assert torch.equal(masks_after[name], masks_before[name]), f"{name}: the mask changed"
    params = _params(model)
    moved = any(not torch.equal(params[n].detach()[masks_before[n]], kept_before[n][masks_before[n]])
                for n in masks_before)
    assert moved, "fine-tuning did not train the kept weights"


# ----------------------------------------------------------------------------- determinism and plans

@pytest.mark.parametrize("crit,scope,pattern,model_name", CASES)
def test_same_seed_same_masks_and_plans_replay(crit, scope, pattern, model_name, tmp_path):
    a, b = _make(model_name), _make(model_name)
    plan_a = _do_prune(a, crit, scope, pattern, model_name, seed=SEED)
    _do_prune(b, crit, scope, pattern, model_name, seed=SEED)
    _assert_same_masks(a, b)

    # a plan saved as JSON and read back, applied to a fresh copy, gives the same masks
    text = plan_a.to_json()
    replay = Plan.from_json(text)
    assert replay.to_json() == text
    c = _make(model_name)
    prunekit.apply_plan(c, replay)
    _assert_same_masks(a, c)
    x = _inputs()
    with torch.no_grad():
        assert torch.equal(a.eval()(x), c.eval()(x))
    plan_a.save(tmp_path / "plan.json")
    d = _make(model_name)
    prunekit.apply_plan(d, Plan.load(tmp_path / "plan.json"))
    _assert_same_masks(a, d)

    # planning alone (no apply) agrees with prune, and does not touch the model
    e = _make(model_name)
    kw = _prune_kwargs(crit, scope, pattern, model_name, SEED)
    kw.update(_stats(crit, e, kw))
    plan_e = prunekit.plan_pruning(e, None if pattern == "nm24" else AMOUNT, **kw)
    assert not masking.is_masked(e)
    assert plan_e.to_json() == text


def test_random_criterion_depends_on_the_seed():
    masks = []
    for seed in (1, 2):
        m = _make("mlp")
        prunekit.prune(m, 0.5, criterion="random", seed=seed)
        masks.append(prunekit.apply.masks(m))
    assert any(not torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


# ----------------------------------------------------------------------------- schedules

# name -> list of sensible parameter sets; a new schedule must add its own here
SCHEDULE_PARAMS = {
    "oneshot": [dict(final=0.9), dict(final=0.5, at=7)],
    "steps": [dict(points=[(0, 0.3), (10, 0.6), (25, 0.9)]), dict(points=[(20, 0.8), (5, 0.2)])],
    "linear": [dict(final=0.9, end=20), dict(final=0.95, initial=0.1, start=3, end=17)],
    "cubic": [dict(final=0.9, n=10), dict(final=0.95, initial=0.2, start=4, n=5, every=3),
              dict(final=0.99, initial=0.0, start=0, n=1, every=7)],
}
STEPS = list(range(-2, 60)) + [100, 10_000]


def _schedule_cases():
    out = []
    for name in prunekit.train.SCHEDULES.names():
        for i, params in enumerate(SCHEDULE_PARAMS.get(name, [None])):
            out.append(pytest.param(name, params, id=f"{name}-{i}"))
    return out


@pytest.mark.parametrize("name,params", _schedule_cases())
def test_schedule_contract(name, params):
    assert params is not None, f"schedule {name!r} has no sensible parameters in SCHEDULE_PARAMS: add some"
    sched = prunekit.train.make_schedule(name, **params)
    first = [sched(t) for t in STEPS]
    second = [sched(t) for t in reversed(STEPS)][::-1]  # another order: no hidden state
    assert first == second, "not a pure function of the step"
    assert [sched(t) for t in STEPS] == first
    for t, v in zip(STEPS, first):
        assert isinstance(v, float) and math.isfinite(v), (t, v)
        assert 0.0 <= v < 1.0, f"step {t}: {v} outside [0, 1)"
    for (t0, v0), (t1, v1) in zip(zip(STEPS, first), zip(STEPS[1:], first[1:])):
        assert v1 >= v0, f"decreases from step {t0} ({v0}) to {t1} ({v1})"
    # it does reach its final target eventually
    final = params["final"] if "final" in params else sorted(params["points"])[-1][1]
    assert first[-1] == pytest.approx(final)
