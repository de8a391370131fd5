"""What a training run carries (:class:`TrainState`) and the :class:`Callback` hooks that act on it."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn


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
