"""The surgery applier: physically remove the slices a structured Plan prunes.

``compact(model, plan)`` returns a new, smaller, plain ``nn.Module``: the pruned
rows/columns/channels are gone from weights, biases and BatchNorm statistics,
and module attributes (``in_features``, ``out_channels``, ``num_features``, ...)
match. It gives the same outputs as ``prunekit.apply.masking.apply(model, plan)``
for plans made by :func:`prunekit.surgery.plan_groups` (exact groups).

How a module is sliced is a *layer handler*, registered by type::

    @prunekit.surgery.register_layer_handler(MyLayer, attrs=("width",))
    def _(module, cuts):
        slice_tensors(module, cuts)            # cuts: {attr: {dim: kept indices}}
        module.width = module.weight.shape[0]

``compact_shapes(slim)`` records the new shapes as JSON and ``rebuild(original,
shapes)`` makes the slim architecture again from the user's model class, so a
compacted model is saved as a state_dict + JSON, without pickling modules.
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from prunekit._util import eval_mode
from prunekit.apply import masking
from prunekit.errors import PrunekitError, UnknownNameError
from prunekit.plan import Plan
from prunekit.registry import Registry
from prunekit.surgery.graph import Member, shapes_of, type_key

LAYER_HANDLERS = Registry("layer handler")
Cuts = Dict[str, Dict[int, torch.Tensor]]   # tensor attribute -> {dim: indices to keep}
SHAPES_FORMAT = "prunekit.shapes/1"


@dataclass(frozen=True)
class LayerHandler:
    """How to slice one layer type, with what it needs declared.

    ``fn(module, cuts)`` slices the module's tensors (usually :func:`slice_tensors`) and updates its
    attributes; ``attrs`` are the attributes that describe its shape (saved by :func:`compact_shapes`,
    restored by :func:`rebuild`); ``refresh``: also called with empty cuts on every such module after all
    tensors were sliced, for attributes derived from its children.
    """

    fn: Callable[[nn.Module, "Cuts"], None]
    attrs: Tuple[str, ...] = ()
    refresh: bool = False

    def __call__(self, module: nn.Module, cuts: "Cuts") -> None:
        self.fn(module, cuts)


def register_layer_handler(*types: Any, attrs: Sequence[str] = (), refresh: bool = False) -> Callable:
    """Decorator: ``handler(module, cuts)`` slices modules of these types (and subclasses).

    ``attrs`` are the module attributes that describe its shape (saved by compact_shapes).
    ``refresh=True``: the handler is also called, with empty cuts, on every such module
    after all tensors were sliced, to update attributes derived from its children
    (an attention block's ``num_heads`` follows its projections). Types may be given as
    ``"module.QualName"`` strings (optional libraries are not imported to register them).
    """
    def deco(fn):
        handler = LayerHandler(fn, tuple(attrs), refresh)
        for t in types:
            LAYER_HANDLERS.register(t if isinstance(t, str) else type_key(t), overwrite=True)(handler)
        return fn
    return deco


# slim replacement classes: when compaction must change a module's class (see surgery.attention),
# the slim class's name maps to it so that rebuild can make the same change on a fresh model
SLIM_CLASSES: Dict[str, type] = {}


def handler_for(module: nn.Module) -> Optional[LayerHandler]:
    """The handler of the module's type or of its nearest registered base class."""
    for cls in type(module).__mro__:
        if type_key(cls) in LAYER_HANDLERS:
            return LAYER_HANDLERS.get(type_key(cls))
    return None


def _side_tensors_only(module: nn.Module, cuts: Cuts) -> bool:
    """Every cut tensor is a parameter cut along one dim that the module holds beside its layers (a layer scale,
    a learned bias, a position embedding, a class token) or a per-channel vector: slicing it means the same
    whatever the module computes with it, so no handler is needed. A leaf layer's weight matrix (an
    nn.Embedding's) needs one: its shape attributes must follow."""
    container = next(module.children(), None) is not None
    for attr, dims in cuts.items():
        t = module._parameters.get(attr)
        vector = isinstance(t, torch.Tensor) and sum(n != 1 for n in t.shape) == 1
        if not isinstance(t, torch.Tensor) or len(dims) != 1 or not (container or vector):
            return False
    return True


def slice_tensors(module: nn.Module, cuts: Cuts) -> None:
    """Keep only the given indices of each tensor; parameters stay parameters."""
    for attr, dims in cuts.items():
        old = getattr(module, attr)
        new = old.detach()
        for dim, keep in sorted(dims.items()):
            new = new.index_select(dim, keep.to(new.device))
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
        else:
            module._buffers[attr] = new.contiguous()


def same_channels(module: nn.Module, cuts: Cuts, attrs: Sequence[str], dim: int = 0) -> None:
    """The named tensors lose the same slices along ``dim`` (a bias follows its weight's rows)."""
    keeps = [(a, cuts[a][dim]) for a in attrs if dim in cuts.get(a, {})]
    if not keeps:
        return
    first_attr, keep = keeps[0]
    for a, k in keeps[1:]:
        if not torch.equal(k, keep):
            raise PrunekitError(f"{type(module).__name__}: the plan removes different channels from "
                             f"{first_attr} and {a}; they must go together")
    for a in attrs:
        if getattr(module, a, None) is not None:
            cuts.setdefault(a, {})[dim] = keep


# ----------------------------------------------------------------------------- built-in handlers

@register_layer_handler(nn.Linear, attrs=("in_features", "out_features"))
def _linear(module: nn.Linear, cuts: Cuts) -> None:
    same_channels(module, cuts, ("weight", "bias"))
    slice_tensors(module, cuts)
    module.out_features, module.in_features = module.weight.shape


@register_layer_handler(nn.Conv1d, nn.Conv2d, nn.Conv3d, attrs=("in_channels", "out_channels", "groups"))
def _conv(module: nn.Conv2d, cuts: Cuts) -> None:
    same_channels(module, cuts, ("weight", "bias"))
    groups = _groups_after(module, cuts.get("weight", {}))
    slice_tensors(module, cuts)
    module.out_channels, module.groups = module.weight.shape[0], groups
    module.in_channels = module.weight.shape[1] * groups


def _groups_after(module: nn.Conv2d, cuts: Dict[int, torch.Tensor]) -> int:
    """The group count once ``cuts`` (dim -> kept indices of the weight) apply: unchanged when every
    conv-group keeps the same number of rows (and of its input positions, dim 1), smaller when whole
    conv-groups go; any other cut would leave uneven groups, which a convolution cannot hold."""
    groups, rows = module.groups, cuts.get(0)
    if groups == 1 or rows is None:
        return groups
    per = module.out_channels // groups
    counts = torch.bincount(rows // per, minlength=groups)
    if bool((counts == counts[0]).all()):
        return groups
    kept = counts[counts > 0]
    if bool((kept == per).all()) and 1 not in cuts:
        return int(kept.numel())
    raise PrunekitError(f"the plan leaves the conv-groups of {module} (groups={groups}) uneven (kept rows per "
                        f"group: {counts.tolist()}); make it with plan_groups")


@register_layer_handler(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, attrs=("num_features",))
def _batchnorm(module: nn.BatchNorm2d, cuts: Cuts) -> None:
    same_channels(module, cuts, ("weight", "bias", "running_mean", "running_var"))
    slice_tensors(module, cuts)
    module.num_features = next(t.shape[0] for t in (module.weight, module.running_mean) if t is not None)


@register_layer_handler(nn.GroupNorm, attrs=("num_groups", "num_channels"))
def _groupnorm(module: nn.GroupNorm, cuts: Cuts) -> None:
    per = module.num_channels // module.num_groups
    same_channels(module, cuts, ("weight", "bias"))
    keep = cuts.get("weight", {}).get(0)
    if keep is not None and keep.numel() != torch.unique(keep // per).numel() * per:
        raise PrunekitError(f"the plan removes part of a channel group of {module}; groups go whole")
    slice_tensors(module, cuts)
    module.num_channels = module.weight.shape[0]
    module.num_groups = module.num_channels // per


@register_layer_handler(nn.LayerNorm, nn.RMSNorm, attrs=("normalized_shape",))
def _layernorm(module: nn.LayerNorm, cuts: Cuts) -> None:
    if len(module.normalized_shape) != 1:
        raise PrunekitError("only a LayerNorm over one dim can lose channels")
    same_channels(module, cuts, ("weight", "bias"))
    slice_tensors(module, cuts)
    if getattr(module, "weight", None) is not None:
        module.normalized_shape = (module.weight.shape[0],)


@register_layer_handler(nn.PReLU, attrs=("num_parameters",))
def _prelu(module: nn.PReLU, cuts: Cuts) -> None:
    slice_tensors(module, cuts)
    module.num_parameters = module.weight.shape[0]


# ----------------------------------------------------------------------------- compaction

def _model_tensors(model: nn.Module) -> Dict[str, torch.Tensor]:
    out = dict(model.named_parameters())
    out.update((n, b) for n, b in model.named_buffers() if b is not None)
    return out


def _pruned_slices(model: nn.Module, plan: Plan) -> Dict[Tuple[str, int], Set[int]]:
    """(tensor, dim) -> pruned indices, from the plan entries and the groups' buffer members."""
    tensors = _model_tensors(model)
    pruned: Dict[Tuple[str, int], Set[int]] = OrderedDict()
    for tp in plan:
        if tp.pattern != "structured":
            raise PrunekitError(f"compact removes whole slices, but the plan prunes {tp.name} with pattern "
                             f"{tp.pattern!r}; apply such plans with prunekit.apply.masking.apply")
        if tp.name not in tensors:
            raise UnknownNameError(f"the plan prunes {tp.name!r}, which {type(model).__name__} does not have")
        if tuple(tensors[tp.name].shape) != tuple(tp.shape):
            raise PrunekitError(f"the plan was made for {tp.name} of shape {tuple(tp.shape)}, the model's is "
                             f"{tuple(tensors[tp.name].shape)} (compact the original or masked model, once)")
        pruned.setdefault((tp.name, tp.dim), set()).update(tp.pruned_idx or [])
    for g in plan.meta.get("groups", []):
        for m in (Member.from_dict(d) for d in g["members"]):
            if m.kind == "buffer" and g.get("pruned") and m.name in tensors:
                pos = m.positions(g["pruned"]).reshape(-1).tolist()
                pruned.setdefault((m.name, m.dim), set()).update(pos)
    return pruned


def _cuts_by_module(model: nn.Module, pruned: Mapping[Tuple[str, int], Set[int]]) -> Dict[str, Cuts]:
    tensors = _model_tensors(model)
    cuts: Dict[str, Cuts] = OrderedDict()
    for (name, dim), idx in pruned.items():
        if not idx:
            continue
        size = tensors[name].shape[dim]
        if max(idx) >= size or min(idx) < 0:
            raise PrunekitError(f"the plan prunes index {max(idx)} of {name} along dim {dim}, which has {size}")
        keep = torch.tensor(sorted(set(range(size)) - set(idx)), dtype=torch.long)
        if keep.numel() == 0:
            raise PrunekitError(f"the plan removes all {size} slices of {name} along dim {dim}; "
                             "keep at least one (min_keep >= 1)")
        mod_name, _, attr = name.rpartition(".")
        cuts.setdefault(mod_name, {}).setdefault(attr, {})[dim] = keep
    return cuts


def strip_masks_and_hooks(model: nn.Module) -> None:
    """Drop masks and hooks: the result must run as a plain module (hooks may expect old shapes)."""
    masking.make_permanent(model)
    for m in model.modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                     "_forward_hooks_always_called"):
            getattr(m, attr, {}).clear()


@torch.no_grad()
def _run_eval(model: nn.Module, example_inputs) -> Any:
    """Run once in eval mode, so BatchNorm statistics do not move; training flags are restored."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    with eval_mode(model):
        return shapes_of(model(*inputs))


def check_runs(slim: nn.Module, example_inputs, original: Optional[nn.Module] = None, expected: Any = None) -> None:
    """The compacted model runs on ``example_inputs`` and returns the same shapes as ``original`` (or the
    ``expected`` shapes, :func:`~prunekit.surgery.graph.shapes_of`'s form, recorded when it was traced)."""
    try:
        got = _run_eval(slim, example_inputs)
    except Exception as e:
        raise PrunekitError(f"the compacted model fails on example_inputs ({type(e).__name__}: {e}); the plan "
                         "probably removes slices without their coupled slices — make it with "
                         "prunekit.surgery.plan_groups") from e
    if original is not None or expected is not None:
        want = expected if expected is not None else _run_eval(original, example_inputs)
        if got != want:
            raise PrunekitError(f"the compacted model returns shapes {got}, the original {want}: the plan prunes "
                             "the model's outputs — make it with prunekit.surgery.plan_groups")


def _replaced_tensors(model: nn.Module, modules: Mapping[str, nn.Module], cuts: Mapping[str, Cuts]) -> Dict[int, Any]:
    """A deepcopy memo that skips copying the parameters compaction replaces anyway (most of the weights at
    50%: the copy was a third of planning time on ResNet-50). Only for an unmasked model and prunekit's own
    handlers, which never write into a tensor (``slice_tensors`` puts a new one in its place); a user's
    handler might, and then it gets its own copy."""
    if masking.is_masked(model):
        return {}
    memo: Dict[int, Any] = {}
    for mod_name, mcuts in cuts.items():
        module = modules[mod_name]
        handler = handler_for(module)
        if handler is not None and not getattr(handler.fn, "__module__", "").startswith("prunekit."):
            continue
        for attr in mcuts:
            t = module._parameters.get(attr)
            if t is not None:
                memo[id(t)] = t
    return memo


def compact(model: nn.Module, plan: Plan, example_inputs=None) -> nn.Module:
    """A new dense module without the plan's pruned slices; ``model`` is not changed.

    ``model`` may be the original or the masked model (other masks are folded in as
    zeros). With ``example_inputs`` the result is run once (eval mode) and its output
    shapes are compared with the original's: recommended for plans not made by plan_groups.
    """
    cuts = _cuts_by_module(model, _pruned_slices(model, plan))   # all checks before copying
    modules = dict(model.named_modules())
    missing = [f"{n} ({type(modules[n]).__name__})" for n in cuts
               if handler_for(modules[n]) is None and not _side_tensors_only(modules[n], cuts[n])]
    if missing:
        raise PrunekitError(f"no layer handler for {', '.join(missing)}; register one with "
                         "@prunekit.surgery.register_layer_handler(YourLayer)")
    memo = _replaced_tensors(model, modules, cuts)
    slim = copy.deepcopy(model, dict(memo))
    strip_masks_and_hooks(slim)
    slim_modules = dict(slim.named_modules())
    for mod_name, mcuts in cuts.items():
        module = slim_modules[mod_name]
        (handler_for(module) or slice_tensors)(module, mcuts)
        for attr in mcuts:   # a handler that left a tensor in place: never hand back the user's own
            t = module._parameters.get(attr)
            if t is not None and id(t) in memo:
                module._parameters[attr] = nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad)
    _refresh(slim, skip=cuts)
    if example_inputs is not None:
        io = (plan.meta or {}).get("io_shapes") or {}
        inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        traced = io.get("outputs") is not None and io.get("inputs") == shapes_of(inputs)
        # the plan's trace saw these inputs' shapes: its recorded outputs save a forward of the original
        check_runs(slim, example_inputs, original=model, expected=io["outputs"] if traced else None)
    slim._prunekit_compacted = True  # prunekit.save records the slim shapes for load to rebuild
    return slim


def _refresh(model: nn.Module, skip: Mapping[str, Any] = ()) -> None:
    """Let refresh handlers recompute attributes that depend on their (sliced) children."""
    for name, m in model.named_modules():
        h = handler_for(m)
        if h is not None and h.refresh and name not in skip:
            h(m, {})


# ----------------------------------------------------------------------------- shapes and rebuild

def _json_value(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def compact_shapes(model: nn.Module) -> Dict[str, Any]:
    """JSON-safe shapes of every tensor and the shape attributes of every module that has tensors."""
    out = OrderedDict()
    for name, m in model.named_modules():
        tensors = OrderedDict((k, list(v.shape)) for k, v in list(m._parameters.items()) + list(m._buffers.items())
                              if v is not None and not k.endswith((masking.MASK_SUFFIX, masking.ORIG_SUFFIX)))
        h = handler_for(m)
        attrs = h.attrs if h is not None else ()
        if not tensors and not attrs:
            continue
        out[name] = {"type": type(m).__name__, "tensors": tensors,
                     "attrs": {a: _json_value(getattr(m, a)) for a in attrs if hasattr(m, a)}}
    return {"format": SHAPES_FORMAT, "modules": out}


def _resize(module: nn.Module, attr: str, shape: Sequence[int], where: str) -> None:
    old = getattr(module, attr, None)
    if not isinstance(old, torch.Tensor):
        raise PrunekitError(f"{where}: the model has no tensor {attr!r}")
    if list(old.shape) == list(shape):
        return
    new = torch.zeros(tuple(shape), dtype=old.dtype, device=old.device)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        module._buffers[attr] = new


def rebuild(original: nn.Module, shapes: Mapping[str, Any]) -> nn.Module:
    """The slim architecture from a copy of the user's model and :func:`compact_shapes`.

    Tensors whose shape changed are zero-filled: load the compacted state_dict into the result.
    """
    if not isinstance(shapes, Mapping) or shapes.get("format") != SHAPES_FORMAT:
        raise PrunekitError(f"not a prunekit shapes record: expected format {SHAPES_FORMAT!r}")
    model = copy.deepcopy(original)
    strip_masks_and_hooks(model)
    modules = dict(model.named_modules())
    for name, spec in shapes["modules"].items():
        m = modules.get(name)
        slim_cls = SLIM_CLASSES.get(spec["type"])
        if m is not None and slim_cls is not None and isinstance(m, slim_cls.__mro__[1]):
            m.__class__ = slim_cls   # the class compaction switched to (same tensors, new forward)
        if m is None or type(m).__name__ != spec["type"]:
            found = type(m).__name__ if m is not None else "nothing"
            raise PrunekitError(f"shapes describe module {name!r} as {spec['type']}, the model has {found} "
                             "there: rebuild needs the architecture the model was compacted from")
        for attr, shape in spec["tensors"].items():
            _resize(m, attr, shape, f"module {name!r}")
        for attr, value in spec.get("attrs", {}).items():
            setattr(m, attr, tuple(value) if isinstance(getattr(m, attr, None), tuple) else value)
    return model
