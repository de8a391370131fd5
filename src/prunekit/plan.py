"""Plans: which entries of which tensors to prune, and ``select()`` that makes them.

A :class:`Plan` addresses tensors by dotted names (``"features.3.weight"``),
never by live modules, so it can be written to JSON, read back and applied to
another copy of the model. Unstructured and N:M masks are stored as packed bits
(1 bit per entry); structured plans store the pruned slice indices.

``select(scores, amount, scope=..., pattern=...)`` turns scores into a Plan:

- pattern ``"unstructured"``: a unit is one entry;
- pattern ``"structured"``: a unit is one slice along ``dim`` (a row/output
  neuron for ``dim=0``, an input feature/channel for ``dim=1``); slice scores are
  the Ln norm (``norm=1, 2, inf, ...``) of the elementwise scores;
- pattern ``"nm"``: in every group of M consecutive entries along the input
  dimension keep the N best (2:4 etc.); the amount is implied (1 - N/M).

``amount`` follows torch's convention: a float in [0, 1) is a fraction of the
units, an int is an absolute count. It is the *total* target: units already
pruned (``current`` masks) count towards it and always stay pruned.
"""
from __future__ import annotations

import base64
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .compress import pack_bits, unpack_bits
from .threshold import Elementwise, count_split, full_scores, kth_smallest, masks_from_threshold

PATTERNS = ("unstructured", "structured", "nm")
SCOPES = ("layer", "global")
Amount = Union[float, int]
ScoreLike = Union[torch.Tensor, Elementwise]


