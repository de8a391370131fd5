"""Bias correction: after pruning, move each layer's bias so that its *mean* output stays where it was.

A pruned weight ``w_ij`` takes ``w_ij * x_j`` out of output ``i``; on average that is ``w_ij * E[x_j]``.
Inputs that are not centred (post-GELU activations, LayerNorm outputs with a bias) make these losses add
up to a systematic shift of every output, which the next layers amplify. Adding
``(W - W_pruned) @ E[x]`` to the bias removes the shift exactly in expectation, at no run-time cost.
The idea is old (Nagel et al. 2019 for quantisation; Frantar & Alistarh's OBC reconstruction is its
full, second-order form); here it is an option of any criterion: ``prunekit.prune(..., bias_correction=True)``.

``E[x]`` comes from calibration data (the ``input_mean`` collector; the ``wanda`` collector records it
too, so Wanda needs no second pass). Convolutions use each input channel's mean over all positions,
which ignores zero padding at the borders. Layers without a bias are left as they are (noted in the plan).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch
from torch import nn

from prunekit.apply import masking
from prunekit.criteria.stats import FEATURE_LAYERS, input_means
from prunekit.errors import PrunekitError
from prunekit.plan import Plan

__all__ = ["bias_corrections", "apply_corrections", "apply_with_correction"]















def _delta(module: nn.Module, removed: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Mean output lost per output unit: ``removed`` weights times the mean of the input each one reads."""
    if isinstance(module, nn.Linear):
        return removed.reshape(removed.shape[0], -1) @ mean
    groups, out_ch = module.groups, removed.shape[0]
    per_group = removed.shape[1]
    group_of_row = torch.arange(out_ch) // (out_ch // groups)
    idx = group_of_row.reshape(-1, 1) * per_group + torch.arange(per_group).reshape(1, -1)
    return (removed.sum(dim=tuple(range(2, removed.dim()))) * mean[idx]).sum(1)


def bias_corrections(model: nn.Module, plan: Plan, stats: Mapping[str, Mapping]
                     ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``({bias name: value to add}, notes)`` for the weights ``plan`` prunes, computed *before* it is applied.

    Raises ValueError when a pruned weight has no input means in ``stats`` (they are needed, not optional).
    """
    modules = dict(model.named_modules())
    out: Dict[str, torch.Tensor] = {}
    notes: List[str] = []
    for tp in plan:
        mod_name, _, pname = tp.name.rpartition(".")
        module = modules.get(mod_name)
        if pname != "weight" or not isinstance(module, FEATURE_LAYERS):
            continue  # biases themselves, norms: nothing to correct
        if module.bias is None:
            notes.append(f"bias correction: {mod_name or 'model'} has no bias, left as it is")
            continue
        mean = input_means(stats, tp.name)
        if mean is None:
            raise PrunekitError(f"bias correction needs the input means of {tp.name}: pass data=... or stats "
                             "collected with the 'input_mean' (or 'wanda') collector")
        w = module.weight.detach()
        removed = w.float() * tp.keep_mask().logical_not().to(w.device)
        bname = f"{mod_name}.bias" if mod_name else "bias"
        d = _delta(module, removed, mean.to(w.device)).to(module.bias.dtype)
        out[bname] = out[bname] + d if bname in out else d
    return out, notes


@torch.no_grad()
def apply_corrections(model: nn.Module, corrections: Mapping[str, torch.Tensor]) -> None:
    """Add the corrections to the biases; entries of a masked bias (a whole output removed) stay zero."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, delta in corrections.items():
        params[name].add_(delta)
        mod_name, _, pname = name.rpartition(".")
        keep = masking.get_mask(model.get_submodule(mod_name), pname)
        if keep is not None:
            params[name].masked_fill_(~keep.to(params[name].device), 0.0)


def apply_with_correction(model: nn.Module, plan: Plan, stats: Mapping[str, Mapping]) -> Plan:
    """Apply ``plan`` as masks and correct the biases of the layers it prunes; returns the plan, with the
    corrected biases in ``meta["bias_correction"]`` and layers left alone in its notes. The corrections are
    computed first (they need the removed values), so an error leaves the model as it was."""
    corrections, notes = bias_corrections(model, plan, stats)
    masking.apply(model, plan)
    apply_corrections(model, corrections)
    plan.notes.extend(notes)
    plan.meta["bias_correction"] = sorted(corrections)
    return plan
