"""Channel groups: which slices of which tensors must be removed together.

Removing output channel ``c`` of ``conv1`` is only valid if every tensor that
reads or writes channel ``c`` loses that slice too: ``conv1.bias[c]``, the
BatchNorm statistics of ``bn1``, input channel ``c`` of ``conv2`` — and, across
a residual addition, channel ``c`` of every other branch that is summed with
it. :func:`build_groups` finds these sets by tracing the model with
``torch.fx`` and propagating a *tag* through the graph: for each value, which
of its dims holds channels and which group each position belongs to.

A :class:`Group` lists its members by dotted tensor names only (never live
modules), so a group description can be stored in a plan's JSON. A member
slice is described by a small *layout*: channel ``c`` of the group occupies the
positions ``base + o * outer_stride + c * inner + i`` (``o < outer``,
``i < inner``) of the member's dim. Plain layers have ``inner = outer = 1``;
a Linear after ``Flatten`` of ``(N, C, H, W)`` has ``inner = H * W``.

Anything the propagation does not understand makes the groups it touches
*unprunable*, with the reason recorded: a wrong slice would give a model that
silently computes something else, an unpruned group only costs compression.
"""
from __future__ import annotations

import fnmatch
import os
import traceback
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.registry import Registry

ROLES = ("producer", "consumer", "channelwise")

# Rules that say how a value's channel tag flows through an op. Module rules are
# keyed by the exact type (see type_key): a subclass may compute something else.
MODULE_RULES = Registry("graph rule")
# Block rules declare the groups *inside* a known block (a BERT layer, nn.TransformerEncoderLayer)
# from its structure alone; they are the fallback for models torch.fx cannot trace.
BLOCK_RULES = Registry("block rule")
FUNCTION_RULES: Dict[Any, Callable] = {}   # torch / operator functions -> rule
METHOD_RULES: Dict[str, Callable] = {}     # tensor method names -> rule


