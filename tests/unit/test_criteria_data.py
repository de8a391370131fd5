"""Data-aware criteria (Taylor, Wanda), their statistics collectors, per-row selection and the data= API."""
import copy

import pytest
import torch
from torch import nn

import prunekit
from prunekit.criteria import calibrate, collect
from prunekit.select.rows import select_rows
from prunekit.zoo.data import TensorLoader


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a busy machine
    yield
    torch.set_num_threads(before)


def _linear(weight, bias=False):
    w = torch.as_tensor(weight, dtype=torch.float32)
    layer = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(w)
    return nn.Sequential(layer)


def _sum_loss(out, target):
    return out.sum()


def _keep(model, name="0.weight"):
    return prunekit.apply.masks(model)[name]


# ----------------------------------------------------------------------------- Taylor

def test_taylor_is_the_batch_mean_of_abs_w_times_grad_and_picks_other_weights_than_magnitude():
    # loss = sum(w . x), so dL/dw = x: per batch |w * x| = [0.3, 5] then [0.9, 1]; mean [0.6, 3.0]
    model = _linear([[3.0, -1.0]])
    data = [torch.tensor([[0.1, 5.0]]), torch.tensor([[0.3, 1.0]])]
    stats = calibrate("taylor", model, data, ["0.weight"], loss_fn=_sum_loss)
    assert stats["0.weight"]["taylor_batches"] == 2
    scores = prunekit.criteria.compute_scores(model, ["0.weight"], "taylor", stats=stats)["0.weight"]()
    torch.testing.assert_close(scores, torch.tensor([[0.6, 3.0]]))

    taylor = copy.deepcopy(model)
    prunekit.prune(taylor, 0.5, criterion="taylor", stats=stats, include_classifier=True, min_keep=0)
    assert _keep(taylor).tolist() == [[False, True]]        # the big weight on a big input matters less
    magnitude = copy.deepcopy(model)
    prunekit.prune(magnitude, 0.5, criterion="l1", include_classifier=True, min_keep=0)
    assert _keep(magnitude).tolist() == [[True, False]]


def test_taylor_collect_in_your_own_loop_matches_calibrate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    loader = TensorLoader(x, y, batch_size=4)
    names = ["0.weight", "0.bias", "2.weight"]
    auto = calibrate("taylor", model, loader, names)  # default loss: cross-entropy on (x, y)
    with collect("taylor", model, names) as manual:
        for xb, yb in loader:
            nn.functional.cross_entropy(model(xb), yb).backward()
    for n in names:
        torch.testing.assert_close(manual[n]["taylor_sum"], auto[n]["taylor_sum"])
        assert manual[n]["taylor_batches"] == auto[n]["taylor_batches"] == 3


def test_taylor_hooks_are_removed_even_when_the_block_raises():
    model = _linear([[1.0, 2.0]])
    w = model[0].weight
    w.requires_grad_(False)  # frozen: collect turns grads on for scoring and back off after
    with pytest.raises(RuntimeError, match="boom"):
        with collect("taylor", model) as stats:
            model(torch.ones(1, 2)).sum().backward()
            raise RuntimeError("boom")
    assert not w._backward_hooks
    assert w.requires_grad is False
    assert stats["0.weight"]["taylor_batches"] == 1
    w.requires_grad_(True)
    model(torch.ones(1, 2)).sum().backward()  # no hook left: nothing more is counted
    assert stats["0.weight"]["taylor_batches"] == 1


def test_taylor_needs_a_loss_for_unlabelled_batches():
    with pytest.raises(ValueError, match="loss_fn"):
        calibrate("taylor", _linear([[1.0, 2.0]]), [torch.ones(1, 2)])


def test_calibrate_leaves_flags_grads_and_requires_grad_as_they_were():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    model[0].eval()
    flags = [m.training for m in model.modules()]
    sentinel = torch.full_like(model[2].weight, 7.0)
    model[2].weight.grad = sentinel
    model[2].bias.requires_grad_(False)
    loader = TensorLoader(torch.randn(8, 4), torch.randint(0, 2, (8,)), batch_size=4)
    calibrate("taylor", model, loader)
    calibrate("wanda", model, loader)
    assert [m.training for m in model.modules()] == flags
    assert model[2].weight.grad is sentinel and model[0].weight.grad is None
    assert model[2].bias.requires_grad is False and model[0].weight.requires_grad


