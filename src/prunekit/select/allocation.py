"""Per-layer sparsities for a total target: how much each tensor gives when the ranking itself is per layer
or per row (Wanda, Taylor, SparseGPT), so that small, sensitive layers are not pruned as hard as big ones.

- ``uniform``: every tensor at the target (the criteria's usual rule);
- ``magnitude``: the sparsities one global ``|w|`` ranking would give (what makes global magnitude pruning
  strong on CNNs, where a 3x3 first conv cannot lose 90% of its weights);
- ``owl``: outlier-weighted layerwise sparsity (Yin et al. 2024): a tensor whose scores have more outliers
  (entries above ``OWL_M`` times the tensor's mean score) keeps more, within ``target ± OWL_LAMBDA``.

Both non-uniform rules keep the parameter-weighted mean at the target.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from prunekit.criteria.score import Elementwise
from prunekit.errors import PrunekitError
from prunekit.select.amount import Amount
from prunekit.select.ranking import select
from prunekit.select.sources import ScoreLike, as_source
from prunekit.select.threshold import full_scores

ALLOCATIONS = ("uniform", "magnitude", "owl")
OWL_M = 5.0        # an outlier: a score above 5x its tensor's mean (the paper's M)
OWL_LAMBDA = 0.08  # sparsities stay within target ± 0.08 (the paper's lambda)


def _abs_into(chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.abs(chunk, out=out)


def magnitude_allocation(weights: Mapping[str, torch.Tensor], amount: float, min_keep: Amount) -> Dict[str, float]:
    """``{name: sparsity}`` of one global magnitude ranking over ``weights`` (with the per-layer floor)."""
    plan = select({n: Elementwise(w.detach(), _abs_into) for n, w in weights.items()}, amount, scope="global",
                  min_keep=min_keep)
    return {n: tp.sparsity for n, tp in plan.tensors.items()}


def owl_allocation(scores: Mapping[str, ScoreLike], amount: float, sizes: Mapping[str, int]) -> Dict[str, float]:
    """``{name: sparsity}``: more outliers, lower sparsity, the size-weighted mean equal to ``amount``."""
    ratios = {}
    for n, s in scores.items():
        full = full_scores(as_source(s)).float()
        finite = full[torch.isfinite(full)]
        mean = float(finite.mean()) if finite.numel() else 0.0
        ratios[n] = float((finite > OWL_M * mean).float().mean()) if finite.numel() else 0.0
    lo, hi = min(ratios.values()), max(ratios.values())
    span = hi - lo
    raw = {n: amount + OWL_LAMBDA - 2 * OWL_LAMBDA * ((r - lo) / span if span > 0 else 0.5) for n, r in ratios.items()}
    total = sum(sizes.values())
    shift = amount - sum(raw[n] * sizes[n] for n in raw) / total   # back to the target on average
    return {n: min(max(v + shift, 0.0), 0.999) for n, v in raw.items()}


def check_allocation(allocation: str, scope: str) -> None:
    if allocation not in ALLOCATIONS:
        raise PrunekitError(f"unknown allocation {allocation!r}; allowed: {', '.join(ALLOCATIONS)}")
    if allocation != "uniform" and scope == "global":
        raise PrunekitError(f"allocation={allocation!r} sets per-layer sparsities; scope='global' ranks every "
                            "layer together already: use scope='layer' or 'row' with it")
