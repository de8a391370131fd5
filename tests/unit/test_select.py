import copy
import json
import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit.plan import Plan, TensorPlan
from prunekit.select.amount import resolve_amount
from prunekit.select.ranking import select


def _zeros(model, name):
    return int((dict(model.named_parameters())[name] == 0).sum())


def test_layer_scope_prunes_the_smallest_entries_of_each_layer(mlp):
    w = mlp[1].weight.detach().clone()
    plan = prunekit.prune(mlp, 0.5)
    assert set(plan.tensors) == {"1.weight", "3.weight"}  # classifier 5.* excluded by default
    k = round(0.5 * w.numel())
    assert _zeros(mlp, "1.weight") == k
    pruned = w.abs()[mlp[1].weight == 0]
    kept = w.abs()[mlp[1].weight != 0]
    assert pruned.max() <= kept.min()
    assert (mlp[5].weight != 0).all()


def test_global_scope_uses_one_threshold_and_exact_total(mlp):
    before = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    plan = prunekit.prune(mlp, 0.7, scope="global", min_keep=0)
    names = plan.meta["targets"]
    total = sum(before[n].numel() for n in names)
    assert sum(_zeros(mlp, n) for n in names) == round(0.7 * total)
    params = dict(mlp.named_parameters())
    pruned = torch.cat([before[n].abs()[params[n] == 0] for n in names])
    kept = torch.cat([before[n].abs()[params[n] != 0] for n in names])
    assert pruned.max() <= kept.min()


def test_global_floor_keeps_units_and_is_reported():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 20), nn.Linear(20, 2))
    with torch.no_grad():
        m[1].weight.mul_(1e-3)  # global ranking alone would empty this layer
    plan = prunekit.prune(m, 0.5, scope="global", min_keep=0.1)
    assert plan.tensors["1.weight"].floor_hit
    assert (m[1].weight != 0).sum() == 40  # 10% of 400 kept
    assert any("1.weight" in n and "floor" in n for n in plan.notes)
    assert _zeros(m, "0.weight") + _zeros(m, "1.weight") == 400  # the target is still met exactly


def test_amount_as_absolute_count(mlp):
    prunekit.prune(mlp, 100, include="1")
    assert _zeros(mlp, "1.weight") == 100


@pytest.mark.parametrize("norm", [1, 2, math.inf])
def test_structured_rows_take_lowest_norm_and_their_bias(mlp, norm):
    w = mlp[1].weight.detach().clone()
    prunekit.prune(mlp, 0.25, pattern="structured", dim=0, norm=norm, include="1")
    row_norms = torch.linalg.vector_norm(w, ord=norm, dim=1)
    pruned_rows = (mlp[1].weight == 0).all(dim=1)
    assert int(pruned_rows.sum()) == 8
    assert row_norms[pruned_rows].max() <= row_norms[~pruned_rows].min()
    assert (mlp[1].bias[pruned_rows] == 0).all() and (mlp[1].bias[~pruned_rows] != 0).all()


def test_structured_conv_input_channels(cnn):
    prunekit.prune(cnn, 0.5, pattern="structured", dim=1, include="2")
    dead = (cnn[2].weight == 0).all(dim=(0, 2, 3))
    assert int(dead.sum()) == 4
    assert (cnn[2].bias != 0).all()  # input channels own no bias entries


def test_global_structured_compares_layers_fairly(cnn):
    plan = prunekit.prune(cnn, 0.5, pattern="structured", dim=0, scope="global")
    units = sum(t.units for t in plan if t.coupled_to is None)
    pruned = sum(t.pruned_units for t in plan if t.coupled_to is None)
    assert pruned == round(0.5 * units)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_pattern_holds_in_every_group(mlp, n, m):
    w = mlp[1].weight.detach().clone()
    prunekit.prune(mlp, pattern="nm", nm=(n, m))
    groups = mlp[1].weight.reshape(-1, m)
    assert ((groups != 0).sum(dim=1) <= n).all()
    # within each group the kept entries are the largest
    wg = w.abs().reshape(-1, m)
    kept_min = wg.masked_fill(groups == 0, math.inf).min(dim=1).values
    pruned_max = wg.masked_fill(groups != 0, -math.inf).max(dim=1).values
    assert (pruned_max <= kept_min).all()


def test_nm_skips_incompatible_layers_with_a_note(cnn):
    plan = prunekit.prune(cnn, pattern="nm", nm=(2, 4))
    assert "0.weight" not in plan.tensors and any("0.weight" in n for n in plan.notes)
    w = cnn[2].weight.permute(0, 2, 3, 1).reshape(-1, 4)  # groups along input channels
    assert ((w != 0).sum(dim=1) <= 2).all()


