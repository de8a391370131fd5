"""Contract tests over the remaining registries (timm style), parametrised over every registered entry:

- ``prunekit.criteria.CRITERIA``: the :class:`~prunekit.criteria.Criterion` object itself (scores shaped like
  the tensor, deterministic for a seed, declared needs honoured, the elementwise form equal to ``score``);
  tests/contract/test_contract.py covers what prune() does with each criterion;
- ``prunekit.pruners.PRUNERS``: declared capabilities, refusing to run without data, determinism, targets;
- ``prunekit.criteria.stats.COLLECTORS``: statistics collected inside the context manager and every hook
  removed afterwards, also when the block raises;
- ``prunekit.zoo.models.MODELS``: builds, runs on its documented input, and a pruned model survives
  ``prunekit.save`` / ``prunekit.load``. A new model needs an entry in ``MODEL_CASES``.

The schedules (``prunekit.train.SCHEDULES``) are covered by ``test_schedule_contract`` in test_contract.py.
"""
from __future__ import annotations

import copy
from typing import Dict, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunekit
from prunekit.criteria import COLLECTORS, CRITERIA, ScoreContext, calibrate, collect
from prunekit.errors import PrunekitError
from prunekit.pruners import PRUNERS
from prunekit.select.threshold import full_scores
from prunekit.targets import select_targets
from prunekit.zoo.data import TensorLoader
from prunekit.zoo.models import MODELS, build_model, model_spec

SEED = 7
PATTERNS = ("unstructured", "structured", "nm")
SCOPES = ("layer", "global", "row")



_FACTORIES = {}


@pytest.fixture(autouse=True)
def _factories(mlp_factory, cnn_factory):
    """The shared small models of tests/conftest.py (an MLP and a CNN on 1x8x8 inputs)."""
    _FACTORIES.update(mlp=mlp_factory, cnn=cnn_factory)


def _make(kind: str, seed: int = 0) -> nn.Module:
    return _FACTORIES[kind](seed)


def _batches(n: int = 32, seed: int = 0) -> TensorLoader:
    g = torch.Generator().manual_seed(seed)
    return TensorLoader(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g), batch_size=16)


def _contexts(model: nn.Module, stats=None, seed: int = SEED):
    """(parameter, ScoreContext) for every default target of the model, as compute_scores builds them."""
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    for name in select_targets(model):
        module = modules[name.rpartition(".")[0]]
        yield params[name], ScoreContext(name, module, seed, dict((stats or {}).get(name, {})))


def _stats_for(crit, model: nn.Module):
    return calibrate(crit.collector, model, _batches(), select_targets(model)) if crit.needs_data else {}


# ----------------------------------------------------------------------------- criteria

@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", CRITERIA.names())
def test_criterion_scores_are_shaped_like_the_tensor_and_deterministic(name, kind):
    crit = CRITERIA.get(name)
    model = _make(kind)
    before = copy.deepcopy(model.state_dict())
    stats = _stats_for(crit, model)
    for param, ctx in _contexts(model, stats):
        s = crit.score(param, ctx)
        assert isinstance(s, torch.Tensor) and tuple(s.shape) == tuple(param.shape), (ctx.name, type(s))
        assert s.is_floating_point() and bool(torch.isfinite(s).all()), ctx.name
        again = crit.score(param, ScoreContext(ctx.name, ctx.module, SEED, dict(ctx.stats)))
        assert torch.equal(s, again), f"{name}: two scorings with seed {SEED} differ on {ctx.name}"
        assert torch.equal(s, crit(param, ctx)), "a Criterion calls like the function it was made from"
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), f"{name} changed the model while scoring"
    # the (lazy or chunked) scores the selection stage reads are these scores
    names = select_targets(model)
    lazy = prunekit.criteria.compute_scores(model, names, name, seed=SEED, stats=stats)
    assert list(lazy) == names
    for param, ctx in _contexts(model, stats):
        assert torch.equal(full_scores(lazy[ctx.name]), crit.score(param, ctx).float()), ctx.name


