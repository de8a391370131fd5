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
Distributed: under ``torchrun`` the loop runs DDP (see :mod:`prunekit.distributed`).
"""
from __future__ import annotations

import json
import math
import os
import pickle  # only for its exception type: checkpoints are read with weights_only=True
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed as dist
from . import masking
from .api import global_sparsity, prune
from .schedules import Schedule, make_schedule

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "linear")
CHECKPOINT_FORMAT = "prunekit.finetune"
CHECKPOINT_VERSION = 2  # 1: epoch-boundary checkpoints (no format/version keys); still readable


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    total_steps: int
    step: int = 0
    epoch: int = 0
    loss: float = math.nan
    history: List[Dict[str, Any]] = field(default_factory=list)
    batch: int = 0  # batches of the current epoch already trained on
    world_size: int = 1
    net: Optional[nn.Module] = None  # what the forward pass calls: the model or its DDP wrapper
    epoch_rng: Optional[Dict[str, Any]] = None  # RNG when the epoch began: replays a generic loader's order


class Callback:
    """Override what you need; every hook gets the live :class:`TrainState`.

    A callback with state that must survive a resume (a schedule's position...)
    returns it from :meth:`state_dict` (tensors, numbers, strings, and lists or
    dicts of them: checkpoints are read with ``weights_only=True``) and takes it
    back in :meth:`load_state_dict`.
    """

    def on_train_begin(self, state: TrainState) -> None: ...
    def on_step_begin(self, state: TrainState) -> None: ...
    def on_step_end(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


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


def _check_args(epochs: int, lr_schedule: str, checkpoint, checkpoint_every: Optional[int]) -> None:
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    lr_factor(lr_schedule, 0, 1)  # validate before touching anything
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every!r} must be a number of steps >= 1")
        if checkpoint is None:
            raise ValueError("checkpoint_every needs checkpoint=<file> to write to")


def finetune(model: nn.Module, loader: Iterable, *, epochs: int = 1, max_steps: Optional[int] = None,
             lr: float = 0.01, optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
             lr_schedule: str = "cosine", loss_fn: Optional[Callable] = None,
             callbacks: Sequence[Callback] = (), progress: Optional[bool] = None,
             desc: str = "fine-tune", checkpoint: Optional[os.PathLike] = None,
             checkpoint_every: Optional[int] = None, resume: bool = True,
             distributed: Optional[bool] = None) -> TrainState:
    """Train ``model`` on ``loader`` with masks held fixed; returns the final state.

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
    _check_args(epochs, lr_schedule, checkpoint, checkpoint_every)
    ddp = dist.want_distributed(distributed)
    if ddp:
        loader = dist.shard_loader(loader)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt = make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad],
                         lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = epochs * len(loader)
    total = min(total, max_steps) if max_steps is not None else total
    state = TrainState(model, opt, total, world_size=dist.get_world_size() if ddp else 1)
    callbacks = list(callbacks)
    if checkpoint is not None:
        ckpt = Checkpointer(checkpoint, every=checkpoint_every, callbacks=callbacks, loader=loader)
        if resume:
            ckpt.restore(state)
        callbacks.append(ckpt)  # last: a checkpoint holds what every other callback did in the step
    if ddp:
        dist.check_masks_equal(model)
    modes = [(m, m.training) for m in model.modules()]  # a frozen BN must stay frozen afterwards
    model.train()
    state.net = dist.wrap(model) if ddp else model  # after train(): DDP keeps its own mode flag
    bar = tqdm(total=total, desc=desc, leave=False,
               disable=not _progress_enabled(progress) or not dist.is_main())
    step = _Stepper(state, lr, lr_schedule, loss_fn, callbacks)
    try:
        _run(state, loader, epochs, step, callbacks, bar)
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


class _Stepper:
    """One optimizer step: forward through the (DDP) net, masks enforced around the update."""

    def __init__(self, state: TrainState, lr: float, lr_schedule: str, loss_fn, callbacks):
        self.state, self.lr, self.lr_schedule, self.loss_fn = state, lr, lr_schedule, loss_fn
        self.callbacks = callbacks
        self.enforcer = masking.MaskEnforcer(state.model)
        self.device = next(state.model.parameters()).device

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
            raise FloatingPointError(f"loss became {loss.item()} at step {state.step}; lower the learning rate")
        loss.backward()  # under DDP the gradients are all-reduced here, pruned entries included
        enforcer.zero_grads()
        state.optimizer.step()
        enforcer()  # momentum and weight decay may have moved pruned weights: zero them again
        state.loss = loss.item()
        state.step += 1
        state.batch += 1
        for cb in self.callbacks:
            cb.on_step_end(state)


