"""Built-in propagation rules: how each op moves, creates or couples channel groups.

A rule gets the :class:`~prunekit.surgery.graph.Propagation` and the fx node and
returns the output's :class:`~prunekit.surgery.graph.Tag` (or None: no prunable
channels). Ops without a rule block every group that reaches them.

Channel dim conventions: Conv/BatchNorm put channels on dim 1, Linear/LayerNorm
on the last dim. Elementwise ops keep the tag where it is (checked against the
recorded shapes, so e.g. a pad that adds channels is caught).

Helpers for writing your own rules (``@register_module_rule(MyLayer)``), public and used by the
built-ins: :func:`param_name` (a dotted parameter name), :func:`node_arg` (an fx node's argument by
position or keyword), :func:`produce` (a new group for a layer's output channels: weight rows and
bias), :func:`consume` (a layer reads a group through its weight's input dim), and the rules
:func:`linear_rule` / :func:`batchnorm_rule` to delegate to from a wrapper layer.
"""
from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from prunekit.surgery.graph import (
    FUNCTION_RULES,
    METHOD_RULES,
    Propagation,
    Seg,
    Tag,
    describe_node,
    register_module_rule,
)


def param_name(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def node_arg(node: fx.Node, i: int, key: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(key, default)


# ----------------------------------------------------------------------------- modules

def produce(prop: Propagation, name: str, module: nn.Module, channels: int, dim: int) -> Tag:
    """A new group for the output channels of a Linear/Conv: weight rows and bias entries."""
    g = prop.new_group(channels)
    prop.add(g, param_name(name, "weight"), 0, "producer")
    if getattr(module, "bias", None) is not None:
        prop.add(g, param_name(name, "bias"), 0, "producer")
    return Tag(dim, (Seg(g),))


def consume(prop: Propagation, t: Optional[Tag], weight: str, wdim: int) -> None:
    for s in (t.segs if t is not None else ()):
        prop.add(s.group, weight, wdim, "consumer", s)


@register_module_rule(nn.Linear)
def linear_rule(prop: Propagation, node: fx.Node, name: str, module: nn.Linear) -> Tag:
    x = node.args[0]
    t, last = prop.tag(x), len(prop.shape(x)) - 1
    if t is not None and t.dim != last:
        # a Linear over another dim would leave two channel dims in its output
        prop.block(t, f"{describe_node(prop, node)} is applied over dim {last}, not over the channels")
    elif t is not None:
        consume(prop, t, param_name(name, "weight"), 1)
    return produce(prop, name, module, module.out_features, last)


def _channelwise(prop: Propagation, t: Tag, name: str, attrs: Sequence[Tuple[str, str]]) -> None:
    """Per-channel tensors (BN statistics, depthwise filters): each segment is a member."""
    for s in t.segs:
        for attr, kind in attrs:
            prop.add(s.group, param_name(name, attr), 0, "channelwise", s, kind)


@register_module_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(prop: Propagation, node: fx.Node, name: str, module: nn.Conv2d) -> Optional[Tag]:
    t = prop.tag(node.args[0])
    if t is not None and t.dim != 1:
        prop.block(t, f"{describe_node(prop, node)} reads channels from dim 1, they are on dim {t.dim}")
        t = None
    g = module.groups
    if g == 1:
        consume(prop, t, param_name(name, "weight"), 1)
        return produce(prop, name, module, module.out_channels, 1)
    if g == module.in_channels == module.out_channels:
        # depthwise: output channel c is input channel c filtered; both go together
        attrs = [("weight", "param")] + ([("bias", "param")] if module.bias is not None else [])
        if t is None:
            return None
        _channelwise(prop, t, name, attrs)
        return prop.passthrough(node, node.args[0])
    return _grouped_conv(prop, node, name, module, t)


def _whole_seg(prop: Propagation, x: Any, t: Optional[Tag]) -> Optional[Seg]:
    """The one segment of ``t`` when it covers the whole channel dim of ``x`` contiguously."""
    if t is None or len(t.segs) != 1:
        return None
    s = t.segs[0]
    fits = s.base == 0 and s.outer == 1 and s.inner == 1
    return s if fits and prop.group(s.group).channels == prop.shape(x)[t.dim] else None


def _grouped_conv(prop: Propagation, node: fx.Node, name: str, module: nn.Conv2d, t: Optional[Tag]) -> Tag:
    """groups=G: conv-group ``k`` reads input block ``k`` and writes output block ``k`` only. A unit is
    position ``c`` inside every block (the group count stays, each block narrows: MACs fall with the square
    of the block width, as Torch-Pruning does it); where the input's layout cannot fold that way, a whole
    conv-group with its input channels."""
    G, cout_g = module.groups, module.out_channels // module.groups
    x = node.args[0]
    seg = _whole_seg(prop, x, t)
    if seg is not None and prop.fold(seg.group, G):
        g = prop.find(seg.group)
        prop.add(g, param_name(name, "weight"), 1, "consumer", Seg(g))   # dim 1 holds one block's positions
        out = prop.new_group(cout_g)
        layout = Seg(out, outer=G, outer_stride=cout_g)
        for attr in ("weight", "bias"):
            if getattr(module, attr, None) is not None:
                prop.add(out, param_name(name, attr), 0, "producer", layout)
        return Tag(1, (layout,))
    seg = _whole_seg(prop, x, prop.tag(x))
    if seg is not None and prop.coarsen(seg.group, G):
        g = prop.find(seg.group)
        for attr in ("weight", "bias"):
            if getattr(module, attr, None) is not None:
                prop.add(g, param_name(name, attr), 0, "channelwise", Seg(g, inner=cout_g))
        return Tag(1, (Seg(g, inner=cout_g),))
    why = (f"grouped convolution {name} (groups={G}): its input channels cannot be split evenly over its "
           "conv-groups here")
    prop.block(t, why)
    g = prop.new_group(G)
    for attr in ("weight", "bias"):
        if getattr(module, attr, None) is not None:
            prop.add(g, param_name(name, attr), 0, "producer", Seg(g, inner=cout_g))
    prop.block_group(g, why)
    return Tag(1, (Seg(g, inner=cout_g),))


@register_module_rule(nn.GroupNorm)
def _groupnorm(prop: Propagation, node: fx.Node, name: str, module: nn.GroupNorm) -> Optional[Tag]:
    """GroupNorm normalises within blocks of channels: removing whole blocks keeps it exact."""
    x = node.args[0]
    t = prop.tag(x)
    if t is None:
        return None
    seg = _whole_seg(prop, x, t) if t.dim == 1 else None
    if not module.affine:
        prop.block(t, f"{describe_node(prop, node)} has no affine parameters to record its new width")
        return None
    if seg is None or not prop.coarsen(seg.group, module.num_groups):
        prop.block(t, f"{describe_node(prop, node)}: its channel groups do not line up with prunable units")
        return None
    t = prop.tag(x)   # coarsening rewrote the tags
    _channelwise(prop, t, name, [("weight", "param"), ("bias", "param")])
    return prop.passthrough(node, x)


_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@register_module_rule(*_BN)
def batchnorm_rule(prop: Propagation, node: fx.Node, name: str, module: nn.BatchNorm2d) -> Optional[Tag]:
    t = prop.tag(node.args[0])
    if t is None:
        return None
    if t.dim != 1:
        prop.block(t, f"{describe_node(prop, node)} normalises dim 1, the channels are on dim {t.dim}")
        return None
    attrs = [(a, "param") for a in ("weight", "bias") if getattr(module, a) is not None]
    attrs += [(a, "buffer") for a in ("running_mean", "running_var") if getattr(module, a) is not None]
    _channelwise(prop, t, name, attrs)
    return prop.passthrough(node, node.args[0])


@register_module_rule(nn.LayerNorm, nn.RMSNorm)
def _layernorm(prop: Propagation, node: fx.Node, name: str, module: nn.LayerNorm) -> Optional[Tag]:
    x = node.args[0]
    t, nd = prop.tag(x), len(prop.shape(x) or ())
    if t is None:
        return None
    normalised = range(nd - len(module.normalized_shape), nd)
    if t.dim not in normalised:
        return prop.passthrough(node, x)
    if len(module.normalized_shape) != 1:
        prop.block(t, f"{describe_node(prop, node)} normalises several dims including the channels")
        return None
    attrs = [(a, "param") for a in ("weight", "bias") if getattr(module, a, None) is not None]
    if not attrs:  # nothing would carry the new size to normalized_shape
        prop.block(t, f"{describe_node(prop, node)} has no affine parameters to slice")
        return None
    _channelwise(prop, t, name, attrs)
    for s in t.segs:
        prop.group(s.group).exact = False
    return prop.passthrough(node, x)


_NORM_MODULES = (nn.LayerNorm, nn.RMSNorm)   # the modules whose handler makes normalized_shape follow a new width


def _norm_function(prop: Propagation, node: fx.Node, shape_arg: int, params: Sequence[Tuple[int, str]]
                   ) -> Optional[Tag]:
    """F.layer_norm called on a LayerNorm module's own parameters (timm's LayerNorm2d permutes, then calls
    it): as :func:`_layernorm`, with the affine parameters found behind their ``get_attr`` nodes."""
    x = node.args[0]
    t, nd = prop.tag(x), len(prop.shape(x) or ())
    if t is None:
        return None
    shape = node_arg(node, shape_arg, "normalized_shape")
    shape = [shape] if isinstance(shape, (int, fx.Node)) else list(shape or ())
    if any(isinstance(d, fx.Node) for d in shape):
        prop.block(t, f"{describe_node(prop, node)} computes its normalized_shape at run time")
        return None
    if t.dim not in range(nd - len(shape), nd):
        return prop.passthrough(node, x)
    found = [(i, _parameter_behind(a)[0]) for i, kw in params
             for a in [node_arg(node, i, kw)] if isinstance(a, fx.Node)]
    root = prop.source if prop.source is not None else prop.gm
    owners = {root.get_submodule(n.rpartition(".")[0]) if n and root is not None else None for _, n in found}
    # the new width must reach normalized_shape: only a LayerNorm's handler carries it there
    if len(shape) != 1 or not found or not all(isinstance(o, _NORM_MODULES) for o in owners):
        prop.block(t, f"{describe_node(prop, node)} normalises the channels, and no LayerNorm module's "
                      "normalized_shape would follow a new width")
        return None
    for _, pname in found:
        for seg in t.segs:
            prop.add(seg.group, pname, 0, "channelwise", seg)
        prop.direct_uses.pop(pname, None)
    for seg in t.segs:
        prop.group(seg.group).exact = False   # the kept channels' statistics change: not exact
    return prop.passthrough(node, x)


@register_module_rule(nn.PReLU)
def _prelu(prop: Propagation, node: fx.Node, name: str, module: nn.PReLU) -> Optional[Tag]:
    t = prop.tag(node.args[0])
    if t is not None and module.num_parameters > 1:
        if t.dim != 1:
            prop.block(t, f"{describe_node(prop, node)} has per-channel slopes on dim 1")
            return None
        _channelwise(prop, t, name, [("weight", "param")])
    return prop.passthrough(node, node.args[0])


@register_module_rule(nn.Flatten)
def _flatten_module(prop: Propagation, node: fx.Node, name: str, module: nn.Flatten) -> Optional[Tag]:
    return _flatten(prop, node, node.args[0], module.start_dim, module.end_dim)


ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
)


@register_module_rule(*ELEMENTWISE_MODULES)
def _elementwise_module(prop: Propagation, node: fx.Node, name: str, module: nn.Module) -> Optional[Tag]:
    if getattr(module, "return_indices", False):
        prop.block(prop.tag(node.args[0]), f"{describe_node(prop, node)} returns indices")
        return None
    return prop.passthrough(node, node.args[0])


# ----------------------------------------------------------------------------- reshapes

def _merge(prop: Propagation, node: fx.Node, t: Tag, shape: Sequence[int], start: int, end: int) -> Optional[Tag]:
    """Tag after merging dims ``start..end`` (inclusive) of a value of ``shape`` into one."""
    k = t.dim
    if not start <= k <= end:
        return Tag(k if k < start else k - (end - start), t.segs)
    if start == 0:
        prop.block(t, f"{describe_node(prop, node)} merges the channels with the batch dim")
        return None
    inner_x = math.prod(shape[k + 1:end + 1])   # each channel position becomes inner_x consecutive ones
    outer_x = math.prod(shape[start:k])         # and repeats every shape[k] * inner_x positions
    segs = []
    for s in t.segs:
        if outer_x > 1 and s.outer > 1:
            prop.block(t, f"{describe_node(prop, node)} flattens channels that were already flattened")
            return None
        outer, stride = (outer_x, shape[k] * inner_x) if outer_x > 1 else (s.outer, s.outer_stride * inner_x)
        segs.append(Seg(s.group, s.base * inner_x, s.inner * inner_x, outer, stride))
    return Tag(start, tuple(segs))


def _flatten(prop: Propagation, node: fx.Node, x: Any, start: int = 0, end: int = -1) -> Optional[Tag]:
    t, shape = prop.tag(x), prop.shape(x)
    if t is None:
        return None
    nd = len(shape)
    return _merge(prop, node, t, shape, start % nd if nd else 0, end % nd if nd else 0)


def _common_ends(a: Sequence[int], b: Sequence[int]) -> Tuple[int, int]:
    """Lengths of the common prefix and (non-overlapping) common suffix of two shapes."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    q = 0
    while q < min(len(a), len(b)) - p and a[len(a) - 1 - q] == b[len(b) - 1 - q]:
        q += 1
    return p, q


def _size_args(node: fx.Node) -> List[Any]:
    sizes = list(node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    return sizes or list(node.kwargs.get("shape", node.kwargs.get("size", ())))


def _reshape(prop: Propagation, node: fx.Node) -> Optional[Tag]:
    """view/reshape: understood when it only merges dims (a flatten) or adds/drops size-1 dims."""
    x = node.args[0]
    t, sin, sout = prop.tag(x), prop.shape(x), prop.shape(node)
    if t is None:
        return None
    p, q = _common_ends(sin, sout)
    mid_out = sout[p:len(sout) - q]
    if t.dim < p:
        new = Tag(t.dim, t.segs)
    elif t.dim >= len(sin) - q:
        new = Tag(t.dim + len(sout) - len(sin), t.segs)
    elif len(mid_out) == 1:
        new = _merge(prop, node, t, sin, p, len(sin) - q - 1)
    elif _channel_shuffle(prop, node, t, sin, sout, p, q):
        return None   # the shuffle's last view gets the tag; the steps between carry none
    else:
        prop.block(t, f"{describe_node(prop, node)} reshapes {tuple(sin)} -> {tuple(sout)}, "
                      "mixing the channels with other dims")
        return None
    sizes = _size_args(node)
    if new is not None and len(sizes) == len(sout) and isinstance(sizes[new.dim], int) and sizes[new.dim] != -1:
        # a literal size would be wrong once channels are removed
        prop.block(t, f"{describe_node(prop, node)} hard-codes the channel size {sizes[new.dim]} "
                      "(use -1 or x.size())")
        return None
    return new


def _only_user(node: fx.Node, methods: Sequence[str], functions: Sequence[Any] = ()) -> Optional[fx.Node]:
    """``node``'s single user when it is one of these methods / functions, else None."""
    users = list(node.users)
    if len(users) != 1:
        return None
    u = users[0]
    ok = (u.op == "call_method" and u.target in methods) or (u.op == "call_function" and u.target in functions)
    return u if ok else None


def _channel_shuffle(prop: Propagation, node: fx.Node, t: Tag, sin, sout, p: int, q: int) -> bool:
    """ShuffleNet's ``x.view(b, g, c // g, h, w).transpose(1, 2).view(b, -1, h, w)``: a fixed permutation of
    the channels. Channel ``j`` of each of the ``g`` pieces becomes one unit (the g pieces stay equal), and
    after the shuffle that unit's channels sit side by side: the last view's tag, preset here."""
    k = t.dim
    if not (p == k and len(sin) - q == k + 1 and len(sout) == len(sin) + 1):
        return False   # not a split of the channel dim alone into two
    g, width = sout[k], sout[k + 1]
    sizes = _size_args(node)
    if len(sizes) == len(sout) and isinstance(sizes[k + 1], int) and sizes[k + 1] != -1:
        return False   # a literal piece width would be wrong once channels go
    swap = _only_user(node, ("transpose",), (torch.transpose,))
    if swap is None or sorted(int(d) % len(sout) for d in swap.args[1:3]) != [k, k + 1]:
        return False
    after = _only_user(swap, ("contiguous",)) or swap
    merge = _only_user(after, ("view", "reshape", "flatten"), (torch.reshape, torch.flatten))
    if merge is None or tuple(prop.shape(merge) or ()) != tuple(sin):
        return False
    msizes = _size_args(merge) if merge.target in ("view", "reshape", torch.reshape) else []
    if len(msizes) == len(sin) and isinstance(msizes[k], int) and msizes[k] != -1:
        return False   # the merged width written as a literal
    seg = _whole_seg(prop, node.args[0], t)
    if seg is None or g * width != prop.group(seg.group).channels or not prop.fold(seg.group, g):
        return False
    prop.preset[merge] = Tag(k, (Seg(prop.find(seg.group), inner=g),))
    return True


def _squeeze_like(prop: Propagation, node: fx.Node) -> Optional[Tag]:
    """squeeze/unsqueeze only add or drop size-1 dims: the shapes say where the channels went."""
    x = node.args[0]
    t, sin, sout = prop.tag(x), prop.shape(x), prop.shape(node)
    if t is None:
        return None
    before = sum(1 for d in sin[:t.dim] if d != 1)
    idx = [i for i, d in enumerate(sout) if d != 1]
    if sin[t.dim] == 1 or before >= len(idx):
        prop.block(t, f"{describe_node(prop, node)} cannot be followed")
        return None
    # channels are the (before)-th non-singleton dim; which size-1 dims moved does not matter
    return Tag(idx[before], t.segs)


def _permute(prop: Propagation, node: fx.Node) -> Optional[Tag]:
    x = node.args[0]
    t = prop.tag(x)
    if t is None:
        return None
    dims = _size_args(node) or list(node.kwargs.get("dims", ()))
    nd = len(prop.shape(x))
    dims = [int(d) % nd for d in dims]
    return Tag(dims.index(t.dim), t.segs)


def _transpose(prop: Propagation, node: fx.Node) -> Optional[Tag]:
    x = node.args[0]
    t = prop.tag(x)
    if t is None:
        return None
    nd = len(prop.shape(x))
    a, b = int(node_arg(node, 1, "dim0")) % nd, int(node_arg(node, 2, "dim1")) % nd
    return Tag({a: b, b: a}.get(t.dim, t.dim), t.segs)


# ----------------------------------------------------------------------------- combining values

def _binary(prop: Propagation, node: fx.Node, divide: bool = False) -> Optional[Tag]:
    """add/sub/mul/div: tagged operands share channels (residuals, SE gates) and are united.

    A scalar, or a tensor broadcast over the channels, leaves the tag alone. A full-size
    untagged operand would keep all its channels while the other side loses some.
    """
    operands = [a for a in (node.args[:2] if len(node.args) >= 2 else (node.args[0], node.kwargs.get("other")))]
    tagged = [(a, prop.tag(a)) for a in operands if prop.tag(a) is not None]
    if not tagged:
        return None
    rel = {t.dim - len(prop.shape(a)) for a, t in tagged}   # channel dim counted from the right
    desc = describe_node(prop, node)
    if len(rel) > 1:
        return _block_all(prop, tagged, f"{desc} combines values whose channels lie on different dims")
    r = rel.pop()
    for a in operands:
        s = prop.shape(a)
        if s is not None and prop.tag(a) is None and len(s) >= -r and s[r] != 1:
            side = _side_parameter(prop, a, s[r], len(s) + r)
            if side is not None:
                _add_side_parameter(prop, side, [t for _, t in tagged])
                continue
            return _block_all(prop, tagged, f"{desc} combines the channels with '{a.name}', "
                                            f"which keeps all its {s[r]} channels")
    if divide and prop.tag(operands[1]) is not None:
        return _block_all(prop, tagged, f"{desc} divides by channels that would be zero when masked")
    first = tagged[0][1]
    for _, t in tagged[1:]:
        if not prop.same_layout(first, t):
            return _block_all(prop, tagged, f"{desc} combines channels laid out differently")
        prop.unite(first, t)
    return Tag(len(prop.shape(node)) + r, first.segs)


# ops that only recast or broadcast a parameter on its way to an elementwise op or a cat (pos_embed,
# cls_token.expand(B, -1, -1)) keep its dims aligned from the right; reshapes (gamma.reshape(1, -1, 1, 1)) do not
_BROADCAST_ONLY = {"to", "float", "type_as", "expand_as", "expand"}
_RESHAPES = {"reshape", "view", "unsqueeze"}


def _parameter_behind(node: fx.Node) -> Tuple[Optional[str], bool]:
    """(the parameter ``node`` is, through recasts / broadcasts / reshapes each used once; whether a reshape
    was among them), or (None, False). A parameter read anywhere else is not one: slicing it would change
    that other use too."""
    reshaped = False
    while node.op != "get_attr":
        target = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
        if node.op not in ("call_method", "call_function") or target not in _BROADCAST_ONLY | _RESHAPES \
                or len(node.users) != 1:
            return None, False
        reshaped |= target in _RESHAPES
        node = node.args[0]
        if not isinstance(node, fx.Node):
            return None, False
    reads = [n for n in node.graph.nodes if n.op == "get_attr" and n.target == node.target]
    return (str(node.target), reshaped) if len(node.users) == 1 and reads == [node] else (None, False)


def _side_parameter(prop: Propagation, a: fx.Node, channels: int, dim: int) -> Optional[Tuple[str, int]]:
    """(name, dim) of the parameter behind ``a`` that holds one entry per channel along that dim, where ``a``
    meets the channels on its dim ``dim``; None if ``a`` is anything else."""
    name, reshaped = _parameter_behind(a)
    if name is None or prop.gm is None:
        return None
    try:
        param = prop.gm.get_parameter(name)
    except AttributeError:   # a buffer or a plain attribute: not something pruning may slice
        return None
    if reshaped:   # only a vector can be followed through a reshape: its one non-singleton dim
        dims = [d for d, n in enumerate(param.shape) if n != 1]
        pdim = dims[0] if len(dims) == 1 else -1
    else:          # broadcasting aligns dims from the right
        pdim = param.dim() - (len(prop.shape(a)) - dim)
    return (name, pdim) if 0 <= pdim < param.dim() and param.shape[pdim] == channels else None


def _add_side_parameter(prop: Propagation, side: Tuple[str, int], tags: Sequence[Tag]) -> None:
    """The parameter joins the groups it meets (a layer scale, a learned bias, a position embedding, a
    class token): sliced with them, it no longer blocks them."""
    name, pdim = side
    for t in tags:
        for seg in t.segs:
            prop.add(seg.group, name, pdim, "side", seg)
    prop.direct_uses.pop(name, None)   # read here, and only here: accounted for


def _block_all(prop: Propagation, tagged, reason: str) -> None:
    for _, t in tagged:
        prop.block(t, reason)
    return None


def _cat(prop: Propagation, node: fx.Node) -> Optional[Tag]:
    """torch.cat along the channels: the result's channels are the inputs' groups, offset."""
    tensors = list(node_arg(node, 0, "tensors"))
    tags = [prop.tag(x) for x in tensors]
    if all(t is None for t in tags):
        return None
    nd = len(prop.shape(node))
    dim = int(node_arg(node, 1, "dim", 0)) % nd
    tagged = [(x, t) for x, t in zip(tensors, tags) if t is not None]
    if any(t.dim != dim for t in tags if t is not None):
        # along another dim the inputs are stacked: every input must carry the same channels
        first = tagged[0][1]
        sides = [_side_parameter(prop, x, prop.shape(x)[first.dim], first.dim) for x, t in zip(tensors, tags)
                 if t is None]   # a class token joined to the patch tokens carries the same channels
        if any(sd is None for sd in sides) or not all(t.dim == first.dim and prop.same_layout(first, t)
                                                      for _, t in tagged):
            return _block_all(prop, tagged, f"{describe_node(prop, node)} joins values with different channels")
        for sd in sides:
            _add_side_parameter(prop, sd, [first])
        for _, t in tagged[1:]:
            prop.unite(first, t)
        return first
    segs, offset = [], 0
    for x, t in zip(tensors, tags):
        if t is not None:
            segs += t.shifted(offset).segs
        offset += prop.shape(x)[dim]
    return Tag(dim, tuple(segs))


def _dim_list(dims: Any, nd: int) -> List[int]:
    """A ``dim``/``dims`` argument (an int, a sequence or None) as non-negative dims; [] for None or ()."""
    if dims is None:
        return []
    return [int(d) % nd for d in (dims if isinstance(dims, (tuple, list)) else [dims])]


def _roll(prop: Propagation, node: fx.Node) -> Optional[Tag]:
    """torch.roll over other dims (Swin's shifted windows) moves positions, never channels."""
    x = node.args[0]
    t = prop.tag(x)
    if t is None:
        return None
    dims = _dim_list(node_arg(node, 2, "dims"), len(prop.shape(x)))
    if not dims or t.dim in dims:   # no dims: roll of the flattened tensor, which mixes everything
        return _block_all(prop, [(x, t)], f"{describe_node(prop, node)} rolls along the channels")
    return prop.passthrough(node, x)


def _pad(prop: Propagation, node: fx.Node) -> Optional[Tag]:
    """F.pad of other dims (Swin pads to whole windows) keeps the channels; padding the channels would add
    new ones."""
    x = node.args[0]
    t = prop.tag(x)
    if t is None:
        return None
    pad = list(node_arg(node, 1, "pad"))
    nd = len(prop.shape(x))
    # pad lists (before, after) pairs from the last dim backwards
    amounts = {nd - 1 - i // 2: 0 for i in range(len(pad))}
    for i, p in enumerate(pad):
        if isinstance(p, fx.Node) or p != 0:
            amounts[nd - 1 - i // 2] = 1
    if amounts.get(t.dim, 0):
        return _block_all(prop, [(x, t)], f"{describe_node(prop, node)} pads the channels")
    return prop.passthrough(node, x)


def _reduce(prop: Propagation, node: fx.Node) -> Optional[Tag]:
    """mean/sum/amax/amin over dims other than the channels (global pooling, SE squeeze)."""
    x = node.args[0]
    t = prop.tag(x)
    if t is None:
        return None
    dims = _dim_list(node_arg(node, 1, "dim"), len(prop.shape(x)))
    keep = bool(node_arg(node, 2, "keepdim", False))
    if not dims or t.dim in dims:   # no dims: a reduction over everything
        return _block_all(prop, [(x, t)], f"{describe_node(prop, node)} reduces over the channels")
    new = t.dim if keep else t.dim - sum(d < t.dim for d in dims)
    return Tag(new, t.segs)


def _getitem(prop: Propagation, node: fx.Node) -> Optional[Tag]:
    """x[:, :, None, None], x[..., 0]: basic indexing that leaves the channel dim whole is followed."""
    src, index = node.args
    if src in prop.shape_of:  # x.shape[i] (a size, maybe the channel count) or x.shape[a:b] (sizes)
        x, tx = prop.shape_of[src], prop.tag(prop.shape_of[src])
        if isinstance(index, int):
            check_size_read(prop, node, x, index)
        elif isinstance(index, slice) and tx is not None and tx.dim in range(len(prop.shape(x)))[index]:
            check_size_read(prop, node, x, None)
        return None
    t = prop.tag(src)
    if t is None:
        if src in prop.tuple_tags:
            if isinstance(index, int):
                return prop.tuple_tags[src].get(index)   # e.g. the output of nn.MultiheadAttention
            prop.block_inputs(node, f"{describe_node(prop, node)} slices a tuple holding channels")
        return None  # e.g. an item of a tuple returned by an unknown module: no known channels
    index = index if isinstance(index, tuple) else (index,)
    nd = len(prop.shape(src))
    in_dim = out_dim = 0
    for item in index:
        if item is Ellipsis:
            skip = nd - sum(1 for i in index if i is not None and i is not Ellipsis)
            if in_dim <= t.dim < in_dim + skip:
                return Tag(out_dim + t.dim - in_dim, t.segs)
            in_dim, out_dim = in_dim + skip, out_dim + skip
        elif item is None:
            out_dim += 1
        elif in_dim == t.dim:
            if item == slice(None):
                return Tag(out_dim, t.segs)
            break
        elif isinstance(item, (int, slice)) and not isinstance(item, bool):
            in_dim, out_dim = in_dim + 1, out_dim + (0 if isinstance(item, int) else 1)
        else:
            break
    else:
        return Tag(out_dim + t.dim - in_dim, t.segs)  # the channels are after the last index
    prop.block(t, f"{describe_node(prop, node)} indexes into the channels")
    return None


def _pieces(prop: Propagation, node: fx.Node, t: Tag, dim: int, count: int, drop_dim: bool = False) -> None:
    """Every item of a split along a non-channel dim carries the channels as they are."""
    new = Tag(t.dim - (1 if drop_dim and dim < t.dim else 0), t.segs)
    prop.tuple_tags[node] = {i: new for i in range(count)}


def _chunk(prop: Propagation, node: fx.Node) -> None:
    """x.chunk(n, dim): along the channels, compaction splits the *new* width in n equal parts, so
    channel c of every piece is made one unit (pieces stay equal); otherwise items keep the tag."""
    x = node.args[0]
    t = prop.tag(x)
    if t is None:
        return None
    shape = prop.shape(x)
    n, dim = int(node_arg(node, 1, "chunks")), int(node_arg(node, 2, "dim", 0)) % len(shape)
    if dim != t.dim:
        return _pieces(prop, node, t, dim, len(range(0, shape[dim], -(-shape[dim] // n))))
    desc = describe_node(prop, node)
    if shape[dim] % n:
        return _block_all(prop, [(x, t)], f"{desc} makes chunks of unequal size")
    seg = _whole_seg(prop, x, t)
    if seg is not None and prop.fold(seg.group, n):
        g = prop.find(seg.group)
        prop.tuple_tags[node] = {i: Tag(dim, (Seg(g),)) for i in range(n)}
        return None
    size = shape[dim] // n
    pieces: List[List[Seg]] = [[] for _ in range(n)]
    for sg in t.segs:
        j = sg.base // size
        end = sg.base + prop.group(sg.group).channels * sg.inner
        if sg.outer != 1 or end > (j + 1) * size:
            return _block_all(prop, [(x, t)], f"{desc} cuts through a group of channels")
        pieces[j].append(replace(sg, base=sg.base - j * size))
    tags = [Tag(dim, tuple(p)) for p in pieces]
    if not all(p and prop.same_layout(tags[0], tg) for p, tg in zip(pieces, tags)):
        return _block_all(prop, [(x, t)], f"{desc} gives pieces with different channels")
    for tg in tags[1:]:
        prop.unite(tags[0], tg)
    prop.tuple_tags[node] = {i: tags[0] for i in range(n)}
    return None


def _split(prop: Propagation, node: fx.Node) -> None:
    """torch.split along other dims keeps the channels; along them the sizes are literals: blocked."""
    def count(shape, dim):
        sizes = node_arg(node, 1, "split_size_or_sections")
        return len(sizes) if isinstance(sizes, (list, tuple)) else len(range(0, shape[dim], int(sizes)))
    return _split_like(prop, node, int(node_arg(node, 2, "dim", 0)), count,
                       "splits the channels into fixed sizes (use chunk, or keep them)")


def _unbind(prop: Propagation, node: fx.Node) -> None:
    return _split_like(prop, node, int(node_arg(node, 1, "dim", 0)), lambda shape, dim: shape[dim],
                       "unbinds the channels", drop_dim=True)


def _split_like(prop: Propagation, node: fx.Node, dim: int, count, blocked: str, drop_dim: bool = False) -> None:
    """Pieces of ``node``'s input along ``dim`` follow its channels; cutting the channels dim itself blocks them."""
    x = node.args[0]
    t = prop.tag(x)
    if t is None:
        return None
    shape = prop.shape(x)
    dim %= len(shape)
    if dim == t.dim:
        return _block_all(prop, [(x, t)], f"{describe_node(prop, node)} {blocked}")
    return _pieces(prop, node, t, dim, count(shape, dim), drop_dim=drop_dim)


def _passthrough(prop: Propagation, node: fx.Node) -> Optional[Tag]:
    return prop.passthrough(node, node.args[0] if node.args else node.kwargs.get("input"))


# ops that take a size as their *shape* argument: a channel count read into one of them follows compaction
SHAPE_METHODS = ("view", "reshape", "expand", "repeat", "new_zeros", "new_ones", "new_empty", "new_full",
                 "flatten", "unflatten")
SHAPE_FUNCTIONS = (torch.reshape, torch.zeros, torch.ones, torch.empty, torch.full, torch.rand, torch.randn)


SIZE_ARITHMETIC = (operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod, operator.neg)


def _used_as_shape(node: fx.Node) -> bool:
    """Every use of this size ends in a shape argument, through integer arithmetic at most
    (``h.reshape(-1, h.shape[1] * h.shape[2])`` follows compaction; ``h * h.shape[1]`` does not)."""
    for u in node.users:
        if u.op == "call_method" and u.target in SHAPE_METHODS and node is not u.args[0]:
            continue
        if u.op == "call_function" and u.target in SHAPE_FUNCTIONS:
            continue
        if u.op == "call_function" and u.target in SIZE_ARITHMETIC and _used_as_shape(u):
            continue
        return False
    return True


def check_size_read(prop: Propagation, node: fx.Node, x: fx.Node, dim: Optional[int]) -> None:
    """``node`` holds x's size along ``dim`` (None: a count over all dims, e.g. numel). If that includes
    x's channels and flows into values rather than into a shape argument, compaction would change the
    result (``h * h.shape[1]``): the channels are kept, with the reason."""
    t, shape = prop.tag(x), prop.shape(x)
    if t is None or shape is None or _used_as_shape(node):
        return
    if dim is None or dim % len(shape) == t.dim:
        prop.block(t, f"{describe_node(prop, node)} reads the channel count into a value")


def _metadata(prop: Propagation, node: fx.Node) -> None:
    """x.size(), x.shape, x.dim(), x.numel(): read shapes, not channels, unless a channel count becomes a
    value (see :func:`check_size_read`)."""
    if node.op == "call_function" and node.args[1] not in ("shape", "dtype", "device", "ndim", "is_cuda"):
        prop.unknown(node)
        return None
    x = node.args[0]
    if not isinstance(x, fx.Node):
        return None
    kind = node.args[1] if node.op == "call_function" else node.target
    if kind == "numel":
        check_size_read(prop, node, x, None)
    elif kind == "size" and len(node.args) + len(node.kwargs) > 1:
        check_size_read(prop, node, x, node_arg(node, 1, "dim"))
    elif kind in ("shape", "size"):
        prop.shape_of[node] = x
        whole = [u for u in node.users if not (u.op == "call_function" and u.target is operator.getitem)]
        if whole and not _used_as_shape(node) and prop.tag(x) is not None:  # e.g. math.prod(x.shape)
            prop.block(prop.tag(x), f"{describe_node(prop, node)} reads the whole shape into a value")
    return None


def _register(rule, functions=(), methods=()) -> None:
    for f in functions:
        FUNCTION_RULES[f] = rule
    for m in methods:
        METHOD_RULES[m] = rule


_register(_passthrough, functions=(
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.abs, torch.neg, torch.clamp,
    F.relu, F.relu_, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.elu, F.leaky_relu, F.sigmoid, F.tanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
    F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate,
), methods=("relu", "relu_", "sigmoid", "tanh", "abs", "neg", "clamp", "contiguous", "clone",
            "detach", "float", "half", "double", "to", "type_as"))
_register(lambda p, n: _binary(p, n), functions=(
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    torch.add, torch.sub, torch.mul), methods=("add", "add_", "sub", "sub_", "mul", "mul_"))
_register(lambda p, n: _binary(p, n, divide=True), functions=(operator.truediv, operator.itruediv, torch.div),
          methods=("div", "div_"))
_register(_cat, functions=(torch.cat, torch.concat))
_register(_roll, functions=(torch.roll,), methods=("roll",))
# torchvision's stochastic depth (fx-wrapped, so it stays one call): the identity in eval, a whole sample (or
# batch) zeroed in training, never one channel against another; registered by name, torchvision not imported
_register(lambda p, n: p.passthrough(n, n.args[0]), functions=("torchvision.ops.stochastic_depth.stochastic_depth",))
_register(_pad, functions=(F.pad,))
_register(lambda p, n: _norm_function(p, n, 1, ((2, "weight"), (3, "bias"))), functions=(F.layer_norm, torch.layer_norm))
_register(lambda p, n: _flatten(p, n, n.args[0], node_arg(n, 1, "start_dim", 0), node_arg(n, 2, "end_dim", -1)),
          functions=(torch.flatten,), methods=("flatten",))
_register(_reshape, functions=(torch.reshape,), methods=("view", "reshape"))
_register(_squeeze_like, functions=(torch.squeeze, torch.unsqueeze), methods=("squeeze", "unsqueeze"))
_register(_permute, functions=(torch.permute,), methods=("permute",))
_register(_transpose, functions=(torch.transpose,), methods=("transpose",))
_register(_reduce, functions=(torch.mean, torch.sum, torch.amax, torch.amin),
          methods=("mean", "sum", "amax", "amin"))
_register(_getitem, functions=(operator.getitem,))
_register(_chunk, functions=(torch.chunk,), methods=("chunk",))
_register(_split, functions=(torch.split,), methods=("split",))
_register(_unbind, functions=(torch.unbind,), methods=("unbind",))
_register(_metadata, functions=(getattr,), methods=("size", "dim", "numel"))
