"""prunekit.lottery: iterative magnitude pruning with exact rewinding, the random re-init control, lottery.json."""
import json
import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit.apply import masking
from prunekit.train.lottery import LotteryRecord, LotteryRound, capture_state, imp_schedule, lottery_ticket, rewind_to
from prunekit.train.state import Callback
from prunekit.zoo.data import TensorLoader

TRAIN = {"lr": 0.05, "lr_schedule": "constant", "momentum": 0.9}


def factory():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 12, generator=g)
    return TensorLoader(x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), 16, shuffle=True, seed=0)  # 6 steps/epoch


class AtRoundStart(Callback):
    """Keeps the model's weights and masks as every round's training begins (i.e. right after rewinding)."""

    def __init__(self):
        self.seen = []

    def on_train_begin(self, state):
        self.seen.append((capture_state(state.model), masking.masks(state.model)))


def test_imp_schedule():
    assert imp_schedule(3, per_round=0.2) == pytest.approx([0.2, 0.36, 0.488])
    assert imp_schedule(2, final_sparsity=0.75) == pytest.approx([0.5, 0.75])
    assert imp_schedule(4, final_sparsity=0.95)[-1] == 0.95
    for bad in ({"per_round": 0.2, "final_sparsity": 0.9}, {}, {"per_round": 1.0}):
        with pytest.raises(ValueError):
            imp_schedule(3, **bad)
    with pytest.raises(ValueError, match="rounds"):
        imp_schedule(0, per_round=0.2)


def test_survivors_are_rewound_exactly_to_an_early_step_and_pruned_weights_are_zero():
    spy = AtRoundStart()
    res = lottery_ticket(factory, loader(), sparsities=[0.5, 0.8], rewind=3, epochs_per_round=1, seed=1,
                         callbacks=[spy], **TRAIN)
    # the rewind point is the model after exactly 3 steps of round 0's training
    torch.manual_seed(1)
    ref = factory()
    torch.manual_seed(1)
    prunekit.finetune(ref, loader(), epochs=1, max_steps=3, **TRAIN)
    assert res.rewind_step == 3
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in res.rewind_state.items())
    assert len(spy.seen) == 3  # round 0 (dense) and the two pruning rounds
    for (weights, masks), plan in zip(spy.seen[1:], res.plans):
        assert set(masks) == {"1.weight", "3.weight"}  # the classifier is spared, prunekit's default
        for name, keep in masks.items():
            assert torch.equal(keep, plan.tensors[name].keep_mask())
            assert torch.equal(weights[name][keep], res.rewind_state[name][keep])   # survivors: rewound
            assert torch.all(weights[name][~keep] == 0)                            # pruned: zero
        assert torch.equal(weights["5.weight"], res.rewind_state["5.weight"])      # unpruned tensors too
        assert torch.equal(weights["1.bias"], res.rewind_state["1.bias"])


def test_rewind_to_init_and_sparsity_follows_the_schedule():
    res = lottery_ticket(factory, loader(), rounds=3, per_round=0.5, rewind="init", epochs_per_round=1, seed=2,
                         **TRAIN)
    torch.manual_seed(2)
    init = factory().state_dict()
    assert res.rewind_step == 0 and all(torch.equal(v, init[k]) for k, v in res.rewind_state.items())
    n = 12 * 16 + 16 * 16
    assert [r.round for r in res.rounds] == [0, 1, 2, 3]
    assert res.rounds[0].sparsity == 0.0
    for r, want in zip(res.rounds[1:], [0.5, 0.75, 0.875]):
        assert r.target == pytest.approx(want) and r.sparsity == pytest.approx(want, abs=1 / n)
        assert r.steps == 6 and r.accuracy is None
    # masks only shrink: every weight pruned in a round stays pruned in the next
    for a, b in zip(res.plans, res.plans[1:]):
        for name in a.tensors:
            assert not torch.any(b.tensors[name].keep_mask() & ~a.tensors[name].keep_mask())
    assert prunekit.apply.global_sparsity(res.model, ["1.weight", "3.weight"]) == pytest.approx(0.875, abs=1 / n)
    assert all(masking.masks(res.model)[k].equal(res.plans[-1].tensors[k].keep_mask()) for k in res.plans[-1].tensors)