# ----------------------------------------------------------------------------- RNG state
def rng_state(loader=None) -> Dict[str, Any]:
    """torch, CUDA, numpy and Python RNG states (and the loader's generator) as plain tensors."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    out: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                   "gauss": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):  # a DataLoader's own shuffling generator
        out["loader"] = gen.get_state()
    return out


def set_rng_state(state: Dict[str, Any], loader=None) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["gauss"]))
    if "python" in state:
        py = state["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    gen = getattr(loader, "generator", None)
    if "loader" in state and isinstance(gen, torch.Generator):
        gen.set_state(state["loader"])


# ----------------------------------------------------------------------------- checkpoints
class Checkpointer(Callback):
    """Writes the training state atomically; :meth:`restore` resumes from it.

    Written at every epoch end and, with ``every``, every ``every`` steps. The
    file is a ``torch.save`` of tensors, numbers and strings only, read back with
    ``weights_only=True``: loading it never executes code. Under DDP every rank's
    RNG is gathered and rank 0 alone writes; the others wait at a barrier.
    """

    # test hook: called between writing the temporary file and renaming it into place
    _before_rename: Optional[Callable[[Path], None]] = None

    def __init__(self, path: os.PathLike, every: Optional[int] = None, callbacks: Sequence[Callback] = (),
                 loader=None):
        self.path = Path(path)
        self.every = every
        self.callbacks = list(callbacks)  # whose state_dict() goes into the checkpoint
        self.loader = loader  # its shuffling generator (a DataLoader's ``generator``) is saved too

    def on_step_end(self, state: TrainState) -> None:
        if self.every and state.step % self.every == 0:
            self.save(state, epoch_done=False)

    def on_epoch_end(self, state: TrainState) -> None:
        self.save(state, epoch_done=True)

    def _callback_states(self) -> Dict[str, Any]:
        return {_cb_key(i, cb): cb.state_dict() for i, cb in enumerate(self.callbacks)}

    def save(self, state: TrainState, *, epoch_done: bool) -> None:
        rngs = dist.all_gather_objects(rng_state(self.loader))  # a collective: every rank gets here together
        epoch_rngs = None if epoch_done else dist.all_gather_objects(state.epoch_rng)
        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                   "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                   "step": state.step, "epoch": state.epoch + 1 if epoch_done else state.epoch,
                   "batch": 0 if epoch_done else state.batch, "total_steps": state.total_steps,
                   "world_size": state.world_size, "rng": rngs, "epoch_rng": epoch_rngs,
                   "callbacks": self._callback_states(), "history": json.dumps(state.history)}
        if dist.is_main():
            _atomic_save(payload, self.path, type(self)._before_rename)  # via the class: a plain function
        dist.barrier()  # nobody runs ahead (or resumes) before the file is complete

    def restore(self, state: TrainState) -> bool:
        """Load the checkpoint into ``state`` (and its model); False if there is none.

        Everything is checked before anything changes: a bad file is a ValueError
        and the model is left as it was.
        """
        if not self.path.is_file():
            return False
        payload = read_checkpoint(self.path)
        _check_compatible(payload, state, self.path)
        states = payload.get("callbacks", {})
        unknown = sorted(set(k for k, v in states.items() if v) - {_cb_key(i, c) for i, c in enumerate(self.callbacks)})
        if unknown:
            raise ValueError(f"cannot resume from {self.path}: it holds the state of callback(s) {unknown} "
                             "that this run does not have (pass the same callbacks as the interrupted run)")
        try:
            state.optimizer.load_state_dict(payload["optimizer"])
            for i, cb in enumerate(self.callbacks):
                if _cb_key(i, cb) in states:
                    cb.load_state_dict(states[_cb_key(i, cb)])
            rank = dist.get_rank()
            rng, epoch_rng = _rank_entry(payload["rng"], rank), _rank_entry(payload.get("epoch_rng"), rank)
            set_rng_state(rng, self.loader)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
            raise ValueError(f"cannot resume from {self.path}: optimizer, callback or RNG state does not fit "
                             f"this run ({e})") from e
        masking.load_state_dict(state.model, payload["model"])  # checked above: cannot fail half-way
        state.step, state.epoch = int(payload["step"]), int(payload["epoch"])
        state.batch, state.epoch_rng = int(payload.get("batch", 0)), epoch_rng
        state.history = json.loads(payload["history"])
        return True


def _cb_key(i: int, cb: Callback) -> str:
    return f"{i}:{type(cb).__name__}"


def _rank_entry(value, rank: int):
    """Version 2 keeps one RNG state per rank; version 1 a single torch RNG tensor."""
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, torch.Tensor):
        return {"torch": value}
    return value[rank]


def _atomic_save(payload: Dict[str, Any], path: Path, before_rename=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the checkpoint
    if before_rename is not None:
        before_rename(tmp)
    os.replace(tmp, path)  # atomic: a run killed at any point leaves the old or the new file, whole
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_REQUIRED = ("model", "optimizer", "step", "epoch", "rng", "history")
_TYPES = {"model": dict, "optimizer": dict, "step": int, "epoch": int, "batch": int, "history": str,
          "callbacks": dict, "total_steps": int, "world_size": int}


def read_checkpoint(path: os.PathLike) -> Dict[str, Any]:
    """Load a fine-tune checkpoint safely (``weights_only``); ValueError if it is not a valid one."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise ValueError(f"cannot resume from {path}: refusing to load it, it asks to import "
                             f"{found.group(1)} (not plain data: a crafted or foreign pickle); nothing in "
                             "it was executed") from e
        detail = re.search(r"Unsupported operand \d+", str(e))
        raise ValueError(f"cannot resume from {path}: corrupt checkpoint, not a torch.save file "
                         f"({detail.group(0) if detail else str(e).splitlines()[0]})") from e
    except Exception as e:  # torch raises RuntimeError, EOFError, zipfile errors... for broken files
        first = str(e).splitlines()[0] if str(e) else "empty or cut short"
        raise ValueError(f"cannot resume from {path}: corrupt or truncated checkpoint "
                         f"({type(e).__name__}: {first})") from e
    if not isinstance(payload, dict):
        raise ValueError(f"cannot resume from {path}: not a prunekit fine-tune checkpoint "
                         f"(holds a {type(payload).__name__})")
    if payload.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise ValueError(f"cannot resume from {path}: format {payload.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r}")
    version = payload.get("version", 1)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ValueError(f"cannot resume from {path}: written by a newer prunekit "
                         f"(checkpoint version {version!r}; this one reads up to {CHECKPOINT_VERSION})")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise ValueError(f"cannot resume from {path}: not a prunekit fine-tune checkpoint "
                         f"(missing {', '.join(missing)})")
    bad = [k for k, kind in _TYPES.items() if k in payload and not isinstance(payload[k], kind)]
    if bad:
        raise ValueError(f"cannot resume from {path}: malformed checkpoint (wrong type for {', '.join(bad)})")
    return payload


