"""Score sources as the selection stage sees them, and the TensorPlan built from a keep-mask.

A source is a score tensor, an :class:`~prunekit.criteria.score.Elementwise` or a
:class:`~prunekit.criteria.score.LazyScores`; helpers here read its shape without computing it, mark
already-pruned entries, and turn the kept entries into a :class:`~prunekit.plan.TensorPlan`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch

from prunekit.bits import pack_bits, unpack_bits
from prunekit.criteria.score import Elementwise
from prunekit.plan import TensorPlan
from prunekit.select.threshold import full_scores

ScoreLike = Union[torch.Tensor, Elementwise]


def shape_of(s) -> Tuple[int, ...]:
    if isinstance(s, Elementwise):
        return tuple(s.tensor.shape)
    shape = getattr(s, "shape", None)
    return tuple(shape) if shape is not None else tuple(s().shape)


def with_current(s: ScoreLike, keep: Optional[torch.Tensor]):
    """Already-pruned entries score -inf, so they are always among the pruned."""
    if keep is None:
        return s
    if isinstance(s, torch.Tensor):
        return s.masked_fill(~keep, -math.inf)

    def masked() -> torch.Tensor:
        return full_scores(s).clone().masked_fill_(~keep, -math.inf)
    masked.shape = shape_of(s)
    return masked


def as_source(s):
    if isinstance(s, torch.Tensor):
        return lambda: s
    return s


def tensor_plan(name, shape, pattern, keep, dim, floor_hit) -> TensorPlan:
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


def unit_count(s) -> int:
    return math.prod(shape_of(s))