def test_reinit_control_has_the_same_masks_and_different_weights():
    test = loader()
    res = lottery_ticket(factory, loader(), sparsities=[0.5, 0.8], rewind=2, epochs_per_round=1, seed=0,
                         reinit=True, eval_loader=test, **TRAIN)
    ticket, twin = res.model, res.reinit_model
    mt, mr = masking.masks(ticket), masking.masks(twin)
    assert mt.keys() == mr.keys() and all(torch.equal(mt[k], mr[k]) for k in mt)
    for name, keep in mt.items():
        w = dict(twin.named_parameters())[name]
        assert torch.all(w[~keep] == 0)
        assert not torch.allclose(w[keep], dict(ticket.named_parameters())[name][keep])
    for r in res.rounds[1:]:
        assert 0.0 <= r.accuracy <= 1.0 and 0.0 <= r.reinit_accuracy <= 1.0 and r.reinit_loss > 0
    assert res.rounds[0].reinit_accuracy is None
    # the control starts from a different random draw (reinit_seed), not from the ticket's init
    torch.manual_seed(1)
    fresh = factory()
    assert not torch.equal(fresh[1].weight, res.rewind_state["1.weight"])
    # a plain module works too: re-drawn by reset_parameters; and runs are deterministic
    torch.manual_seed(0)
    again = lottery_ticket(factory(), loader(), sparsities=[0.5, 0.8], rewind=2, epochs_per_round=1, seed=0,
                           reinit=True, eval_loader=test, **TRAIN)
    assert again.summary() == res.summary()
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), ticket.state_dict().values()))


def test_rewind_to_keeps_masks():
    torch.manual_seed(0)
    net = factory()
    state = capture_state(net)
    prunekit.prune(net, 0.5)
    with torch.no_grad():
        net[1].weight.add_(1.0)
    rewind_to(net, state)
    keep = masking.masks(net)["1.weight"]
    assert torch.equal(net[1].weight[keep], state["1.weight"][keep]) and torch.all(net[1].weight[~keep] == 0)
    assert "1.weight_mask" not in state
    with pytest.raises(KeyError, match="lacks"):
        rewind_to(net, {"9.weight": torch.zeros(1)})


def test_bad_input_is_rejected_before_any_training():
    torch.manual_seed(0)
    net = factory()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cases = [
        ({"sparsities": [0.5], "rewind": 6}, ValueError, "inside round 0"),         # 6 steps per round
        ({"sparsities": [0.5], "rewind": "late"}, ValueError, "'init' or an int"),
        ({"sparsities": [0.8, 0.5]}, ValueError, "increasing"),
        ({"sparsities": [0.5], "rounds": 2, "per_round": 0.2}, ValueError, "not both"),
        ({}, ValueError, "rounds"),
        ({"sparsities": [0.5], "scope": "model"}, ValueError, "layer, global"),
        ({"sparsities": [0.5], "criterion": "nope"}, KeyError, "unknown criterion"),
        ({"sparsities": [0.5], "epochs": 3}, ValueError, "epochs_per_round"),
        ({"sparsities": [0.5], "optimizer": "lbfgs"}, ValueError, "sgd, adam"),
        ({"sparsities": [0.5], "prune_kwargs": {"pattern": "blocks"}}, ValueError, "unstructured"),
    ]
    for kwargs, exc, needle in cases:
        with pytest.raises(exc, match=needle):
            lottery_ticket(net, loader(), **kwargs)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not masking.is_masked(net)

    class Scaled(nn.Module):  # a parameter no reset_parameters re-draws: the control would not be random
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3)
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.fc(x) * self.scale

    with pytest.raises(ValueError, match="scale"):
        lottery_ticket(Scaled(), loader(), sparsities=[0.5], reinit=True, prune_kwargs={"include_classifier": True})