@pytest.mark.parametrize("name", CRITERIA.names())
def test_criterion_declares_consistent_needs(name):
    crit = CRITERIA.get(name)
    assert crit.name in CRITERIA, f"{name} is registered as a Criterion named {crit.name!r}, which is not registered"
    if crit.needs_data:
        assert crit.collector in COLLECTORS, f"{name} needs data but its collector {crit.collector!r} is not registered"
        assert name in prunekit.criteria.data_aware()
    else:
        assert crit.collector is None
        assert name not in prunekit.criteria.data_aware()


@pytest.mark.parametrize("name", [n for n in CRITERIA.names() if CRITERIA.get(n).needs_data])
def test_data_aware_criterion_refuses_without_statistics_and_says_how_to_collect(name):
    crit = CRITERIA.get(name)
    model = _make("mlp")
    param, ctx = next(_contexts(model))
    with pytest.raises(Exception) as err:
        crit.score(param, ctx)
    msg = str(err.value)
    assert "collect" in msg and crit.collector in msg, f"the error does not say how to collect statistics: {msg}"
    with pytest.raises(Exception) as err:   # and through the front door
        prunekit.prune(model, 0.5, criterion=name)
    msg = str(err.value)
    assert "collect" in msg and crit.collector in msg, msg
    assert not prunekit.apply.masking.is_masked(model)
    # after calibration it works (the shape test above scores every target with these statistics)
    stats = calibrate(crit.collector, model, _batches(), select_targets(model))
    assert ctx.name in stats
    s = crit.score(param, ScoreContext(ctx.name, ctx.module, SEED, dict(stats[ctx.name])))
    assert tuple(s.shape) == tuple(param.shape)
    plan = prunekit.prune(model, 0.5, criterion=name, stats=stats)
    assert plan.meta["criterion"] == crit.name


@pytest.mark.parametrize("name", [n for n in CRITERIA.names() if CRITERIA.get(n).elementwise is not None])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_elementwise_form_equals_score(name, kind):
    crit = CRITERIA.get(name)
    model = _make(kind)
    for param, ctx in _contexts(model, _stats_for(crit, model)):
        want = crit.score(param, ctx).float()
        out = torch.empty(param.shape, dtype=torch.float32)
        got = crit.elementwise(param.detach(), out)
        assert torch.equal(got.reshape(param.shape), want), ctx.name
        # chunk by chunk into one reused buffer, as global ranking calls it
        flat, buf, parts = param.detach().reshape(-1), torch.empty(7), []
        for i in range(0, flat.numel(), 7):
            chunk = flat[i:i + 7]
            parts.append(crit.elementwise(chunk, buf[:chunk.numel()]).clone())
        assert torch.equal(torch.cat(parts), want.reshape(-1)), f"{ctx.name}: chunked scores differ"


# ----------------------------------------------------------------------------- whole-model pruners

def _pruner_kwargs(pruner, pattern: str) -> Tuple[object, Dict]:
    if pattern == "nm":
        return None, {"pattern": "nm", "nm": (2, 4)}
    if pattern == "structured":
        return 0.5, {"pattern": "structured", "dim": 0}
    return 0.5, {"pattern": pattern}


@pytest.mark.parametrize("name", PRUNERS.names())
def test_pruner_declares_what_it_supports(name):
    pruner = PRUNERS.get(name)
    assert pruner.name == name
    assert pruner.patterns and set(pruner.patterns) <= set(PATTERNS), pruner.patterns
    assert pruner.scopes and set(pruner.scopes) <= set(SCOPES), pruner.scopes
    assert all(isinstance(o, str) for o in pruner.options)
    desc = pruner.describe()
    assert desc["name"] == name and set(desc["patterns"]) == set(pruner.patterns)
    assert prunekit.api.needs_data(name) is pruner.needs_data
    # a whole-model pruner cannot only plan: it says so
    with pytest.raises(PrunekitError, match=name):
        prunekit.plan_pruning(_make("mlp"), 0.5, criterion=name)


@pytest.mark.parametrize("name", [n for n in PRUNERS.names() if PRUNERS.get(n).needs_data])
def test_pruner_refuses_without_data_and_says_how(name):
    model = _make("mlp")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PrunekitError, match="data="):
        prunekit.prune(model, 0.5, criterion=name)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert not prunekit.apply.masking.is_masked(model)


def _pruner_cases():
    return [pytest.param(n, p, id=f"{n}-{p}") for n in PRUNERS.names() for p in PRUNERS.get(n).patterns]


