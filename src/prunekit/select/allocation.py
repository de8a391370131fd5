"""Per-layer sparsities for a total target: how much each tensor gives when the ranking itself is per layer
or per row (Wanda, Taylor, SparseGPT), so that small, sensitive layers are not pruned as hard as big ones.

- ``uniform``: every tensor at the target (the criteria's usual rule);
- ``magnitude``: the sparsities one global ``|w|`` ranking would give (what makes global magnitude pruning
  strong on CNNs, where a 3x3 first conv cannot lose 90% of its weights);
- ``sensitivity`` / least loss (:func:`least_cost_allocation`): given each tensor's measured cost at a few sparsities (a
  sensitivity analysis; the sequential LLM pruner's per-block errors; for ``prunekit.prune`` each layer's
  calibration loss pruned alone by the criterion itself, :mod:`prunekit.select.probe`), the sparsities that meet
  the target with the least summed cost (piecewise-linear curves, their lower convex hulls walked greedily);
- ``owl``: outlier-weighted layerwise sparsity (Yin et al. 2024): a tensor whose scores have more outliers
  (entries above ``OWL_M`` times the tensor's mean score) keeps more, within ``target ± OWL_LAMBDA``.

Both non-uniform rules keep the parameter-weighted mean at the target.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from prunekit.criteria.score import Elementwise
from prunekit.errors import PrunekitError
from prunekit.select.amount import Amount, resolve_amount
from prunekit.select.ranking import select
from prunekit.select.sources import ScoreLike, as_source
from prunekit.select.threshold import full_scores

ALLOCATIONS = ("uniform", "magnitude", "owl", "sensitivity")
OWL_M = 5.0        # an outlier: a score above 5x its tensor's mean (the paper's M)
OWL_LAMBDA = 0.08  # sparsities stay within target ± 0.08 (the paper's lambda)


def _abs_into(chunk: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.abs(chunk, out=out)


def magnitude_allocation(weights: Mapping[str, torch.Tensor], amount: float, min_keep: Amount) -> Dict[str, float]:
    """``{name: sparsity}`` of one global magnitude ranking over ``weights`` (with the per-layer floor)."""
    plan = select({n: Elementwise(w.detach(), _abs_into) for n, w in weights.items()}, amount, scope="global",
                  min_keep=min_keep)
    return {n: tp.sparsity for n, tp in plan.tensors.items()}


def owl_allocation(scores: Mapping[str, ScoreLike], amount: float, sizes: Mapping[str, int], *,
                   m: float = OWL_M, lam: float = OWL_LAMBDA) -> Dict[str, float]:
    """``{name: sparsity}``: more outliers (scores above ``m`` times their mean), lower sparsity, within
    ``amount ± lam``, the size-weighted mean equal to ``amount``."""
    ratios = {}
    for n, s in scores.items():
        full = full_scores(as_source(s)).float()
        finite = full[torch.isfinite(full)]
        mean = float(finite.mean()) if finite.numel() else 0.0
        ratios[n] = float((finite > m * mean).float().mean()) if finite.numel() else 0.0
    lo, hi = min(ratios.values()), max(ratios.values())
    span = hi - lo
    raw = {n: amount + lam - 2 * lam * ((r - lo) / span if span > 0 else 0.5) for n, r in ratios.items()}
    total = sum(sizes.values())
    shift = amount - sum(raw[n] * sizes[n] for n in raw) / total   # back to the target on average
    return {n: min(max(v + shift, 0.0), 0.999) for n, v in raw.items()}


def check_fraction(allocation: str, amount: object) -> None:
    """An allocation spreads a fraction over the layers: an int count (or anything else) is refused."""
    if isinstance(amount, bool) or not isinstance(amount, float):
        raise PrunekitError(f"allocation={allocation!r} spreads a fraction over the layers; amount={amount!r} is "
                            "not a fraction in [0, 1)")
    resolve_amount(amount, 1)


def check_allocation(allocation: str, scope: str) -> None:
    if allocation not in ALLOCATIONS:
        raise PrunekitError(f"unknown allocation {allocation!r}; allowed: {', '.join(ALLOCATIONS)}")
    if allocation != "uniform" and scope == "global":
        raise PrunekitError(f"allocation={allocation!r} sets per-layer sparsities; scope='global' ranks every "
                            "layer together already: use scope='layer' or 'row' with it")


# ----------------------------------------------------------------------------- least-cost allocation

Curve = List[Tuple[float, float]]   # (sparsity, cost) points, sparsity increasing, from the current sparsity


def interp(pts: Sequence[Tuple[float, float]], s: float) -> float:
    """The piecewise-linear curve ``pts`` at sparsity ``s`` (flat outside its range)."""
    if s <= pts[0][0]:
        return pts[0][1]
    for (s0, c0), (s1, c1) in zip(pts, pts[1:]):
        if s <= s1:
            return c0 + (c1 - c0) * (s - s0) / (s1 - s0)
    return pts[-1][1]


def _truncate(pts: Curve, cap: float) -> Curve:
    """The curve up to sparsity ``cap`` (interpolated there)."""
    if cap <= pts[0][0]:
        return [pts[0]]
    kept = [p for p in pts if p[0] < cap - 1e-12]
    return kept + [(cap, interp(pts, cap))] if cap < pts[-1][0] else pts


def _lower_hull(pts: Curve) -> Curve:
    """Lower convex hull of points sorted by x (Andrew's monotone chain)."""
    hull: Curve = []
    for p in pts:
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = hull[-2], hull[-1]
            if (x1 - x0) * (p[1] - y0) - (y1 - y0) * (p[0] - x0) <= 0:  # hull[-1] is on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def least_cost_allocation(curves: Mapping[str, Curve], weights: Mapping[str, float], target: float,
                          caps: Mapping[str, float]) -> Dict[str, float]:
    """``{name: sparsity}`` with weighted mean ``target`` and the least summed cost.

    Each curve starts at the tensor's current sparsity (cost 0 there) and is used up to ``caps[name]``;
    between measured points the cost is interpolated, and the greedy walk over the lower convex hulls'
    segments (cheapest cost per weight first) is optimal for those convexified curves. Deterministic.
    """
    hulls = {n: _lower_hull(_truncate(curves[n], caps[n])) for n in curves}
    alloc = {n: h[0][0] for n, h in hulls.items()}
    total = sum(weights[n] for n in curves)
    need = target * total - sum(weights[n] * alloc[n] for n in alloc)
    reach = sum(weights[n] * (h[-1][0] - h[0][0]) for n, h in hulls.items())
    if need > reach + 1e-9 * total:
        best = sum(weights[n] * h[-1][0] for n, h in hulls.items()) / total
        raise PrunekitError(f"target={target} cannot be reached: at most {best:.4f}")
    order = list(curves)
    segments = sorted(((c1 - c0) / (s1 - s0) / weights[n] if weights[n] > 0 else math.inf, s0, order.index(n), s1)
                      for n, h in hulls.items() for (s0, c0), (s1, c1) in zip(h, h[1:]))
    for _, s0, i, s1 in segments:
        if need <= 0:
            break
        n = order[i]
        step = min(s1 - s0, need / weights[n]) if weights[n] > 0 else 0.0
        alloc[n] = s0 + step
        need -= weights[n] * step
    return alloc
