"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin, 2019).

    result = lottery_ticket(lambda: build_model("lenet300"), train, rounds=4, final_sparsity=0.95,
                            rewind=200, epochs_per_round=5, lr=0.1, eval_loader=test, reinit=True)
    result.model            # the ticket, trained at 95% sparsity
    result.summary()        # per round: target, sparsity, accuracy (and the re-init control's)
    result.save("lottery.json", meta={"model": "lenet300"})   # the numbers, no tensors
    LotteryRecord.load("lottery.json").points()               # what `prunekit report` plots

Round 0 trains the dense network and records the *rewind point*: the weights
at initialisation (``rewind="init"``) or after ``rewind=k`` optimizer steps
(Frankle et al. 2020, "Linear mode connectivity and the lottery ticket
hypothesis": rewinding to an early step finds tickets where rewinding to
init does not). Each later round prunes the surviving weights by magnitude
to the round's target (masks compose: pruned weights stay pruned), puts the
survivors back to their values at the rewind point (buffers such as
BatchNorm statistics too), and trains again with the masks held fixed
(:func:`prunekit.train.loop`: fresh optimizer and learning-rate schedule each
round).

``reinit=True`` adds the control of the paper: in every pruning round, a
copy with the *same masks* but a fresh random initialisation (another seed)
is trained the same way, so "ticket vs random re-init" is measured at every
sparsity from one run.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit._util import atomic_write_text, check_choice, progress_enabled
from prunekit.analysis.metrics import evaluate
from prunekit.api import plan_pruning, prune
from prunekit.apply import masking
from prunekit.apply.masking import current_plan, global_sparsity
from prunekit.criteria import Criterion, get_criterion
from prunekit.errors import InvalidTypeError, PrunekitError, UnknownNameError
from prunekit.plan import Plan
from prunekit.select.ranking import SCOPES
from prunekit.train.loop import finetune, lr_factor, make_optimizer
from prunekit.train.state import Callback, TrainState

FORMAT = "prunekit.lottery/1"
ModelOrFactory = Union[nn.Module, Callable[[], nn.Module]]
_AUX = (masking.MASK_SUFFIX, masking.ORIG_SUFFIX)
# finetune arguments lottery_ticket sets itself
_RESERVED = ("epochs", "callbacks", "desc", "checkpoint", "progress")


# ----------------------------------------------------------------------------- schedule

