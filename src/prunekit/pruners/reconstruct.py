"""Exact reconstruction: the best kept weights of a layer once its mask is fixed.

A layer solver picks which weights go (and SparseGPT also nudges the rest, column by column, with an
approximate inverse-Hessian update). Once the mask is fixed, the kept weights that best reproduce the
layer's target outputs have a closed form, row by row: with ``H = X^T X`` the inputs' second moment and
``w*`` the weights the row should imitate (the dense row, or the dense-target row of
:func:`prunekit.pruners.sequential` which already folds in the dense model's outputs),

    minimise (w - w*)^T H (w - w*)  subject to  w_j = 0 for pruned j
    =>  H[S, S] w_S = (H w*)_S,    S = the row's kept inputs.

That is a small positive-definite system per row (one Cholesky each, batched), solved here. It is
what SparseGPT's update approximates, so refitting its weights can only lower the layer's calibration
error; applied after Wanda or magnitude it turns a selection-only method into one that also repairs
(Boža 2024 does the same with ADMM). Memory: a batch of ``rows x kept x kept`` systems, sized by
:data:`CHUNK_BYTES`.
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 1 << 28   # 256 MiB of float64 systems per batched solve (half that in float32)


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` in float64: the ridge SparseGPT uses, so a dead input cannot make
    the system singular."""
    H64 = H.double()
    ridge = damp * float(torch.diagonal(H64).mean()) if H64.numel() else 0.0
    return H64 + torch.eye(H64.shape[0], dtype=H64.dtype, device=H64.device) * max(ridge, 1e-12)


def refit_rows(W: torch.Tensor, H: torch.Tensor, keep: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The weights ``(out, in)`` minimising ``(w - W_i)^T H (w - W_i)`` for every row ``i`` with the entries
    where ``keep`` is False held at zero; returned in ``W``'s dtype (pruned entries exactly 0)."""
    if W.shape != keep.shape or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"refit_rows: W {tuple(W.shape)}, keep {tuple(keep.shape)} and H {tuple(H.shape)} "
                         "must be (out, in), (out, in) and (in, in)")
    Hd = damped(H, damp)
    rhs = W.double() @ Hd                       # row i: (H w*_i)^T; H is symmetric
    counts = keep.sum(1)
    out = torch.zeros(W.shape, dtype=torch.float64, device=W.device)
    kmax = int(counts.max()) if counts.numel() else 0
    if kmax == 0:
        return out.to(W.dtype)
    # the kept columns of each row first (stable: in column order), padded to kmax with pruned ones
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :kmax]
    valid = torch.arange(kmax, device=W.device).unsqueeze(0) < counts.unsqueeze(1)
    step = max(1, CHUNK_BYTES // (8 * kmax * kmax))
    for r0 in range(0, W.shape[0], step):
        idx, ok = order[r0:r0 + step], valid[r0:r0 + step]
        out[r0:r0 + step] = _solve_rows(Hd, rhs[r0:r0 + step], idx, ok)
    return out.to(W.dtype)


def _gather(Hd: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """Each row's ``H[S, S]``; the padding rows/columns made the identity (so their solution is 0)."""
    Hs = Hd[idx.unsqueeze(2), idx.unsqueeze(1)]
    if not bool(ok.all()):
        Hs.mul_((ok.unsqueeze(2) & ok.unsqueeze(1)).to(Hs.dtype))
        Hs.diagonal(dim1=1, dim2=2).add_((~ok).to(Hs.dtype))
    return Hs


def _solve_rows(Hd: torch.Tensor, rhs: torch.Tensor, idx: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """The refit rows ``(rows, in)`` of one chunk. A float32 Cholesky (about twice as fast as float64) and
    one step of iterative refinement against the float64 residual, which restores the digits float32 loses
    on the ill-conditioned Hessians activation outliers give; float64 throughout if float32 fails."""
    b = torch.gather(rhs, 1, idx).mul_(ok)
    L, info = torch.linalg.cholesky_ex(_gather(Hd.float(), idx, ok))
    if bool((info != 0).any()):
        x = torch.cholesky_solve(b.unsqueeze(-1), torch.linalg.cholesky(_gather(Hd, idx, ok))).squeeze(-1)
        return torch.zeros_like(rhs).scatter_(1, idx, x * ok)
    x = torch.cholesky_solve(b.float().unsqueeze(-1), L).squeeze(-1).double().mul_(ok)
    full = torch.zeros_like(rhs).scatter_(1, idx, x)
    residual = (b - torch.gather(full @ Hd, 1, idx)).mul_(ok)
    x += torch.cholesky_solve(residual.float().unsqueeze(-1), L).squeeze(-1).double().mul_(ok)
    return full.zero_().scatter_(1, idx, x)


def layer_error(W_new: torch.Tensor, W_target: torch.Tensor, H: torch.Tensor) -> float:
    """``sum_i (w_i - w*_i)^T H (w_i - w*_i)``: the layer's squared output error per calibration row."""
    D = (W_new.double() - W_target.double())
    return float(((D @ H.double()) * D).sum())