def type_key(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# base classes whose subclasses are handled as the base by default: a conv or linear subclass (EfficientNet's
# Conv2dStaticSamePadding, a weight-standardised conv) keeps its base's channel semantics whatever it does
# to the spatial dims. Not every base: a LayerNorm subclass may normalise another dim (timm's LayerNorm2d).
SUBCLASS_FALLBACK = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def module_rule_key(cls: type) -> Optional[str]:
    """The MODULE_RULES key for modules of ``cls``: its own, else (for subclasses of
    :data:`SUBCLASS_FALLBACK`) its base's; registering a rule for the subclass itself overrides this."""
    if type_key(cls) in MODULE_RULES:
        return type_key(cls)
    base = next((b for b in SUBCLASS_FALLBACK if issubclass(cls, b)), None)
    return type_key(base) if base is not None and type_key(base) in MODULE_RULES else None


def register_module_rule(*types: Any) -> Callable:
    """Decorator: ``rule(prop, node, name, module) -> Optional[Tag]`` for leaf modules of these types.

    Modules with a rule are traced as leaves (fx does not look inside them). A type may
    also be given as its ``"module.QualName"`` string, so that rules for optional
    libraries (timm, transformers) are registered without importing them.
    """
    def deco(fn):
        for t in types:
            MODULE_RULES.register(t if isinstance(t, str) else type_key(t), overwrite=True)(fn)
        return fn
    return deco


def register_function_rule(*targets: Any) -> Callable:
    """Decorator: ``rule(prop, node) -> Optional[Tag]`` for functions (``torch.roll``), functions of an
    optional library by dotted name (``"torchvision.ops.stochastic_depth.stochastic_depth"``, a name with
    dots) or tensor method names (``"roll"``)."""
    def deco(fn):
        for t in targets:
            (METHOD_RULES if isinstance(t, str) and "." not in t else FUNCTION_RULES)[t] = fn
        return fn
    return deco


def _qualname(fn: Any) -> Optional[str]:
    module, name = getattr(fn, "__module__", None), getattr(fn, "__name__", None)
    return f"{module}.{name}" if module and name else None


def register_block_rule(*types: Any) -> Callable:
    """Decorator: ``rule(prop, name, module)`` declares (with ``prop.new_group``/``prop.add``) the
    channel groups that live entirely inside a block of these types: slices whose removal
    changes no shape outside the block. Used when fx cannot trace the model."""
    def deco(fn):
        for t in types:
            BLOCK_RULES.register(t if isinstance(t, str) else type_key(t), overwrite=True)(fn)
        return fn
    return deco


class TraceError(ValueError):
    """The model cannot be traced by torch.fx; the message names where and suggests a fix."""


# ----------------------------------------------------------------------------- public data

@dataclass
class Member:
    """One tensor slice family of a group: ``name``'s ``dim``, laid out as described above."""

    name: str                 # dotted tensor name, e.g. "layer1.0.conv1.weight"
    dim: int
    role: str                 # producer (writes channels), consumer (reads them), channelwise (BN, depthwise)
    kind: str = "param"       # "param" or "buffer" (BN running statistics)
    base: int = 0
    inner: int = 1
    outer: int = 1
    outer_stride: int = 0

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    def layout(self) -> Tuple[int, int, int, int]:
        return (self.base, self.inner, self.outer, self.outer_stride)

    def key(self) -> Tuple[str, int, Tuple[int, int, int, int]]:
        return (self.name, self.dim, self.layout())

    def positions(self, channels: Iterable[int]) -> torch.Tensor:
        """``(len(channels), outer * inner)`` indices along ``dim``: row ``k`` holds channel ``channels[k]``."""
        c = (torch.arange(channels.start, channels.stop, channels.step) if isinstance(channels, range)
             else torch.as_tensor(list(channels), dtype=torch.long)).reshape(-1, 1, 1)
        if self.outer == 1 and self.inner == 1:   # the common case, one index per channel: no broadcasting
            return (c.reshape(-1, 1) + self.base)
        o = (torch.arange(self.outer) * self.outer_stride).reshape(1, -1, 1)
        i = torch.arange(self.inner).reshape(1, 1, -1)
        return (self.base + o + c * self.inner + i).reshape(c.shape[0], self.outer * self.inner)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Member":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Group:
    """Channels that are pruned together; channel ``c`` means the same slice in every member."""

    id: int
    channels: int
    members: List[Member] = field(default_factory=list)
    prunable: bool = True
    reasons: List[str] = field(default_factory=list)
    exact: bool = True        # False: removing channels changes the kept ones (LayerNorm statistics)

    @property
    def reason(self) -> Optional[str]:
        return "; ".join(self.reasons) if self.reasons else None

    def lead(self) -> Member:
        """The first producer (earliest in the graph): names the group in messages."""
        return next((m for m in self.members if m.role == "producer"), self.members[0])

    def params(self) -> List[Member]:
        return [m for m in self.members if m.kind == "param"]

    def to_dict(self) -> Dict[str, Any]:
        return {"id": self.id, "channels": self.channels, "prunable": self.prunable,
                "reason": self.reason, "exact": self.exact,
                "members": [m.to_dict() for m in self.members]}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Group":
        return cls(id=int(d["id"]), channels=int(d["channels"]),
                   members=[Member.from_dict(m) for m in d["members"]],
                   prunable=bool(d.get("prunable", True)),
                   reasons=[d["reason"]] if d.get("reason") else [], exact=bool(d.get("exact", True)))


@dataclass
class ChannelGraph:
    """The channel groups of one model (JSON-safe via ``to_dict``)."""

    groups: List[Group]
    notes: List[str] = field(default_factory=list)   # e.g. why the block fallback was used
    # {"inputs", "outputs"}: the shapes seen when tracing (JSON form), so compact can check a slim model's
    # outputs without running the original again
    io_shapes: Optional[Dict[str, Any]] = None

    def prunable(self) -> List[Group]:
        return [g for g in self.groups if g.prunable]

    def group_of(self, name: str, dim: int = 0) -> List[Group]:
        return [g for g in self.groups if any(m.name == name and m.dim == dim for m in g.members)]

    def to_dict(self) -> Dict[str, Any]:
        return {"format": "prunekit.groups/1", "groups": [g.to_dict() for g in self.groups],
                "notes": list(self.notes), "io_shapes": self.io_shapes}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ChannelGraph":
        return cls([Group.from_dict(g) for g in d["groups"]], list(d.get("notes", [])), d.get("io_shapes"))

    def describe(self) -> str:
        lines = []
        for g in self.groups:
            state = "prunable" if g.prunable else f"fixed: {g.reason}"
            names = ", ".join(_describe_member(m) for m in g.members)
            lines.append(f"group {g.id} ({g.channels} ch, {state}): {names}")
        return "\n".join(lines)


def _describe_member(m: Member) -> str:
    text = f"{m.name}[{m.dim}]"
    text += f"+{m.base}" if m.base else ""
    text += f" x{m.inner}" if m.inner > 1 else ""
    return text + (f" ({m.outer} times, every {m.outer_stride})" if m.outer > 1 else "")


# ----------------------------------------------------------------------------- tags

@dataclass(frozen=True)
class Seg:
    """Group ``group``'s channels inside one dim of a value, with the Member layout fields."""

    group: int
    base: int = 0
    inner: int = 1
    outer: int = 1
    outer_stride: int = 0

    def layout(self) -> Tuple[int, int, int, int]:
        return (self.base, self.inner, self.outer, self.outer_stride)


@dataclass(frozen=True)
class Tag:
    """Which dim of a value carries channels, and the groups laid out along it."""

    dim: int
    segs: Tuple[Seg, ...]

    def shifted(self, offset: int) -> "Tag":
        return Tag(self.dim, tuple(replace(s, base=s.base + offset) for s in self.segs))


# ----------------------------------------------------------------------------- propagation

def describe_node(prop: "Propagation", node: fx.Node) -> str:
    """Human-readable name of an op for reasons: module name and type, or the function."""
    if node.op == "call_module":
        return f"module '{node.target}' ({type(prop.modules[node.target]).__name__})"
    if node.op == "call_method":
        return f"tensor method '.{node.target}()' (node '{node.name}')"
    target = getattr(node.target, "__name__", str(node.target))
    owner = getattr(node.target, "__module__", None) or ""
    owner = "torch" if owner.startswith("torch") else owner.lstrip("_")   # _operator -> operator
    return f"{owner + '.' if owner else ''}{target} (node '{node.name}')"


class Propagation:
    """Walks the traced graph once, in order, and keeps the groups in a union-find.

    Rules (see :mod:`prunekit.surgery.rules`) call the helpers below: ``tag``/``shape``
    to look at inputs, ``new_group``/``add`` to declare channels, ``unite`` when two
    values must share channels, ``block`` when a group cannot be pruned.
    """

    def __init__(self, gm: Optional[fx.GraphModule], shapes: Dict[fx.Node, Optional[Tuple[int, ...]]]):
        self.gm = gm
        self.modules = dict(gm.named_modules()) if gm is not None else {}
        self.shapes = shapes
        self.tags: Dict[fx.Node, Optional[Tag]] = {}
        # ops returning a tuple (nn.MultiheadAttention, HF attention): item index -> tag, read by getitem
        self.tuple_tags: Dict[fx.Node, Dict[int, Tag]] = {}
        self.groups: List[Group] = []
        self._parent: List[int] = []
        self.direct_uses: Dict[str, str] = {}  # tensor name -> node that reads it outside a module
        # x.shape / x.size() nodes -> x: an item read from them may be x's channel count (see rules._metadata)
        self.shape_of: Dict[fx.Node, fx.Node] = {}
        # the traced model itself: the GraphModule keeps a parameter read by get_attr, but not its owner's class
        self.source: Optional[nn.Module] = None
        # tags a rule worked out for a later node (a channel shuffle's last view): taken when it is visited
        self.preset: Dict[fx.Node, Tag] = {}

    # -- groups
    def new_group(self, channels: int) -> int:
        gid = len(self.groups)
        self.groups.append(Group(gid, int(channels)))
        self._parent.append(gid)
        return gid

    def find(self, g: int) -> int:
        while self._parent[g] != g:
            self._parent[g] = self._parent[self._parent[g]]
            g = self._parent[g]
        return g

    def group(self, g: int) -> Group:
        return self.groups[self.find(g)]

    def union(self, a: int, b: int) -> int:
        ra, rb = sorted((self.find(a), self.find(b)))
        if ra == rb:
            return ra
        ga, gb = self.groups[ra], self.groups[rb]
        self._parent[rb] = ra
        ga.members += gb.members
        ga.prunable &= gb.prunable
        ga.exact &= gb.exact
        ga.reasons += [r for r in gb.reasons if r not in ga.reasons]
        if ga.channels != gb.channels:  # layouts are compared before uniting, so this is a bug guard
            self.block_group(ra, f"coupled channel counts differ ({ga.channels} vs {gb.channels})")
        return ra

    # -- regrouping: every member and every tag of a group changes together
    def _class_of(self, root: int) -> List[int]:
        return [i for i in range(len(self.groups)) if self.find(i) == root]

    def _regroup(self, g: int, channels: int, member_fn: Callable, seg_fn: Callable) -> None:
        root = self.find(g)
        for i in self._class_of(root):   # merged groups' members are copies of the root's: drop them
            if i != root:
                self.groups[i].members = []
        grp = self.groups[root]
        grp.members = [member_fn(m) for m in grp.members]
        grp.channels = channels

        def retag(t: Optional[Tag]) -> Optional[Tag]:
            if t is None:
                return None
            return Tag(t.dim, tuple(seg_fn(x) if self.find(x.group) == root else x for x in t.segs))
        for node, t in list(self.tags.items()):
            self.tags[node] = retag(t)
        for items in self.tuple_tags.values():
            for k, t in list(items.items()):
                items[k] = retag(t)

    def _all_layouts(self, g: int) -> List[Tuple[int, int, int, int]]:
        root = self.find(g)
        segs = [x for t in list(self.tags.values()) + [t for d in self.tuple_tags.values() for t in d.values()]
                if t is not None for x in t.segs if self.find(x.group) == root]
        return [m.layout() for m in self.groups[root].members] + [x.layout() for x in segs]

    def coarsen(self, g: int, units: int) -> bool:
        """Make group ``g``'s channels go in ``units`` blocks of consecutive channels (a grouped conv
        or GroupNorm works on such blocks); False when its channel count does not divide."""
        channels = self.group(g).channels
        if channels == units:
            return True
        if units < 1 or channels % units:
            return False
        k = channels // units
        self._regroup(g, units, lambda m: replace(m, inner=m.inner * k), lambda x: replace(x, inner=x.inner * k))
        return True

    def fold(self, g: int, pieces: int) -> bool:
        """Channel ``c`` of each of ``pieces`` equal parts of group ``g`` becomes one channel
        (``chunk`` then an op on every piece); False when a layout already repeats (outer > 1)."""
        channels = self.group(g).channels
        if pieces < 1 or channels % pieces or any(lay[2] != 1 for lay in self._all_layouts(g)):
            return False
        n = channels // pieces
        self._regroup(g, n, lambda m: replace(m, outer=pieces, outer_stride=n * m.inner),
                      lambda x: replace(x, outer=pieces, outer_stride=n * x.inner))
        return True

    def add(self, g: int, name: str, dim: int, role: str, seg: Optional[Seg] = None, kind: str = "param"):
        base, inner, outer, stride = seg.layout() if seg is not None else (0, 1, 1, 0)
        self.group(g).members.append(Member(name, dim, role, kind, base, inner, outer, stride))

    def block_group(self, g: int, reason: str) -> None:
        grp = self.group(g)
        grp.prunable = False
        if reason not in grp.reasons:
            grp.reasons.append(reason)

    def block(self, tag: Optional[Tag], reason: str) -> None:
        """Make every group in ``tag`` unprunable."""
        for s in (tag.segs if tag is not None else ()):
            self.block_group(s.group, reason)

    def block_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            for t in self.tags_of(arg):
                self.block(t, reason)

    def tags_of(self, arg: Any) -> List[Tag]:
        """Every tag a value carries: its own, or those of the items of a tuple it holds."""
        if not isinstance(arg, fx.Node):
            return []
        own = [self.tags[arg]] if self.tags.get(arg) is not None else []
        return own + list(self.tuple_tags.get(arg, {}).values())

    # -- values
    def tag(self, arg: Any) -> Optional[Tag]:
        return self.tags.get(arg) if isinstance(arg, fx.Node) else None

    def shape(self, arg: Any) -> Optional[Tuple[int, ...]]:
        return self.shapes.get(arg) if isinstance(arg, fx.Node) else None

    def same_layout(self, a: Tag, b: Tag) -> bool:
        return len(a.segs) == len(b.segs) and all(
            x.layout() == y.layout() and self.group(x.group).channels == self.group(y.group).channels
            for x, y in zip(a.segs, b.segs))

    def unite(self, a: Tag, b: Tag) -> None:
        for x, y in zip(a.segs, b.segs):
            self.union(x.group, y.group)

    def passthrough(self, node: fx.Node, arg: Any) -> Optional[Tag]:
        """The op keeps channels where they are (activations, pooling, dropout, ...)."""
        t = self.tag(arg)
        if t is None:
            return None
        sin, sout = self.shape(arg), self.shape(node)
        if sout is None or len(sout) != len(sin) or sout[t.dim] != sin[t.dim]:
            self.block(t, f"{describe_node(self, node)} changes the channel dim")
            return None
        return t

    def unknown(self, node: fx.Node) -> None:
        self.block_inputs(node, f"consumed by {describe_node(self, node)}, which prunekit does not "
                                "know (teach it with surgery.register_module_rule/register_function_rule)")

    # -- driver
    def visit(self, node: fx.Node) -> Optional[Tag]:
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            self.direct_uses.setdefault(str(node.target), node.name)
            return None
        if node.op == "output":
            self.block_inputs(node, "reaches the model output")
            return None
        if node in self.preset:
            return self.preset.pop(node)
        rule = self.rule_for(node)
        if rule is None:
            if any(self.tags_of(a) for a in node.all_input_nodes):
                self.unknown(node)
            return None
        return rule(self, node)

    def rule_for(self, node: fx.Node) -> Optional[Callable]:
        if node.op == "call_module":
            module = self.modules[node.target]
            key = module_rule_key(type(module))
            if key is None:
                return self._block_rule(module) if _has_block_rules(module) else None
            fn = MODULE_RULES.get(key)
            return lambda prop, n: fn(prop, n, str(n.target), module)
        if node.op == "call_method":
            return METHOD_RULES.get(node.target)
        try:
            rule = FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
        # functions of optional libraries are registered by their dotted name (nothing imported to do so)
        return rule if rule is not None else FUNCTION_RULES.get(_qualname(node.target))

    @staticmethod
    def _block_rule(module: nn.Module) -> Callable:
        """A leaf that is a known block or holds some (nn.TransformerEncoder): the groups inside
        those blocks, and the leaf's input width kept whole."""
        def rule(prop: "Propagation", node: fx.Node) -> None:
            prop.block_inputs(node, f"{describe_node(prop, node)} keeps its input width")
            _apply_block_rules(prop, module, prefix=str(node.target))
            return None
        return rule

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.tags[node] = self.visit(node)


# ----------------------------------------------------------------------------- tracing

class _Tracer(fx.Tracer):
    """fx's tracer, plus: modules with a registered rule, and user-named ones, stay leaves."""

    def __init__(self, leaf_modules: Sequence[str]):
        super().__init__()
        self._leaf_patterns = tuple(leaf_modules)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if any(fnmatch.fnmatchcase(qualname, p) for p in self._leaf_patterns):
            return True
        if module_rule_key(type(m)) is not None or type_key(type(m)) in BLOCK_RULES:
            return True
        return super().is_leaf_module(m, qualname)


_TORCH_DIR = os.path.dirname(torch.__file__)


def _trace_message(model: nn.Module, tracer: _Tracer, err: Exception) -> str:
    """Name the module and the line of user code where tracing stopped, and how to get past it."""
    stack = list(getattr(tracer, "module_stack", {}).items())
    mod_name, mod_type = (stack[-1][1] if stack else ("", type(model)))
    mod_name = mod_name or "(the model itself)"
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(os.path.dirname(__file__))]
    where = f", at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}()" if frames else ""
    type_name = getattr(mod_type, "__name__", str(mod_type))
    leaf_hint = (f"; or pass leaf_modules=['{mod_name}'] to treat that module as an opaque leaf "
                 "(its channels are then kept)" if stack and stack[-1][1][0] else "")
    return (f"cannot trace {type(model).__name__} with torch.fx: {type(err).__name__}: {err}. "
            f"It stopped in module {mod_name} ({type_name}){where}. {_trace_fix(model, err)}{leaf_hint}.")


