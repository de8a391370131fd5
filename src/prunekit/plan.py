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
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from prunekit._util import atomic_write_text
from prunekit.bits import unpack_bits
from prunekit.errors import PrunekitError


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

    def _check_structured(self) -> None:
        """A structured entry names slices that exist: dim in range, indices in [0, size), no repeats."""
        if self.pattern != "structured":
            return
        if not isinstance(self.dim, int) or isinstance(self.dim, bool) or not 0 <= self.dim < len(self.shape):
            raise PrunekitError(f"dim={self.dim!r} is not a dim of shape {list(self.shape)}")
        idx, size = self.pruned_idx or [], self.shape[self.dim]
        if not isinstance(idx, list) or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < size
                                            for i in idx):
            raise PrunekitError(f"pruned_idx must be a list of slice indices in [0, {size}) along dim {self.dim}")
        if len(set(idx)) != len(idx) or len(idx) != self.pruned_units or self.units != size:
            raise PrunekitError(f"pruned_idx ({len(idx)} entries) disagrees with units={self.units}, "
                                f"pruned_units={self.pruned_units} of a dim of {size}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorPlan":
        try:
            bits = None
            if d.get("keep_bits") is not None:
                raw = base64.b64decode(d["keep_bits"], validate=True)
                bits = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
                if bits.numel() != (math.prod(d["shape"]) + 7) // 8:
                    raise PrunekitError("keep_bits length does not match the shape")
            tp = cls(name=str(d["name"]), shape=tuple(int(s) for s in d["shape"]),
                     pattern=str(d["pattern"]), units=int(d["units"]),
                     pruned_units=int(d["pruned_units"]), keep_bits=bits, dim=d.get("dim"),
                     pruned_idx=d.get("pruned_idx"), nm=tuple(d["nm"]) if d.get("nm") else None,
                     floor_hit=bool(d.get("floor_hit", False)), coupled_to=d.get("coupled_to"))
            tp._check_structured()
            return tp
        except (KeyError, TypeError, ValueError) as e:
            raise PrunekitError(f"malformed plan entry {d.get('name', '?')!r}: {e}") from e


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
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: absurdly deep nesting
            raise PrunekitError(f"not a prunekit plan (invalid JSON: {str(e)[:200]})") from e
        if not isinstance(d, dict) or d.get("format") != "prunekit.plan/1":
            raise PrunekitError("not a prunekit plan: expected format 'prunekit.plan/1'")
        entries = d.get("tensors", [])
        if not isinstance(entries, list) or not all(isinstance(t, dict) for t in entries):
            raise PrunekitError("not a prunekit plan: 'tensors' must be a list of entries")
        tensors = {str(t.get("key", t.get("name"))): TensorPlan.from_dict(t) for t in entries}
        return cls(tensors, dict(d.get("meta", {})), list(d.get("notes", [])))

    def save(self, path: Union[str, os.PathLike]) -> None:
        atomic_write_text(path, self.to_json())  # a crash never leaves half a plan

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Plan":
        with open(path) as f:
            return cls.from_json(f.read())


# ----------------------------------------------------------------------------- validation







# ----------------------------------------------------------------------------- unit scores







# ----------------------------------------------------------------------------- selection





















