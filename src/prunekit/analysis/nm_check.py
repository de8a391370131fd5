"""Does a model satisfy N:M? ``validate_nm(model, 2, 4)`` lists the tensors that break it, with the reason.

The N:M rule itself (which groups, what is valid) is :mod:`prunekit.select.nm`; this module applies it to
a model's masked (or, without masks, all 2-D and larger) weights.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

from torch import nn

from prunekit.apply import masking
from prunekit.select.nm import groups_of, max_nonzeros, parse_nm


def _targets(model: nn.Module, names: Optional[Iterable[str]]) -> List[str]:
    if names is not None:
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            masking.owner_of(model, name)  # KeyError with close matches for a typo
        return names
    masked = [n for n, _, _ in masking.masked_parameters(model)]
    if masked:
        return masked
    return [n for n, p in model.named_parameters() if n.endswith("weight") and p.dim() >= 2]


def validate_nm(model: nn.Module, n: int, m: int, names: Optional[Iterable[str]] = None,
                dim: Optional[int] = None) -> Dict[str, str]:
    """Tensors that break N:M, with the reason; ``{}`` means every checked tensor is N:M.

    Checked by default: every parameter carrying a prunekit mask, or, in a model
    without masks, every weight with 2 or more dims.
    """
    n, m = parse_nm((n, m))
    params = dict(model.named_parameters(remove_duplicate=False))
    bad: Dict[str, str] = {}
    for name in _targets(model, names):
        worst = max_nonzeros(params[name], m, dim)
        if worst is None:
            bad[name] = f"the grouped dim of shape {tuple(params[name].shape)} is not a multiple of {m}"
        elif worst > n:
            g = groups_of(params[name], m, dim)
            count = int(((g != 0).sum(dim=1) > n).sum())
            bad[name] = f"{count} of {g.shape[0]} groups of {m} have more than {n} non-zeros (up to {worst})"
    return bad
