"""Refit after masking: the least-squares kept weights of every pruned layer, its mask left as it is.

A masking criterion (magnitude, Wanda, Taylor) only chooses which weights go; the ones it keeps still have
the values they had in the dense model, tuned for inputs that no longer arrive. Once a layer's mask is
fixed, the kept weights that best reproduce the dense layer on the calibration inputs have a closed form
per row (:func:`prunekit.pruners.reconstruct.refit_rows`, with ``H = X^T X``). ``prunekit.prune(...,
refit=True, data=...)`` runs this after the plan is applied.

Layers go in forward order and each one's ``H`` is collected on the model as it is by then, with the
layers before it already pruned *and* refit (as SparseGPT does): a later layer repairs what the earlier
ones still get wrong. The target is the dense layer's weights on those inputs. Convolutions are refit per
group on their unfolded input patches, with SparseGPT's im2col view (:mod:`prunekit.pruners.sparsegpt`).
Memory: one layer's ``H`` at a time (``groups x cols^2`` float64) plus the caller's copy of the dense
weights. A layer whose calibration error the refit would not lower (rounding on a near-singular ``H``)
keeps its masked weights, so the refit never makes a layer worse on the calibration data.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit._util import progress_enabled
from prunekit.apply import masking
from prunekit.criteria.stats import check_reiterable, default_forward, preserved_state
from prunekit.errors import PrunekitError
from prunekit.pruners.reconstruct import layer_error, refit_rows
from prunekit.pruners.sparsegpt import (
    SUPPORTED,
    as_matrix,
    from_matrix,
    is_linear,
    layer_hessian,
    record_calls,
    unsupported_conv,
)
from prunekit.targets import owner_of


@dataclass(frozen=True)
class RefitOptions:
    """``damp``: the ridge added to ``H`` (a fraction of its mean diagonal, as SparseGPT's) so that an input
    that never varies cannot make a row's system singular; ``max_batches``: calibration batches read per
    layer (None: all); ``progress``: a bar over the layers (None: PRUNEKIT_PROGRESS decides)."""

    damp: float = 0.01
    max_batches: Optional[int] = None
    progress: Optional[bool] = None

    def __post_init__(self) -> None:
        if isinstance(self.damp, bool) or not isinstance(self.damp, numbers.Real) or not 0.0 <= self.damp < math.inf:
            raise PrunekitError(f"damp={self.damp!r} must be a number >= 0 (a fraction of H's mean diagonal)")


def refit_targets(model: nn.Module, names: Iterable[str], notes: List[str]) -> Dict[str, nn.Module]:
    """The layers among ``names`` a refit can take: masked weights of Linear/Conv1d/Conv2d layers with at least
    one pruned entry. Others that were pruned are noted and keep their masked values; biases are skipped."""
    out = {}
    for name in names:
        module, pname = owner_of(model, name)
        keep = masking.get_mask(module, pname)
        if pname != "weight" or keep is None or bool(keep.all()):
            continue  # a bias, or nothing pruned here: nothing to repair
        if not (isinstance(module, SUPPORTED) or is_linear(module)):
            notes.append(f"refit: {name} is the weight of a {type(module).__name__} (refit takes Linear, Conv1d, "
                         "Conv2d): left as masked")
            continue
        why = unsupported_conv(module)
        if why:
            notes.append(f"refit: {name} left as masked: {why}")
            continue
        out[name] = module
    return out


def refit_model(model: nn.Module, dense: Mapping[str, torch.Tensor], data: Iterable,
                forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
                options: RefitOptions = RefitOptions()) -> Dict[str, Any]:
    """Refit the kept weights of the masked layers named in ``dense`` (``{name: dense weight}``) on ``data``.

    The model must carry its final masks already; they are not changed. Returns a JSON-ready record for the
    plan's meta: ``damp``, and per layer its calibration output error (``sum_i (w_i - w*_i)^T H (w_i - w*_i)``,
    per input row) with the masked weights and after the refit; ``notes`` for layers it could not take. On an
    error the caller restores the model (:func:`prunekit.apply.masking.restored_on_error`).
    """
    check_reiterable(data, "refit")
    notes: List[str] = []
    targets = refit_targets(model, dense, notes)
    errors: Dict[str, Dict[str, float]] = {}
    forward_fn = forward_fn or default_forward
    if targets:
        with preserved_state(model), torch.no_grad():
            first = next(iter(data), None)
            if first is None:
                raise PrunekitError("the calibration data yielded no batch")
            groups, count = record_calls(model, targets, first, forward_fn)
            for group in tqdm(groups, desc="refit", leave=False, disable=not progress_enabled(options.progress)):
                # layers reading the very same tensor share one pass and one H; a layer called more than once
                # per forward sees all its calls (no early stop)
                H = layer_hessian(model, targets[group[0]], data, forward_fn, options.max_batches,
                                  stop_early=count[group[0]] == 1)
                for name in group:
                    errors[name], note = refit_layer(targets[name], dense[name], H, options.damp)
                    notes.extend([f"refit: {name} {note}"] if note else [])
                del H
    return {"damp": options.damp, "layers": errors, "notes": notes}


def refit_layer(module: nn.Module, dense: torch.Tensor, H: torch.Tensor, damp: float
                ) -> Tuple[Dict[str, float], Optional[str]]:
    """Refit one masked layer in place towards ``dense`` given its per-group ``H``; ({masked_error,
    refit_error}, a note if the masked weights were kept)."""
    w = module.weight
    keep = masking.get_mask(module, "weight").to(w.device)
    target = as_matrix(module, dense.to(w.device))
    keeps = as_matrix(module, keep)
    masked = as_matrix(module, w.detach())
    new = torch.stack([refit_rows(target[g], H[g], keeps[g], damp) for g in range(target.shape[0])])
    before = sum(layer_error(masked[g], target[g], H[g]) for g in range(target.shape[0]))
    after = sum(layer_error(new[g], target[g], H[g]) for g in range(target.shape[0]))
    record = {"masked_error": before, "refit_error": after}
    if not after <= before:  # also NaN: the masked weights are the safe answer
        record["refit_error"] = before
        return record, f"kept its masked weights (the refit's error {after:.4g} is not below {before:.4g})"
    w.copy_(from_matrix(module, new, tuple(w.shape)))
    w.masked_fill_(~keep, 0.0)  # exact zeros where pruned, whatever the solve's rounding
    return record, None
