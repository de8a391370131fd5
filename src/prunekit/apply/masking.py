"""The masking applier: apply a Plan by zeroing entries in place and keeping compact masks.

Why not ``torch.nn.utils.parametrize`` or forward pre-hooks (as torch's prune
does)? Both run on every forward: we measured 77-320% extra latency on small
layers. Here the forward path is untouched: pruned entries are *stored* as
zeros, and a packed bit mask (1 bit per entry) is kept as a buffer named
``<param>_mask`` next to the parameter. Training code calls :func:`enforce`
(or uses :class:`MaskEnforcer`) after each optimizer step to put the zeros
back; :func:`prunekit.train.loop.finetune` does that for you.

Because masks are ordinary buffers, ``copy.deepcopy`` and ``state_dict`` carry
them; :func:`load_state_dict` also restores them into a fresh, unmasked model, and
:func:`plain_state_dict` leaves them out, for plain PyTorch (``load_state_dict(strict=True)`` on an
unpruned model) and other tools.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from prunekit.bits import pack_bits, unpack_bits
from prunekit.errors import InvalidTypeError, PrunekitError
from prunekit.plan import Plan, TensorPlan
from prunekit.targets import owner_of

MASK_SUFFIX = "_mask"
ORIG_SUFFIX = "_orig_values"




def masked_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str]]:
    """(dotted name, module, attribute) of every parameter that carries a prunekit mask."""
    for mod_name, module in model.named_modules():
        for bname in list(module._buffers):
            stem = bname[: -len(MASK_SUFFIX)]
            if bname.endswith(MASK_SUFFIX) and stem in module._parameters:
                yield (f"{mod_name}.{stem}" if mod_name else stem), module, stem


def get_mask(module: nn.Module, pname: str) -> Optional[torch.Tensor]:
    """Boolean keep-mask of ``module.<pname>`` (True = kept), or None if not masked."""
    packed = module._buffers.get(pname + MASK_SUFFIX)
    if packed is None:
        return None
    p = module._parameters[pname]
    return unpack_bits(packed, p.numel()).reshape(p.shape)


def masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """All keep-masks of the model, by dotted parameter name."""
    return {name: get_mask(m, p) for name, m, p in masked_parameters(model)}


def is_masked(model: nn.Module) -> bool:
    return next(masked_parameters(model), None) is not None


@torch.no_grad()
def apply(model: nn.Module, plan: Plan, *, keep_original: bool = False) -> nn.Module:
    """Apply ``plan`` as masks, in place; returns ``model``.

    Masks compose: an entry pruned before stays pruned. Everything is checked
    before anything changes, so a bad plan leaves the model as it was.
    ``keep_original=True`` keeps the values of pruned entries (non-persistent,
    extra memory = the pruned fraction of the tensor) so that :func:`remove`
    can restore them.
    """
    staged = []
    for tp in plan:  # check everything first: a bad plan must leave the model as it was
        module, pname = owner_of(model, tp.name)
        param = module._parameters[pname]
        if tuple(param.shape) != tuple(tp.shape):
            raise PrunekitError(f"plan for {tp.name} has shape {tuple(tp.shape)}, "
                             f"but the model's tensor has shape {tuple(param.shape)}")
        staged.append((module, pname, param, tp))
    prunes_nothing = all(tp.pruned_units == 0 for _, _, _, tp in staged)
    for module, pname, param, tp in staged:  # one unpacked mask at a time: memory stays low
        old = get_mask(module, pname)
        if prunes_nothing and old is None:
            continue  # amount=0 is a no-op: the model stays plain, no masks added
        keep = tp.keep_mask().to(param.device)
        if old is not None:
            keep = keep & old
        bits = None if old is not None or tp.keep_bits is None else tp.keep_bits
        _apply_one(module, pname, param, keep, keep_original, bits)
    return model


def _apply_one(module, pname, param, keep, keep_original, bits=None) -> None:
    bits = pack_bits(keep.reshape(-1)) if bits is None else bits  # reuse the plan's packed bits
    pruned = keep.logical_not_()  # in place: one full-size mask at a time is enough
    if keep_original or (pname + ORIG_SUFFIX) in module._buffers:
        full = param.detach().clone()
        old = module._buffers.get(pname + ORIG_SUFFIX)
        if old is not None:  # put earlier originals back before gathering the new set
            full.view(-1)[~get_mask(module, pname).reshape(-1)] = old
        module.register_buffer(pname + ORIG_SUFFIX, full.reshape(-1)[pruned.reshape(-1)].clone(),
                               persistent=False)
    param.masked_fill_(pruned, 0.0)
    module.register_buffer(pname + MASK_SUFFIX, bits.to(param.device))


@contextlib.contextmanager
def restored_on_error(model: nn.Module, names: Sequence[str]) -> Iterator[Dict[str, torch.Tensor]]:
    """Run a multi-step change of ``names`` (several :func:`apply` calls, weights rewritten) all or nothing.

    Yields ``{name: a copy of the tensor as it is now}`` (the dense weights a refit aims at). If the block
    raises, every parameter and mask buffer of the modules owning ``names`` is put back as it was, masks the
    block added are dropped: the project rule that an error never leaves a model half-modified. Memory: one
    copy of those modules' parameters.
    """
    saved: Dict[int, Tuple[nn.Module, Dict[str, torch.Tensor], Dict[str, torch.Tensor]]] = {}
    originals: Dict[str, torch.Tensor] = {}
    for name in names:
        module, pname = owner_of(model, name)
        if id(module) not in saved:  # a module once, however many of its tensors are named
            params = {k: p.detach().clone() for k, p in module._parameters.items() if p is not None}
            saved[id(module)] = (module, params, _mask_buffers(module))
        originals[name] = saved[id(module)][1][pname]
    try:
        yield originals
    except BaseException:
        with torch.no_grad():
            for module, params, buffers in saved.values():
                _restore_module(module, params, buffers)
        raise


def _mask_buffers(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {k: b.clone() for k, b in module._buffers.items()
            if b is not None and (k.endswith(MASK_SUFFIX) or k.endswith(ORIG_SUFFIX))}


def _restore_module(module: nn.Module, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]):
    for k, value in params.items():
        module._parameters[k].copy_(value)
    for k in [k for k in module._buffers if k.endswith(MASK_SUFFIX) or k.endswith(ORIG_SUFFIX)]:
        if k not in buffers:
            module._buffers.pop(k)
            module._non_persistent_buffers_set.discard(k)
    for k, b in buffers.items():
        module.register_buffer(k, b, persistent=not k.endswith(ORIG_SUFFIX))


@torch.no_grad()
def enforce(model: nn.Module) -> None:
    """Zero every masked entry again (call after an optimizer step)."""
    for _, module, pname in masked_parameters(model):
        module._parameters[pname].masked_fill_(~get_mask(module, pname), 0.0)


class MaskEnforcer:
    """Fast :func:`enforce` for training loops: unpacks each mask once and caches it.

    The cache is keyed by the mask buffer object, so masks changed by a new
    :func:`apply` (gradual pruning) are picked up automatically.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._cache: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def __call__(self) -> None:
        for name, module, pname in masked_parameters(self.model):
            packed = module._buffers[pname + MASK_SUFFIX]
            hit = self._cache.get(name)
            if hit is None or hit[0] is not packed:
                hit = (packed, ~get_mask(module, pname))
                self._cache[name] = hit
            module._parameters[pname].masked_fill_(hit[1], 0.0)

    def zero_grads(self) -> None:
        """Zero the gradients of pruned entries (keeps optimizer state of pruned weights clean)."""
        for name, module, pname in masked_parameters(self.model):
            p = module._parameters[pname]
            if p.grad is not None and name in self._cache:
                p.grad.masked_fill_(self._cache[name][1], 0.0)