def imp_schedule(rounds: int, *, final_sparsity: Optional[float] = None,
                 per_round: Optional[float] = None) -> List[float]:
    """Sparsity after each pruning round.

    ``per_round=p`` prunes a fraction p of the surviving weights each round
    (the paper's 20%: 0.2, 0.36, 0.488, ...); ``final_sparsity=f`` picks the
    rate that reaches f in ``rounds`` rounds (the last one is exactly f).
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise PrunekitError(f"rounds={rounds!r} must be an int >= 1")
    if (final_sparsity is None) == (per_round is None):
        raise PrunekitError("give exactly one of final_sparsity and per_round")
    rate = per_round if per_round is not None else final_sparsity
    what = "per_round" if per_round is not None else "final_sparsity"
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < rate < 1.0:
        raise PrunekitError(f"{what}={rate!r} must be a fraction in (0, 1)")
    keep = 1.0 - per_round if per_round is not None else (1.0 - final_sparsity) ** (1.0 / rounds)
    out = [round(1.0 - keep ** (r + 1), 12) for r in range(rounds)]
    if final_sparsity is not None:
        out[-1] = float(final_sparsity)
    return out


def _schedule(rounds, final_sparsity, per_round, sparsities) -> List[float]:
    if sparsities is None:
        if rounds is None:
            raise PrunekitError("give rounds with final_sparsity or per_round, or an explicit list of sparsities")
        return _check_schedule(imp_schedule(rounds, final_sparsity=final_sparsity, per_round=per_round))
    if rounds is not None or final_sparsity is not None or per_round is not None:
        raise PrunekitError("give either sparsities or rounds with final_sparsity/per_round, not both")
    return _check_schedule(sparsities)


def _check_schedule(sparsities: Sequence[float]) -> List[float]:
    out = [float(s) for s in sparsities]
    if not out:
        raise PrunekitError("sparsities is empty: give at least one target")
    if any(not 0.0 <= s < 1.0 for s in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise PrunekitError(f"sparsities {out} must be fractions in [0, 1), strictly increasing")
    return out


# ----------------------------------------------------------------------------- rewinding

def capture_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Copies of every parameter and buffer except prunekit's masks: a rewind point."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(_AUX)}


@torch.no_grad()
def rewind_to(model: nn.Module, state: Dict[str, torch.Tensor]) -> nn.Module:
    """Put every parameter and buffer back to ``state``; masks stay, so pruned weights stay zero."""
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    missing = [k for k in state if k not in tensors]
    if missing:
        raise UnknownNameError(f"the rewind state names tensors the model lacks: {', '.join(missing[:5])}")
    for k, v in state.items():
        tensors[k].copy_(v)
    masking.enforce(model)
    return model


class RewindCapture(Callback):
    """Records the rewind point: before training (``step=0``) or after ``step`` optimizer steps."""

    def __init__(self, step: int):
        self.step = step
        self.state: Optional[Dict[str, torch.Tensor]] = None

    def on_train_begin(self, state: TrainState) -> None:
        if self.step == 0:
            self.state = capture_state(state.model)

    def on_step_end(self, state: TrainState) -> None:
        if state.step == self.step and self.state is None:
            self.state = capture_state(state.model)


# ----------------------------------------------------------------------------- results

@dataclass
class LotteryRound:
    round: int                           # 0: dense (or as given) training; 1..: pruning rounds
    target: float                        # the scheduled sparsity
    sparsity: float                      # achieved, over the pruned tensors
    steps: int
    loss: float                          # last training loss
    accuracy: Optional[float] = None     # on eval_loader, after training
    reinit_accuracy: Optional[float] = None
    reinit_loss: Optional[float] = None


@dataclass
class LotteryResult:
    model: nn.Module                               # the ticket, trained at the last round's sparsity
    rounds: List[LotteryRound]
    rewind_step: int
    rewind_state: Dict[str, torch.Tensor]
    plans: List[Plan] = field(default_factory=list)  # masks after each pruning round (rounds 1..)
    reinit_model: Optional[nn.Module] = None       # the last round's re-init control, if reinit=True

    def summary(self) -> List[Dict[str, Any]]:
        return [{k: v for k, v in asdict(r).items() if v is not None} for r in self.rounds]

    def record(self, meta: Optional[Dict[str, Any]] = None) -> "LotteryRecord":
        """The numbers of this run (no model, no tensors), with ``meta`` (model, data, settings...)."""
        return LotteryRecord(copy.deepcopy(self.rounds), self.rewind_step, dict(meta or {}))

    def to_json(self, meta: Optional[Dict[str, Any]] = None) -> str:
        return self.record(meta).to_json()

    def save(self, path: Union[str, os.PathLike], *, meta: Optional[Dict[str, Any]] = None) -> Path:
        """Write ``lottery.json`` (see :class:`LotteryRecord`); models are saved with :func:`prunekit.save`."""
        return self.record(meta).save(path)


_ROUND_FIELDS = ("round", "target", "sparsity", "steps", "loss", "accuracy", "reinit_accuracy", "reinit_loss")
_FRACTIONS = ("target", "sparsity", "accuracy", "reinit_accuracy")


def _finite_or_none(value: Any) -> Any:
    # JSON has no NaN: a loss that was never measured (no training step) is written as null
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass
class LotteryRecord:
    """What ``lottery.json`` holds: every round's numbers, the rewind step and free-form ``meta``.

    Format ``prunekit.lottery/1``::

        {"format": "prunekit.lottery/1", "rewind_step": 200,
         "rounds": [{"round": 0, "target": 0.0, "sparsity": 0.0, "steps": 469, "loss": 0.05,
                     "accuracy": 0.982, "reinit_accuracy": null, "reinit_loss": null}, ...],
         "meta": {"model": "lenet300", "data": "mnist", "seed": 0, ...}}

    Round 0 is the dense training (the reference); fractions are in [0, 1];
    ``null`` marks what was not measured.
    """

    rounds: List[LotteryRound]
    rewind_step: int
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def dense_accuracy(self) -> Optional[float]:
        """Round 0's accuracy: the reference the pruned rounds are compared with."""
        return self.rounds[0].accuracy if self.rounds else None

    def points(self) -> List[Dict[str, Any]]:
        """One dict per pruning round: target, sparsity, ticket and re-init accuracy, ticket advantage (pp)."""
        out = []
        for r in self.rounds[1:]:
            gap = None if r.accuracy is None or r.reinit_accuracy is None else 100.0 * (r.accuracy - r.reinit_accuracy)
            out.append({"round": r.round, "target": r.target, "sparsity": r.sparsity, "ticket": r.accuracy,
                        "reinit": r.reinit_accuracy, "advantage_pp": gap})
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"format": FORMAT, "rewind_step": self.rewind_step,
                "rounds": [{k: _finite_or_none(v) for k, v in asdict(r).items()} for r in self.rounds],
                "meta": self.meta}

    def to_json(self) -> str:
        try:
            return json.dumps(self.to_dict(), indent=1, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise PrunekitError(f"lottery record is not JSON-safe (meta must hold plain numbers, strings, "
                             f"lists and dicts): {e}") from e

    def save(self, path: Union[str, os.PathLike]) -> Path:
        path = Path(path)
        text = self.to_json()  # before touching the file: a bad meta leaves no half-written file
        atomic_write_text(path, text)  # the report never reads half a file
        return path

    @classmethod
    def from_dict(cls, d: Any) -> "LotteryRecord":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PrunekitError(f"not a prunekit lottery record: expected format {FORMAT!r}")
        try:
            rounds = [_round_from_dict(r) for r in d["rounds"]]
            rec = cls(rounds, int(d["rewind_step"]), dict(d.get("meta") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PrunekitError(f"malformed lottery record: {e}") from e
        if not rounds or [r.round for r in rounds] != list(range(len(rounds))):
            raise PrunekitError("malformed lottery record: rounds must be numbered 0, 1, 2, ... in order")
        return rec

    @classmethod
    def from_json(cls, text: str) -> "LotteryRecord":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrunekitError(f"not a prunekit lottery record (invalid JSON: {e})") from e
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "LotteryRecord":
        return cls.from_json(Path(path).read_text())


def _round_from_dict(d: Dict[str, Any]) -> LotteryRound:
    unknown = sorted(set(d) - set(_ROUND_FIELDS))
    if unknown:
        raise PrunekitError(f"unknown round field(s) {', '.join(unknown)}; allowed: {', '.join(_ROUND_FIELDS)}")

    def num(key: str, required: bool = False) -> Optional[float]:
        v = d[key] if required else d.get(key)
        if v is None:
            if required:
                raise PrunekitError(f"round {d.get('round')}: {key} is missing")
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidTypeError(f"round {d.get('round')}: {key}={v!r} is not a number")
        if key in _FRACTIONS and not 0.0 <= v <= 1.0:
            raise PrunekitError(f"round {d.get('round')}: {key}={v!r} is not a fraction in [0, 1]")
        return float(v)

    loss = num("loss")
    return LotteryRound(int(d["round"]), num("target", True), num("sparsity", True), int(d["steps"]),
                        math.nan if loss is None else loss, num("accuracy"), num("reinit_accuracy"),
                        num("reinit_loss"))


# ----------------------------------------------------------------------------- the loop

def _fresh_copy(template: nn.Module, factory: Optional[Callable[[], nn.Module]], seed: int) -> nn.Module:
    """A new random initialisation of the same architecture, without masks."""
    torch.manual_seed(seed)
    if factory is not None:
        return factory()
    fresh = masking.remove(copy.deepcopy(template))
    for m in fresh.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return fresh


def _check_resettable(model: nn.Module) -> None:
    """Every parameter must be re-drawn by its module's reset_parameters, or the control is not random."""
    bad = [f"{mn}.{pn}" if mn else pn for mn, m in model.named_modules()
           for pn, p in m._parameters.items() if p is not None and not hasattr(m, "reset_parameters")]
    if bad:
        raise PrunekitError(f"reinit=True cannot re-initialise {', '.join(bad[:5])} (their modules have no "
                         "reset_parameters): pass a model factory (a function returning a new model) instead")


def _rewind_step(rewind: Union[str, int], steps_per_round: int) -> int:
    if rewind == "init":
        return 0
    if isinstance(rewind, bool) or not isinstance(rewind, int) or rewind < 0:
        raise PrunekitError(f"rewind={rewind!r} must be 'init' or an int number of optimizer steps >= 0")
    if rewind >= steps_per_round:
        raise PrunekitError(f"rewind={rewind} steps is not inside round 0's training ({steps_per_round} steps); "
                         "rewind to an early step, or train more epochs per round")
    return rewind


def _validate(train_loader, epochs_per_round, criterion, scope, train_kwargs) -> int:
    if isinstance(epochs_per_round, bool) or not isinstance(epochs_per_round, int) or epochs_per_round < 1:
        raise PrunekitError(f"epochs_per_round={epochs_per_round!r} must be an int >= 1")
    get_criterion(criterion)
    check_choice(scope, SCOPES, "scope")
    bad = sorted(set(train_kwargs) & set(_RESERVED))
    if bad:
        raise PrunekitError(f"lottery_ticket sets {', '.join(bad)} itself; use epochs_per_round and callbacks")
    make_optimizer(train_kwargs.get("optimizer", "sgd"), [torch.zeros(1, requires_grad=True)], lr=0.1)
    lr_factor(train_kwargs.get("lr_schedule", "cosine"), 0, 1)
    steps = epochs_per_round * len(train_loader)
    return min(steps, train_kwargs["max_steps"]) if train_kwargs.get("max_steps") is not None else steps


def _train(model, loader, epochs, seed, callbacks, desc, progress, train_kwargs, eval_loader):
    torch.manual_seed(seed)  # the same seed gives the same run, round by round
    st = finetune(model, loader, epochs=epochs, callbacks=callbacks, desc=desc, progress=progress, **train_kwargs)
    acc = None
    if eval_loader is not None:

        acc = evaluate(model, eval_loader)["accuracy"]
    return st, acc


def lottery_ticket(model: ModelOrFactory, train_loader, *, rounds: Optional[int] = None,
                   final_sparsity: Optional[float] = None, per_round: Optional[float] = None,
                   sparsities: Optional[Sequence[float]] = None, rewind: Union[str, int] = "init",
                   epochs_per_round: int = 1, criterion: Union[str, Criterion] = "l1", scope: str = "global",
                   seed: int = 0, reinit: bool = False, reinit_seed: Optional[int] = None, eval_loader=None,
                   callbacks: Sequence[Callback] = (), prune_kwargs: Optional[Dict[str, Any]] = None,
                   progress: Optional[bool] = None, **train_kwargs: Any) -> LotteryResult:
    """Iterative magnitude pruning with rewinding; returns the trained ticket and per-round records.

    ``model``: an untrained ``nn.Module`` (trained in place; its weights now are
    "init") or a function returning one (called under ``torch.manual_seed(seed)``).
    The schedule is ``rounds`` with ``final_sparsity`` or ``per_round`` (see
    :func:`imp_schedule`), or an explicit increasing list ``sparsities``.
    ``rewind``: ``"init"`` or a number of optimizer steps into round 0.
    ``prune_kwargs`` go to :func:`prunekit.prune` (include, min_keep, ...);
    ``train_kwargs`` to :func:`prunekit.train.loop` (lr, optimizer, ...);
    ``callbacks`` are passed to every round's training. The re-init control
    uses ``reinit_seed`` (default ``seed + 1``).
    """
    schedule = _schedule(rounds, final_sparsity, per_round, sparsities)
    steps = _validate(train_loader, epochs_per_round, criterion, scope, train_kwargs)
    k = _rewind_step(rewind, steps)
    factory = None if isinstance(model, nn.Module) else model
    if factory is not None:
        if not callable(factory):
            raise InvalidTypeError(f"model must be an nn.Module or a function returning one, got {type(model).__name__}")
        torch.manual_seed(seed)
        model = factory()
    if reinit and factory is None:
        _check_resettable(model)
    pk = {"criterion": criterion, "scope": scope, "seed": seed, **(prune_kwargs or {})}
    names = plan_pruning(model, schedule[0], **pk).meta["targets"]  # checks prune_kwargs before any training
    capture = RewindCapture(k)
    show = progress_enabled(progress)
    result = LotteryResult(model, [], k, {})
    with tqdm(total=len(schedule) + 1, desc="lottery", disable=not show, leave=False) as bar:
        st, acc = _train(model, train_loader, epochs_per_round, seed, [capture, *callbacks],
                         "lottery round 0", progress, train_kwargs, eval_loader)
        result.rewind_state = capture.state
        result.rounds.append(LotteryRound(0, global_sparsity(model, names), global_sparsity(model, names),
                                          st.step, st.loss, acc))
        bar.update(1)
        for r, target in enumerate(schedule, 1):
            _round(result, r, target, names, pk, train_loader, epochs_per_round, seed, callbacks, progress,
                   train_kwargs, eval_loader, (factory, reinit_seed if reinit_seed is not None else seed + 1)
                   if reinit else None)
            bar.update(1)
            bar.set_postfix(sparsity=f"{target:.3f}", acc="-" if result.rounds[-1].accuracy is None
                            else f"{result.rounds[-1].accuracy:.4f}")
    return result


def _round(result: LotteryResult, r, target, names, pk, loader, epochs, seed, callbacks, progress, train_kwargs,
           eval_loader, control) -> None:
    """One pruning round: prune survivors by magnitude, (train the re-init control,) rewind, train."""
    model = result.model
    prune(model, target, **pk)  # ranks the trained weights; earlier pruned ones stay pruned
    plan = current_plan(model)
    result.plans.append(plan)
    row = LotteryRound(r, target, global_sparsity(model, names), 0, math.nan)
    if control is not None:
        factory, rseed = control
        twin = masking.apply(_fresh_copy(model, factory, rseed), plan)  # same masks, new random weights
        cst, row.reinit_accuracy = _train(twin, loader, epochs, seed + r, (), f"re-init control {r}", progress,
                                          train_kwargs, eval_loader)
        row.reinit_loss = cst.loss
        result.reinit_model = twin
    rewind_to(model, result.rewind_state)
    st, row.accuracy = _train(model, loader, epochs, seed + r, list(callbacks), f"lottery round {r}", progress,
                              train_kwargs, eval_loader)
    row.steps, row.loss = st.step, st.loss
    result.rounds.append(row)
