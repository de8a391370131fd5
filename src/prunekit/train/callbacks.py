"""Pruning during training, as callbacks of the fine-tuning loop.

:class:`GradualPruner` prunes to ``schedule(step)`` whenever that target rises: with the cubic schedule
this is Zhu & Gupta's gradual pruning (:func:`gradual_prune`), with steps at round boundaries classic
iterative pruning (:func:`iterative_prune`). :class:`EvalCallback` records accuracy and sparsity.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from prunekit.analysis.metrics import evaluate
from prunekit.api import prune
from prunekit.apply import masking
from prunekit.apply.masking import global_sparsity
from prunekit.errors import PrunekitError
from prunekit.spec import PruneSpec, split_options
from prunekit.train import distributed as dist
from prunekit.train.config import TrainConfig, train_config
from prunekit.train.loop import finetune
from prunekit.train.schedules import Schedule, make_schedule
from prunekit.train.state import Callback, TrainState


class GradualPruner(Callback):
    """Prune to ``schedule(step)`` whenever the scheduled sparsity rises.

    What to prune is a :class:`~prunekit.spec.PruneSpec` (``spec``), or the options of
    :func:`prunekit.prune` as keywords (criterion, scope, ..., data for data-aware criteria); they are
    checked here, before training starts. With the cubic schedule this is Zhu & Gupta's gradual
    pruning; with a ``steps`` schedule at epoch boundaries it is classic iterative pruning.
    """

    def __init__(self, schedule: Schedule, spec: Optional[PruneSpec] = None, **prune_options: Any):
        self.schedule = schedule
        self.spec, calib, _ = split_options(prune_options, spec)  # refuses unknown options now, not mid-run
        self.calibration = {k: v for k, v in vars(calib).items() if v is not None}
        self.current = 0.0
        self.events: List[Dict[str, float]] = []

    def on_train_begin(self, state: TrainState) -> None:
        if state.step > 0:  # resumed: the restored masks already hold the earlier targets
            self.current = max(self.current, float(self.schedule(state.step - 1)))

    def on_step_begin(self, state: TrainState) -> None:
        target = float(self.schedule(state.step))
        if target > self.current + 1e-9:
            plan = prune(state.model, target, spec=self.spec, **self.calibration)
            if state.world_size > 1:  # DDP keeps the weights equal, so the masks must come out equal too
                dist.check_masks_equal(state.model)
            self.current = target
            names = plan.meta.get("targets")
            self.events.append({"step": state.step, "target": target,
                                "sparsity": global_sparsity(state.model, names)})

    def state_dict(self) -> Dict[str, Any]:
        return {"current": self.current, "events": [dict(e) for e in self.events]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.current = float(state["current"])
        self.events = [dict(e) for e in state["events"]]


class EvalCallback(Callback):
    """Evaluate on ``loader`` at the end of every ``every`` epochs; rows go to state.history."""

    def __init__(self, loader, every: int = 1, names: Optional[Sequence[str]] = None):
        self.loader, self.every, self.names = loader, every, names

    def on_epoch_end(self, state: TrainState) -> None:
        if (state.epoch + 1) % self.every:
            return

        res = evaluate(state.model, self.loader)
        names = self.names or [n for n, _, _ in masking.masked_parameters(state.model)] or None
        state.history.append({"step": state.step, "epoch": state.epoch + 1, "loss": state.loss,
                              "accuracy": res["accuracy"],
                              "sparsity": global_sparsity(state.model, names) if names else 0.0})


def gradual_prune(model: nn.Module, loader, *, final: float, epochs: int, prune_epochs: Optional[int] = None,
                  every: Optional[int] = None, initial: float = 0.0, eval_loader=None,
                  spec: Optional[PruneSpec] = None, prune_kwargs: Optional[Dict[str, Any]] = None,
                  config: Optional[TrainConfig] = None, **train_kwargs: Any) -> TrainState:
    """Zhu & Gupta gradual pruning during ``epochs`` of training.

    Sparsity follows the cubic schedule over the first ``prune_epochs`` epochs
    (default: 40% of them), updated every ``every`` steps (default: ~10 updates
    per epoch); the rest of the epochs fine-tune at the final sparsity. What to
    prune: ``spec`` and/or ``prune_kwargs`` (see :class:`GradualPruner`); how to
    train: ``config`` and/or training keywords (see :func:`prunekit.finetune`).
    """
    cfg = train_config(config, {**train_kwargs, "epochs": epochs})
    steps_per_epoch = len(loader)
    # default: sparsity rises over the first 40% of the epochs (best of the splits measured by
    # benchmarks/lenet_mnist.py), the rest fine-tunes at the final sparsity
    prune_epochs = prune_epochs if prune_epochs is not None else max(1, round(0.4 * epochs))
    if not 1 <= prune_epochs <= epochs:
        raise PrunekitError(f"prune_epochs={prune_epochs} must be in [1, epochs={epochs}]: the sparsity must "
                         "reach its final value before training ends")
    every = every or max(1, steps_per_epoch // 10)
    n = max(1, (prune_epochs * steps_per_epoch) // every)
    schedule = make_schedule("cubic", final=final, initial=initial, n=n, every=every)
    pruner = GradualPruner(schedule, spec, **(prune_kwargs or {}))
    callbacks = [pruner] + ([EvalCallback(eval_loader)] if eval_loader is not None else [])
    state = finetune(model, loader, cfg, callbacks=callbacks, desc="gradual")
    state.history.extend({"event": "prune", **e} for e in pruner.events)
    return state


def iterative_prune(model: nn.Module, loader, *, sparsities: Sequence[float], epochs_per_round: int = 1,
                    eval_loader=None, spec: Optional[PruneSpec] = None,
                    prune_kwargs: Optional[Dict[str, Any]] = None, config: Optional[TrainConfig] = None,
                    **train_kwargs: Any) -> TrainState:
    """Prune → fine-tune → prune more, one round per target in ``sparsities`` (increasing).

    ``spec``/``prune_kwargs`` and ``config``/training keywords as in :func:`gradual_prune`."""
    cfg = train_config(config, {**train_kwargs, "epochs": epochs_per_round * len(sparsities)})
    if list(sparsities) != sorted(sparsities):
        raise PrunekitError(f"sparsities must increase, got {list(sparsities)}")
    per_round = epochs_per_round * len(loader)
    schedule = make_schedule("steps", points=[(i * per_round, s) for i, s in enumerate(sparsities)])
    pruner = GradualPruner(schedule, spec, **(prune_kwargs or {}))
    callbacks = [pruner] + ([EvalCallback(eval_loader, every=epochs_per_round)] if eval_loader else [])
    state = finetune(model, loader, cfg, callbacks=callbacks, desc="iterative")
    state.history.extend({"event": "prune", **e} for e in pruner.events)
    return state
