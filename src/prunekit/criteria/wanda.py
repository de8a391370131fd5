"""Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2, pruning by weights *and* activations.

A weight that multiplies a large input feature matters more than its magnitude
says. ``||X_j||`` is the root mean square of input feature ``j`` over every
calibration row (token, pixel, example); the mean instead of the sum keeps the
scores independent of the calibration set's size, which matters only for global
ranking (per row or per layer the ordering is the same).

Wanda compares scores *per output row*: use ``scope="row"`` (see
:mod:`prunekit.criteria.rowwise`); ``scope="layer"``/``"global"`` and the N:M
and structured patterns work too, since the scores are elementwise.

Convolutions: feature ``j`` is an input channel (its RMS over all positions);
every kernel tap of that channel gets the same norm. Padding is not counted.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from . import ScoreContext, register_criterion
from .calibrate import Stats, register_collector, resolve_names
from .taylor import stats_entry
from ..biascorr import add_feature_sums  # noqa: E402 (also registers the "input_mean" collector)

SQSUM, ROWS = "wanda_sqsum", "wanda_rows"
SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _weights(model: nn.Module) -> List[str]:
    return [f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, SUPPORTED)]


def _feature_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, nn.Linear) else 1


@register_collector("wanda")
class WandaCollector:
    """Forward pre-hooks that add the squared inputs of each layer, per input feature."""

    needs_grad = False
    default_names = staticmethod(_weights)

    def __init__(self, model: nn.Module, names: Optional[Sequence[str]] = None):
        self.names = resolve_names(model, names, _weights)
        self.modules = {}
        for name in self.names:
            mod_name, _, pname = name.rpartition(".")
            module = model.get_submodule(mod_name)
            if pname != "weight" or not isinstance(module, SUPPORTED):
                raise ValueError(f"wanda scores the weight of {', '.join(t.__name__ for t in SUPPORTED)} "
                                 f"layers; {name} is the {pname!r} of a {type(module).__name__}")
            self.modules[name] = module

    def attach(self, stats: Stats) -> list:
        return [m.register_forward_pre_hook(self._hook(n, m, stats)) for n, m in self.modules.items()]

    @staticmethod
    def _hook(name: str, module: nn.Module, stats: Stats):
        dim = _feature_dim(module)

        @torch.no_grad()
        def hook(mod, args) -> None:
            x = args[0].detach().float()
            x = x.reshape(-1, x.shape[-1]) if dim == -1 else x.movedim(1, -1).reshape(-1, x.shape[1])
            sq = x.pow(2).sum(0).double()  # float64 sums: many rows of small squares
            entry = stats.get(name)
            if entry is None:
                entry = stats[name] = {SQSUM: sq, ROWS: x.shape[0]}
            else:
                entry[SQSUM].add_(sq)
                entry[ROWS] += x.shape[0]
            add_feature_sums(entry, x)  # the input means too: bias correction needs no second pass
        return hook


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


@register_criterion("wanda")
def wanda_scores(param: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """|W| * RMS of the matching input feature (needs ``stats`` from the wanda collector)."""
    st = stats_entry(ctx, "wanda", (SQSUM, ROWS))
    norms = (st[SQSUM] / max(int(st[ROWS]), 1)).sqrt().float()
    if isinstance(ctx.module, nn.Linear) or param.dim() == 2:
        expected = param.shape[1]
    else:
        expected = param.shape[1] * getattr(ctx.module, "groups", 1)
    if norms.numel() != expected:
        raise ValueError(f"wanda statistics of {ctx.name} have {norms.numel()} input features, the layer "
                         f"{expected}: they were collected on another model")
    return param.detach().abs().float() * _column_norms(norms, ctx.module, tuple(param.shape))
