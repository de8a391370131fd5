"""A small fine-tuning loop that keeps pruned weights at exactly zero.

After every optimizer step the masks are enforced again: momentum, Adam's
moments or weight decay may move a pruned weight off zero, and it must not
stay there. Gradients of pruned entries are zeroed before the step too, so the
optimizer's state for them stays clean.

Gradual and iterative pruning are callbacks: :class:`GradualPruner` prunes to
``schedule(step)`` whenever that target rises, then training goes on.
"""
from __future__ import annotations

import json
import math
import os
import pickle  # only for its exception type: checkpoints are read with weights_only=True
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import masking
from .api import global_sparsity, prune
from .schedules import Schedule, make_schedule

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    total_steps: int
    step: int = 0
    epoch: int = 0
    loss: float = math.nan
    history: List[Dict[str, Any]] = field(default_factory=list)


class Callback:
    """Override what you need; every hook gets the live :class:`TrainState`."""

    def on_train_begin(self, state: TrainState) -> None: ...
    def on_step_begin(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...


def make_optimizer(name: str, params, *, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def lr_factor(kind: str, step: int, total: int) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``."""
    if kind == "constant":
        return 1.0
    frac = min(step / max(total, 1), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if kind == "linear":
        return 1.0 - frac
    raise ValueError(f"unknown lr_schedule {kind!r}; allowed: {', '.join(LR_SCHEDULES)}")


def _progress_enabled(progress: Optional[bool]) -> bool:
    if progress is not None:
        return progress
    return os.environ.get("PRUNEKIT_PROGRESS", "1") != "0"


def finetune(model: nn.Module, loader: Iterable, *, epochs: int = 1, max_steps: Optional[int] = None,
             lr: float = 0.01, optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
             lr_schedule: str = "cosine", loss_fn: Optional[Callable] = None,
             callbacks: Sequence[Callback] = (), progress: Optional[bool] = None,
             desc: str = "fine-tune", checkpoint: Optional[os.PathLike] = None) -> TrainState:
    """Train ``model`` on ``loader`` with masks held fixed; returns the final state.

    ``epochs`` passes over ``loader`` (or ``max_steps`` optimizer steps if given,
    whichever comes first). The model's train/eval mode is restored afterwards.
    With ``checkpoint`` (a file path), the state is written atomically at the
    end of every epoch, and a run started with an existing checkpoint resumes
    from it (model with masks, optimizer, step, epoch, RNG).
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    lr_factor(lr_schedule, 0, 1)  # validate before touching anything
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad],
                         lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = epochs * len(loader)
    total = min(total, max_steps) if max_steps is not None else total
    state = TrainState(model, opt, total)
    if checkpoint is not None:
        callbacks = [Checkpointer(checkpoint), *callbacks]
        callbacks[0].restore(state)
    enforcer = masking.MaskEnforcer(model)
    modes = [(m, m.training) for m in model.modules()]  # a frozen BN must stay frozen afterwards
    model.train()
    try:
        _run(state, loader, epochs, lr, lr_schedule, loss_fn, callbacks, enforcer,
             tqdm(total=total, desc=desc, disable=not _progress_enabled(progress), leave=False))
    finally:
        for m, mode in modes:
            m.training = mode
    return state


def _run(state, loader, epochs, lr, lr_schedule, loss_fn, callbacks, enforcer, bar) -> None:
    for cb in callbacks:
        cb.on_train_begin(state)
    bar.update(state.step)  # non-zero when resuming
    with bar:
        for epoch in range(state.epoch, epochs):
            state.epoch = epoch
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for x, y in loader:
                if state.step >= state.total_steps:
                    break
                _train_step(state, x, y, lr * lr_factor(lr_schedule, state.step, state.total_steps),
                            loss_fn, callbacks, enforcer)
                bar.update(1)
                if state.step % 20 == 0:
                    bar.set_postfix(loss=f"{state.loss:.4f}", epoch=epoch)
            for cb in callbacks:
                cb.on_epoch_end(state)
            if state.step >= state.total_steps:
                break
    for cb in callbacks:
        cb.on_train_end(state)


def _train_step(state: TrainState, x, y, lr: float, loss_fn, callbacks, enforcer) -> None:
    for cb in callbacks:
        cb.on_step_begin(state)
    enforcer()  # a callback may have pruned more: refresh the cache before the step
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(state.model(x), y)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss became {loss.item()} at step {state.step}; lower the learning rate")
    loss.backward()
    enforcer.zero_grads()
    state.optimizer.step()
    enforcer()  # momentum and weight decay may have moved pruned weights: zero them again
    state.loss = loss.item()
    state.step += 1
    for cb in callbacks:
        cb.on_step_end(state)


class Checkpointer(Callback):
    """Writes the training state atomically at every epoch end; ``restore`` resumes from it.

    The file is a ``torch.save`` of tensors and plain numbers only, read back with
    ``weights_only=True``: loading it never executes code.
    """

    def __init__(self, path: os.PathLike):
        self.path = Path(path)

    def on_epoch_end(self, state: TrainState) -> None:
        payload = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                   "step": state.step, "epoch": state.epoch + 1, "rng": torch.get_rng_state(),
                   "history": json.dumps(state.history)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)  # a run killed mid-write leaves the previous checkpoint intact

    def restore(self, state: TrainState) -> bool:
        if not self.path.is_file():
            return False
        try:
            payload = torch.load(self.path, map_location="cpu", weights_only=True)
            masking.load_state_dict(state.model, payload["model"])
            state.optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"cannot resume from {self.path}: corrupt or from another model ({e})") from e
        state.step, state.epoch = int(payload["step"]), int(payload["epoch"])
        state.history = json.loads(payload["history"])
        torch.set_rng_state(payload["rng"])
        return True


