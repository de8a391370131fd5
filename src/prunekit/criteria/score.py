"""Scores for the selection stage: lazy, shaped like their tensor, never all held at once.

``compute_scores(model, names, criterion)`` gives one score source per tensor: an
:class:`Elementwise` (chunked, for criteria that declare an elementwise form) or a
:class:`LazyScores` (computed on demand and checked against the tensor's shape).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from prunekit.criteria.base import Criterion, ScoreContext, ScoreFn, get_criterion
from prunekit.errors import PrunekitError, UnknownNameError


@dataclass(frozen=True)
class Elementwise:
    """Scores that are an elementwise function of one tensor, e.g. ``|w|``.

    They are computed chunk by chunk into one reused buffer: materialising a
    full score tensor per pass costs more (page faults of a fresh allocation)
    than the comparisons themselves.
    """

    tensor: torch.Tensor
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (chunk, out) -> out

    def numel(self) -> int:
        return self.tensor.numel()



@dataclass(frozen=True)
class LazyScores:
    """Scores computed on demand; ``shape`` is known without computing them (select() validates with it)."""

    shape: Tuple[int, ...]
    compute: Callable[[], torch.Tensor]

    def __call__(self) -> torch.Tensor:
        return self.compute()


def _checked(crit: Criterion, param: torch.Tensor, ctx: ScoreContext) -> LazyScores:
    def scores() -> torch.Tensor:
        s = crit.score(param, ctx)
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(param.shape):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise PrunekitError(f"criterion {crit.name!r} returned {got} for {ctx.name}; expected a tensor of "
                                f"shape {tuple(param.shape)}")
        return s.detach().float()
    return LazyScores(tuple(param.shape), scores)


ScoreSource = Union[torch.Tensor, Elementwise, LazyScores]


def compute_scores(model: nn.Module, names: Sequence[str], criterion: Union[str, ScoreFn, Criterion] = "l1", *,
                   seed: int = 0, stats: Optional[Mapping[str, Dict[str, Any]]] = None) -> Dict[str, ScoreSource]:
    """Lazy scores per parameter: recomputed on demand, never all held at once."""
    crit = get_criterion(criterion)
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied tensor answers to every name
    modules = dict(model.named_modules(remove_duplicate=False))
    out: Dict[str, ScoreSource] = {}
    for name in names:
        if name not in params:
            raise UnknownNameError(f"unknown parameter {name!r}")
        p = params[name]
        if crit.elementwise is not None:
            out[name] = Elementwise(p, crit.elementwise)
            continue
        ctx = ScoreContext(name, modules.get(name.rpartition(".")[0]), seed, dict((stats or {}).get(name, {})))
        out[name] = _checked(crit, p, ctx)
    return out
