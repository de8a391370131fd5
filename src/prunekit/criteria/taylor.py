"""First-order Taylor importance: |w * dL/dw|, averaged over calibration batches.

Removing weight ``w`` changes the loss by about ``-w * dL/dw`` (first-order
Taylor expansion; Molchanov et al. 2017/2019). The magnitude is accumulated
*per batch*, ``mean_b |w * g_b|``: on a trained model the gradient averaged over
the whole set is close to zero, so ``|w * mean_b g_b|`` would mostly measure
noise, while per-batch magnitudes measure how sensitive the loss is to ``w``.

Structured pruning reduces these elementwise scores over each slice (``norm=1``
gives the sum of the slice's Taylor scores, as Torch-Pruning's TaylorImportance
does), and :func:`prunekit.surgery.group_scores` aggregates them over coupled
groups: collect statistics for every parameter of the groups (``names=None``).

Weights already pruned by a mask are zero, so their score is zero: they stay
pruned, which is what a masked model needs.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.criteria.base import ScoreContext, register_criterion
from prunekit.criteria.stats import Stats, batch_target, register_collector, resolve_names
from prunekit.errors import PrunekitError, UnknownNameError

SUM, COUNT = "taylor_sum", "taylor_batches"


def _all_float_params(model: nn.Module) -> List[str]:
    return [n for n, p in model.named_parameters() if p.is_floating_point()]


class _Restore:
    """A hook-like handle that puts ``requires_grad`` back when removed."""

    def __init__(self, params):
        self.saved = [(p, p.requires_grad) for p in params]

    def remove(self) -> None:
        for p, rg in self.saved:
            p.requires_grad_(rg)


@register_collector("taylor")
class TaylorCollector:
    """Tensor hooks that add ``|w * grad|`` of every backward to ``stats[name]["taylor_sum"]``."""

    needs_grad = True
    default_names = staticmethod(_all_float_params)

    def __init__(self, model: nn.Module, names: Optional[Sequence[str]] = None):
        self.names = resolve_names(model, names, _all_float_params)
        params = dict(model.named_parameters(remove_duplicate=False))
        self.params = {n: params[n] for n in self.names}
        bad = [n for n, p in self.params.items() if not p.is_floating_point()]
        if bad:
            raise PrunekitError(f"taylor needs floating-point parameters; not: {', '.join(bad)}")

    def attach(self, stats: Stats) -> list:
        handles: list = [_Restore(self.params.values())]
        for name, p in self.params.items():
            p.requires_grad_(True)  # frozen weights still get a score; restored on exit
            handles.append(p.register_hook(self._hook(name, p, stats)))
        return handles

    @staticmethod
    def _hook(name: str, p: torch.Tensor, stats: Stats) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            contrib = (p.detach() * grad.detach()).abs().float()
            entry = stats.get(name)
            if entry is None:
                stats[name] = {SUM: contrib.clone(), COUNT: 1}
            else:
                entry[SUM].add_(contrib)
                entry[COUNT] += 1
        return hook

    @staticmethod
    def step(model: nn.Module, batch: Any, forward_fn, loss_fn) -> None:
        """One calibration batch: forward, loss, backward (the hooks do the rest)."""
        out = forward_fn(model, batch)
        target = batch_target(batch)
        if loss_fn is None:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise PrunekitError("taylor needs a loss: batches of (x, y) for the default cross-entropy, "
                                 "or loss_fn(output, target)")
            loss = F.cross_entropy(out, target)
        else:
            loss = loss_fn(out, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise PrunekitError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
        loss.backward()
        for p in model.parameters():  # the hooks already took what they need: keep memory flat
            p.grad = None


def stats_entry(ctx: ScoreContext, kind: str, keys: Sequence[str]) -> dict:
    """The statistics of ``ctx.name``, with an error that says how to collect them."""
    if not all(k in ctx.stats for k in keys):
        raise UnknownNameError(f"{kind}: no statistics for {ctx.name!r}; collect them first "
                       f"(prunekit.criteria.collect({kind!r}, model, names) or calibrate(...)), "
                       f"or pass data=... to prunekit.prune")
    return ctx.stats


@register_criterion("taylor", needs_data=True)
def taylor_scores(param: torch.Tensor, ctx: ScoreContext) -> torch.Tensor:
    """mean over batches of |w * dL/dw| (needs ``stats`` from the taylor collector)."""
    st = stats_entry(ctx, "taylor", (SUM, COUNT))
    s = st[SUM]
    if tuple(s.shape) != tuple(param.shape):
        raise PrunekitError(f"taylor statistics of {ctx.name} have shape {tuple(s.shape)}, the parameter "
                         f"{tuple(param.shape)}: they were collected on another model")
    return s / max(int(st[COUNT]), 1)