def test_taylor_scores_feed_structured_group_pruning_in_the_surgery():
    from prunekit.surgery import build_groups, group_scores, plan_groups

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    loader = TensorLoader(torch.randn(16, 4), torch.randint(0, 3, (16,)), batch_size=8)
    stats = calibrate("taylor", model, loader)  # every parameter: the groups' biases too
    x = torch.randn(2, 4)
    graph = build_groups(model, x)
    scores = group_scores(model, graph, "taylor", stats=stats, norm=1.0)
    t = {n: s["taylor_sum"] / s["taylor_batches"] for n, s in stats.items()}
    # hidden channel c: fc1 row c + fc1 bias c + fc2 column c (L1 norms, summed over the members)
    manual = t["0.weight"].sum(1) + t["0.bias"] + t["2.weight"].sum(0)
    (hidden,) = [v for v in scores.values() if v.numel() == 6]
    torch.testing.assert_close(hidden.float(), manual)
    plan = plan_groups(model, x, 0.5, criterion="taylor", stats=stats, norm=1.0, min_keep=0)
    assert sorted(plan.tensors["0.weight"].pruned_idx) == sorted(torch.argsort(manual)[:3].tolist())


# ----------------------------------------------------------------------------- Wanda

# W rows [1 2 3 4] and [40 30 20 10]; inputs whose RMS per feature is [4, 1, 1, 0.1]
W = [[1.0, 2.0, 3.0, 4.0], [40.0, 30.0, 20.0, 10.0]]
X = torch.tensor([[4.0, 1.0, 1.0, 0.1], [-4.0, -1.0, 1.0, -0.1]])


def test_wanda_scores_are_abs_weight_times_input_rms():
    model = _linear(W)
    stats = calibrate("wanda", model, [X])
    scores = prunekit.criteria.compute_scores(model, ["0.weight"], "wanda", stats=stats)["0.weight"]()
    torch.testing.assert_close(scores, torch.tensor([[4.0, 2.0, 3.0, 0.4], [160.0, 30.0, 20.0, 1.0]]))


def test_wanda_per_row_keeps_the_best_half_of_every_row():
    model = _linear(W)
    prunekit.prune(model, 0.5, criterion="wanda", scope="row", data=[X], include_classifier=True)
    assert _keep(model).tolist() == [[True, False, True, False], [True, True, False, False]]
    # per layer the same scores strip row 0 to one weight; magnitude per row keeps other columns
    layer = _linear(W)
    prunekit.prune(layer, 0.5, criterion="wanda", scope="layer", data=[X], include_classifier=True, min_keep=0)
    assert _keep(layer).tolist() == [[True, False, False, False], [True, True, True, False]]
    mag = _linear(W)
    prunekit.prune(mag, 0.5, criterion="l1", scope="row", include_classifier=True)
    assert _keep(mag).tolist() == [[False, False, True, True], [True, True, False, False]]


def test_wanda_data_argument_equals_collected_stats():
    torch.manual_seed(1)
    a = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    b = copy.deepcopy(a)
    batches = [torch.randn(5, 8) for _ in range(3)]
    prunekit.prune(a, 0.5, criterion="wanda", scope="row", data=batches)
    with collect("wanda", b, ["0.weight"]) as stats:
        for x in batches:
            b(x)
    prunekit.prune(b, 0.5, criterion="wanda", scope="row", stats=stats)
    assert torch.equal(_keep(a), _keep(b))