# ----------------------------------------------------------------------------- lottery.json

def _record():
    rounds = [LotteryRound(0, 0.0, 0.0, 12, 0.25, 0.9),
              LotteryRound(1, 0.5, 0.5, 12, 0.3, 0.875, 0.85, 0.4),
              LotteryRound(2, 0.75, 0.7421875, 12, 0.35, 0.8, None, None)]
    return LotteryRecord(rounds, 3, {"model": "toy", "seed": 0})


def test_record_json_round_trip_is_exact_and_points_compare_ticket_and_control(tmp_path):
    rec = _record()
    path = rec.save(tmp_path / "sub" / "lottery.json")
    d = json.loads(path.read_text())
    assert d["format"] == "prunekit.lottery/1" and d["rewind_step"] == 3 and d["meta"] == {"model": "toy", "seed": 0}
    assert d["rounds"][2] == {"round": 2, "target": 0.75, "sparsity": 0.7421875, "steps": 12, "loss": 0.35,
                              "accuracy": 0.8, "reinit_accuracy": None, "reinit_loss": None}
    assert LotteryRecord.load(path) == rec and LotteryRecord.from_json(rec.to_json()) == rec
    assert rec.dense_accuracy == 0.9
    pts = rec.points()
    assert [p["round"] for p in pts] == [1, 2] and pts[0]["ticket"] == 0.875 and pts[0]["reinit"] == 0.85
    assert pts[0]["advantage_pp"] == pytest.approx(2.5) and pts[1]["advantage_pp"] is None
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_lottery_result_saves_what_it_measured(tmp_path):
    res = lottery_ticket(factory, loader(), sparsities=[0.5, 0.8], rewind=2, epochs_per_round=1, seed=0,
                         reinit=True, eval_loader=loader(), **TRAIN)
    path = res.save(tmp_path / "lottery.json", meta={"model": "factory", "schedule": [0.5, 0.8]})
    rec = LotteryRecord.load(path)
    assert rec.rounds == res.rounds and rec.rewind_step == 2 and rec.meta["schedule"] == [0.5, 0.8]
    assert LotteryRecord.from_json(res.to_json()) == res.record()
    assert "NaN" not in path.read_text() and "weight" not in path.read_text()  # numbers only, no tensors
    for p, row in zip(rec.points(), res.rounds[1:]):
        assert p["advantage_pp"] == pytest.approx(100 * (row.accuracy - row.reinit_accuracy))


def test_a_loss_never_measured_is_null_in_json_and_nan_again_when_read():
    rec = _record()
    rec.rounds[1].loss = math.nan
    d = json.loads(rec.to_json())
    assert d["rounds"][1]["loss"] is None
    assert math.isnan(LotteryRecord.from_json(rec.to_json()).rounds[1].loss)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d.update(format="prunekit.sensitivity/1"), "expected format"),
    (lambda d: d.pop("rounds"), "malformed"),
    (lambda d: d["rounds"][1].update(accuracy=1.5), "fraction"),
    (lambda d: d["rounds"][1].update(sparsity="half"), "not a number"),
    (lambda d: d["rounds"][1].update(target=None), "target is missing"),
    (lambda d: d["rounds"][1].update(extra=1), "unknown round field"),
    (lambda d: d["rounds"].reverse(), "numbered 0, 1, 2"),
    (lambda d: d.update(rounds=[]), "numbered 0, 1, 2"),
])
def test_malformed_records_are_rejected_with_a_clear_message(edit, needle):
    d = _record().to_dict()
    edit(d)
    with pytest.raises(ValueError, match=needle):
        LotteryRecord.from_json(json.dumps(d))
    with pytest.raises(ValueError, match="invalid JSON"):
        LotteryRecord.from_json("{not json")


def test_meta_that_is_not_json_safe_fails_before_writing(tmp_path):
    rec = _record()
    rec.meta["model"] = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="JSON-safe"):
        rec.save(tmp_path / "lottery.json")
    assert not list(tmp_path.iterdir())
