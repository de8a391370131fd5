"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning that also rewrites the kept weights.

For a Linear layer with calibration inputs ``X`` the goal is a sparse ``W'``
with ``X W'^T`` close to ``X W^T``. With ``H = X^T X`` (plus damping), removing
weight ``w_ij`` costs ``w_ij^2 / [H^-1]_jj`` and the best correction of the
weights to its right in that row is ``-w_ij / [H^-1]_jj * H^-1_{j,:}``
(Optimal Brain Surgeon). SparseGPT walks the columns left to right, using rows
of the upper Cholesky factor of ``H^-1`` for these updates, and picks the mask
of each block of ``blocksize`` columns from the weights as they are when the
block is reached (or N:M within each group of M columns).

Layers go one at a time, in forward order: the inputs of layer k are recorded
with layers before it already pruned, so later layers correct for earlier
errors. For a generic ``nn.Module`` that means one pass over the calibration
data per layer (stopped right after the layer's input is seen); layers that
read the very same input tensor (q, k, v of an attention block) share one pass
and one ``H``. Memory: one ``H`` (in_features^2, float64) at a time, plus a copy
of the original target weights, which are put back if anything fails.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit._util import check_choice, progress_enabled
from prunekit.apply import masking
from prunekit.bits import pack_bits
from prunekit.criteria.stats import batches, check_reiterable, default_forward, preserved_state
from prunekit.errors import PrunekitError
from prunekit.plan import Plan, TensorPlan
from prunekit.pruners.base import Pruner, register_pruner
from prunekit.select.allocation import magnitude_allocation
from prunekit.select.nm import parse_nm
from prunekit.select.probe import LossProbe, sensitivity_allocation
from prunekit.select.ranking import PruningShortfall, amount_of
from prunekit.spec import Calibration, PruneSpec
from prunekit.targets import select_targets


class StopForward(Exception):
    """Raised by a hook once it has what it needs: the rest of the forward is not computed."""


# ----------------------------------------------------------------------------- the OBS core

def _check_target(sparsity, nm) -> None:
    if (sparsity is None) == (nm is None):
        raise PrunekitError("give exactly one of sparsity (a fraction in [0, 1)) or nm=(N, M)")
    if nm is not None:
        parse_nm(nm)
        return
    for s in (sparsity.values() if isinstance(sparsity, Mapping) else [sparsity]):  # one, or one per layer
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or isinstance(s, numbers.Integral) \
                or not 0.0 <= s < 1.0:
            raise PrunekitError(f"sparsity={s!r} must be a fraction in [0, 1)")


def _check_options(blocksize, damp) -> None:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise PrunekitError(f"blocksize={blocksize!r} must be a positive int (e.g. 128)")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not 0.0 <= damp < math.inf:
        raise PrunekitError(f"damp={damp!r} must be a number >= 0 (a fraction of H's mean diagonal, e.g. 0.01)")


def _inverse_cholesky(H: torch.Tensor, damp: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, dead-input flags)."""
    H = H.clone()
    dead = torch.diagonal(H) == 0                # inputs that were always zero: H's row is zero
    H[dead, dead] = 1.0                          # decoupled from the rest; pruning them costs nothing
    H.diagonal().add_(damp * float(torch.diagonal(H).mean()))
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise PrunekitError("the input Hessian is not positive definite (collinear or too few calibration "
                         f"rows); raise damp (now {damp}) or give more calibration data")
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise PrunekitError(f"the inverse Hessian is not positive definite; raise damp (now {damp})")
    return U, dead


def _lowest(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k lowest entries (ties by position); -inf entries (already pruned) always included."""
    flat = saliency.reshape(-1)
    k = max(k, int(torch.isneginf(flat).sum()))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[torch.argsort(flat, stable=True)[:k]] = True
    return mask.reshape(saliency.shape)


def _nm_lowest(saliency: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per row of a (rows, m) group: prune the m - n lowest (more if more were pruned before)."""
    order = torch.argsort(saliency, dim=1, stable=True)
    ranks = torch.arange(m, device=order.device).expand_as(order).contiguous()
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    k = torch.clamp(torch.isneginf(saliency).sum(1, keepdim=True), min=m - n)
    return rank < k


def _saliency(W1, d, dead, forced) -> torch.Tensor:
    s = W1.pow(2) / d.pow(2).reshape(1, -1)
    s[:, dead] = 0.0
    if forced is not None:
        s = s.masked_fill(forced, -math.inf)
    return s


def obs_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: Optional[float] = None, *,
              nm: Optional[Tuple[int, int]] = None, blocksize: int = 128, damp: float = 0.01,
              keep: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Prune one (rows, cols) weight given ``H = X^T X``; returns (new weight, keep mask, OBS loss).

    ``sparsity`` is met exactly over the whole tensor (each block gets its share);
    ``keep`` is a mask of entries still allowed (False = pruned before, stays pruned).
    """
    _check_target(sparsity, nm)
    _check_options(blocksize, damp)
    W = weight.detach().to(torch.float64).clone()
    rows, cols = W.shape
    if tuple(hessian.shape) != (cols, cols):
        raise PrunekitError(f"hessian has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    U, dead = _inverse_cholesky(hessian.detach().to(torch.float64), damp)
    forced = None if keep is None else ~keep.reshape(rows, cols).bool()
    if nm is not None:
        blocksize = -(-blocksize // nm[1]) * nm[1]  # blocks hold whole groups
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        f1 = None if forced is None else forced[:, i1:i2]
        W1, d1 = W[:, i1:i2].clone(), torch.diagonal(U)[i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:  # the block's share of an exact total: cumulative rounding
            k = round(sparsity * rows * i2) - round(sparsity * rows * i1)
            mask1 = _lowest(_saliency(W1, d1, dead[i1:i2], f1), k)
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                mask1[:, g] = _nm_lowest(_saliency(W1[:, g], d1[g], dead[i1:i2][g],
                                                   None if f1 is None else f1[:, g]), *nm)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            err = (w - q) / U[i1 + i, i1 + i]
            loss += float(err.pow(2).sum()) / 2
            W1[:, i:] -= err.reshape(-1, 1) * U[i1 + i, i1 + i:i2].reshape(1, -1)
            W1[:, i] = q  # exact zeros (the update above gives them only up to rounding)
            err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ U[i1:i2, i2:]
        pruned[:, i1:i2] = mask1
    return W.to(weight.dtype), ~pruned, loss


# ----------------------------------------------------------------------------- the model driver

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def is_transposed_linear(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's projections): a Linear whose weight is stored (in, out)."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == module.nf)


def is_linear(module: nn.Module) -> bool:
    """A layer computing ``x @ W^T + b`` on the last dimension: nn.Linear or a transposed one."""
    return isinstance(module, nn.Linear) or is_transposed_linear(module)


def _targets(model: nn.Module, names: Optional[Sequence[str]], notes: List[str]) -> Dict[str, nn.Module]:
    """The layers to prune; a selected layer SparseGPT cannot take is skipped with a note (and a warning)."""
    if names is None:
        names = select_targets(model, types=["Linear", "Conv1d", "Conv2d"])
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise PrunekitError("no layers to prune: names is empty")
    out = {}
    for name in names:
        module, pname = masking.owner_of(model, name)
        if pname != "weight" or not (isinstance(module, SUPPORTED) or is_linear(module)):
            raise PrunekitError(f"sparsegpt prunes the weights of {', '.join(t.__name__ for t in SUPPORTED)} layers; "
                                f"{name} is the {pname!r} of a {type(module).__name__}")
        why = unsupported_conv(module)
        if why:
            notes.append(f"skipped {name}: {why}")
            continue
        out[name] = module
    if not out:
        raise PrunekitError("no selected layer can be pruned by sparsegpt: " + "; ".join(notes))
    return out


def unsupported_conv(module: nn.Module) -> Optional[str]:
    if is_linear(module):
        return None
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        return f"{type(module).__name__} with padding={module.padding!r}, padding_mode={module.padding_mode!r} " \
               "(its unfolded inputs need explicit zero padding)"
    return None


# ----------------------------------------------------------------------------- layers as matrices
# A Linear is (out, in) on input rows. A Conv is, per group, (out_g, taps * in_g) on its unfolded input patches,
# columns ordered tap-major (the input channels of one kernel tap are consecutive), so that N:M groups of M
# columns are M input channels at one tap: what sparse tensor cores expect and what prunekit's N:M rule checks.

def _conv2d_view(module: nn.Module) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    """(kernel, stride, padding, dilation) as 2-D pairs: a Conv1d is a Conv2d of height 1."""
    if isinstance(module, nn.Conv1d):
        return ((1, module.kernel_size[0]), (1, module.stride[0]), (0, module.padding[0]), (1, module.dilation[0]))
    return module.kernel_size, module.stride, module.padding, module.dilation


def layer_features(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as (groups, rows, cols): the rows X of ``H = X^T X`` for each group."""
    if is_linear(module):
        return x.reshape(-1, _in_width(module)).unsqueeze(0)
    x = x.unsqueeze(-2) if isinstance(module, nn.Conv1d) else x  # (N, C, L) -> (N, C, 1, L)
    if x.dim() == 3:  # an unbatched input
        x = x.unsqueeze(0)
    kernel, stride, padding, dilation = _conv2d_view(module)
    u = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    g, taps = module.groups, kernel[0] * kernel[1]
    u = u.reshape(u.shape[0], g, module.in_channels // g, taps, u.shape[-1])      # (N, G, in_g, taps, L)
    return u.permute(1, 0, 4, 3, 2).reshape(g, -1, taps * (module.in_channels // g))


def as_matrix(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor as (groups, out_g, cols), columns as in :func:`layer_features`."""
    if is_linear(module):
        return (t.t() if is_transposed_linear(module) else t).unsqueeze(0)
    g = module.groups
    w = t.reshape(g, t.shape[0] // g, t.shape[1], -1)                 # (G, out_g, in_g, taps)
    return w.permute(0, 1, 3, 2).reshape(g, t.shape[0] // g, -1)


def from_matrix(module: nn.Module, m: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`as_matrix`."""
    if is_linear(module):
        return m.squeeze(0).t() if is_transposed_linear(module) else m.squeeze(0)
    g, out_g = m.shape[0], m.shape[1]
    in_g = shape[1]
    w = m.reshape(g, out_g, -1, in_g).permute(0, 1, 3, 2)               # (G, out_g, in_g, taps)
    return w.reshape(shape)


def _nm_width(module: nn.Module) -> int:
    """The input width an N:M group runs along: in_features, or the input channels of one group at a tap."""
    return _in_width(module) if is_linear(module) else module.in_channels // module.groups


def _in_width(module: nn.Module) -> int:
    return module.weight.shape[0] if is_transposed_linear(module) else module.in_features


def record_calls(model: nn.Module, targets: Dict[str, nn.Linear], batch, forward_fn):
    """Forward order of the targets on one batch, grouped where consecutive layers read the very same
    tensor (their inputs do not depend on each other); also how often each layer is called."""
    calls: List[Tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, _n=n: calls.append((_n, args[0])))
               for n, m in targets.items()]
    try:
        forward_fn(model, batch)
    finally:
        for h in handles:
            h.remove()
    count: Dict[str, int] = {}
    for n, _ in calls:
        count[n] = count.get(n, 0) + 1
    missing = [n for n in targets if n not in count]
    if missing:
        raise PrunekitError(f"calibration never reached {', '.join(missing)} (not called in the forward); "
                         "exclude it (names=...) or check forward_fn")
    groups: List[List[str]] = []
    prev = None
    for n, x in calls:
        if any(n in g for g in groups):
            prev = (n, x)  # a later call of a layer used twice: its first call placed it
            continue
        if prev is not None and prev[1] is x and count[n] == 1 and count[prev[0]] == 1 and prev[0] in groups[-1]:
            groups[-1].append(n)
        else:
            groups.append([n])
        prev = (n, x)
    return groups, count


def layer_hessian(model: nn.Module, module: nn.Module, data, forward_fn, max_batches, stop_early: bool):
    """``X^T X / rows`` of the module's inputs over the calibration data, per group: (groups, cols, cols)."""
    acc = {"H": None, "rows": 0}

    def hook(mod, args):
        x = layer_features(mod, args[0].detach()).float()
        h = (x.transpose(1, 2) @ x).double()  # float32 products, float64 sum over batches
        acc["H"] = h if acc["H"] is None else acc["H"].add_(h)
        acc["rows"] += x.shape[1]
        if stop_early:
            raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        for batch in batches(data, max_batches, False, "sparsegpt"):
            try:
                forward_fn(model, batch)
            except StopForward:
                pass
    finally:
        handle.remove()
    return acc["H"] / max(acc["rows"], 1)


def _skip_nm(targets: Dict[str, nn.Module], nm, notes: List[str]) -> Dict[str, nn.Module]:
    if nm is None:
        return targets
    kept = {n: m for n, m in targets.items() if _nm_width(m) % nm[1] == 0}
    for n in targets.keys() - kept.keys():
        notes.append(f"skipped {n}: N:M needs the input dimension ({_nm_width(targets[n])}) divisible by "
                     f"M={nm[1]}")
    if not kept:
        raise PrunekitError(f"no selected layer can take the {nm[0]}:{nm[1]} pattern: " + "; ".join(notes))
    return kept


@dataclass
class _Job:
    """What the layer loop needs; ``backup`` holds the original weights of the layers done so far."""

    model: nn.Module
    targets: Dict[str, nn.Linear]
    data: Iterable
    forward_fn: Callable[[nn.Module, Any], Any]
    max_batches: Optional[int]
    obs: Dict[str, Any]                      # obs_prune's options
    current: Dict[str, torch.Tensor]         # masks the model carried before
    plan: Plan
    backup: Dict[str, torch.Tensor] = field(default_factory=dict)


def sparsegpt_prune(model: nn.Module, data: Iterable, sparsity: Union[None, float, Mapping[str, float]] = None, *,
                    nm: Optional[Tuple[int, int]] = None, names: Optional[Sequence[str]] = None,
                    blocksize: int = 128, damp: float = 0.01, seed: int = 0,
                    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
                    max_batches: Optional[int] = None, progress: Optional[bool] = None,
                    scope: str = "layer") -> Plan:
    """Prune the Linear and Conv1d/Conv2d layers ``names`` (default: all but the classifier) one-shot with
    SparseGPT; a conv is pruned per group on its unfolded input patches (im2col Hessian), grouped and
    depthwise ones included: ``scope="layer"`` spreads a grouped conv's sparsity over its groups by
    saliency (:func:`group_sparsities`), ``"row"`` gives every group (every row) the same share.

    ``sparsity`` (fraction per layer) or ``nm=(N, M)``. ``data`` is re-iterated once
    per layer (a list or a DataLoader; see :mod:`prunekit.criteria.stats` for
    ``forward_fn``). Writes the reconstructed weights, applies the masks with
    :func:`prunekit.apply.masking.apply` and returns the Plan (masks only: re-applying it
    to another copy gives the masks, not the reconstruction). SparseGPT has no
    randomness; ``seed`` is recorded for a uniform API. On any error the model is
    left as it was.
    """
    _check_target(sparsity, nm)
    _check_options(blocksize, damp)
    check_choice(scope, SparseGPTPruner.scopes, "scope")
    check_reiterable(data, "sparsegpt")
    nm = None if nm is None else parse_nm(nm)
    notes: List[str] = []
    targets = _skip_nm(_targets(model, names, notes), nm, notes)
    if isinstance(sparsity, Mapping) and set(targets) - set(sparsity):
        raise PrunekitError(f"per-layer sparsities miss {sorted(set(targets) - set(sparsity))[:5]}")
    plan = Plan(meta={"criterion": "sparsegpt", "scope": scope,
                      "pattern": "unstructured" if nm is None else "nm", "amount": sparsity,
                      "nm": list(nm) if nm else None, "blocksize": blocksize, "damp": damp, "seed": seed,
                      "targets": list(targets), "obs_loss": {}}, notes=notes)
    job = _Job(model, targets, data, forward_fn or default_forward, max_batches,
               dict(sparsity=sparsity, nm=nm, blocksize=blocksize, damp=damp, scope=scope), masking.masks(model), plan)
    try:
        with preserved_state(model), torch.no_grad():
            first = next(iter(data), None)
            if first is None:
                raise PrunekitError("the calibration data yielded no batch")
            groups, count = record_calls(model, targets, first, job.forward_fn)
            _prune_groups(job, groups, count, progress)
        masking.apply(model, plan)
        for note in notes:  # layers left as they were: said on stderr too, not only in plan.notes
            warnings.warn(note, PruningShortfall, stacklevel=2)
    except BaseException:
        with torch.no_grad():
            for name, w in job.backup.items():  # leave the model as it was
                targets[name].weight.copy_(w)
        raise
    return plan


def _prune_groups(job: _Job, groups: List[List[str]], count: Dict[str, int], progress: Optional[bool]) -> None:
    for group in tqdm(groups, desc="sparsegpt", leave=False, disable=not progress_enabled(progress)):
        # a layer called more than once per forward sees all its calls: no early stop then
        H = layer_hessian(job.model, job.targets[group[0]], job.data, job.forward_fn, job.max_batches,
                     stop_early=count[group[0]] == 1)
        for name in group:
            module = job.targets[name]
            obs = {**job.obs, "sparsity": None if job.obs["nm"] else amount_of(job.obs["sparsity"], name)}
            new, keep, loss = obs_prune_layer(module, H, obs, job.current.get(name))
            job.backup[name] = module.weight.detach().clone()
            module.weight.copy_(new)
            job.plan.tensors[name] = keep_plan(name, keep, job.obs["nm"])
            job.plan.meta["obs_loss"][name] = loss
        del H


def obs_prune_layer(module: nn.Module, H: torch.Tensor, obs: Dict[str, Any], current: Optional[torch.Tensor]):
    """obs_prune on each group's matrix; the weight and keep mask back in the layer's shape.

    A grouped conv's groups share the layer's sparsity as :func:`group_sparsities` says (``obs["scope"]``
    "layer", the default) or each take it whole (``"row"``)."""
    w = module.weight
    mats, keeps = as_matrix(module, w.detach()), None if current is None else as_matrix(module, current)
    shares = [obs["sparsity"]] * mats.shape[0]
    if mats.shape[0] > 1 and obs["nm"] is None and obs.get("scope", "layer") == "layer":
        shares = group_sparsities(mats, H, obs["sparsity"], obs["damp"], keeps)
    out = [obs_prune(mats[g], H[g], shares[g], nm=obs["nm"], blocksize=obs["blocksize"], damp=obs["damp"],
                     keep=None if keeps is None else keeps[g]) for g in range(mats.shape[0])]
    new = from_matrix(module, torch.stack([o[0] for o in out]), tuple(w.shape))
    keep = from_matrix(module, torch.stack([o[1] for o in out]), tuple(w.shape))
    return new, keep, float(sum(o[2] for o in out))


def group_sparsities(mats: torch.Tensor, H: torch.Tensor, sparsity: float, damp: float,
                     keeps: Optional[torch.Tensor]) -> List[float]:
    """Each group's sparsity when a grouped conv's groups share the layer's target by OBS saliency.

    A depthwise conv's group is one filter of one channel: a uniform rate would strip a channel that
    carries the signal as hard as a silent one. Pooling every group's initial saliency ``w^2 / [H^-1]_jj``
    (its own Hessian) and pruning the ``round(sparsity * numel)`` lowest gives each group its count, so the
    layer total stays exact; each group keeps its best weight, as obs_prune cannot empty a group.
    """
    sal = []
    for g in range(mats.shape[0]):
        U, dead = _inverse_cholesky(H[g].detach().to(torch.float64), damp)
        s = _saliency(mats[g].to(torch.float64), torch.diagonal(U), dead,
                      None if keeps is None else ~keeps[g].bool())
        s.reshape(-1)[torch.argmax(s.reshape(-1))] = math.inf   # the group's best weight stays
        sal.append(s.reshape(-1))
    flat = torch.cat(sal)
    k = min(max(round(sparsity * flat.numel()), int(torch.isneginf(flat).sum())), flat.numel() - len(sal))
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    pruned[torch.argsort(flat, stable=True)[:k]] = True
    return [float(c) / mats[g].numel() for g, c in enumerate(pruned.reshape(len(sal), -1).sum(1))]


def keep_plan(name: str, keep: torch.Tensor, nm) -> TensorPlan:
    pattern = "unstructured" if nm is None else "nm"
    return TensorPlan(name, tuple(keep.shape), pattern, units=keep.numel(), pruned_units=int((~keep).sum()),
                      keep_bits=pack_bits(keep.reshape(-1).cpu()), nm=None if nm is None else tuple(nm))


# ----------------------------------------------------------------------------- prune(criterion="sparsegpt")

@register_pruner("sparsegpt")
class SparseGPTPruner(Pruner):
    """``prunekit.prune(model, amount, criterion="sparsegpt", data=...)``: a PruneSpec mapped onto
    :func:`sparsegpt_prune` (Linear and Conv1d/Conv2d layers by default; ``blocksize``, ``damp``, ``max_batches``, ``progress``)."""

    patterns = ("unstructured", "nm")
    scopes = ("layer", "row")  # row: every row (every group of a grouped conv) to the same sparsity
    options = ("blocksize", "damp", "max_batches", "progress")

    def prune(self, model: nn.Module, amount, spec: PruneSpec, calib: Calibration, **options: Any) -> Plan:
        if calib.data is None:
            raise PrunekitError("sparsegpt needs calibration data: prune(..., criterion='sparsegpt', data=batches)")
        if calib.stats is not None or (calib.loss_fn is not None and spec.allocation != "sensitivity"):
            raise PrunekitError("sparsegpt collects its own statistics from data=...: it takes no stats, and loss_fn "
                                "only for allocation='sensitivity'")
        names = select_targets(model, types=["Linear", "Conv1d", "Conv2d"] if spec.types is None else spec.types,
                               include=spec.include,
                               exclude=spec.exclude, include_classifier=spec.include_classifier)
        common = dict(names=names, seed=spec.seed, forward_fn=calib.forward_fn, scope=spec.scope, **options)
        if spec.pattern == "nm":
            return sparsegpt_prune(model, calib.data, nm=spec.nm, **common)
        if amount is None:
            raise PrunekitError("amount is required: a fraction in [0, 1)")
        if spec.allocation == "owl":
            raise PrunekitError("sparsegpt takes allocation 'uniform', 'magnitude' or 'sensitivity' (owl needs "
                                "per-entry scores)")
        if spec.allocation != "uniform":
            _check_target(amount, None)
        if spec.allocation == "magnitude":  # the per-layer sparsities of one global |w| ranking
            amount = magnitude_allocation({n: model.get_parameter(n) for n in names}, amount, spec.min_keep)
        if spec.allocation == "sensitivity":  # each layer reconstructed alone at a few sparsities, its loss probed
            amount = _probed_allocation(model, names, amount, spec, calib, options)
        return sparsegpt_prune(model, calib.data, amount, **common)


def _probed_allocation(model: nn.Module, names, amount: float, spec: PruneSpec, calib: Calibration,
                       options: Mapping[str, Any]) -> Dict[str, float]:
    """``allocation="sensitivity"`` with SparseGPT's own layer solve as the trial (:mod:`prunekit.select.probe`)."""
    targets = _targets(model, names, [])
    forward_fn = calib.forward_fn or default_forward
    obs = dict(nm=None, blocksize=options.get("blocksize", 128), damp=options.get("damp", 0.01), scope=spec.scope)
    _check_options(obs["blocksize"], obs["damp"])
    check_reiterable(calib.data, "sparsegpt")
    with preserved_state(model), torch.no_grad():
        first = next(iter(calib.data), None)
        if first is None:
            raise PrunekitError("the calibration data yielded no batch")
        _, count = record_calls(model, targets, first, forward_fn)
    current = masking.masks(model)
    hessian: Dict[str, torch.Tensor] = {}   # the layer being probed only: one H in memory at a time

    def trial(name: str, sparsity: float) -> torch.Tensor:
        if name not in hessian:
            hessian.clear()
            with preserved_state(model), torch.no_grad():
                hessian[name] = layer_hessian(model, targets[name], calib.data, forward_fn,
                                              options.get("max_batches"), stop_early=count[name] == 1)
        return obs_prune_layer(targets[name], hessian[name], {**obs, "sparsity": sparsity}, current.get(name))[0]

    probe = LossProbe(calib.data, calib.forward_fn, calib.loss_fn)
    return sensitivity_allocation(model, list(targets), amount, trial, probe, min_keep=spec.min_keep,
                                  current={n: current[n] for n in targets if n in current})
