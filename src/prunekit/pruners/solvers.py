"""Layer solvers: how one linear layer is pruned from its calibration statistics.

The sequential pruner (:mod:`prunekit.pruners.sequential`) walks a model block by block and hands each
linear layer, viewed as an ``(out, in)`` matrix, to a solver looked up by name here:

- ``magnitude``: the lowest ``|W|`` of the whole layer (no data; the usual LLM baseline);
- ``wanda``: ``|W_ij| * ||X_j||`` compared within each output row (Sun et al. 2023);
- ``sparsegpt``: Optimal-Brain-Surgeon pruning that also updates the kept weights (Frantar & Alistarh 2023).

Each declares the statistic it needs from the layer's inputs (``none``, ``norms``: the mean square of each
input feature, or ``hessian``: ``X^T X / rows``), so the driver collects only that. N:M keeps the N best of
every M consecutive inputs of a row with every solver.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from prunekit.pruners.sparsegpt import obs_prune
from prunekit.registry import Registry
from prunekit.select.nm import nm_keep
from prunekit.select.ranking import select
from prunekit.select.rows import select_rows

SOLVERS = Registry("layer solver")
STATS = ("none", "norms", "hessian")


@dataclass(frozen=True)
class Target:
    """One layer's goal: a sparsity (fraction of the layer) or an N:M pattern, plus solver options."""

    sparsity: Optional[float] = None
    nm: Optional[Tuple[int, int]] = None
    blocksize: int = 128
    damp: float = 0.01


class Solver:
    """``solve(name, W, stat, target, keep)`` -> (new W or None when kept weights are unchanged, keep mask)."""

    stats: str = "none"

    def solve(self, name: str, W: torch.Tensor, stat: Optional[torch.Tensor], target: Target,
              keep: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        raise NotImplementedError


def _keep_from_scores(name: str, scores: torch.Tensor, target: Target, keep: Optional[torch.Tensor],
                      per_row: bool) -> torch.Tensor:
    if target.nm is not None:
        mask = nm_keep(scores, *target.nm, name)
        return mask if keep is None else mask & keep
    current = None if keep is None else {name: keep}
    if per_row:
        plan = select_rows({name: scores}, target.sparsity, min_keep=0, current=current)
    else:
        plan = select({name: scores}, target.sparsity, scope="layer", min_keep=0, current=current)
    return plan.tensors[name].keep_mask().reshape(scores.shape)


@SOLVERS.register("magnitude")
class MagnitudeSolver(Solver):
    stats = "none"

    def solve(self, name, W, stat, target, keep):
        return None, _keep_from_scores(name, W.abs(), target, keep, per_row=False)


@SOLVERS.register("wanda")
class WandaSolver(Solver):
    stats = "norms"

    def solve(self, name, W, stat, target, keep):
        scores = W.abs().float() * stat.sqrt().float().reshape(1, -1)
        return None, _keep_from_scores(name, scores, target, keep, per_row=True)


@SOLVERS.register("sparsegpt")
class SparseGPTSolver(Solver):
    stats = "hessian"

    def solve(self, name, W, stat, target, keep):
        new, mask, _ = obs_prune(W, stat, target.sparsity, nm=target.nm, blocksize=target.blocksize,
                                 damp=target.damp, keep=keep)
        return new, mask


def get_solver(name: str) -> Solver:
    return SOLVERS.get(name)()