class MaskGuard:
    """What :func:`keep_masks` returns: ``remove()`` takes the optimizer hooks off again."""

    def __init__(self, handles: Sequence[Any]):
        self._handles = list(handles)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def keep_masks(optimizer: torch.optim.Optimizer, model: nn.Module) -> MaskGuard:
    """Keep pruned weights at zero in *your own* training loop: hooks on ``optimizer.step``.

    Before each step the gradients of pruned entries are zeroed (so momentum and Adam's moments stay
    clean); after it the masked entries are zeroed again (weight decay and stale momentum would move
    them). prunekit's own loops (:func:`prunekit.finetune`) do this already. Masks added later (gradual
    pruning) are picked up at the next step.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidTypeError(f"keep_masks needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    enforcer = MaskEnforcer(model)
    enforcer()  # fills the cache, and zeroes anything revived before the guard was set

    def before_step(*_: Any) -> None:
        enforcer.zero_grads()

    def after_step(*_: Any) -> None:
        enforcer()

    return MaskGuard([optimizer.register_step_pre_hook(before_step),
                      optimizer.register_step_post_hook(after_step)])


def digest(model: nn.Module, h: Optional[Any] = None) -> str:
    """A short hash of every mask (names and bits): equal masks, equal digest. Feeds ``h`` if given."""
    h = h if h is not None else hashlib.sha256()
    for name, keep in sorted(masks(model).items()):
        h.update(name.encode())
        h.update(keep.numpy().tobytes())
    return h.hexdigest()[:16]


def revived(model: nn.Module) -> Dict[str, int]:
    """``{name: count}`` of pruned entries that are not zero (a training loop without the masks moved them)."""
    out = {}
    with torch.no_grad():
        for name, module, pname in masked_parameters(model):
            n = int(module._parameters[pname].masked_select(~get_mask(module, pname)).count_nonzero())
            if n:
                out[name] = n
    return out


def check_not_revived(model: nn.Module, doing: str = "save") -> None:
    """Refuse (:class:`PrunekitError`) a model whose pruned weights are not all zero: written out, they would hold
    values that loading with the masks zeroes, so the reloaded model would differ from this one."""
    moved = revived(model)
    if moved:
        raise PrunekitError(
            f"{sum(moved.values())} pruned weights are not zero ({', '.join(f'{k}: {v}' for k, v in list(moved.items())[:4])}"
            "): a training loop moved them off their masks. Keep them at zero while training with "
            f"prunekit.keep_masks(optimizer, model), or zero them now with prunekit.apply.enforce(model), then {doing}")


def _mask_keys(model: nn.Module) -> set:
    """The state_dict keys of prunekit's mask buffers, under every name a shared module has."""
    keys = set()
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for bname in module._buffers:
            if bname.endswith(MASK_SUFFIX) and bname[: -len(MASK_SUFFIX)] in module._parameters:
                keys.add(f"{mod_name}.{bname}" if mod_name else bname)
    return keys


