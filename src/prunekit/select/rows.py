"""Per-row selection (``scope="row"``): every output row loses the same fraction of its entries.

Wanda compares its scores within each output row (row ``i`` of a Linear
weight, output channel ``i`` of a conv weight, all its taps flattened): every
output keeps the same number of inputs, which is what makes it work on
transformers, where a few input features carry huge activations and a
per-layer threshold would strip whole rows. This is a selection rule, not a
score: normalising scores per row and ranking per layer is *not* equivalent.

The result is an ordinary unstructured :class:`prunekit.plan.Plan`, so
:func:`prunekit.apply.masking.apply` applies it like any other.
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping, Optional

import torch

from prunekit.errors import PrunekitError
from prunekit.plan import Plan
from prunekit.select.amount import Amount, resolve_floor
from prunekit.select.ranking import amount_of
from prunekit.select.sources import tensor_plan
from prunekit.select.threshold import full_scores


def _row_keep(scores: torch.Tensor, amount: float, floor_frac, keep: Optional[torch.Tensor]):
    """Keep-mask pruning the ``round(amount * row length)`` lowest scores of each row.

    Entries pruned before (``keep`` False) are always among the pruned; ties go
    by position (stable sort), so the result is deterministic.
    """
    rows = scores.reshape(scores.shape[0], -1).float()
    length = rows.shape[1]
    if keep is not None:
        rows = rows.masked_fill(~keep.reshape(rows.shape), -math.inf)
    k = int(round(amount * length))
    k_row = torch.full((rows.shape[0],), min(k, length - resolve_floor(floor_frac, length)), dtype=torch.long,
                       device=rows.device)
    floor_hit = bool(k_row[0] < k)
    if keep is not None:  # already-pruned entries stay pruned, even past the target
        k_row = torch.maximum(k_row, (~keep.reshape(rows.shape)).sum(1))
    order = torch.argsort(rows, dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=rows.device).expand_as(order)
                                            .contiguous())
    return (rank >= k_row.reshape(-1, 1)).reshape(scores.shape).cpu(), floor_hit


def select_rows(scores: Mapping[str, object], amount: Amount, *, min_keep: Amount = 0.01,
                current: Optional[Mapping[str, torch.Tensor]] = None) -> Plan:
    """Prune the fraction ``amount`` of every output row of every tensor (low score = prune first).

    ``scores`` maps names to score tensors or lazy score sources (as
    :func:`prunekit.compute_scores` returns). ``min_keep`` is a per-row floor.
    """
    for a in (amount.values() if isinstance(amount, Mapping) else [amount]):
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or isinstance(a, numbers.Integral):
            raise PrunekitError(f"scope='row' takes amount as a fraction in [0, 1), got {a!r} "
                                "(an int count has no per-row meaning)")
        if not 0.0 <= a < 1.0 or math.isnan(a):
            raise PrunekitError(f"amount={a} must be a fraction in [0, 1)")
    if isinstance(amount, Mapping) and set(amount) != set(scores):
        raise PrunekitError(f"per-tensor amounts need one entry per selected tensor; missing: "
                            f"{sorted(set(scores) - set(amount))[:5]}")
    if not scores:
        raise PrunekitError("nothing to prune: no tensors were selected")
    current = current or {}
    plan = Plan(meta={"scope": "row", "pattern": "unstructured", "amount": amount, "min_keep": min_keep})
    for name, src in scores.items():
        s = src if isinstance(src, torch.Tensor) else full_scores(src)
        if s.dim() < 2:
            raise PrunekitError(f"scope='row' needs tensors with rows (2-D or more); {name} has shape "
                             f"{tuple(s.shape)} (exclude it or use scope='layer')")
        cur = current.get(name)
        keep, hit = _row_keep(s, float(amount_of(amount, name)), min_keep, None if cur is None else cur.to(s.device))
        plan.tensors[name] = tensor_plan(name, tuple(s.shape), "unstructured", keep, 0, hit)
        if hit:
            plan.notes.append(f"{name}: the per-row floor (min_keep={min_keep}) stopped pruning")
    return plan
