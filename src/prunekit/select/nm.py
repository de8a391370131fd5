"""N:M semi-structured sparsity: check which pattern a tensor satisfies.

A tensor is N:M along a dimension when every group of M consecutive entries
along it holds at most N non-zeros (2:4 is what sparse tensor cores run).
prunekit groups along the *input* dimension, as sparse kernels expect: the
last dim of a 2-D weight, the input channels (dim 1) of a conv weight, at each
kernel tap. ``dim=None`` means that convention; give an int to check another.

    check_nm(layer.weight, 2, 4)          # True / False
    nm_pattern(layer.weight)              # (2, 4), (4, 8), ... or None
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch

from prunekit.errors import PrunekitError
from prunekit.plan import Plan
from prunekit.select.sources import as_source, tensor_plan, with_current
from prunekit.select.threshold import full_scores

MS: Tuple[int, ...] = (4, 8, 16, 32, 64, 128)


def groups_of(tensor: torch.Tensor, m: int, dim: Optional[int]) -> Optional[torch.Tensor]:
    """``(groups, m)`` view of the entries along the checked dim, or None if it is not a multiple of m."""
    t = tensor.detach()
    if t.dim() == 0:
        return None
    if dim is None:
        dim = 1 if t.dim() > 2 else t.dim() - 1
    if not -t.dim() <= dim < t.dim():
        raise PrunekitError(f"dim={dim} is out of range for a tensor with {t.dim()} dims")
    moved = t.movedim(dim, -1)
    if moved.shape[-1] % m:
        return None
    return moved.reshape(-1, m)


def parse_nm(value: Union[str, Sequence[int]]) -> Tuple[int, int]:
    """The one N:M rule: ``(N, M)`` (or ``"N:M"``) integers with 0 < N < M, e.g. (2, 4) or "2:4"."""
    parts: Any = value.split(":") if isinstance(value, str) else value
    try:
        n, m = parts
        if isinstance(value, str):
            n, m = int(n), int(m)
    except (TypeError, ValueError):
        raise PrunekitError(f"nm={value!r} must be (N, M) or 'N:M' with integers 0 < N < M, e.g. (2, 4)") from None
    if isinstance(n, bool) or isinstance(m, bool) or not (isinstance(n, int) and isinstance(m, int)) \
            or not 0 < n < m:
        raise PrunekitError(f"nm={value!r} must be (N, M) or 'N:M' with integers 0 < N < M, e.g. (2, 4)")
    return int(n), int(m)


def max_nonzeros(tensor: torch.Tensor, m: int, dim: Optional[int] = None) -> Optional[int]:
    """The largest number of non-zeros in any group of ``m``; None if the dim is not a multiple of m."""
    g = groups_of(tensor, m, dim)
    if g is None:
        return None
    return int((g != 0).sum(dim=1).max()) if g.numel() else 0


def check_nm(tensor: torch.Tensor, n: int, m: int, dim: Optional[int] = None) -> bool:
    """Whether every group of ``m`` consecutive entries along ``dim`` has at most ``n`` non-zeros."""
    n, m = parse_nm((n, m))
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
        n = max(n, 1)  # an all-zero tensor: N:M needs N >= 1
        if best is None or n * best[1] < best[0] * m:
            best = (n, m)
    return best






def nm_keep(scores: torch.Tensor, n: int, m: int, name: str) -> torch.Tensor:
    """Keep the n best of every m consecutive entries along the input dimension."""
    # conv weights (out, in, kh, kw): group input channels at the same tap, as sparse
    # tensor cores expect (the reduction dimension in NHWC order)
    s = scores.movedim(1, -1) if scores.dim() > 2 else scores
    if s.dim() < 2 or s.shape[-1] % m:
        raise PrunekitError(f"{name}: N:M needs the input dimension ({s.shape[-1] if s.dim() else 0}) "
                         f"divisible by M={m}")
    groups = s.reshape(-1, m)
    idx = groups.topk(n, dim=1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, idx, True)
    keep = keep.reshape(s.shape)
    return keep.movedim(-1, 1) if scores.dim() > 2 else keep


def select_nm(scores, nm, current) -> Plan:
    """Layers whose input dimension is not a multiple of M are skipped with a note
    (as sparse tensor core tooling does): the rest of the model still gets N:M."""
    n, m = parse_nm(nm)
    plan = Plan(meta={"scope": "layer", "pattern": "nm", "nm": [n, m]})
    for name, sc in scores.items():
        s = full_scores(as_source(with_current(sc, current.get(name))))
        try:
            keep = nm_keep(s, n, m, name)
        except ValueError as e:
            plan.notes.append(f"skipped {e}")
            continue
        if name in current:
            keep &= current[name]
        tp = tensor_plan(name, s.shape, "nm", keep, 0, False)
        tp.nm = (n, m)
        plan.tensors[name] = tp
    if not plan.tensors:
        raise PrunekitError(f"no selected tensor can take the {n}:{m} pattern: " + "; ".join(plan.notes))
    return plan