def _trace_fix(model: nn.Module, err: Exception) -> str:
    """What to do about a trace failure, by its cause (the generic advice is wrong for most of them)."""
    text = str(err)
    if "cannot be iterated" in text:
        return ("Cause: Python iterates over a traced tensor there (a for loop over it, *x, list(x.unbind())), "
                "whose length fx cannot know. Fix: index it explicitly (x[:, 0], x.unbind(1) unpacked into "
                "names) or make that module a leaf")
    if "control flow" in text or "symbolically traced variables" in text:
        return ("Cause: Python control flow on a tensor's value. Fix: compute it with tensor ops (torch.where) "
                "there")
    if callable(getattr(model, "save_pretrained", None)) and getattr(model, "config", None) is not None:
        return ("Cause: Hugging Face models use Python features torch.fx cannot follow (argument introspection, "
                "caches, dynamic dispatch), whatever the weights. Fix: for a decoder LLM use "
                "prunekit.surgery.plan_decoder / compact_decoder (no tracing); for other architectures "
                "register a block rule (surgery.register_block_rule) for its layer class, as prunekit does for "
                "BERT layers, and the fallback prunes inside those blocks")
    return ("Fix: teach prunekit that module: surgery.register_module_rule(YourModule) with the public helpers "
            "in prunekit.surgery.rules, or a block rule (surgery.register_block_rule) for a whole layer")


