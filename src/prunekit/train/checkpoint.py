"""Resumable training: the whole state written atomically, read back without executing code.

A checkpoint holds the model with its masks, the optimizer, step, epoch, position in the epoch, every
callback's state and every RNG; it is a ``torch.save`` of tensors, numbers and strings only, read with
``weights_only=True``. A run restarted with the same arguments resumes bit-identical; one whose model,
masks or options differ is refused with the difference named.
"""
from __future__ import annotations

import json
import math
import os
import pickle  # only for its exception type: checkpoints are read with weights_only=True
import random
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from prunekit._util import atomic_write
from prunekit.apply import masking
from prunekit.errors import PrunekitError
from prunekit.train import distributed as dist
from prunekit.train.state import Callback, TrainState

CHECKPOINT_FORMAT = "prunekit.finetune"  # a file format tag: unchanged when the module moved


CHECKPOINT_VERSION = 2  # 1: epoch-boundary checkpoints (no format/version keys); still readable


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
                 loader=None, run: Optional[Dict[str, Any]] = None):
        self.path = Path(path)
        self.run = dict(run or {})  # what makes a run this run (see run_identity): a checkpoint must match it
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
                   "callbacks": self._callback_states(), "history": json.dumps(state.history),
                   "run": json.dumps(self.run)}
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
        _check_same_run(payload, self.run, self.path)
        states = payload.get("callbacks", {})
        unknown = sorted(set(k for k, v in states.items() if v) - {_cb_key(i, c) for i, c in enumerate(self.callbacks)})
        if unknown:
            raise PrunekitError(f"cannot resume from {self.path}: it holds the state of callback(s) {unknown} "
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
            raise PrunekitError(f"cannot resume from {self.path}: optimizer, callback or RNG state does not fit "
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
    """torch.save through the atomic writer: a run killed at any point leaves the old or the new file, whole.
    The temp file is ``<name>.tmp`` (one writer, rank 0): a killed run's leftover is overwritten next time."""
    atomic_write(path, lambda f: torch.save(payload, f), before_rename=before_rename, fixed_temp=True)


_REQUIRED = ("model", "optimizer", "step", "epoch", "rng", "history")


_TYPES = {"model": dict, "optimizer": dict, "step": int, "epoch": int, "batch": int, "history": str,
          "callbacks": dict, "total_steps": int, "world_size": int, "run": str}


def read_checkpoint(path: os.PathLike) -> Dict[str, Any]:
    """Load a fine-tune checkpoint safely (``weights_only``); ValueError if it is not a valid one."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise PrunekitError(f"cannot resume from {path}: refusing to load it, it asks to import "
                             f"{found.group(1)} (not plain data: a crafted or foreign pickle); nothing in "
                             "it was executed") from e
        detail = re.search(r"Unsupported operand \d+", str(e))
        raise PrunekitError(f"cannot resume from {path}: corrupt checkpoint, not a torch.save file "
                         f"({detail.group(0) if detail else str(e).splitlines()[0]})") from e
    except Exception as e:  # torch raises RuntimeError, EOFError, zipfile errors... for broken files
        first = str(e).splitlines()[0] if str(e) else "empty or cut short"
        raise PrunekitError(f"cannot resume from {path}: corrupt or truncated checkpoint "
                         f"({type(e).__name__}: {first})") from e
    if not isinstance(payload, dict):
        raise PrunekitError(f"cannot resume from {path}: not a prunekit fine-tune checkpoint "
                         f"(holds a {type(payload).__name__})")
    if payload.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise PrunekitError(f"cannot resume from {path}: format {payload.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT!r}")
    version = payload.get("version", 1)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise PrunekitError(f"cannot resume from {path}: written by a newer prunekit "
                         f"(checkpoint version {version!r}; this one reads up to {CHECKPOINT_VERSION})")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise PrunekitError(f"cannot resume from {path}: not a prunekit fine-tune checkpoint "
                         f"(missing {', '.join(missing)})")
    bad = [k for k, kind in _TYPES.items() if k in payload and not isinstance(payload[k], kind)]
    if bad:
        raise PrunekitError(f"cannot resume from {path}: malformed checkpoint (wrong type for {', '.join(bad)})")
    return payload


def _check_compatible(payload: Dict[str, Any], state: TrainState, path: Path) -> None:
    """The checkpoint's model must fit ``state.model`` and its run must be this run."""
    problems = model_mismatch(state.model, payload["model"])
    if problems:
        raise PrunekitError(f"cannot resume from {path}: it was written for a different model; "
                         + "; ".join(problems))
    for key, ours in (("total_steps", state.total_steps), ("world_size", state.world_size)):
        theirs = payload.get(key)
        if theirs is not None and int(theirs) != ours:
            raise PrunekitError(f"cannot resume from {path}: it was written with {key}={theirs}, this run has "
                             f"{key}={ours} (resume with the same epochs, max_steps, loader and processes)")


def run_identity(model: nn.Module, optimizer: str, lr: float, momentum: float, weight_decay: float,
                 lr_schedule: str) -> Dict[str, Any]:
    """What a resumed run must share with the interrupted one: the optimizer and its settings, and the masks
    the model started with (a model pruned further since must not come back with the old masks)."""
    names = [n for n, _, _ in masking.masked_parameters(model)]
    return {"optimizer": optimizer, "lr": float(lr), "momentum": float(momentum),
            "weight_decay": float(weight_decay), "lr_schedule": lr_schedule, "masks": masking.digest(model),
            "sparsity": round(masking.global_sparsity(model, names), 6) if names else 0.0}


def _check_same_run(payload: Dict[str, Any], run: Dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint written by a run with other settings or other starting masks, naming each."""
    try:
        theirs = json.loads(payload.get("run") or "{}")
    except json.JSONDecodeError:
        raise PrunekitError(f"cannot resume from {path}: malformed run record") from None
    if not run or not theirs:  # written before runs were recorded: nothing to compare
        return
    # a model without masks takes them from the checkpoint (a fresh process resuming); one with other masks
    # than the interrupted run started with would silently come back with the old ones: refused
    fresh = run.get("masks") == masking.digest(nn.Module())
    diff = [k for k in run if k in theirs and k != "sparsity" and theirs[k] != run[k] and not (k == "masks" and fresh)]
    if not diff:
        return
    said = [f"the model's masks differ from those the interrupted run started with (sparsity {theirs.get('sparsity')} "
            f"then, {run.get('sparsity')} now)" if k == "masks" else f"{k}={theirs[k]!r} then, {run[k]!r} now"
            for k in diff]
    raise PrunekitError(f"cannot resume from {path}: it was written by a different run: {'; '.join(said)}. "
                        "Resume with the same model and options, or start afresh (delete the file or resume=False)")


def model_mismatch(model: nn.Module, state_dict: Dict[str, Any]) -> List[str]:
    """Why ``state_dict`` cannot load into ``model`` (empty when it can): keys and shapes named."""
    own = model.state_dict()
    params = dict(model.named_parameters(remove_duplicate=False))
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
