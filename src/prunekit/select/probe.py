"""``allocation="sensitivity"`` for :func:`prunekit.prune`: per-layer sparsities from what each layer costs the loss.

Each target layer is pruned *alone*, by the criterion itself (its own scores with its own scope, or SparseGPT's
reconstruction: a :data:`Trial`), at every sparsity of :data:`GRID`; the loss on the calibration batches is
measured and the layer's weights put back. :func:`~prunekit.select.allocation.least_cost_allocation` then picks
the sparsities that meet the total target (weighted by layer size) with the least summed loss increase.

Why not only ``allocation="magnitude"``: that borrows ``|w|``'s view of which layer can lose what, which is right
for magnitude and only a guess for another criterion; the probe asks the model, with the criterion that will
actually prune. It needs labelled batches (or ``loss_fn``) and costs ``layers x len(GRID)`` forward passes over
the calibration data (no backward). Layer costs are assumed to add up, as in
:mod:`prunekit.analysis.sensitivity` (the same allocator, measured there on a test metric).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.criteria.stats import batch_target, check_reiterable, default_forward, preserved_state
from prunekit.errors import PrunekitError
from prunekit.select.allocation import Curve, least_cost_allocation
from prunekit.select.amount import Amount, resolve_floor
from prunekit.select.ranking import select
from prunekit.select.rows import select_rows

GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)   # sparsities each layer is probed at (a 0.9 target needs room above it)

Trial = Callable[[str, float], torch.Tensor]   # (name, sparsity) -> that layer's weight pruned to the sparsity


@dataclass(frozen=True)
class LossProbe:
    """The loss the probe measures: mean over ``data`` of ``loss_fn(output, target)`` (default: cross-entropy
    on ``(x, y)`` batches), the model in eval mode, without autograd."""

    data: Iterable
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None
    grid: Tuple[float, ...] = GRID

    def __post_init__(self) -> None:
        check_reiterable(self.data, "allocation='sensitivity'")   # one pass per layer and probed sparsity

    def loss(self, model: nn.Module) -> float:
        total, n = 0.0, 0
        with preserved_state(model), torch.no_grad():
            for batch in self.data:
                total += self._batch_loss(model, batch)
                n += 1
        if n == 0:
            raise PrunekitError("the calibration data yielded no batch")
        return total / n

    def _batch_loss(self, model: nn.Module, batch: Any) -> float:
        out = (self.forward_fn or default_forward)(model, batch)
        if self.loss_fn is not None:
            return float(self.loss_fn(out, batch_target(batch)))
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise PrunekitError("allocation='sensitivity' measures a loss: give batches of (x, y) for the default "
                                "cross-entropy, or loss_fn(output, target)")
        return float(F.cross_entropy(out, batch[1]))


def selection_trial(scores: Mapping[str, Any], scope: str, current: Mapping[str, torch.Tensor],
                    params: Mapping[str, torch.Tensor]) -> Trial:
    """A trial for criteria that only select: the layer's weights masked by its own ranking (per row for
    ``scope="row"``, else per layer), entries pruned before staying pruned."""

    def trial(name: str, sparsity: float) -> torch.Tensor:
        cur = {name: current[name]} if name in current else None
        if scope == "row":
            plan = select_rows({name: scores[name]}, sparsity, min_keep=0, current=cur)
        else:
            plan = select({name: scores[name]}, sparsity, scope="layer", min_keep=0, current=cur)
        keep = plan.tensors[name].keep_mask().to(params[name].device)
        return params[name].detach() * keep
    return trial


def cost_curves(model: nn.Module, names: Sequence[str], trial: Trial, probe: LossProbe,
                current: Mapping[str, torch.Tensor]) -> Dict[str, Curve]:
    """``{name: [(sparsity, loss increase), ...]}`` from the layer's current sparsity (cost 0) up the grid.

    Costs are made non-decreasing in sparsity: removing more is not expected to help, so a lower loss at a
    higher sparsity is calibration noise. Each layer is put back exactly, also when a trial raises."""
    params = dict(model.named_parameters(remove_duplicate=False))
    base = probe.loss(model)
    curves: Dict[str, Curve] = {}
    for name in names:
        p = params[name]
        start = float((~current[name]).float().mean()) if name in current else 0.0
        saved = p.detach().clone()
        pts: List[Tuple[float, float]] = [(start, 0.0)]
        try:
            for s in (s for s in probe.grid if s > start + 1e-9):
                with torch.no_grad():
                    p.copy_(trial(name, s))
                pts.append((s, max(pts[-1][1], probe.loss(model) - base)))
        finally:
            with torch.no_grad():
                p.copy_(saved)
        curves[name] = pts
    return curves


def sensitivity_allocation(model: nn.Module, names: Sequence[str], amount: float, trial: Trial, probe: LossProbe,
                           *, min_keep: Amount = 0.01,
                           current: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, float]:
    """``{name: sparsity}``: the size-weighted mean is ``amount``, the summed probed loss increase least.

    No layer goes past the highest probed sparsity nor keeps fewer than ``min_keep`` of its weights."""
    current = current or {}
    curves = cost_curves(model, names, trial, probe, current)
    params = dict(model.named_parameters(remove_duplicate=False))
    sizes = {n: float(params[n].numel()) for n in names}
    caps = {n: min(probe.grid[-1], 1.0 - resolve_floor(min_keep, int(sizes[n])) / sizes[n]) for n in names}
    try:
        return least_cost_allocation(curves, sizes, amount, caps)
    except PrunekitError as e:  # say what bounds it
        raise PrunekitError(f"allocation='sensitivity': {e} (each layer is probed up to {probe.grid[-1]}, "
                            f"min_keep={min_keep})") from None