def test_reprune_composes_and_counts_total(mlp):
    prunekit.prune(mlp, 0.5, criterion="random", seed=1)
    first = mlp[1].weight == 0
    prunekit.prune(mlp, 0.8)
    second = mlp[1].weight == 0
    assert (second[first]).all()  # nothing comes back
    assert int(second.sum()) == round(0.8 * second.numel())


def test_lower_target_than_current_never_unprunes(mlp):
    prunekit.prune(mlp, 0.8)
    z = _zeros(mlp, "1.weight")
    prunekit.prune(mlp, 0.3)
    assert _zeros(mlp, "1.weight") == z


@pytest.mark.parametrize("bad,err,match", [
    (dict(amount=1.5), ValueError, r"\[0, 1\)"),
    (dict(amount=-0.1), ValueError, r"\[0, 1\)"),
    (dict(amount=10 ** 9), ValueError, "count of units"),
    (dict(amount=True), TypeError, "float in"),
    (dict(amount="half"), TypeError, "float in"),
    (dict(amount=0.5, scope="everywhere"), ValueError, "allowed: layer, global"),
    (dict(amount=0.5, pattern="blocks"), ValueError, "allowed: unstructured, structured, nm"),
    (dict(amount=0.5, criterion="nope"), KeyError, "known: .*l1"),
    (dict(amount=0.5, include="nope*"), ValueError, "matches no prunable layer"),
    (dict(amount=0.5, pattern="structured", dim=4), ValueError, "out of range"),
    (dict(amount=0.5, min_keep=-2), ValueError, "min_keep"),
    (dict(pattern="nm", nm=(4, 2)), ValueError, "0 < N < M"),
    (dict(amount=0.5, types=["Linearr"]), ValueError, "unknown module type"),
])
def test_bad_input_is_a_clear_error_and_leaves_model_untouched(mlp, bad, err, match):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(err, match=match):
        prunekit.prune(mlp, **bad)
    after = mlp.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resolve_amount_rounds_like_torch():
    assert resolve_amount(0.5, 7) == 4 and resolve_amount(3, 7) == 3 and resolve_amount(0.0, 7) == 0


def test_select_works_on_plain_score_tensors():
    scores = {"a": torch.arange(10.0), "b": torch.arange(10.0) + 5}
    plan = select(scores, 0.5, scope="global", min_keep=0)
    # the 10 lowest: a 0..7 and b 5, 6 (the tie at 7 goes to the first tensor)
    assert plan.tensors["a"].pruned_units == 8 and plan.tensors["b"].pruned_units == 2


def test_plan_json_round_trip_and_corrupt_plans(mlp, tmp_path):
    plan = prunekit.plan_pruning(mlp, 0.6, scope="global")
    plan.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json")
    assert back.meta == plan.meta
    for a in plan:
        assert torch.equal(a.keep_mask(), back.tensors[a.name].keep_mask())
    with pytest.raises(ValueError, match="not a prunekit plan"):
        Plan.from_json('{"format": "other"}')
    with pytest.raises(ValueError, match="invalid JSON"):
        Plan.from_json("{nope")
    d = plan.tensors["1.weight"].to_dict()
    d["keep_bits"] = d["keep_bits"][:8]
    with pytest.raises(ValueError, match="malformed plan entry"):
        TensorPlan.from_dict(d)


def test_plan_applies_to_another_copy(mlp, mlp_factory):
    plan = prunekit.plan_pruning(mlp, 0.6, scope="global")
    assert (mlp[1].weight != 0).all()  # planning alone changes nothing
    other = mlp_factory()
    prunekit.apply_plan(other, Plan.from_json(plan.to_json()))
    prunekit.apply_plan(mlp, plan)
    x = torch.randn(3, 64)
    assert torch.equal(other(x), mlp(x))


def test_same_seed_same_masks_different_seed_different(mlp_factory):
    masks = []
    for seed in (5, 5, 6):
        m = mlp_factory()
        prunekit.prune(m, 0.5, criterion="random", seed=seed, scope="global")
        masks.append(prunekit.apply.masks(m)["1.weight"])
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


