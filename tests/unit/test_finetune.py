import pytest
import torch
from torch import nn

import prunekit
from prunekit.train.callbacks import GradualPruner, gradual_prune, iterative_prune
from prunekit.train.loop import finetune
from prunekit.train.schedules import make_schedule
from prunekit.train.state import Callback
from prunekit.zoo.data import TensorLoader

pytestmark = pytest.mark.usefixtures("one_thread")


def _loader(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    y = (x[:, :10].argmax(dim=1))  # learnable labels
    return TensorLoader(x, y, batch_size=32, shuffle=True, seed=seed)


class ZeroWatcher(Callback):
    """Checks after every optimizer step that every pruned weight is exactly zero."""

    def __init__(self):
        self.checked = 0

    def on_step_end(self, state):
        for name, keep in prunekit.apply.masks(state.model).items():
            p = dict(state.model.named_parameters())[name]
            assert (p[~keep] == 0).all(), f"{name} moved at step {state.step}"
        self.checked += 1


@pytest.mark.parametrize("opt,kw", [("sgd", dict(momentum=0.9, weight_decay=1e-2)),
                                    ("adam", dict(weight_decay=1e-2)), ("adamw", dict(weight_decay=0.1))])
def test_pruned_weights_stay_zero_every_step(mlp, opt, kw):
    # prune after some momentum has built up, the hardest case for staying at zero
    loader = _loader()
    finetune(mlp, loader, epochs=1, lr=0.05, optimizer=opt, **kw)
    prunekit.prune(mlp, 0.7, scope="global")
    watcher = ZeroWatcher()
    finetune(mlp, loader, epochs=2, lr=0.05, optimizer=opt, callbacks=[watcher], **kw)
    assert watcher.checked == 2 * len(loader)


def test_finetune_learns_and_restores_mode(mlp):
    loader = _loader()
    mlp.eval()
    x, y = next(iter(loader))
    loss0 = nn.functional.cross_entropy(mlp(x), y).item()
    state = finetune(mlp, loader, epochs=5, lr=0.1)
    assert not mlp.training
    assert nn.functional.cross_entropy(mlp(x), y).item() < loss0
    assert state.step == 5 * len(loader)


def test_max_steps_and_bad_arguments(mlp):
    state = finetune(mlp, _loader(), epochs=3, max_steps=5)
    assert state.step == 5
    with pytest.raises(ValueError, match="allowed: sgd, adam, adamw"):
        finetune(mlp, _loader(), optimizer="lbfgs")
    with pytest.raises(ValueError, match="allowed: constant, cosine, linear"):
        finetune(mlp, _loader(), lr_schedule="step")


def test_gradual_pruner_follows_schedule(mlp):
    loader = _loader()
    sched = make_schedule("cubic", final=0.8, n=4, every=2)
    pruner = GradualPruner(sched, scope="global")
    watcher = ZeroWatcher()
    finetune(mlp, loader, epochs=2, callbacks=[pruner, watcher])
    targets = [e["target"] for e in pruner.events]
    assert targets == sorted(targets) and targets[-1] == pytest.approx(0.8)
    assert len(targets) == 4  # steps 2, 4, 6, 8 (step 0 has sparsity 0)
    assert prunekit.apply.global_sparsity(mlp, ["1.weight", "3.weight"]) == pytest.approx(0.8, abs=1e-3)


def test_gradual_and_iterative_helpers(mlp_factory):
    m = mlp_factory()
    state = gradual_prune(m, _loader(), final=0.9, epochs=3, prune_kwargs={"scope": "global"}, lr=0.05)
    assert prunekit.apply.global_sparsity(m, ["1.weight", "3.weight"]) == pytest.approx(0.9, abs=1e-3)
    assert any(h.get("event") == "prune" for h in state.history)
    m = mlp_factory()
    state = iterative_prune(m, _loader(), sparsities=[0.5, 0.75], eval_loader=_loader(64, 1), lr=0.05)
    evals = [h for h in state.history if "accuracy" in h]
    assert [round(h["sparsity"], 2) for h in evals] == [0.5, 0.75]
    with pytest.raises(ValueError, match="must increase"):
        iterative_prune(m, _loader(), sparsities=[0.8, 0.5])


class _Kill(Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, state):
        if state.step == self.at_step:
            raise KeyboardInterrupt("simulated kill")


def test_checkpoint_resume_matches_uninterrupted_run(mlp_factory, tmp_path):
    loader = _loader()
    kw = dict(epochs=3, lr=0.05, weight_decay=1e-3)
    ref = mlp_factory()
    prunekit.prune(ref, 0.5)
    finetune(ref, loader, checkpoint=tmp_path / "ref.pt", **kw)

    run = mlp_factory()
    prunekit.prune(run, 0.5)
    with pytest.raises(KeyboardInterrupt):  # killed in the middle of the second epoch
        finetune(run, loader, checkpoint=tmp_path / "run.pt", callbacks=[_Kill(len(loader) + 3)], **kw)
    resumed = mlp_factory(seed=99)  # a fresh process would start from scratch
    state = finetune(resumed, loader, checkpoint=tmp_path / "run.pt", **kw)
    assert state.step == 3 * len(loader)
    for (n, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_checkpoint_is_a_clear_error(mlp, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match="cannot resume"):
        finetune(mlp, _loader(), checkpoint=bad)


def test_gradual_must_reach_its_target_before_training_ends(mlp):
    with pytest.raises(ValueError, match=r"prune_epochs=4 must be in \[1, epochs=2\]"):
        gradual_prune(mlp, _loader(), final=0.9, epochs=2, prune_epochs=4)
    assert not prunekit.apply.masking.is_masked(mlp)


# ----------------------------------------------------------------------------- mid-epoch checkpoints
import json  # noqa: E402
import pickle  # noqa: E402
import random  # noqa: E402

import numpy as np  # noqa: E402

from prunekit.train.checkpoint import Checkpointer, read_checkpoint  # noqa: E402


class _NoisyDataset(torch.utils.data.Dataset):
    """Augmentation drawing from the torch, numpy and Python RNGs."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(()) + 0.1 * float(np.random.randn()) + 0.1 * random.random(), self.y[i]


def _dropout_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))


def _resumable_run(kind, ckpt, seed=0, kill_at=None):
    """3 epochs of 7 steps, gradual pruning, a checkpoint every 3 steps; the model (None if killed)."""
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    base = _loader(200)
    gen = torch.Generator().manual_seed(7) if kind == "dataloader+generator" else None
    loader = base if kind == "tensor" else torch.utils.data.DataLoader(
        _NoisyDataset(base.x, base.y), batch_size=32, shuffle=True, generator=gen)
    model = _dropout_mlp(seed)
    pruner = GradualPruner(make_schedule("cubic", final=0.8, n=3, every=4), scope="global")
    callbacks = [pruner] + ([_Kill(kill_at)] if kill_at else [])
    try:
        finetune(model, loader, epochs=3, lr=0.05, checkpoint=ckpt, checkpoint_every=3, callbacks=callbacks)
    except KeyboardInterrupt:
        return None, pruner
    return model, pruner


@pytest.mark.parametrize("kind,kill_at,where", [
    ("tensor", 11, (9, 1, 2)),  # killed at epoch 1, batch 4; checkpointed at step 9 (every 3)
    ("dataloader", 11, (9, 1, 2)),
    ("dataloader+generator", 8, (7, 1, 0)),  # the last checkpoint is an epoch end: step 7 = 0 batches into epoch 1
])
def test_mid_epoch_resume_is_bit_identical(kind, kill_at, where, tmp_path):
    ref, ref_pruner = _resumable_run(kind, tmp_path / "ref.pt")
    assert _resumable_run(kind, tmp_path / "run.pt", kill_at=kill_at)[0] is None
    saved = read_checkpoint(tmp_path / "run.pt")
    assert (saved["step"], saved["epoch"], saved["batch"]) == where
    resumed, pruner = _resumable_run(kind, tmp_path / "run.pt", seed=99)
    assert list(ref.state_dict()) == list(resumed.state_dict())
    for (n, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n
    assert pruner.events == ref_pruner.events and len(pruner.events) == 3
    assert not list(tmp_path.glob("*.tmp"))


def test_resume_without_the_rng_state_would_differ(tmp_path):
    # guards the test above: with a different RNG after the resume, dropout draws differ
    ref, _ = _resumable_run("tensor", tmp_path / "ref.pt")
    _resumable_run("tensor", tmp_path / "run.pt", kill_at=11)
    payload = read_checkpoint(tmp_path / "run.pt")
    payload["rng"][0]["torch"] = torch.Generator().manual_seed(5).get_state()
    torch.save(payload, tmp_path / "run.pt")
    resumed, _ = _resumable_run("tensor", tmp_path / "run.pt")
    assert not all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()))


def test_checkpoint_every_arguments(mlp, tmp_path):
    with pytest.raises(ValueError, match="needs checkpoint="):
        finetune(mlp, _loader(), checkpoint_every=5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="must be a number of steps >= 1"):
            finetune(mlp, _loader(), checkpoint=tmp_path / "c.pt", checkpoint_every=bad)
    assert not (tmp_path / "c.pt").exists()


def test_resume_false_starts_over(mlp_factory, tmp_path):
    finetune(mlp_factory(), _loader(), epochs=1, checkpoint=tmp_path / "c.pt")
    state = finetune(mlp_factory(), _loader(), epochs=1, checkpoint=tmp_path / "c.pt", resume=False)
    assert state.step == len(_loader())  # trained again, not "already done"


def test_kill_between_temp_write_and_rename_keeps_the_previous_checkpoint(mlp_factory, tmp_path, monkeypatch):
    calls = []

    def die(tmp):
        calls.append(tmp)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed mid-write")
    monkeypatch.setattr(Checkpointer, "_before_rename", die)
    with pytest.raises(KeyboardInterrupt):
        finetune(mlp_factory(), _loader(), epochs=2, checkpoint=tmp_path / "c.pt", checkpoint_every=3)
    assert (tmp_path / "c.pt.tmp").is_file() and read_checkpoint(tmp_path / "c.pt.tmp")["step"] == 6
    assert read_checkpoint(tmp_path / "c.pt")["step"] == 3  # the previous one, whole


def test_tensor_loader_seek_skips_without_reading():
    loader = _loader(100)
    full = [yb for _, yb in (loader.set_epoch(2), loader)[1]]
    loader.seek(2, 3)
    assert [yb.tolist() for _, yb in loader] == [yb.tolist() for yb in full[3:]]
    assert [len(yb) for _, yb in loader] == [32, 32, 32, 4]  # the next epoch starts at batch 0 again
    with pytest.raises(ValueError, match=r"batch=5 must be in \[0, 4\]"):
        loader.seek(0, 5)


def test_callback_state_protocol_defaults():
    assert Callback().state_dict() == {}
    Callback().load_state_dict({"anything": 1})  # a no-op, not an error
    pruner = GradualPruner(make_schedule("oneshot", final=0.5))
    pruner.load_state_dict({"current": 0.5, "events": [{"step": 0, "target": 0.5, "sparsity": 0.5}]})
    assert pruner.state_dict() == {"current": 0.5, "events": [{"step": 0, "target": 0.5, "sparsity": 0.5}]}


# ----------------------------------------------------------------------------- loading robustness
def _finished_checkpoint(mlp_factory, tmp_path, name="c.pt"):
    model = mlp_factory()
    prunekit.prune(model, 0.5)
    finetune(model, _loader(), epochs=1, checkpoint=tmp_path / name, checkpoint_every=4)
    return tmp_path / name


def _untouched(model, before):
    after = model.state_dict()
    return list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_truncated_checkpoint_is_a_clear_error(mlp_factory, tmp_path):
    path = _finished_checkpoint(mlp_factory, tmp_path)
    data = path.read_bytes()
    model = mlp_factory(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for cut in (len(data) // 2, 10, 0):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cannot resume from .*corrupt or truncated"):
            finetune(model, _loader(), checkpoint=path)
    assert _untouched(model, before)


def test_checkpoint_of_another_architecture_names_keys_and_shapes(mlp_factory, tmp_path):
    path = _finished_checkpoint(mlp_factory, tmp_path)
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16), nn.ReLU(),
                          nn.Linear(16, 10), nn.Linear(10, 10))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="different model") as err:
        finetune(other, _loader(), checkpoint=path)
    msg = str(err.value)
    assert "1.weight has shape (32, 64) in the checkpoint, (48, 64) in the model" in msg
    assert "missing in the checkpoint: 6.weight, 6.bias" in msg
    assert _untouched(other, before)  # no mask buffer added, no weight copied


def test_checkpoint_of_another_run_length_is_refused(mlp_factory, tmp_path):
    path = _finished_checkpoint(mlp_factory, tmp_path)
    with pytest.raises(ValueError, match="total_steps=8, this run has total_steps=16"):
        finetune(mlp_factory(), _loader(), epochs=2, checkpoint=path)
    with pytest.raises(ValueError, match=r"callback\(s\) \['0:GradualPruner'\]"):
        p2 = tmp_path / "g.pt"
        finetune(mlp_factory(), _loader(), callbacks=[GradualPruner(make_schedule("oneshot", final=0.5))],
                 checkpoint=p2)
        finetune(mlp_factory(), _loader(), checkpoint=p2)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling it calls open(marker, "w"): creates the marker file
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch.save", "raw pickle"])
def test_crafted_pickle_is_refused_and_nothing_runs(mlp, tmp_path, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    if container == "torch.save":
        torch.save({"model": _Payload(marker), "step": 0}, path)
    else:
        path.write_bytes(pickle.dumps({"model": _Payload(marker)}, protocol=2))
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(ValueError, match="refusing to load it, it asks to import .*open.*nothing in it was executed"):
        finetune(mlp, _loader(), checkpoint=path)
    assert not marker.exists() and _untouched(mlp, before)
    # the payload is real: its pickle asks to call open() (read statically, nothing is unpickled)
    assert any(name == "open" for _, name in _pickle_imports(path)), _pickle_imports(path)


def _pickle_imports(path):
    """(module, name) of every global a pickle would import, read with pickletools (never executed)."""
    import pickletools
    import zipfile
    if zipfile.is_zipfile(path):   # torch.save's container: the pickle is <archive>/data.pkl
        with zipfile.ZipFile(path) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    else:
        data = path.read_bytes()
    found, strings = [], []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.append(tuple(arg.split(" ", 1)))
        elif op.name == "STACK_GLOBAL":
            found.append(tuple(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def test_other_payloads_are_clear_errors(mlp, tmp_path):
    path = tmp_path / "x.pt"
    cases = [([1, 2], "not a prunekit fine-tune checkpoint .holds a list"),
             ({"model": {}}, "missing optimizer, step, epoch, rng, history"),
             ({"format": "other", "model": {}}, "format 'other'"),
             ({"format": "prunekit.finetune", "version": 99}, "written by a newer prunekit"),
             ({"model": {}, "optimizer": {}, "step": "3", "epoch": 0, "rng": None, "history": "[]", "callbacks": []},
              r"malformed checkpoint \(wrong type for step, callbacks\)")]
    for payload, msg in cases:
        torch.save(payload, path)
        with pytest.raises(ValueError, match=msg):
            finetune(mlp, _loader(), checkpoint=path)


def test_version_1_checkpoints_still_resume(mlp_factory, tmp_path):
    path = tmp_path / "c.pt"
    ref = mlp_factory()
    finetune(ref, _loader(), epochs=2, checkpoint=path)
    model = mlp_factory()
    finetune(model, _loader(), epochs=2, max_steps=len(_loader()), checkpoint=tmp_path / "one.pt")
    payload = read_checkpoint(tmp_path / "one.pt")
    old = {k: payload[k] for k in ("model", "optimizer", "step", "epoch", "history")}
    old["rng"] = payload["rng"][0]["torch"]  # version 1: one torch RNG tensor, epoch boundaries only
    torch.save(old, path)
    resumed = mlp_factory(seed=4)
    state = finetune(resumed, _loader(), epochs=2, checkpoint=path)
    assert state.step == 2 * len(_loader())
    assert json.dumps(state.history) == "[]"


def _interrupted(model, ckpt, **kw):
    with pytest.raises(KeyboardInterrupt):
        finetune(model, _loader(), epochs=2, checkpoint=ckpt, checkpoint_every=1, callbacks=[_Kill(3)], **kw)
    assert ckpt.is_file()


@pytest.mark.parametrize("change,said", [
    (dict(amount=0.9), "masks differ"),                      # issue 11.3: came back 50% sparse
    (dict(optimizer="adam"), "optimizer='sgd' then, 'adam' now"),
    (dict(lr=0.5), "lr=0.05 then, 0.5 now"),
    (dict(weight_decay=1e-2), "weight_decay=0.0 then, 0.01 now"),
])
def test_resume_refuses_a_checkpoint_of_another_run(mlp_factory, tmp_path, change, said):
    first = mlp_factory()
    prunekit.prune(first, 0.5)
    _interrupted(first, tmp_path / "c.pt", lr=0.05)
    again = mlp_factory()
    prunekit.prune(again, change.pop("amount", 0.5))
    before = {k: v.clone() for k, v in again.state_dict().items()}
    with pytest.raises(prunekit.PrunekitError, match=said):
        finetune(again, _loader(), epochs=2, checkpoint=tmp_path / "c.pt", **{"lr": 0.05, **change})
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in before.items())  # refused before any change


def test_resume_with_the_same_masks_and_options_continues(mlp_factory, tmp_path):
    first = mlp_factory()
    prunekit.prune(first, 0.5)
    _interrupted(first, tmp_path / "c.pt", lr=0.05)
    again = mlp_factory()
    prunekit.prune(again, 0.5)
    state = finetune(again, _loader(), epochs=2, checkpoint=tmp_path / "c.pt", lr=0.05)
    assert state.step == 2 * len(_loader())


def test_a_float16_run_that_diverges_says_why():
    # issue 11.6: a diverging float16 AdamW fine-tune blamed the learning rate
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).half()
    data = [(torch.randn(8, 16).half() * 100, torch.randint(0, 4, (8,))) for _ in range(20)]
    with pytest.raises(FloatingPointError, match="restored.*float16.*GradScaler"):
        finetune(m, data, epochs=3, lr=10.0, optimizer="adamw", progress=False,
                 loss_fn=lambda out, y: nn.functional.cross_entropy(out.float(), y))
    # the step that overflowed was undone: the user's model is left finite, and still works
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())
    assert bool(torch.isfinite(m(data[0][0])).all())


def test_overflowed_gradients_never_reach_the_weights(mlp):
    class InfGrad(torch.autograd.Function):  # a finite loss whose gradient overflows
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    class Blowup(nn.Module):
        def forward(self, out, y):
            return nn.functional.cross_entropy(InfGrad.apply(out), y)
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(FloatingPointError, match="were not updated"):
        finetune(mlp, _loader(), epochs=1, lr=0.1, loss_fn=Blowup(), progress=False)
    assert all(torch.equal(v, before[k]) for k, v in mlp.state_dict().items())
