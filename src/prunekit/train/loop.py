"""A small fine-tuning loop that keeps pruned weights at exactly zero.

After every optimizer step the masks are enforced again: momentum, Adam's
moments or weight decay may move a pruned weight off zero, and it must not
stay there. Gradients of pruned entries are zeroed before the step too, so the
optimizer's state for them stays clean.

Gradual and iterative pruning are callbacks: :class:`GradualPruner` prunes to
``schedule(step)`` whenever that target rises, then training goes on.

Reliability: with ``checkpoint=path`` the whole training state (model with
masks, optimizer, step, epoch, position in the epoch, callback state such as
the pruning schedule's, and every RNG) is written atomically at each epoch end
and every ``checkpoint_every`` steps; a run restarted with the same arguments
resumes from it and ends bit-identical to an uninterrupted run.
Distributed: under ``torchrun`` the loop runs DDP (see :mod:`prunekit.train.distributed`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit._util import progress_enabled
from prunekit.apply import masking
from prunekit.errors import PrunekitError
from prunekit.train import distributed as dist
from prunekit.train.checkpoint import Checkpointer, rng_state, run_identity, set_rng_state
from prunekit.train.config import LR_SCHEDULES, OPTIMIZERS, TrainConfig, train_config
from prunekit.train.state import Callback, TrainState


def make_optimizer(name: str, params, *, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise PrunekitError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZERS)}")


def lr_factor(kind: str, step: int, total: int) -> float:
    """Multiplier of the base learning rate at ``step`` of ``total``."""
    if kind == "constant":
        return 1.0
    frac = min(step / max(total, 1), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if kind == "linear":
        return 1.0 - frac
    raise PrunekitError(f"unknown lr_schedule {kind!r}; allowed: {', '.join(LR_SCHEDULES)}")




def finetune(model: nn.Module, loader: Iterable, config: Optional[TrainConfig] = None, *,
             loss_fn: Optional[Callable] = None, callbacks: Sequence[Callback] = (), desc: str = "fine-tune",
             **options: Any) -> TrainState:
    """Train ``model`` on ``loader`` with masks held fixed; returns the final state.

    Options (a :class:`~prunekit.train.config.TrainConfig`, or its fields as keywords, which override
    ``config``): ``epochs``, ``max_steps``, ``lr``, ``optimizer`` (sgd, adam, adamw), ``momentum``,
    ``weight_decay``, ``lr_schedule`` (constant, cosine, linear), ``progress``, ``checkpoint``,
    ``checkpoint_every``, ``resume``, ``distributed``; all checked before the first step.

    ``epochs`` passes over ``loader`` (or ``max_steps`` optimizer steps if given,
    whichever comes first). The model's train/eval mode is restored afterwards.

    ``checkpoint`` (a file): the state is written atomically at every epoch end
    and, with ``checkpoint_every=N``, every N steps; if the file exists (and
    ``resume``), training continues from it exactly where it stopped. Resuming
    mid-epoch skips the batches already used: free for a prunekit TensorLoader
    (its order is a function of (seed, epoch)); any other loader is replayed from
    the epoch's start and the used batches discarded (exact for a DataLoader
    with num_workers=0 or a seeded sampler).

    ``distributed`` (default: when WORLD_SIZE > 1, as under torchrun): DDP with a
    sharded loader; masks must match on every rank (checked); rank 0 writes
    the checkpoints.
    """
    cfg = train_config(config, options)
    ddp = dist.want_distributed(cfg.distributed)
    if ddp:
        loader = dist.shard_loader(loader)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt = make_optimizer(cfg.optimizer, [p for p in model.parameters() if p.requires_grad],
                         lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    total = cfg.epochs * len(loader)
    total = min(total, cfg.max_steps) if cfg.max_steps is not None else total
    state = TrainState(model, opt, total, world_size=dist.get_world_size() if ddp else 1)
    callbacks = list(callbacks)
    if cfg.checkpoint is not None:
        run = run_identity(model, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_schedule)
        ckpt = Checkpointer(cfg.checkpoint, every=cfg.checkpoint_every, callbacks=callbacks, loader=loader, run=run)
        if cfg.resume:
            ckpt.restore(state)
        callbacks.append(ckpt)  # last: a checkpoint holds what every other callback did in the step
    if ddp:
        dist.check_masks_equal(model)
    modes = [(m, m.training) for m in model.modules()]  # a frozen BN must stay frozen afterwards
    model.train()
    state.net = dist.wrap(model) if ddp else model  # after train(): DDP keeps its own mode flag
    bar = tqdm(total=total, desc=desc, leave=False,
               disable=not progress_enabled(cfg.progress) or not dist.is_main())
    step = _Stepper(state, cfg.lr, cfg.lr_schedule, loss_fn, callbacks)
    try:
        _run(state, loader, cfg.epochs, step, callbacks, bar)
    finally:
        state.net = None  # drop the DDP wrapper: its gradient hooks must not outlive the run
        for m, mode in modes:
            m.training = mode
    return state


def _run(state: TrainState, loader, epochs: int, step: "_Stepper", callbacks, bar) -> None:
    for cb in callbacks:
        cb.on_train_begin(state)
    bar.update(state.step)  # non-zero when resuming
    with bar:
        while state.epoch < epochs:  # a finished run's checkpoint says epoch == epochs: nothing to do
            for x, y in _epoch_batches(loader, state):
                if state.step >= state.total_steps:
                    break
                step(x, y)
                bar.update(1)
                if state.step % 20 == 0:
                    bar.set_postfix(loss=f"{state.loss:.4f}", epoch=state.epoch)
            for cb in callbacks:
                cb.on_epoch_end(state)
            if state.step >= state.total_steps or state.epoch + 1 >= epochs:
                break  # the last epoch keeps its index in state.epoch
            state.epoch, state.batch = state.epoch + 1, 0
    for cb in callbacks:
        cb.on_train_end(state)


def _set_epoch(loader, epoch: int) -> None:
    """``set_epoch`` of the loader, or of its (distributed) sampler."""
    for obj in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None),
                                                                   "sampler", None)):
        if callable(getattr(obj, "set_epoch", None)):
            obj.set_epoch(epoch)
            return


def _epoch_batches(loader, state: TrainState) -> Iterator:
    """The batches of ``state.epoch`` not yet trained on (``state.batch`` of them are done)."""
    seek = getattr(loader, "seek", None)
    if callable(seek):  # TensorLoader: the order is a function of (seed, epoch), skipping is free
        seek(state.epoch, state.batch)
        return iter(loader)
    _set_epoch(loader, state.epoch)
    if state.batch == 0:
        state.epoch_rng = rng_state(loader)  # the order of a generic loader may come from the global RNG
        return iter(loader)
    # resumed mid-epoch: replay the epoch from the RNG it began with, drop the used batches,
    # then continue from the RNG the checkpoint was written with
    now = rng_state()  # not the loader's generator: the replay below leaves it where it must be
    if state.epoch_rng is not None:
        set_rng_state(state.epoch_rng, loader)
    it = iter(loader)
    for _ in range(state.batch):
        next(it)
    set_rng_state(now)
    return it


def _diverged_advice(state: TrainState) -> str:
    low = sorted({str(p.dtype).replace("torch.", "") for p in state.model.parameters()} & {"float16"})
    if low:  # float16's range (max 65504) overflows in the loss or the gradients long before fp32's does
        return ("the model's weights are float16, which overflows without loss scaling: train in float32 or "
                "bfloat16, or use torch.amp with a GradScaler around your own loop")
    return "lower the learning rate"


def _check_grads(state: TrainState) -> None:
    grads = [p.grad for p in state.model.parameters() if p.grad is not None]
    if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()):
        raise FloatingPointError(f"gradients became NaN or infinite at step {state.step} (the weights were not "
                                 f"updated with them); {_diverged_advice(state)}")


LOW_PRECISION = (torch.float16, torch.bfloat16)


class _Stepper:
    """One optimizer step: forward through the (DDP) net, masks enforced around the update.

    A float16/bfloat16 model's optimizer update itself can overflow (Adam's squared gradients exceed float16's
    range with gradients above 256) and write NaN into the weights: for such a model the parameters are
    copied before each step and put back if the step made any of them non-finite, so a diverging run never
    leaves the user's model broken.
    """

    def __init__(self, state: TrainState, lr: float, lr_schedule: str, loss_fn, callbacks):
        self.state, self.lr, self.lr_schedule, self.loss_fn = state, lr, lr_schedule, loss_fn
        self.callbacks = callbacks
        self.enforcer = masking.MaskEnforcer(state.model)
        self.device = next(state.model.parameters()).device
        self.params = [p for p in state.model.parameters() if p.requires_grad]
        self.guard = any(p.dtype in LOW_PRECISION for p in self.params)

    def _update(self) -> None:
        """``optimizer.step()``; for a low-precision model, undone when it leaves a weight NaN or infinite."""
        saved = [p.detach().clone() for p in self.params] if self.guard else None
        self.state.optimizer.step()
        if saved is None or bool(torch.isfinite(torch.stack(torch._foreach_norm(self.params)).float()).all()):
            return
        with torch.no_grad():
            torch._foreach_copy_(self.params, saved)
        raise FloatingPointError(f"the optimizer step {self.state.step} made weights NaN or infinite (they are "
                                 f"restored to their values before it); {_diverged_advice(self.state)}")

    def __call__(self, x, y) -> None:
        state, enforcer = self.state, self.enforcer
        for cb in self.callbacks:
            cb.on_step_begin(state)
        enforcer()  # a callback may have pruned more: refresh the cache before the step
        for group in state.optimizer.param_groups:
            group["lr"] = self.lr * lr_factor(self.lr_schedule, state.step, state.total_steps)
        state.optimizer.zero_grad(set_to_none=True)
        x, y = (t.to(self.device) if isinstance(t, torch.Tensor) else t for t in (x, y))
        loss = self.loss_fn(state.net(x), y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at step {state.step}; {_diverged_advice(state)}")
        loss.backward()  # under DDP the gradients are all-reduced here, pruned entries included
        enforcer.zero_grads()
        _check_grads(state)  # before the step: an overflowed gradient must not reach the weights
        self._update()
        enforcer()  # momentum and weight decay may have moved pruned weights: zero them again
        state.loss = loss.item()
        state.step += 1
        state.batch += 1
        for cb in self.callbacks:
            cb.on_step_end(state)




























