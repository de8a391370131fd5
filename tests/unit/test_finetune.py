import pytest
import torch
from torch import nn

import prunekit
from prunekit.data import TensorLoader
from prunekit.finetune import Callback, GradualPruner, finetune, gradual_prune, iterative_prune
from prunekit.schedules import make_schedule


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
        for name, keep in prunekit.masks(state.model).items():
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
    assert prunekit.global_sparsity(mlp, ["1.weight", "3.weight"]) == pytest.approx(0.8, abs=1e-3)


def test_gradual_and_iterative_helpers(mlp_factory):
    m = mlp_factory()
    state = gradual_prune(m, _loader(), final=0.9, epochs=3, prune_kwargs={"scope": "global"}, lr=0.05)
    assert prunekit.global_sparsity(m, ["1.weight", "3.weight"]) == pytest.approx(0.9, abs=1e-3)
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
    assert not prunekit.masking.is_masked(mlp)
