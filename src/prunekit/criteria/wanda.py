"""Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2, pruning by weights *and* activations.

A weight that multiplies a large input feature matters more than its magnitude
says. ``||X_j||`` is the root mean square of input feature ``j`` over every
calibration row (token, pixel, example); the mean instead of the sum keeps the
scores independent of the calibration set's size, which matters only for global
ranking (per row or per layer the ordering is the same).

Wanda compares scores *per output row*: use ``scope="row"`` (see
:mod:`prunekit.select.rows`); ``scope="layer"``/``"global"`` and the N:M
and structured patterns work too, since the scores are elementwise.

Convolutions: feature ``j`` is an input channel (its RMS over all positions);
every kernel tap of that channel gets the same norm. Padding is not counted.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from prunekit.criteria.base import ScoreContext, register_criterion
from prunekit.criteria.stats import (  # also registers the "input_mean" collector
    InputFeatureCollector,
    add_feature_sums,
    register_collector,
)
from prunekit.criteria.taylor import stats_entry
from prunekit.errors import PrunekitError

SQSUM, ROWS = "wanda_sqsum", "wanda_rows"


@register_collector("wanda")
class WandaCollector(InputFeatureCollector):
    """Forward pre-hooks that add the squared inputs of each layer, per input feature (and their sums:
    bias correction then needs no second pass)."""

    what = "wanda scores"

    @staticmethod
    def accumulate(entry: Optional[dict], rows: torch.Tensor) -> dict:
        sq = rows.pow(2).sum(0).double()  # float64 sums: many rows of small squares
        if entry is None:
            entry = {SQSUM: sq, ROWS: rows.shape[0]}
        else:
            entry[SQSUM].add_(sq)
            entry[ROWS] += rows.shape[0]
        return add_feature_sums(entry, rows)


def _column_norms(norms: torch.Tensor, module: nn.Module, shape) -> torch.Tensor:
    """Input norms laid out like the weight (broadcastable)."""
    if isinstance(module, nn.Linear) or module is None and len(shape) == 2:
        return norms.reshape(1, -1)
    out_ch, in_per_group = shape[0], shape[1]
    groups = getattr(module, "groups", 1)
    # weight[o, c] reads input channel (o // (out/groups)) * (in/groups) + c
    group_of_row = torch.arange(out_ch, device=norms.device) // (out_ch // groups)
    within = torch.arange(in_per_group, device=norms.device)
    idx = group_of_row.reshape(-1, 1) * in_per_group + within.reshape(1, -1)
    return norms[idx].reshape(out_ch, in_per_group, *([1] * (len(shape) - 2)))


@register_criterion("wanda", needs_data=True)
def wanda_scores(param: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """|W| * RMS of the matching input feature (needs ``stats`` from the wanda collector)."""
    st = stats_entry(ctx, "wanda", (SQSUM, ROWS))
    norms = (st[SQSUM] / max(int(st[ROWS]), 1)).sqrt().float()
    if isinstance(ctx.module, nn.Linear) or param.dim() == 2:
        expected = param.shape[1]
    else:
        expected = param.shape[1] * getattr(ctx.module, "groups", 1)
    if norms.numel() != expected:
        raise PrunekitError(f"wanda statistics of {ctx.name} have {norms.numel()} input features, the layer "
                         f"{expected}: they were collected on another model")
    return param.detach().abs().float() * _column_norms(norms, ctx.module, tuple(param.shape))
