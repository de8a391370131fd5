"""prunekit.train.distill: a pruned student trained to match a frozen teacher."""
import copy
import math

import pytest
import torch
from torch import nn

import prunekit
from prunekit.train.distill import LOSSES, Distiller, agreement, distill, make_loss, pick_output
from prunekit.train.state import Callback
from prunekit.zoo.data import TensorLoader

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(n_batches=8, batch=16, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, generator=g) for _ in range(n_batches)]


def _linear(i=4, o=3, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o)


def _mlp(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 3))


# ----------------------------------------------------------------------------- losses

def test_losses_on_exact_cases():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert float(LOSSES.get("mse")(a, a)) == 0.0
    assert float(LOSSES.get("mse")(a, torch.zeros(2, 2))) == pytest.approx(5 / 4)
    assert float(LOSSES.get("cosine")(a, 3 * a)) == pytest.approx(0.0, abs=1e-7)  # the norm does not count
    assert float(LOSSES.get("cosine")(a, -a)) == pytest.approx(2.0)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    assert float(LOSSES.get("kl")(logits, logits, temperature=3.0)) == pytest.approx(0.0, abs=1e-7)
    s, t, temp = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), 2.0
    p = torch.softmax(t / temp, -1)  # teacher's distribution at T=2
    q = torch.softmax(s / temp, -1)  # student's: uniform
    expected = float((p * (p / q).log()).sum()) * temp ** 2
    assert float(LOSSES.get("kl")(s, t, temperature=temp)) == pytest.approx(expected, rel=1e-6)


def test_loss_mixture_and_callable():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mix = make_loss({"cosine": 2.0, "mse": 0.5})
    assert float(mix(a, b)) == pytest.approx(2.0 * 1.0 + 0.5 * 1.0)
    custom = make_loss(lambda s, t: (s - t).abs().sum())
    assert float(custom(a, b)) == 2.0


def test_loss_registry_errors():
    with pytest.raises(KeyError, match="known: cosine, kl, mse"):
        make_loss("cosin")
    with pytest.raises(KeyError, match="unknown distillation loss 'l1'"):
        make_loss({"cosine": 1.0, "l1": 1.0})
    with pytest.raises(ValueError, match="only applies to the 'kl' loss"):
        make_loss("mse", temperature=2.0)
    with pytest.raises(ValueError, match="must be > 0"):
        make_loss("kl", temperature=0.0)
    with pytest.raises(ValueError, match="non-empty mapping"):
        make_loss({})


def test_pick_output():
    t = torch.ones(2)
    assert pick_output({"logits": t, "aux": 1}, "logits") is t
    assert pick_output((t, None), 0) is t
    assert pick_output(t, None) is t
    assert pick_output({"a": t}, lambda o: o["a"] * 2).sum() == 4

    class Out:
        logits = t

    assert pick_output(Out(), "logits") is t
    with pytest.raises(KeyError, match="has no 'hidden'; its keys: logits, aux"):
        pick_output({"logits": t, "aux": 1}, "hidden")
    with pytest.raises(ValueError, match="not a tensor: pass output=.*keys: logits"):
        pick_output({"logits": t}, None)


# ----------------------------------------------------------------------------- training