def test_wanda_on_convolutions_uses_the_input_channel_rms_with_groups():
    conv = nn.Conv2d(2, 4, 1, groups=2, bias=False)  # output channels 0,1 read input 0; 2,3 read input 1
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -2.0, 3.0, -4.0]).reshape(4, 1, 1, 1))
    model = nn.Sequential(conv)
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = 3.0                 # RMS of channel 0 = 3
    x[0, 1, 0, 0] = 2.0           # RMS of channel 1 = sqrt(4 / 4) = 1
    stats = calibrate("wanda", model, [x])
    scores = prunekit.criteria.compute_scores(model, ["0.weight"], "wanda", stats=stats)["0.weight"]()
    torch.testing.assert_close(scores.reshape(-1), torch.tensor([3.0, 6.0, 3.0, 4.0]))


def test_wanda_hooks_are_removed_even_when_the_block_raises():
    model = _linear(W)
    with pytest.raises(RuntimeError):
        with collect("wanda", model):
            model(X)
            raise RuntimeError("stop")
    assert not model[0]._forward_pre_hooks


def test_wanda_rejects_parameters_it_cannot_score():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="LayerNorm"):
        with collect("wanda", model, ["1.weight"]):
            pass
    with pytest.raises(KeyError, match="did you mean"):
        with collect("wanda", model, ["0.weigth"]):
            pass


def test_calibration_that_never_reaches_a_layer_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="never reached 1.weight"):
        calibrate("wanda", model, [torch.ones(1, 4)], ["0.weight", "1.weight"],
                  forward_fn=lambda m, b: m[0](b))


# ----------------------------------------------------------------------------- the API around them

def test_missing_statistics_say_how_to_collect_them():
    with pytest.raises(KeyError, match="collect"):
        prunekit.prune(_linear(W), 0.5, criterion="wanda", include_classifier=True)


@pytest.mark.parametrize("kwargs,match", [
    (dict(criterion="l1", data=[X]), "data-aware"),
    (dict(criterion="wanda", data=[X], stats={}), "not both"),
    (dict(criterion="l1", loss_fn=_sum_loss), "only used with data"),
    (dict(criterion="wanda", data=[X], loss_fn=_sum_loss), "gradients"),
    (dict(criterion="l1", scope="row", pattern="structured"), "scope='row'"),
    (dict(criterion="l1", scope="rows"), "allowed: layer, global, row"),
    (dict(criterion="sparsegpt"), "cannot only plan"),
])
def test_bad_data_arguments_get_clear_errors_and_leave_the_model(kwargs, match):
    model = _linear(W)
    before = model[0].weight.detach().clone()
    with pytest.raises(ValueError, match=match):
        prunekit.plan_pruning(model, 0.5, include_classifier=True, **kwargs)
    assert torch.equal(model[0].weight, before) and not prunekit.apply.masking.is_masked(model)


# ----------------------------------------------------------------------------- per-row selection

def test_select_rows_prunes_the_same_count_per_row_and_keeps_old_prunings():
    scores = torch.tensor([[5.0, 1.0, 2.0, 4.0, 3.0, 6.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    current = torch.ones(2, 6, dtype=torch.bool)
    current[1, 5] = False  # pruned before: the best score of row 1; it stays pruned and counts
    plan = select_rows({"w": scores}, 0.5, current={"w": current}, min_keep=0)
    keep = plan.tensors["w"].keep_mask()
    assert keep.tolist() == [[True, False, False, True, False, True], [False, False, True, True, True, False]]
    assert plan.tensors["w"].pruned_units == 6
    current[1, 2:] = False  # more pruned before than the target: all stay pruned
    keep = select_rows({"w": scores}, 0.5, current={"w": current}, min_keep=0).tensors["w"].keep_mask()
    assert keep[1].tolist() == [True, True, False, False, False, False]
    with pytest.raises(ValueError, match="fraction"):
        select_rows({"w": scores}, 3)


def test_select_rows_floor_and_shapes():
    plan = select_rows({"w": torch.arange(8.0).reshape(2, 4)}, 0.9, min_keep=2)
    assert plan.tensors["w"].keep_mask().sum(1).tolist() == [2, 2] and plan.tensors["w"].floor_hit
    assert plan.notes
    with pytest.raises(ValueError, match="rows"):
        select_rows({"b": torch.ones(4)}, 0.5)
