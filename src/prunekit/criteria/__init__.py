"""Criteria: plain callables that score the entries of one tensor.

A criterion has the signature ``fn(param, ctx) -> scores`` where ``scores`` has
the shape of ``param`` and *low* means *prune first*. Structured patterns reduce
these elementwise scores over each slice (see :mod:`prunekit.plan`), so one
criterion serves every pattern.

Register your own with one decorator::

    @prunekit.register_criterion("my_score")
    def my_score(param, ctx):
        return param.detach().abs() * ctx.stats.get("weight", 1.0)

A criterion may also expose ``fn.elementwise(chunk, out)`` when its score is a
pure elementwise function of the tensor: global ranking then computes it chunk
by chunk instead of materialising whole score tensors (this is what keeps the
global threshold fast and light on 100M-parameter models).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from ..registry import Registry

CRITERIA = Registry("criterion")
register_criterion = CRITERIA.register

Criterion = Callable[[torch.Tensor, "ScoreContext"], torch.Tensor]


@dataclass
class ScoreContext:
    """What a criterion may look at besides the tensor itself."""

    name: str                                  # dotted parameter name, e.g. "features.3.weight"
    module: Optional[nn.Module] = None         # the module owning the parameter
    seed: int = 0
    stats: Dict[str, Any] = field(default_factory=dict)  # data-aware criteria put their statistics here

    def generator(self) -> torch.Generator:
        """A generator seeded by (seed, name): same seed → same scores, independent per tensor."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(self.name.encode()))


def get_criterion(name_or_fn) -> Criterion:
    if callable(name_or_fn):
        return name_or_fn
    return CRITERIA.get(name_or_fn)


def _abs_into(chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.abs(chunk, out=out)


@register_criterion("l1")
def l1_magnitude(param: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """|w|: the magnitude criterion (Han et al. 2015). Structured: the Ln norm of each slice."""
    return param.detach().abs()


l1_magnitude.elementwise = _abs_into
register_criterion("magnitude")(l1_magnitude)


@register_criterion("random")
def random_scores(param: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """Uniform random scores, seeded per tensor; a baseline every method must beat.

    Reduced over slices the i.i.d. scores still give a uniformly random order of
    slices, so the same criterion serves structured pruning.
    """
    return torch.rand(param.shape, generator=ctx.generator(), dtype=torch.float32)


# Data-aware criteria: registered on import; their statistics come from collect() / calibrate().
from .calibrate import COLLECTORS, calibrate, collect, register_collector  # noqa: E402,F401 (re-exports)
from . import taylor, wanda  # noqa: E402,F401
from .rowwise import select_rows  # noqa: E402,F401 (re-export)