@dataclass
class TensorPlan:
    """What to prune in one tensor."""

    name: str
    shape: Tuple[int, ...]
    pattern: str
    units: int                       # how many units the tensor has
    pruned_units: int                # how many of them the plan prunes
    keep_bits: Optional[torch.Tensor] = None   # unstructured / nm: packed keep-mask
    dim: Optional[int] = None                  # structured: the sliced dim
    pruned_idx: Optional[List[int]] = None     # structured: pruned slice indices
    nm: Optional[Tuple[int, int]] = None
    floor_hit: bool = False          # the per-layer floor (min_keep) stopped pruning here
    coupled_to: Optional[str] = None  # e.g. a bias that follows its weight's rows

    def keep_mask(self) -> torch.Tensor:
        """Boolean mask of the tensor's shape, True where the entry is kept."""
        if self.keep_bits is not None:
            return unpack_bits(self.keep_bits, math.prod(self.shape)).reshape(self.shape)
        keep = torch.ones(self.shape[self.dim], dtype=torch.bool)
        keep[list(self.pruned_idx or [])] = False
        view = [1] * len(self.shape)
        view[self.dim] = -1
        return keep.reshape(view).expand(self.shape).clone()

    @property
    def sparsity(self) -> float:
        return self.pruned_units / self.units if self.units else 0.0

    def to_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in ("name", "pattern", "units", "pruned_units", "dim",
                                           "pruned_idx", "floor_hit", "coupled_to")}
        d["shape"] = list(self.shape)
        d["nm"] = list(self.nm) if self.nm else None
        if self.keep_bits is not None:
            d["keep_bits"] = base64.b64encode(self.keep_bits.numpy().tobytes()).decode("ascii")
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorPlan":
        try:
            bits = None
            if d.get("keep_bits") is not None:
                raw = base64.b64decode(d["keep_bits"], validate=True)
                bits = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                if bits.numel() != (math.prod(d["shape"]) + 7) // 8:
                    raise ValueError("keep_bits length does not match the shape")
            return cls(name=str(d["name"]), shape=tuple(int(s) for s in d["shape"]),
                       pattern=str(d["pattern"]), units=int(d["units"]),
                       pruned_units=int(d["pruned_units"]), keep_bits=bits, dim=d.get("dim"),
                       pruned_idx=d.get("pruned_idx"), nm=tuple(d["nm"]) if d.get("nm") else None,
                       floor_hit=bool(d.get("floor_hit", False)), coupled_to=d.get("coupled_to"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed plan entry {d.get('name', '?')!r}: {e}") from e


@dataclass
class Plan:
    """A serialisable pruning decision for a set of tensors."""

    tensors: Dict[str, TensorPlan] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)

    def __iter__(self):
        return iter(self.tensors.values())

    def __len__(self) -> int:
        return len(self.tensors)

    def summary(self) -> List[Dict[str, Any]]:
        return [{"name": t.name, "pattern": t.pattern, "units": t.units, "pruned": t.pruned_units,
                 "sparsity": t.sparsity, "floor_hit": t.floor_hit} for t in self]

    def to_json(self) -> str:
        # the key is kept: a tensor pruned along two dims has two entries ("w" and "w#dim1")
        return json.dumps({"format": "prunekit.plan/1", "meta": self.meta, "notes": self.notes,
                           "tensors": [{**t.to_dict(), "key": k} for k, t in self.tensors.items()]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not a prunekit plan (invalid JSON: {e})") from e
        if not isinstance(d, dict) or d.get("format") != "prunekit.plan/1":
            raise ValueError("not a prunekit plan: expected format 'prunekit.plan/1'")
        entries = d.get("tensors", [])
        if not isinstance(entries, list) or not all(isinstance(t, dict) for t in entries):
            raise ValueError("not a prunekit plan: 'tensors' must be a list of entries")
        tensors = {str(t.get("key", t.get("name"))): TensorPlan.from_dict(t) for t in entries}
        return cls(tensors, dict(d.get("meta", {})), list(d.get("notes", [])))

    def save(self, path: Union[str, os.PathLike]) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)  # atomic: a crash never leaves half a plan

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Plan":
        with open(path) as f:
            return cls.from_json(f.read())


# ----------------------------------------------------------------------------- validation

def resolve_amount(amount: Amount, units: int, what: str = "amount") -> int:
    """Number of units to prune; torch's convention (fraction or absolute count)."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"{what} must be a float in [0, 1) or an int count, got {amount!r}")
    if isinstance(amount, numbers.Integral):
        if not 0 <= amount <= units:
            raise ValueError(f"{what}={amount} is a count of units: it must be in [0, {units}]")
        return int(amount)
    if not (0.0 <= amount < 1.0) or math.isnan(amount):
        raise ValueError(f"{what}={amount} must be a fraction in [0, 1) (or an int count of units)")
    return int(round(amount * units))


def resolve_floor(min_keep: Amount, units: int) -> int:
    """Per-layer floor: the fewest units global ranking may leave in a tensor."""
    if isinstance(min_keep, bool) or not isinstance(min_keep, numbers.Real):
        raise TypeError(f"min_keep must be a float in (0, 1) or an int >= 1, got {min_keep!r}")
    if isinstance(min_keep, numbers.Integral):
        if min_keep < 0:
            raise ValueError(f"min_keep={min_keep} must be an int >= 0 or a fraction in (0, 1)")
        return min(int(min_keep), units)
    if not 0.0 <= min_keep < 1.0:
        raise ValueError(f"min_keep={min_keep} must be a fraction in [0, 1) or an int count")
    return min(units, max(1, math.ceil(min_keep * units))) if min_keep > 0 else 0


def _check_choice(value: str, allowed: Sequence[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


# ----------------------------------------------------------------------------- unit scores

def _shape_of(s) -> Tuple[int, ...]:
    if isinstance(s, Elementwise):
        return tuple(s.tensor.shape)
    shape = getattr(s, "shape", None)
    return tuple(shape) if shape is not None else tuple(s().shape)


def _with_current(s: ScoreLike, keep: Optional[torch.Tensor]):
    """Already-pruned entries score -inf, so they are always among the pruned."""
    if keep is None:
        return s
    if isinstance(s, torch.Tensor):
        return s.masked_fill(~keep, -math.inf)

    def masked() -> torch.Tensor:
        return full_scores(s).clone().masked_fill_(~keep, -math.inf)
    masked.shape = _shape_of(s)
    return masked


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


# ----------------------------------------------------------------------------- selection

def _global_keep(sources: Dict[str, Any], k: int, floors: Dict[str, int]):
    """Global ranking with per-layer floors.

    Returns ({name: (packed keep, pruned count)}, {name: floor_hit}). A layer
    that the global threshold would take below its floor is fixed at the floor
    and the threshold is recomputed over the other layers, so the total target
    is still met exactly.
    """
    units = {n: _numel(s) for n, s in sources.items()}
    fixed: Dict[str, int] = {}
    while True:
        pool = [n for n in sources if n not in fixed]
        k_pool = max(0, min(k - sum(fixed.values()), sum(units[n] for n in pool)))
        thr = kth_smallest([_src(sources[n]) for n in pool], k_pool)
        ties, over = thr.ties, []
        for n, (below, eq) in zip(pool, count_split([_src(sources[n]) for n in pool], thr)):
            take = min(ties, eq)
            ties -= take
            if units[n] - below - take < floors[n]:
                over.append(n)
        if not over:
            break
        for n in over:
            fixed[n] = units[n] - floors[n]
    keeps = dict(zip(pool, masks_from_threshold([_src(sources[n]) for n in pool], thr)))
    for n, kn in fixed.items():
        keeps[n] = next(masks_from_threshold([_src(sources[n])], kth_smallest([_src(sources[n])], kn)))
    return keeps, {n: n in fixed for n in sources}


def _numel(s) -> int:
    return math.prod(_shape_of(s))


def _src(s):
    if isinstance(s, torch.Tensor):
        return lambda: s
    return s


def _nm_keep(scores: torch.Tensor, n: int, m: int, name: str) -> torch.Tensor:
    """Keep the n best of every m consecutive entries along the input dimension."""
    # conv weights (out, in, kh, kw): group input channels at the same tap, as sparse
    # tensor cores expect (the reduction dimension in NHWC order)
    s = scores.movedim(1, -1) if scores.dim() > 2 else scores
    if s.dim() < 2 or s.shape[-1] % m:
        raise ValueError(f"{name}: N:M needs the input dimension ({s.shape[-1] if s.dim() else 0}) "
                         f"divisible by M={m}")
    groups = s.reshape(-1, m)
    idx = groups.topk(n, dim=1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True)
    keep = keep.reshape(s.shape)
    return keep.movedim(-1, 1) if scores.dim() > 2 else keep


def _unit_scores(sources, pattern: str, dim: int, norm: float, normalize: bool):
    if pattern != "structured":
        return sources
    return {n: slice_scores(full_scores(_src(s)), dim, norm, normalize) for n, s in sources.items()}


def _layer_keep(src, units: int, k: int, floor: int, forced: int) -> Tuple[Tuple[torch.Tensor, int], bool]:
    floor_hit = k > units - floor
    k = max(min(k, units - floor), forced)
    return next(masks_from_threshold([_src(src)], kth_smallest([_src(src)], k))), floor_hit


def _forced_units(keep: Optional[torch.Tensor], pattern: str, dim: int) -> int:
    if keep is None:
        return 0
    if pattern != "structured":
        return int((~keep).sum())
    return int((~keep).movedim(dim % keep.dim(), 0).reshape(keep.shape[dim], -1).all(dim=1).sum())


def _validate(scores, scope, pattern, dim, norm, nm, current):
    _check_choice(scope, SCOPES, "scope")
    _check_choice(pattern, PATTERNS, "pattern")
    if not scores:
        raise ValueError("nothing to prune: no tensors were selected")
    if pattern == "nm":
        n, m = nm
        if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
            raise ValueError(f"nm={nm!r} must be (N, M) integers with 0 < N < M, e.g. (2, 4)")
    if pattern == "structured":
        if not (isinstance(norm, (int, float)) and norm > 0):
            raise ValueError(f"norm={norm!r} must be a positive number (1, 2, float('inf'), ...)")
        for name, sc in scores.items():
            nd = len(_shape_of(sc))
            if not -nd <= dim < nd:
                raise ValueError(f"dim={dim} is out of range for {name} with {nd} dims (allowed "
                                 f"{-nd}..{nd - 1})")
    for name, keep in (current or {}).items():
        if name in scores and tuple(keep.shape) != _shape_of(scores[name]):
            raise ValueError(f"current mask of {name} has shape {tuple(keep.shape)}, "
                             f"expected {_shape_of(scores[name])}")


def select(scores: Mapping[str, ScoreLike], amount: Optional[Amount] = None, *, scope: str = "layer",
           pattern: str = "unstructured", dim: int = 0, norm: float = 1.0,
           nm: Tuple[int, int] = (2, 4), min_keep: Amount = 0.01,
           current: Optional[Mapping[str, torch.Tensor]] = None,
           normalize: Optional[bool] = None) -> Plan:
    """Turn scores (low = prune first) into a Plan; see the module docstring."""
    _validate(scores, scope, pattern, dim, norm, nm, current)
    current = current or {}
    if pattern == "nm":
        return _select_nm(scores, nm, current)
    if amount is None:
        raise ValueError("amount is required: a fraction in [0, 1) or an int count of units")
    normalize = (scope == "global") if normalize is None else normalize
    sources = {n: _with_current(s, current.get(n)) for n, s in scores.items()}
    units_src = _unit_scores(sources, pattern, dim, norm, normalize)
    units = {n: _numel(s) for n, s in units_src.items()}
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
            keeps[n], hits[n] = _layer_keep(src, units[n], resolve_amount(amount, units[n]),
                                            floors[n], forced[n])
    plan = Plan(meta={"scope": scope, "pattern": pattern, "amount": amount, "dim": dim, "norm": norm,
                      "min_keep": min_keep, "normalize": normalize})
    for n in scores:
        plan.tensors[n] = _tensor_plan(n, _shape_of(scores[n]), pattern, keeps[n], dim, hits[n])
        if hits[n]:
            notes.append(f"{n}: the per-layer floor (min_keep={min_keep}) kept "
                         f"{units[n] - plan.tensors[n].pruned_units} of {units[n]} units")
    plan.notes = notes
    return plan


def _tensor_plan(name, shape, pattern, keep, dim, floor_hit) -> TensorPlan:
    """``keep`` is a boolean mask, or (packed mask, pruned count) from masks_from_threshold."""
    if isinstance(keep, tuple):
        bits, pruned = keep
        n = math.prod(shape) if pattern != "structured" else shape[dim % len(shape)]
        if pattern == "structured":  # unit scores are tiny: unpack to list the pruned slices
            keep = unpack_bits(bits, n)
        else:
            return TensorPlan(name, tuple(shape), pattern, units=n, pruned_units=pruned, keep_bits=bits,
                              floor_hit=floor_hit)
    pruned = int(keep.numel() - keep.sum())
    if pattern == "structured":
        idx = (~keep).nonzero().squeeze(1).tolist()
        return TensorPlan(name, tuple(shape), pattern, units=keep.numel(), pruned_units=pruned,
                          dim=dim % len(shape), pruned_idx=idx, floor_hit=floor_hit)
    return TensorPlan(name, tuple(shape), pattern, units=keep.numel(), pruned_units=pruned,
                      keep_bits=pack_bits(keep.reshape(-1)), floor_hit=floor_hit)


def _select_nm(scores, nm, current) -> Plan:
    """Layers whose input dimension is not a multiple of M are skipped with a note
    (as sparse tensor core tooling does): the rest of the model still gets N:M."""
    n, m = nm
    plan = Plan(meta={"scope": "layer", "pattern": "nm", "nm": [n, m]})
    for name, sc in scores.items():
        s = full_scores(_src(_with_current(sc, current.get(name))))
        try:
            keep = _nm_keep(s, n, m, name)
        except ValueError as e:
            plan.notes.append(f"skipped {e}")
            continue
        if name in current:
            keep &= current[name]
        tp = _tensor_plan(name, s.shape, "nm", keep, 0, False)
        tp.nm = (n, m)
        plan.tensors[name] = tp
    if not plan.tensors:
        raise ValueError(f"no selected tensor can take the {n}:{m} pattern: " + "; ".join(plan.notes))
    return plan