def _decoder_case():
    """A pruner of stacks of blocks (decoder LLMs) gets a tiny decoder and token ids."""
    from prunekit.zoo.llm import tiny_decoder

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    return (lambda: tiny_decoder("llama", num_hidden_layers=2)), ids, lambda m: m(input_ids=ids[:2]).logits


# pruner name -> (model factory, calibration data, forward on an example); default: the MLP on 1x8x8 batches
_PRUNER_MODELS = {"sequential": _decoder_case}


def _pruner_model(name):
    if name in _PRUNER_MODELS:
        return _PRUNER_MODELS[name]()
    return (lambda: _make("mlp")), list(_batches()), lambda m: m(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("name,pattern", _pruner_cases())
def test_pruner_prunes_its_targets_deterministically(name, pattern):
    pruner = PRUNERS.get(name)
    amount, kw = _pruner_kwargs(pruner, pattern)
    make, batches, forward = _pruner_model(name)
    data = {"data": batches} if pruner.needs_data else {}
    a, b = make(), make()
    plan = prunekit.prune(a, amount, criterion=name, seed=SEED, **kw, **data)
    prunekit.prune(b, amount, criterion=name, seed=SEED, **kw, **data)
    masks, params = prunekit.apply.masks(a), dict(a.named_parameters())
    targets = plan.meta["targets"]
    assert targets and set(targets) <= set(masks), "every target carries a mask"
    for t in targets:
        keep = masks[t]
        assert keep.shape == params[t].shape
        assert bool((params[t].detach()[~keep] == 0).all()), f"{t}: pruned entries are not zero"
        if pattern == "nm":
            groups = keep.reshape(-1, 4)
            assert bool((groups.sum(1) == 2).all()), f"{t}: not 2 of every 4 kept"
        else:
            assert abs(float((~keep).float().mean()) - amount) <= 0.05, f"{t}: sparsity {(~keep).float().mean()}"
    # same seed, same data -> same masks and same (possibly rewritten) weights
    mb = prunekit.apply.masks(b)
    assert masks.keys() == mb.keys() and all(torch.equal(masks[n], mb[n]) for n in masks)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with torch.no_grad():
        assert bool(torch.isfinite(forward(a.eval())).all())


@pytest.mark.parametrize("name", PRUNERS.names())
def test_pruner_rejects_what_it_does_not_declare(name):
    pruner = PRUNERS.get(name)
    data = {"data": list(_batches())} if pruner.needs_data else {}
    for pattern in set(PATTERNS) - set(pruner.patterns):
        amount, kw = _pruner_kwargs(pruner, pattern)
        with pytest.raises(PrunekitError, match=pattern):
            prunekit.prune(_make("mlp"), amount, criterion=name, **kw, **data)
    for scope in set(SCOPES) - set(pruner.scopes):
        with pytest.raises(PrunekitError, match=scope):
            prunekit.prune(_make("mlp"), 0.5, criterion=name, scope=scope, **data)


# ----------------------------------------------------------------------------- statistics collectors

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooks(model: nn.Module) -> Dict[str, int]:
    """Hook counts of every module and every parameter (tensor hooks), by where they are."""
    out = {f"{n}:{d}": len(getattr(m, d)) for n, m in model.named_modules() for d in _HOOK_DICTS}
    out.update({f"{n}:tensor": len(p._backward_hooks or {}) for n, p in model.named_parameters()})
    return out


def _collect_batch(cls, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One batch the way the collector wants it: forward, plus a backward when it needs gradients."""
    out = model(x)
    if getattr(cls, "needs_grad", False):
        F.cross_entropy(out, y).backward()


def _frozen_mlp() -> nn.Module:
    model = _make("mlp")
    model[1].bias.requires_grad_(False)   # a frozen parameter must stay frozen
    return model


@pytest.mark.parametrize("kind", COLLECTORS.names())
def test_collector_collects_and_removes_its_hooks(kind):
    cls = COLLECTORS.get(kind)
    model = _frozen_mlp()
    x, y = next(iter(_batches()))
    hooks, grads = _hooks(model), [p.requires_grad for p in model.parameters()]
    with collect(kind, model) as stats:
        assert _hooks(model) != hooks, f"{kind} attached no hook"
        _collect_batch(cls, model, x, y)
    assert _hooks(model) == hooks, f"{kind} left hooks behind"
    assert [p.requires_grad for p in model.parameters()] == grads
    names = cls.default_names(model)
    assert names and set(stats) == set(names), (sorted(stats), names)
    assert all(isinstance(v, dict) and v for v in stats.values())
    # what was collected does not change once the block has ended
    snapshot = copy.deepcopy(stats)
    model.zero_grad()
    _collect_batch(cls, model, x, y)
    for n, entry in stats.items():
        for k, v in entry.items():
            assert torch.equal(snapshot[n][k], v) if torch.is_tensor(v) else snapshot[n][k] == v, (n, k)


@pytest.mark.parametrize("kind", COLLECTORS.names())
def test_collector_removes_its_hooks_when_the_block_raises(kind):
    cls = COLLECTORS.get(kind)
    model = _frozen_mlp()
    x, y = next(iter(_batches()))
    hooks, grads = _hooks(model), [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        with collect(kind, model):
            _collect_batch(cls, model, x, y)
            raise RuntimeError("boom")
    assert _hooks(model) == hooks, f"{kind} left hooks behind after an exception"
    assert [p.requires_grad for p in model.parameters()] == grads


@pytest.mark.parametrize("kind", COLLECTORS.names())
def test_calibrate_with_every_collector_leaves_the_model_as_it_was(kind):
    model = _frozen_mlp().train()
    hooks, grads = _hooks(model), [p.requires_grad for p in model.parameters()]
    before = copy.deepcopy(model.state_dict())
    stats = calibrate(kind, model, _batches())
    assert set(stats) == set(COLLECTORS.get(kind).default_names(model))
    assert _hooks(model) == hooks and [p.requires_grad for p in model.parameters()] == grads
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


# ----------------------------------------------------------------------------- built-in models

MODEL_NAMES = MODELS.names()   # at collection time, like every parametrisation here

# name -> (build_model kwargs, documented input shape, number of classes); small widths keep them fast
MODEL_CASES = {
    "mlp": (dict(in_features=64, hidden=[32], num_classes=7), (2, 1, 8, 8), 7),
    "lenet300": (dict(), (2, 1, 28, 28), 10),
    "lenet5": (dict(), (2, 1, 28, 28), 10),
    "vgg_small": (dict(input_size=8, widths=[8, 16], num_classes=7), (2, 1, 8, 8), 7),
    "resnet18_cifar": (dict(widths=[8, 16, 32, 64], num_classes=7), (2, 3, 32, 32), 7),
    "mobilenetv2_cifar": (dict(stem=8, last=64, num_classes=7), (2, 3, 32, 32), 7),
}


def test_every_model_has_a_case():
    missing = sorted(set(MODEL_NAMES) - set(MODEL_CASES))
    assert not missing, f"models without build kwargs and an input shape in MODEL_CASES: {missing}"


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "compressed"])
def test_model_builds_runs_prunes_and_round_trips(name, compressed, tmp_path):
    assert name in MODEL_CASES, f"model {name!r} has no entry in MODEL_CASES: add its kwargs and input shape"
    kwargs, shape, classes = MODEL_CASES[name]
    torch.manual_seed(0)
    model = build_model(name, **kwargs).eval()
    assert model_spec(model) == {"name": name, "kwargs": kwargs}
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert model(x).shape == (shape[0], classes)
    plan = prunekit.prune(model, 0.5)
    assert plan.meta["targets"] and prunekit.apply.global_sparsity(model) > 0.3
    with torch.no_grad():
        ref = model(x)

    folder = prunekit.save(model, tmp_path / name, compressed=compressed)
    loaded = prunekit.load(folder).eval()             # rebuilt from the recorded spec
    torch.manual_seed(123)
    into = prunekit.load(folder, build_model(name, **kwargs)).eval()   # loaded into a fresh instance
    masks = prunekit.apply.masks(model)
    for other in (loaded, into):
        assert type(other) is type(model)
        with torch.no_grad():
            assert torch.equal(other(x), ref)
        got = prunekit.apply.masks(other)
        assert got.keys() == masks.keys() and all(torch.equal(got[n], masks[n]) for n in masks)