def _check_compatible(payload: Dict[str, Any], state: TrainState, path: Path) -> None:
    """The checkpoint's model must fit ``state.model`` and its run must be this run."""
    problems = model_mismatch(state.model, payload["model"])
    if problems:
        raise ValueError(f"cannot resume from {path}: it was written for a different model; "
                         + "; ".join(problems))
    for key, ours in (("total_steps", state.total_steps), ("world_size", state.world_size)):
        theirs = payload.get(key)
        if theirs is not None and int(theirs) != ours:
            raise ValueError(f"cannot resume from {path}: it was written with {key}={theirs}, this run has "
                             f"{key}={ours} (resume with the same epochs, max_steps, loader and processes)")


def model_mismatch(model: nn.Module, state_dict: Dict[str, Any]) -> List[str]:
    """Why ``state_dict`` cannot load into ``model`` (empty when it can): keys and shapes named."""
    own = model.state_dict()
    params = dict(model.named_parameters())
    mask = masking.MASK_SUFFIX
    is_new_mask = lambda k: k.endswith(mask) and k[: -len(mask)] in params  # noqa: E731
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own and not is_new_mask(k)]
    out = []
    if missing:
        out.append(f"missing in the checkpoint: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        out.append(f"not in the model: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            out.append(f"{k} is a {type(v).__name__}, not a tensor")
        elif k in own and tuple(v.shape) != tuple(own[k].shape):
            out.append(f"{k} has shape {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model")
        elif is_new_mask(k) and (v.dtype != torch.uint8 or v.numel() != math.ceil(params[k[: -len(mask)]].numel() / 8)):
            out.append(f"{k} is not a mask for {k[: -len(mask)]} of shape {tuple(params[k[: -len(mask)]].shape)}")
    return out


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