def trace(model: nn.Module, leaf_modules: Sequence[str] = ()) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, AttributeError, ... from user code
        raise TraceError(_trace_message(model, tracer, e)) from e
    return fx.GraphModule(tracer.root, graph)


def shapes_of(out: Any) -> Any:
    """The shapes in a (nested) model output or input, in JSON form: lists, dicts, None for non-tensors."""
    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, (tuple, list)):
        return [shapes_of(o) for o in out]
    if isinstance(out, Mapping):
        return {str(k): shapes_of(v) for k, v in out.items()}
    return None


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: Dict[fx.Node, Optional[Tuple[int, ...]]] = {}
        self.output_shapes: Any = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as e:
            raise PrunekitError(f"running the model on example_inputs failed at node '{n.name}' "
                             f"({n.op} {n.target}): {e}") from e
        self.shapes[n] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        if n.op == "output":
            self.output_shapes = shapes_of(out)
        return out


@torch.no_grad()
def record_shapes(gm: fx.GraphModule, example_inputs) -> Dict[fx.Node, Optional[Tuple[int, ...]]]:
    """Output shape of every node (the model's outputs, in :func:`shapes_of`'s form, under the key None).
    Runs in eval mode so BatchNorm statistics do not move (the traced graph shares its modules with the
    user's model)."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        rec = _ShapeRecorder(gm)
        rec.run(*inputs)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return {**rec.shapes, None: rec.output_shapes}


# ----------------------------------------------------------------------------- finishing

def _tensor_sizes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    sizes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    sizes.update({n: tuple(b.shape) for n, b in model.named_buffers(remove_duplicate=False)})
    return sizes


def _share_identical_members(prop: Propagation) -> None:
    """The same slice owned by two groups (a module called twice): they are one group."""
    owner: Dict[Any, int] = {}
    for g in list(prop.groups):   # merged groups still hold their own members: visit them all
        for m in list(g.members):
            other = owner.setdefault(m.key(), g.id)
            if prop.find(other) != prop.find(g.id):
                prop.union(other, g.id)


def _dedupe(group: Group) -> None:
    seen, kept = set(), []
    for m in group.members:
        if (m.key(), m.role, m.kind) not in seen:
            seen.add((m.key(), m.role, m.kind))
            kept.append(m)
    group.members = kept


def _check_slices(prop: Propagation, roots: List[Group], model: nn.Module) -> None:
    """Slices must lie inside their tensor and never overlap: otherwise the layout is not understood."""
    sizes = _tensor_sizes(model)
    taken: Dict[Tuple[str, int], List[Tuple[int, set]]] = {}
    for g in roots:
        for m in g.members:
            size = sizes.get(m.name)
            pos = m.positions(range(g.channels)).reshape(-1)
            if size is None or m.dim >= len(size) or (pos.numel() and int(pos.max()) >= size[m.dim]):
                prop.block_group(g.id, f"slices of {m.name} do not fit its shape {size}")
                continue
            mine = set(pos.tolist())
            for other, theirs in taken.setdefault((m.name, m.dim), []):
                if mine & theirs:
                    why = f"overlapping slices of {m.name} along dim {m.dim}"
                    prop.block_group(g.id, why)
                    prop.block_group(other, why)
            taken[(m.name, m.dim)].append((g.id, mine))


def _check_aliases(prop: Propagation, roots: List[Group], model: nn.Module) -> None:
    """A tensor tied to another name, or read outside its module, would keep its old shape there."""
    aliases: Dict[int, List[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    names = {n: aliases[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}
    for g in roots:
        for m in g.members:
            if len(names.get(m.name, [])) > 1:
                prop.block_group(g.id, f"{m.name} is tied to {', '.join(x for x in names[m.name] if x != m.name)}")
            if m.name in prop.direct_uses:
                prop.block_group(g.id, f"{m.name} is also read directly (node '{prop.direct_uses[m.name]}')")


def _finish(prop: Propagation, model: nn.Module, exact: bool) -> ChannelGraph:
    _share_identical_members(prop)
    roots = [g for g in prop.groups if prop.find(g.id) == g.id and g.members]
    for g in roots:
        _dedupe(g)
    _check_slices(prop, roots, model)
    _check_aliases(prop, roots, model)
    out = []
    for new_id, g in enumerate(roots):
        if exact and not g.exact:
            prop.block_group(g.id, "a LayerNorm normalises over these channels: removing some changes "
                                    "the others (pass exact=False to allow it)")
        out.append(replace(g, id=new_id, members=list(g.members), reasons=list(g.reasons)))
    return ChannelGraph(out)


def _apply_block_rules(prop: Propagation, root: nn.Module, prefix: str = "") -> List[str]:
    """Run the block rule of every outermost known block in ``root``; returns their names."""
    matched: List[str] = []
    for name, module in root.named_modules(prefix=prefix):
        if any(name.startswith(m + ".") for m in matched) or type_key(type(module)) not in BLOCK_RULES:
            continue
        BLOCK_RULES.get(type_key(type(module)))(prop, name, module)
        matched.append(name)
    return matched


def block_groups(model: nn.Module, exact: bool = True) -> ChannelGraph:
    """Groups from block rules only: each known block's internal channels; nothing else is pruned."""
    prop = Propagation(None, {})
    matched = _apply_block_rules(prop, model)
    graph = _finish(prop, model, exact)
    graph.notes.append(f"block rules matched {len(matched)} block(s)")
    return graph