@torch.no_grad()
def plain_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The model's ``state_dict`` as plain PyTorch expects it: prunekit's ``*_mask`` buffers left out and every
    pruned entry an exact zero, so ``fresh_model.load_state_dict(plain_state_dict(pruned), strict=True)`` works
    on an unpruned instance of the architecture (and so does ``save_pretrained(state_dict=...)``).

    Tensors are shared with the model (like ``state_dict``) except where a pruned entry had moved off zero
    (training without :func:`keep_masks`): those come back as zeroed copies, the model is not changed. Tied
    weights stay tied: every name of a shared parameter maps to the same tensor. To put the masks back later,
    save :func:`masks` (or :func:`current_plan`) beside it.
    """
    sd = model.state_dict()
    drop = _mask_keys(model)
    zeroed: Dict[int, torch.Tensor] = {}  # id(parameter) -> its exact-zero tensor, shared by all its names
    for _, module, pname in masked_parameters(model):
        p = module._parameters[pname]
        pruned = ~get_mask(module, pname)
        zeroed[id(p)] = p.detach().masked_fill(pruned, 0.0) if bool(p.detach()[pruned].any()) else p.detach()
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for key, value in sd.items():
        if key in drop:
            continue
        p = params.get(key)
        out[key] = zeroed.get(id(p), value) if p is not None else value
    return out


def remove(model: nn.Module, *, restore: bool = False) -> nn.Module:
    """Drop all masks. ``restore=True`` puts the original values back (needs keep_original)."""
    entries = list(masked_parameters(model))
    if restore:
        missing = [n for n, m, p in entries if (p + ORIG_SUFFIX) not in m._buffers]
        if missing:
            raise PrunekitError(f"cannot restore {', '.join(missing)}: they were pruned without "
                             "keep_original=True (original values were not kept)")
    with torch.no_grad():
        for _, module, pname in entries:
            if restore:
                keep = get_mask(module, pname)
                module._parameters[pname].view(-1)[~keep.reshape(-1)] = module._buffers[pname + ORIG_SUFFIX]
            module._buffers.pop(pname + MASK_SUFFIX, None)
            module._buffers.pop(pname + ORIG_SUFFIX, None)
            module._non_persistent_buffers_set.discard(pname + ORIG_SUFFIX)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold masks into plain weights: pruned entries stay zero, the mask buffers go."""
    enforce(model)
    return remove(model, restore=False)


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True):
    """``model.load_state_dict`` that also restores prunekit masks into an unmasked model."""
    params = dict(model.named_parameters(remove_duplicate=False))
    added = []
    for key, value in state_dict.items():
        stem = key[: -len(MASK_SUFFIX)] if key.endswith(MASK_SUFFIX) else None
        if stem is None or stem not in params:
            continue
        if value.dtype != torch.uint8 or value.numel() != math.ceil(params[stem].numel() / 8):
            raise PrunekitError(f"{key}: not a prunekit mask for {stem} of shape {tuple(params[stem].shape)}")
        module, pname = owner_of(model, stem)
        if (pname + MASK_SUFFIX) not in module._buffers:
            added.append((module, pname + MASK_SUFFIX, value))
    for module, bname, value in added:
        module.register_buffer(bname, torch.zeros_like(value))
    try:
        result = model.load_state_dict(state_dict, strict=strict)
    except Exception:
        for module, bname, _ in added:  # leave the model as it was
            module._buffers.pop(bname, None)
        raise
    enforce(model)
    return result


def sparsity(model: nn.Module) -> Dict[str, float]:
    """Fraction of zero entries of every masked parameter."""
    return {n: float((m._parameters[p] == 0).float().mean()) for n, m, p in masked_parameters(model)}


def global_sparsity(model: nn.Module, names: Optional[Sequence[str]] = None) -> float:
    """Fraction of zeros over the given parameters (default: all masked ones)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    names = list(names) if names is not None else [n for n, _, _ in masked_parameters(model)]
    total = sum(params[n].numel() for n in names)
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    return zeros / total if total else 0.0


def current_plan(model: nn.Module) -> Plan:
    """The masks a model carries now, as an (unstructured) Plan that can be saved and re-applied."""

    plan = Plan(meta={"source": "masks of a model"})
    for name, keep in masks(model).items():
        plan.tensors[name] = TensorPlan(name, tuple(keep.shape), "unstructured", units=keep.numel(),
                                        pruned_units=int((~keep).sum()), keep_bits=pack_bits(keep.reshape(-1)))
    return plan
