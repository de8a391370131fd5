"""The criterion contract and its registry.

A :class:`Criterion` scores the entries of one tensor: ``score(param, ctx)`` returns a
tensor shaped like ``param`` where *low* means *prune first*. Structured patterns reduce
these elementwise scores over each slice (see :mod:`prunekit.select`), so one criterion
serves every pattern. What a criterion needs is declared on it, never inferred from its
name:

- ``needs_data``: it scores from calibration statistics (``ctx.stats``), which the
  statistics ``collector`` of that name gathers (:mod:`prunekit.criteria.stats`);
- ``elementwise``: ``fn(chunk, out) -> out`` when the score is a pure elementwise function
  of the tensor; global ranking then scores chunk by chunk instead of materialising whole
  score tensors (what keeps the global threshold fast and light on 100M-parameter models).

Register your own with one decorator; the decorated function becomes a Criterion::

    @prunekit.register_criterion("my_score")
    def my_score(param, ctx):
        return param.detach().abs() * ctx.stats.get("weight", 1.0)
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Union

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.registry import Registry

ScoreFn = Callable[[torch.Tensor, "ScoreContext"], torch.Tensor]
ElementwiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

CRITERIA = Registry("criterion")


@dataclass
class ScoreContext:
    """What a criterion may look at besides the tensor itself."""

    name: str                                  # dotted parameter name, e.g. "features.3.weight"
    module: Optional[nn.Module] = None         # the module owning the parameter
    seed: int = 0
    stats: Dict[str, Any] = field(default_factory=dict)  # data-aware criteria find their statistics here

    def generator(self) -> torch.Generator:
        """A generator seeded by (seed, name): same seed → same scores, independent per tensor."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(self.name.encode()))


@dataclass(frozen=True)
class Criterion:
    """A scoring rule with its needs declared (see the module docstring)."""

    name: str
    fn: ScoreFn
    needs_data: bool = False
    collector: Optional[str] = None            # the statistics collector that feeds it (needs_data only)
    elementwise: Optional[ElementwiseFn] = None

    def __post_init__(self) -> None:
        if self.needs_data and self.collector is None:
            object.__setattr__(self, "collector", self.name)  # a data-aware criterion's collector shares its name
        if self.collector is not None and not self.needs_data:
            raise PrunekitError(f"criterion {self.name!r} names a collector but does not declare needs_data=True")

    def score(self, param: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
        return self.fn(param, ctx)

    __call__ = score  # a registered criterion still calls like the function it was made from


def register_criterion(name: Optional[str] = None, *, needs_data: bool = False, collector: Optional[str] = None,
                       elementwise: Optional[ElementwiseFn] = None, overwrite: bool = False):
    """Decorator: register ``fn(param, ctx) -> scores`` as a :class:`Criterion` (returned in its place)."""

    def deco(fn: Union[ScoreFn, Criterion]) -> Criterion:
        crit = fn if isinstance(fn, Criterion) else Criterion(name or fn.__name__, fn, needs_data, collector,
                                                               elementwise)
        CRITERIA.register(name or crit.name, overwrite=overwrite)(crit)
        return crit

    return deco


def get_criterion(criterion: Union[str, ScoreFn, Criterion]) -> Criterion:
    """A registered name, a Criterion, or a plain ``fn(param, ctx)`` (taken as a criterion needing no data)."""
    if isinstance(criterion, Criterion):
        return criterion
    if callable(criterion):
        return Criterion(getattr(criterion, "__name__", "custom"), criterion)
    return CRITERIA.get(criterion)


def criterion_name(criterion: Union[str, ScoreFn, Criterion]) -> str:
    """The name a plan records for a criterion given as a name, a Criterion or a function."""
    return criterion if isinstance(criterion, str) else get_criterion(criterion).name


def data_aware() -> list:
    """Names of the registered criteria that score from calibration statistics."""
    return [n for n in CRITERIA.names() if CRITERIA.get(n).needs_data]