def test_custom_criterion_plugs_in_with_one_decorator(mlp):
    @prunekit.register_criterion("test_keep_first_half", overwrite=True)
    def keep_first_half(param, ctx):
        s = torch.zeros_like(param)
        s.view(-1)[: param.numel() // 2] = 1.0
        return s

    prunekit.prune(mlp, 0.5, criterion="test_keep_first_half", include="1")
    flat = mlp[1].weight.reshape(-1)
    assert (flat[: flat.numel() // 2] != 0).all() and (flat[flat.numel() // 2:] == 0).all()


def test_criterion_returning_wrong_shape_is_rejected(mlp):
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        prunekit.prune(mlp, 0.5, criterion=lambda p, ctx: torch.zeros(3))


def _tied(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    m[1].weight = m[0].weight  # tied, as every HF LM ties embeddings and lm_head
    return m


@pytest.mark.parametrize("options", [{}, {"scope": "global"}, {"exclude": "0"}, {"criterion": "random"}])
def test_a_tied_tensor_is_pruned_once_under_all_its_names(options, tmp_path):
    # issue 11.4: KeyError: unknown parameter '1.weight' with default options
    m = _tied()
    plan = prunekit.prune(m, 0.5, **options)
    assert len([n for n in plan.tensors if n in ("0.weight", "1.weight")]) == 1
    assert m[1].weight is m[0].weight and float((m[0].weight == 0).float().mean()) == pytest.approx(0.5)
    back = prunekit.load(prunekit.save(m, tmp_path / "t"), _tied(1))
    x = torch.randn(4, 8)
    assert back[1].weight is back[0].weight and torch.equal(back(x), m(x))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


def test_options_that_cannot_be_honoured_are_refused_not_ignored():
    # issue 11.5: pattern="bogus" with scope="row" ran; pattern="nm" with 0.9 silently gave 50%
    m = _mlp()
    with pytest.raises(prunekit.PrunekitError, match="unknown pattern 'bogus'"):
        prunekit.prune(m, 0.5, pattern="bogus", scope="row")
    with pytest.raises(prunekit.PrunekitError, match="amount=0.9 cannot be honoured"):
        prunekit.prune(m, 0.9, pattern="nm")
    assert not prunekit.apply.masks(m)
    prunekit.prune(m, 0.5, pattern="nm", nm="2:4")   # the implied amount, or none, is fine; "N:M" strings too
    assert prunekit.apply.global_sparsity(m) == pytest.approx(0.5)


def test_amount_zero_is_a_no_op():
    m = _mlp()
    before = copy.deepcopy(m.state_dict())
    plan = prunekit.prune(m, 0.0)
    assert all(tp.pruned_units == 0 for tp in plan)
    assert not prunekit.apply.masks(m) and list(m.state_dict()) == list(before)


@pytest.mark.parametrize("options", [{}, {"scope": "row"}, {"scope": "global"}, {"pattern": "nm"},
                                     {"criterion": "random"}, {"pattern": "structured"}])
def test_nan_weights_are_refused_by_every_path_naming_the_tensor(options):
    m = _mlp()
    with torch.no_grad():
        m[2].weight[3, 5] = float("nan")
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(prunekit.PrunekitError, match=r"2\.weight holds 1 NaN"):
        prunekit.prune(m, None if options.get("pattern") == "nm" else 0.5, **options)
    assert not prunekit.apply.masks(m)
    assert all(torch.equal(v, before[k]) or torch.isnan(v).any() for k, v in m.state_dict().items())


@pytest.mark.parametrize("idx,said", [([999], r"in \[0, 16\)"), ([-1], r"in \[0, 16\)"), ([1, 1], "disagrees")])
def test_a_structured_plan_naming_slices_that_do_not_exist_is_refused(idx, said):
    m = _mlp()
    plan = prunekit.plan_pruning(m, 0.25, pattern="structured")
    doc = json.loads(plan.to_json())
    entry = next(e for e in doc["tensors"] if e["name"] == "2.weight")
    entry.update(pruned_idx=idx, pruned_units=len(idx))
    with pytest.raises(prunekit.PrunekitError, match=said):
        Plan.from_json(json.dumps(doc))


def test_deeply_nested_plan_json_is_a_clear_error():
    with pytest.raises(prunekit.PrunekitError, match="not a prunekit plan"):
        Plan.from_json("[" * 100_000 + "]" * 100_000)


def test_a_global_target_the_floor_prevents_is_said_in_notes_and_on_stderr():
    # issue 11.7: global ranking at 99.9% reached 98.89% without a word
    m = _mlp()
    with pytest.warns(UserWarning, match="target not reached"):
        plan = prunekit.prune(m, 0.999, scope="global")
    assert any("target not reached" in n and "min_keep=0.01" in n for n in plan.notes)
    with pytest.warns(UserWarning, match="every unit of"):
        plan = prunekit.prune(_mlp(), 0.999, pattern="structured", min_keep=0)
    assert any("every unit of 0.weight" in n for n in plan.notes)