def _has_block_rules(model: nn.Module) -> bool:
    return any(type_key(type(m)) in BLOCK_RULES for m in model.modules())


def build_groups(model: nn.Module, example_inputs, *, leaf_modules: Sequence[str] = (),
                 exact: bool = True, fallback: bool = True) -> ChannelGraph:
    """Trace ``model`` and return its channel groups.

    ``example_inputs`` (a tensor or a tuple of them, batch size >= 2) is run once in
    eval mode to learn shapes; the model is not changed. ``leaf_modules`` are glob
    patterns of module names fx should not trace into (their channels are then kept).
    ``exact=False`` also allows groups whose removal changes the kept channels'
    values (LayerNorm over the channels): masked and compacted models then differ.

    When fx cannot trace the model (Hugging Face models, for one) and ``fallback`` is
    true, the groups inside known blocks (see :func:`register_block_rule`: BERT-style
    layers, nn.TransformerEncoderLayer) are returned instead: attention heads and FFN
    neurons, whose removal changes no shape outside the block. Without such blocks the
    :class:`TraceError` names the module where tracing stopped.
    """
    if example_inputs is None:
        raise PrunekitError("build_groups needs example_inputs (e.g. torch.randn(2, 3, 32, 32)) to learn shapes")

    try:
        gm = trace(model, leaf_modules)
    except TraceError as e:
        if not (fallback and _has_block_rules(model)):
            raise
        graph = block_groups(model, exact)
        graph.notes.insert(0, f"fx could not trace the model, so only the insides of known blocks are "
                              f"pruned ({e})")
        return graph
    shapes = record_shapes(gm, example_inputs)
    prop = Propagation(gm, shapes)
    prop.source = model
    prop.run()
    graph = _finish(prop, model, exact)
    graph.io_shapes = {"inputs": shapes_of(tuple(example_inputs) if isinstance(example_inputs, (tuple, list))
                                          else (example_inputs,)), "outputs": shapes[None]}
    return graph
