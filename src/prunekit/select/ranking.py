"""``select(scores, amount, scope=..., pattern=...)``: turn scores into a :class:`~prunekit.plan.Plan`.

- pattern ``"unstructured"``: a unit is one entry;
- pattern ``"structured"``: a unit is one slice along ``dim`` (a row/output neuron for ``dim=0``, an
  input feature/channel for ``dim=1``); slice scores are the Ln norm (``norm=1, 2, inf, ...``) of the
  elementwise scores;
- pattern ``"nm"``: in every group of M consecutive entries along the input dimension keep the N best
  (:mod:`prunekit.select.nm`); the amount is implied (1 - N/M).

Scope ``"layer"`` ranks within each tensor, ``"global"`` across all of them with one exact threshold
(:mod:`prunekit.select.threshold`) and a per-layer floor. ``amount`` is the *total* target: units already
pruned (``current`` masks) count towards it and always stay pruned.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from prunekit._util import check_choice
from prunekit.errors import PrunekitError
from prunekit.plan import Plan
from prunekit.select.amount import Amount, resolve_amount, resolve_floor
from prunekit.select.nm import parse_nm, select_nm
from prunekit.select.sources import ScoreLike, as_source, shape_of, tensor_plan, unit_count, with_current
from prunekit.select.threshold import count_split, full_scores, kth_smallest, masks_from_threshold

PATTERNS = ("unstructured", "structured", "nm")


SCOPES = ("layer", "global")








def slice_scores(scores: torch.Tensor, dim: int, norm: float, normalize: bool) -> torch.Tensor:
    """Ln norm of each slice along ``dim``; ``normalize`` divides by the slice size so that
    slices of layers with different fan-in compare fairly in global ranking."""
    d = dim % scores.dim()
    moved = scores.movedim(d, 0).reshape(scores.shape[d], -1)
    neg = torch.isneginf(moved).all(dim=1)          # fully pruned slices stay pruned
    x = moved.masked_fill(torch.isneginf(moved), 0).abs().double()
    if math.isinf(norm):
        out = x.amax(dim=1)
    else:
        out = x.pow(norm).sum(dim=1)
        if normalize:
            out = out / moved.shape[1]
        out = out.pow(1.0 / norm)
    return out.masked_fill(neg, -math.inf)


def _global_keep(sources: Dict[str, Any], k: int, floors: Dict[str, int]):
    """Global ranking with per-layer floors.

    Returns ({name: (packed keep, pruned count)}, {name: floor_hit}). A layer
    that the global threshold would take below its floor is fixed at the floor
    and the threshold is recomputed over the other layers, so the total target
    is still met exactly.
    """
    units = {n: unit_count(s) for n, s in sources.items()}
    fixed: Dict[str, int] = {}
    while True:
        pool = [n for n in sources if n not in fixed]
        k_pool = max(0, min(k - sum(fixed.values()), sum(units[n] for n in pool)))
        thr = kth_smallest([as_source(sources[n]) for n in pool], k_pool)
        ties, over = thr.ties, []
        for n, (below, eq) in zip(pool, count_split([as_source(sources[n]) for n in pool], thr)):
            take = min(ties, eq)
            ties -= take
            if units[n] - below - take < floors[n]:
                over.append(n)
        if not over:
            break
        for n in over:
            fixed[n] = units[n] - floors[n]
    keeps = dict(zip(pool, masks_from_threshold([as_source(sources[n]) for n in pool], thr)))
    for n, kn in fixed.items():
        keeps[n] = next(masks_from_threshold([as_source(sources[n])], kth_smallest([as_source(sources[n])], kn)))
    return keeps, {n: n in fixed for n in sources}






def _unit_scores(sources, pattern: str, dim: int, norm: float, normalize: bool):
    if pattern != "structured":
        return sources
    return {n: slice_scores(full_scores(as_source(s)), dim, norm, normalize) for n, s in sources.items()}


def _layer_keep(src, units: int, k: int, floor: int, forced: int) -> Tuple[Tuple[torch.Tensor, int], bool]:
    floor_hit = k > units - floor
    k = max(min(k, units - floor), forced)
    return next(masks_from_threshold([as_source(src)], kth_smallest([as_source(src)], k))), floor_hit


def _forced_units(keep: Optional[torch.Tensor], pattern: str, dim: int) -> int:
    if keep is None:
        return 0
    if pattern != "structured":
        return int((~keep).sum())
    return int((~keep).movedim(dim % keep.dim(), 0).reshape(keep.shape[dim], -1).all(dim=1).sum())


def _validate(scores, scope, pattern, dim, norm, nm, current):
    check_choice(scope, SCOPES, "scope")
    check_choice(pattern, PATTERNS, "pattern")
    if not scores:
        raise PrunekitError("nothing to prune: no tensors were selected")
    if pattern == "nm":
        parse_nm(nm)
    if pattern == "structured":
        if not (isinstance(norm, (int, float)) and norm > 0):
            raise PrunekitError(f"norm={norm!r} must be a positive number (1, 2, float('inf'), ...)")
        for name, sc in scores.items():
            nd = len(shape_of(sc))
            if not -nd <= dim < nd:
                raise PrunekitError(f"dim={dim} is out of range for {name} with {nd} dims (allowed "
                                 f"{-nd}..{nd - 1})")
    for name, keep in (current or {}).items():
        if name in scores and tuple(keep.shape) != shape_of(scores[name]):
            raise PrunekitError(f"current mask of {name} has shape {tuple(keep.shape)}, "
                             f"expected {shape_of(scores[name])}")


def amount_of(amount: Union[Amount, Mapping[str, Amount]], name: str) -> Amount:
    """The amount for one tensor: the same for all, or its own entry of a ``{name: amount}`` allocation."""
    return amount[name] if isinstance(amount, Mapping) else amount


def select(scores: Mapping[str, ScoreLike], amount: Optional[Amount] = None, *, scope: str = "layer",
           pattern: str = "unstructured", dim: int = 0, norm: float = 1.0,
           nm: Tuple[int, int] = (2, 4), min_keep: Amount = 0.01,
           current: Optional[Mapping[str, torch.Tensor]] = None,
           normalize: Optional[bool] = None) -> Plan:
    """Turn scores (low = prune first) into a Plan; see the module docstring."""
    _validate(scores, scope, pattern, dim, norm, nm, current)
    current = current or {}
    if pattern == "nm":
        return select_nm(scores, nm, current)
    if amount is None:
        raise PrunekitError("amount is required: a fraction in [0, 1) or an int count of units")
    if isinstance(amount, Mapping) and (scope == "global" or set(amount) != set(scores)):
        raise PrunekitError("per-tensor amounts ({name: fraction}) take scope='layer' and one entry per selected "
                            f"tensor; missing: {sorted(set(scores) - set(amount))[:5]}")
    normalize = (scope == "global") if normalize is None else normalize
    sources = {n: with_current(s, current.get(n)) for n, s in scores.items()}
    units_src = _unit_scores(sources, pattern, dim, norm, normalize)
    units = {n: unit_count(s) for n, s in units_src.items()}
    forced = {n: _forced_units(current.get(n), pattern, dim) for n in scores}
    floors = {n: resolve_floor(min_keep, u) for n, u in units.items()}
    notes: List[str] = []
    if scope == "global":
        k = resolve_amount(amount, sum(units.values()))
        k = max(k, sum(forced.values()))
        keeps, hits = _global_keep(units_src, k, floors)
    else:
        keeps, hits = {}, {}
        for n, src in units_src.items():
            keeps[n], hits[n] = _layer_keep(src, units[n], resolve_amount(amount_of(amount, n), units[n]),
                                            floors[n], forced[n])
    plan = Plan(meta={"scope": scope, "pattern": pattern, "amount": amount, "dim": dim, "norm": norm,
                      "min_keep": min_keep, "normalize": normalize})
    for n in scores:
        plan.tensors[n] = tensor_plan(n, shape_of(scores[n]), pattern, keeps[n], dim, hits[n])
        if hits[n]:
            notes.append(f"{n}: the per-layer floor (min_keep={min_keep}) kept "
                         f"{units[n] - plan.tensors[n].pruned_units} of {units[n]} units")
    wanted = (resolve_amount(amount, sum(units.values())) if scope == "global"
              else sum(resolve_amount(amount_of(amount, n), u) for n, u in units.items()))
    plan.notes = notes + _shortfall(plan, wanted, units, min_keep)
    for note in plan.notes[len(notes):]:
        warnings.warn(note, PruningShortfall, stacklevel=3)
    return plan


class PruningShortfall(UserWarning):
    """The plan prunes less than asked, or everything: said on stderr and in ``plan.notes``."""


def _shortfall(plan: Plan, wanted: int, units: Dict[str, int], min_keep: Amount) -> List[str]:
    """Notes for a target that was not reached (floors) and for tensors pruned away entirely."""
    notes = []
    total, pruned = sum(units.values()), sum(tp.pruned_units for tp in plan)
    if pruned < wanted:
        notes.append(f"target not reached: {pruned} of {total} units pruned ({pruned / total:.4%}), "
                     f"{wanted} asked ({wanted / total:.4%}); the per-layer floor min_keep={min_keep} kept the rest")
    empty = [tp.name for tp in plan if tp.units and tp.pruned_units == tp.units]
    if empty:
        notes.append(f"every unit of {', '.join(empty[:8])} is pruned: all its weights are zero "
                     "(raise min_keep to keep some)")
    return notes


