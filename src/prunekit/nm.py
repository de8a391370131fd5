"""N:M semi-structured sparsity: check which pattern a tensor satisfies.

A tensor is N:M along a dimension when every group of M consecutive entries
along it holds at most N non-zeros (2:4 is what sparse tensor cores run).
prunekit groups along the *input* dimension, as sparse kernels expect: the
last dim of a 2-D weight, the input channels (dim 1) of a conv weight, at each
kernel tap. ``dim=None`` means that convention; give an int to check another.

    check_nm(layer.weight, 2, 4)          # True / False
    nm_pattern(layer.weight)              # (2, 4), (4, 8), ... or None
    validate_nm(model, 2, 4)              # {name: why} of the tensors that break 2:4; {} if none
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

MS: Tuple[int, ...] = (4, 8, 16, 32, 64, 128)


def _groups(tensor: torch.Tensor, m: int, dim: Optional[int]) -> Optional[torch.Tensor]:
    """``(groups, m)`` view of the entries along the checked dim, or None if it is not a multiple of m."""
    t = tensor.detach()
    if t.dim() == 0:
        return None
    if dim is None:
        dim = 1 if t.dim() > 2 else t.dim() - 1
    if not -t.dim() <= dim < t.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor with {t.dim()} dims")
    moved = t.movedim(dim, -1)
    if moved.shape[-1] % m:
        return None
    return moved.reshape(-1, m)


def _check_nm_args(n: int, m: int) -> None:
    if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int)) \
            or not 0 <= n < m:
        raise ValueError(f"(n, m)=({n!r}, {m!r}) must be integers with 0 <= n < m, e.g. (2, 4)")


def max_nonzeros(tensor: torch.Tensor, m: int, dim: Optional[int] = None) -> Optional[int]:
    """The largest number of non-zeros in any group of ``m``; None if the dim is not a multiple of m."""
    g = _groups(tensor, m, dim)
    if g is None:
        return None
    return int((g != 0).sum(dim=1).max()) if g.numel() else 0


def check_nm(tensor: torch.Tensor, n: int, m: int, dim: Optional[int] = None) -> bool:
    """Whether every group of ``m`` consecutive entries along ``dim`` has at most ``n`` non-zeros."""
    _check_nm_args(n, m)
    worst = max_nonzeros(tensor, m, dim)
    return worst is not None and worst <= n


def nm_pattern(tensor: torch.Tensor, dim: Optional[int] = None,
               ms: Sequence[int] = MS) -> Optional[Tuple[int, int]]:
    """The tightest N:M pattern the tensor satisfies, or None.

    For each M in ``ms`` that divides the dim, N is the most non-zeros of any
    group; the pattern with the lowest density N/M wins, ties going to the
    smaller M (N:M implies kN:kM, never the reverse). A pattern with N == M says
    nothing, so a dense tensor gives None.
    """
    best = None
    for m in sorted(ms):
        n = max_nonzeros(tensor, m, dim)
        if n is None or n >= m:
            continue
        if best is None or n * best[1] < best[0] * m:
            best = (n, m)
    return best


def _targets(model: nn.Module, names: Optional[Iterable[str]]) -> List[str]:
    from . import masking

    if names is not None:
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            masking._owner(model, name)  # KeyError with close matches for a typo
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
    _check_nm_args(n, m)
    params = dict(model.named_parameters())
    bad: Dict[str, str] = {}
    for name in _targets(model, names):
        worst = max_nonzeros(params[name], m, dim)
        if worst is None:
            bad[name] = f"the grouped dim of shape {tuple(params[name].shape)} is not a multiple of {m}"
        elif worst > n:
            g = _groups(params[name], m, dim)
            count = int(((g != 0).sum(dim=1) > n).sum())
            bad[name] = f"{count} of {g.shape[0]} groups of {m} have more than {n} non-zeros (up to {worst})"
    return bad