class GradualPruner(Callback):
    """Prune to ``schedule(step)`` whenever the scheduled sparsity rises.

    ``prune_kwargs`` are those of :func:`prunekit.prune` (criterion, scope, ...).
    With the cubic schedule this is Zhu & Gupta's gradual pruning; with a
    ``steps`` schedule at epoch boundaries it is classic iterative pruning.
    """

    def __init__(self, schedule: Schedule, **prune_kwargs):
        self.schedule = schedule
        self.prune_kwargs = prune_kwargs
        self.current = 0.0
        self.events: List[Dict[str, float]] = []

    def on_train_begin(self, state: TrainState) -> None:
        if state.step > 0:  # resumed: the restored masks already hold the earlier targets
            self.current = max(self.current, float(self.schedule(state.step - 1)))

    def on_step_begin(self, state: TrainState) -> None:
        target = float(self.schedule(state.step))
        if target > self.current + 1e-9:
            plan = prune(state.model, target, **self.prune_kwargs)
            self.current = target
            names = plan.meta.get("targets")
            self.events.append({"step": state.step, "target": target,
                                "sparsity": global_sparsity(state.model, names)})


class EvalCallback(Callback):
    """Evaluate on ``loader`` at the end of every ``every`` epochs; rows go to state.history."""

    def __init__(self, loader, every: int = 1, names: Optional[Sequence[str]] = None):
        self.loader, self.every, self.names = loader, every, names

    def on_epoch_end(self, state: TrainState) -> None:
        if (state.epoch + 1) % self.every:
            return
        from .metrics import evaluate  # imported here: metrics pulls in the flop counter

        res = evaluate(state.model, self.loader)
        names = self.names or [n for n, _, _ in masking.masked_parameters(state.model)] or None
        state.history.append({"step": state.step, "epoch": state.epoch + 1, "loss": state.loss,
                              "accuracy": res["accuracy"],
                              "sparsity": global_sparsity(state.model, names) if names else 0.0})


def gradual_prune(model: nn.Module, loader, *, final: float, epochs: int, prune_epochs: Optional[int] = None,
                  every: Optional[int] = None, initial: float = 0.0, eval_loader=None,
                  prune_kwargs: Optional[Dict[str, Any]] = None, **train_kwargs) -> TrainState:
    """Zhu & Gupta gradual pruning during ``epochs`` of training.

    Sparsity follows the cubic schedule over the first ``prune_epochs`` epochs
    (default: 40% of them), updated every ``every`` steps (default: ~10 updates
    per epoch); the rest of the epochs fine-tune at the final sparsity.
    """
    steps_per_epoch = len(loader)
    # default: sparsity rises over the first 40% of the epochs (best of the splits measured by
    # benchmarks/lenet_mnist.py), the rest fine-tunes at the final sparsity
    prune_epochs = prune_epochs if prune_epochs is not None else max(1, round(0.4 * epochs))
    if not 1 <= prune_epochs <= epochs:
        raise ValueError(f"prune_epochs={prune_epochs} must be in [1, epochs={epochs}]: the sparsity must "
                         "reach its final value before training ends")
    every = every or max(1, steps_per_epoch // 10)
    n = max(1, (prune_epochs * steps_per_epoch) // every)
    schedule = make_schedule("cubic", final=final, initial=initial, n=n, every=every)
    pruner = GradualPruner(schedule, **(prune_kwargs or {}))
    callbacks = [pruner] + ([EvalCallback(eval_loader)] if eval_loader is not None else [])
    state = finetune(model, loader, epochs=epochs, callbacks=callbacks, desc="gradual", **train_kwargs)
    state.history.extend({"event": "prune", **e} for e in pruner.events)
    return state


def iterative_prune(model: nn.Module, loader, *, sparsities: Sequence[float], epochs_per_round: int = 1,
                    eval_loader=None, prune_kwargs: Optional[Dict[str, Any]] = None,
                    **train_kwargs) -> TrainState:
    """Prune → fine-tune → prune more, one round per target in ``sparsities`` (increasing)."""
    if list(sparsities) != sorted(sparsities):
        raise ValueError(f"sparsities must increase, got {list(sparsities)}")
    per_round = epochs_per_round * len(loader)
    schedule = make_schedule("steps", points=[(i * per_round, s) for i, s in enumerate(sparsities)])
    pruner = GradualPruner(schedule, **(prune_kwargs or {}))
    callbacks = [pruner] + ([EvalCallback(eval_loader, every=epochs_per_round)] if eval_loader else [])
    state = finetune(model, loader, epochs=epochs_per_round * len(sparsities), callbacks=callbacks,
                     desc="iterative", **train_kwargs)
    state.history.extend({"event": "prune", **e} for e in pruner.events)
    return state