def test_linear_student_converges_to_the_teacher():
    teacher, student = _linear(seed=0), _linear(seed=1)
    before = (student.weight - teacher.weight).abs().max()
    distill(student, teacher, _inputs(), loss="mse", epochs=40, lr=0.05, optimizer="adam")
    # least squares on full-rank inputs has one solution: the teacher's weights
    assert before > 0.1
    torch.testing.assert_close(student.weight, teacher.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(student.bias, teacher.bias, atol=1e-5, rtol=0)


def test_masks_stay_zero_and_teacher_is_untouched():
    teacher = _mlp(seed=0)
    student = copy.deepcopy(teacher)
    prunekit.prune(student, 0.5, scope="global")
    masks = {k: v.clone() for k, v in prunekit.apply.masks(student).items()}
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    batches = _inputs(seed=3)
    start = agreement(student, teacher, batches)["mse"]

    class Zeros(Callback):
        def on_step_end(self, state):
            params = dict(student.named_parameters())
            for name, keep in prunekit.apply.masks(student).items():
                assert (params[name][~keep] == 0).all(), f"{name} moved at step {state.step}"

    state = distill(student, teacher, batches, epochs=10, lr=0.01, callbacks=[Zeros()])
    assert state.step == 10 * len(batches)
    assert {k: v.tolist() for k, v in prunekit.apply.masks(student).items()} == {k: v.tolist() for k, v in masks.items()}
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k
    assert agreement(student, teacher, batches)["mse"] < 0.5 * start


def test_teacher_runs_in_eval_without_grad_and_flags_are_restored():
    teacher, student = _mlp(seed=0, dropout=0.5), _mlp(seed=1, dropout=0.5)
    teacher.train()
    student.train()
    student[2].eval()  # a user's frozen submodule must stay frozen afterwards
    seen = []
    teacher.register_forward_pre_hook(lambda m, _x: seen.append((m.training, m[2].training,
                                                                  torch.is_grad_enabled())))
    distill(student, teacher, _inputs(n_batches=2), epochs=1)
    assert seen == [(False, False, False)] * 2
    assert teacher.training and teacher[2].training
    assert student.training and not student[2].training and student[0].training
    assert all(p.grad is None for p in teacher.parameters())


def test_same_seed_same_result_and_callers_rng_untouched():
    teacher = _mlp(seed=0)
    runs = []
    for _ in range(2):
        student = _mlp(seed=1, dropout=0.3)  # dropout draws from the RNG that seed fixes
        rng = torch.get_rng_state()
        state = distill(student, teacher, _inputs(), epochs=2, lr=0.01, log_every=4, seed=7)
        assert torch.equal(torch.get_rng_state(), rng)
        runs.append((student.state_dict(), state.history))
    assert all(torch.equal(v, runs[1][0][k]) for k, v in runs[0][0].items())
    assert runs[0][1] == runs[1][1] and [h["step"] for h in runs[0][1]] == [4, 8, 12, 16]


def test_pairs_loaders_and_tuple_inputs():
    teacher, student = _linear(seed=0), _linear(seed=1)
    x = torch.cat(_inputs())
    loader = TensorLoader(x, torch.zeros(len(x)), batch_size=16, shuffle=True, seed=0)
    state = distill(student, teacher, loader, epochs=1)  # (x, y) pairs: y ignored
    assert state.step == len(loader)
    # inputs that are 2-tuples themselves: say so with pairs=False
    add = lambda m, xs: m(xs[0] + xs[1])  # noqa: E731
    tuples = [(a, a) for a in _inputs(n_batches=3)]
    state = distill(student, teacher, tuples, pairs=False, forward_fn=add, epochs=1)
    assert state.step == 3
    with pytest.raises(ValueError, match="must have a length"):
        distill(student, teacher, iter(_inputs()), epochs=1)


def test_hidden_states_are_matched_too():
    teacher, student = _mlp(seed=0), _mlp(seed=1)
    x = _inputs(n_batches=1)[0]
    d = Distiller(student, teacher, loss="cosine", hidden={"0": "0"}, hidden_weight=0.25)
    expected = LOSSES.get("cosine")(student(x), teacher(x)) + 0.25 * nn.functional.mse_loss(student[0](x),
                                                                                            teacher[0](x))
    torch.testing.assert_close(d(x), expected)
    state = distill(student, teacher, _inputs(), hidden=["0"], epochs=20, lr=0.01)
    assert state.history[-1]["loss"] < 0.5 * state.history[0]["loss"]


# ----------------------------------------------------------------------------- bad input

def test_mismatched_outputs_fail_clearly_and_leave_the_student_as_it_was():
    teacher, student = _linear(o=5, seed=0), _linear(o=3, seed=1)
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ValueError, match=r"student gives shape \(16, 3\), the teacher \(16, 5\)"):
        distill(student, teacher, _inputs(), epochs=1)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    with pytest.raises(ValueError, match="hidden '0'"):
        Distiller(_mlp(), nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), hidden=["0"])(_inputs()[0])
    with pytest.raises(KeyError, match="no module named 'encoder' in the student"):
        Distiller(_mlp(seed=1), _mlp(), hidden=["encoder"])


def test_student_sharing_weights_with_the_teacher_is_refused():
    teacher = _mlp()
    with pytest.raises(ValueError, match="same module"):
        distill(teacher, teacher, _inputs())
    student = nn.Sequential(teacher[0], nn.ReLU(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"share parameter\(s\) 0.weight, 0.bias"):
        distill(student, teacher, _inputs())


class _StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, state):
        if state.step == self.step:
            raise KeyboardInterrupt


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    teacher = _mlp(seed=0)
    kw = dict(epochs=3, lr=0.01, log_every=5, seed=3)
    whole = _mlp(seed=1, dropout=0.2)
    distill(whole, teacher, _inputs(), **kw)
    cut = _mlp(seed=1, dropout=0.2)
    ckpt = tmp_path / "distill.pt"
    with pytest.raises(KeyboardInterrupt):
        distill(cut, teacher, _inputs(), checkpoint=ckpt, checkpoint_every=5, callbacks=[_StopAt(13)], **kw)
    resumed = _mlp(seed=1, dropout=0.2)
    state = distill(resumed, teacher, _inputs(), checkpoint=ckpt, checkpoint_every=5, **kw)
    assert state.step == 24 and [h["step"] for h in state.history] == [5, 10, 15, 20, 24]
    assert all(torch.equal(v, whole.state_dict()[k]) for k, v in resumed.state_dict().items())


def test_inputs_are_moved_to_each_models_device_keeping_their_type():
    from collections import namedtuple

    from prunekit.train.distill import _to

    meta = torch.device("meta")
    Pair = namedtuple("Pair", "a b")
    t = torch.ones(2)
    moved = _to({"x": t, "n": 3, "p": Pair(t, [t])}, meta)
    assert moved["x"].device == meta and moved["n"] == 3
    assert isinstance(moved["p"], Pair) and moved["p"].b[0].device == meta
    same = {"x": t}
    assert _to(same, torch.device("cpu")) is same
