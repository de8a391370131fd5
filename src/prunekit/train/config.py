"""How to train: the options of :func:`~prunekit.train.loop.finetune` that travel together.

Recipes, gradual and iterative pruning, distillation and ``advise`` all hand the same training options
to the loop; they pass one :class:`TrainConfig` (validated when built, before any step runs) instead
of relaying keyword arguments. ``finetune(model, loader, epochs=2, lr=0.01)`` still works: the keywords
build (or override) a config.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Union

from prunekit._util import check_choice
from prunekit.errors import PrunekitError

OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "linear")


def _positive_int(value: Any, what: str, allow_none: bool = False, unit: str = "an int") -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise PrunekitError(f"{what}={value!r} must be {unit} >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Training options (see :func:`prunekit.finetune`): length, optimizer, checkpointing, distribution."""

    epochs: int = 1
    max_steps: Optional[int] = None
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    progress: Optional[bool] = None
    checkpoint: Optional[Union[str, os.PathLike]] = None
    checkpoint_every: Optional[int] = None
    resume: bool = True
    distributed: Optional[bool] = None

    def __post_init__(self) -> None:
        _positive_int(self.epochs, "epochs")
        _positive_int(self.max_steps, "max_steps", allow_none=True)
        check_choice(self.optimizer, OPTIMIZERS, "optimizer")
        check_choice(self.lr_schedule, LR_SCHEDULES, "lr_schedule")
        for what in ("lr", "momentum", "weight_decay"):
            v = getattr(self, what)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v >= 0:
                raise PrunekitError(f"{what}={v!r} must be a number >= 0")
        if self.checkpoint_every is not None:
            _positive_int(self.checkpoint_every, "checkpoint_every", unit="a number of steps")
            if self.checkpoint is None:
                raise PrunekitError("checkpoint_every needs checkpoint=<file> to write to")


TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))


def train_config(config: Optional[TrainConfig] = None, options: Optional[Mapping[str, Any]] = None,
                 **defaults: Any) -> TrainConfig:
    """``config`` (or a fresh one with ``defaults``) overridden by ``options``; unknown names are refused."""
    options = dict(options or {})
    unknown = [k for k in options if k not in TRAIN_FIELDS]
    if unknown:
        raise PrunekitError(f"unknown training option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                            f"allowed: {', '.join(TRAIN_FIELDS)}")
    if config is None:
        return TrainConfig(**{**defaults, **options})
    if not isinstance(config, TrainConfig):
        raise PrunekitError(f"config must be a prunekit.train.TrainConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **options) if options else config
