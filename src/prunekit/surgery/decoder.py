"""Structured pruning of decoder LLMs that stays exact: SwiGLU neurons, GQA attention heads, whole layers.

Hugging Face decoders cannot be traced by torch.fx, so this path reads the structure of each decoder layer
instead (Llama, Qwen2, Mistral and any layer laid out like them: ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj``; GPT-2's fused ``c_attn`` is not covered)::

    stats = decoder_stats(model, calib_ids)                  # one calibration pass: activations, block influence
    plan = plan_decoder(model, 0.25, unit="ffn", criterion="output", stats=stats)
    prunekit.apply.masking.apply(masked, plan)               # zeros, same shapes
    slim = compact_decoder(model, plan)                      # a smaller model of the same class, config updated
    prunekit.deploy.hf.save_pretrained(slim, "out/")         # plain AutoModelForCausalLM.from_pretrained loads it

**Units** (``unit=``), each a set of slices removed together (:func:`unit_members`, as graph
:class:`~prunekit.surgery.graph.Member` layouts):

- ``"ffn"``: SwiGLU neuron ``i``: row ``i`` of ``gate_proj`` and ``up_proj`` (and their biases), column ``i``
  of ``down_proj``;
- ``"kv_groups"``: key/value head ``k`` with its ``num_key_value_groups`` query heads: the k/v rows of head
  ``k``, the q rows of its query heads, the matching ``o_proj`` columns (biases follow their rows);
- ``"q_heads"``: query heads inside their KV groups: q rows and ``o_proj`` columns. Every KV group loses the
  same number, so ``num_key_value_groups`` stays an integer (transformers repeats each KV head that many times);
- ``"layers"``: whole decoder layers (depth), ranked by **block influence** (ShortGPT, Men et al. 2024):
  ``1 - mean cos(input hidden state, output hidden state)`` of the layer over calibration tokens; the lowest
  influence goes first.

**Uniform across layers.** transformers 5.24 reads one ``num_attention_heads`` / ``num_key_value_heads`` /
``intermediate_size`` per model: its config has a ``per_layer_config``, but Llama/Qwen2/Mistral do not read
it (building one raises ``AmbiguousGlobalPerLayerAttributeError``). So every layer loses the same number of
units (each layer picks its own by its own scores), and a plan whose layers would end up with different counts
is refused with the counts named. Depth changes only ``num_hidden_layers``.

**Scores** (``criterion=``; high = important, the lowest go): ``"l2"`` / ``"l1"``, the norm of all weights of
the coupled slices; data-aware, from :func:`decoder_stats`: ``"wanda"`` (sum over those weights of
``|W_ij| * rms(x_j)``, x the layer's input; structured Wanda), ``"activation"`` (mean ``|activation|`` of the
unit on calibration tokens: the neuron's ``act(gate) * up``, the head's attention output), ``"output"``
(mean squared norm of the unit's contribution to the residual stream, ``E ||W_out[:, unit] x_unit||^2``,
exact from the activations' second moments); ``"influence"`` for layers.

**Exact.** Masking zeros the unit's rows and columns; a neuron or head whose output columns are zero adds
nothing, and a layer whose parameters are all zero is the identity (its residual branches add 0).
:func:`compact_decoder` applies the plan as masks to a copy, then removes the slices that are wholly zero:
Linear layers sliced, each attention's ``num_key_value_groups`` and ``layer_idx`` (the KV cache index) updated,
dropped layers removed from the stack, and the config (``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, ``intermediate_size``, ``num_hidden_layers``, ``layer_types``) rewritten, so masked and compacted
models compute the same logits and ``generate`` (KV cache) gives the same tokens.

The same units serve the graph-based surgery: a block rule declares the KV groups and FFN neurons of
Llama/Qwen2/Mistral layers (so :func:`prunekit.surgery.build_groups` falls back to them when fx fails), and
layer handlers keep attributes and config in step when :func:`prunekit.surgery.compact` slices those models.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from prunekit._util import check_choice, eval_mode
from prunekit.apply import masking
from prunekit.errors import InvalidTypeError, PrunekitError
from prunekit.plan import Plan, TensorPlan
from prunekit.pruners.sequential import calibration_batches, find_blocks
from prunekit.surgery.compact import Cuts, handler_for, register_layer_handler, strip_masks_and_hooks
from prunekit.surgery.graph import Member, Propagation, Seg, register_block_rule

UNITS = ("ffn", "kv_groups", "q_heads", "layers")
WIDTH_CRITERIA = ("l2", "l1", "wanda", "activation", "output")
DATA_CRITERIA = ("wanda", "activation", "output", "influence")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

# the Hugging Face classes whose layers the block rule and handlers know (strings: transformers stays unimported)
_HF = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
_DECODER_LAYERS = tuple(f"transformers.models.{m}.modeling_{m}.{c}DecoderLayer" for m, c in _HF.items())
_ATTENTIONS = tuple(f"transformers.models.{m}.modeling_{m}.{c}Attention" for m, c in _HF.items())
_MLPS = tuple(f"transformers.models.{m}.modeling_{m}.{c}MLP" for m, c in _HF.items())
_BASE_MODELS = tuple(f"transformers.models.{m}.modeling_{m}.{c}Model" for m, c in _HF.items())

Amount = Union[int, float]


# ----------------------------------------------------------------------------- layout

@dataclass(frozen=True)
class LayerShape:
    """The sizes of one decoder layer and the names of its tensors (``name``: the layer's dotted name)."""

    name: str
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    biases: Tuple[str, ...] = ()                              # which projections have a bias ("q_proj", ...)
    params: Tuple[Tuple[str, Tuple[int, ...]], ...] = ()       # every parameter of the layer, with its shape

    @property
    def groups(self) -> int:
        """Query heads per KV head (transformers' ``num_key_value_groups``)."""
        return self.heads // self.kv_heads

    def counts(self) -> Tuple[int, int, int]:
        return (self.heads, self.kv_heads, self.intermediate)

    def tensor(self, proj: str, attr: str = "weight") -> str:
        part = "self_attn" if proj in _ATTN else "mlp"
        return f"{self.name}.{part}.{proj}.{attr}" if self.name else f"{part}.{proj}.{attr}"


def _linear(parent: nn.Module, attr: str, where: str) -> nn.Linear:
    m = getattr(parent, attr, None)
    if not isinstance(m, nn.Linear):
        raise PrunekitError(f"{where}.{attr} is {type(m).__name__ if m is not None else 'missing'}, not an nn.Linear")
    return m


def layer_shape(name: str, layer: nn.Module) -> LayerShape:
    """The :class:`LayerShape` of a Llama-style decoder layer; :class:`PrunekitError` for another layout."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        raise PrunekitError(
            f"{name or 'the layer'} ({type(layer).__name__}) is not a Llama-style decoder layer: structured decoder "
            "pruning needs self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj (Llama, Qwen2, Mistral, ...); "
            "GPT-2's fused c_attn/c_fc are not supported")
    q, k, v, o = (_linear(attn, p, f"{name}.self_attn") for p in _ATTN)
    gate, up, down = (_linear(mlp, p, f"{name}.mlp") for p in _MLP)
    hd = getattr(attn, "head_dim", None)
    if not isinstance(hd, int) or hd < 1:
        raise PrunekitError(f"{name}.self_attn has no integer head_dim attribute")
    heads, kv = q.out_features // hd, k.out_features // hd
    ok = (q.out_features % hd == 0 and k.out_features % hd == 0 and kv >= 1 and heads % kv == 0
          and v.out_features == k.out_features and o.in_features == q.out_features
          and gate.out_features == up.out_features == down.in_features)
    if not ok:
        raise PrunekitError(f"{name}: projections do not fit grouped-query attention with head_dim={hd} "
                            f"(q {q.out_features}, k {k.out_features}, v {v.out_features}, o in {o.in_features}) "
                            f"or a gated MLP (gate {gate.out_features}, up {up.out_features}, down in {down.in_features})")
    biases = tuple(p for p, m in zip(_ATTN + _MLP, (q, k, v, o, gate, up, down)) if m.bias is not None)
    prefix = f"{name}." if name else ""
    params = tuple((prefix + n, tuple(p.shape)) for n, p in layer.named_parameters())
    return LayerShape(name, heads, kv, hd, gate.out_features, biases, params)


def decoder_layout(model: nn.Module) -> Tuple[str, List[LayerShape]]:
    """``(dotted name of the layer stack, [LayerShape per layer])`` of a decoder LLM."""
    if not isinstance(model, nn.Module):
        raise InvalidTypeError(f"expected a torch nn.Module (a Hugging Face causal LM), got {type(model).__name__}")
    prefix, blocks = find_blocks(model)
    return prefix, [layer_shape(f"{prefix}.{i}" if prefix else str(i), b) for i, b in enumerate(blocks)]


def unit_members(shape: LayerShape, unit: str) -> Tuple[int, List[Member]]:
    """``(number of units, members)`` of one layer: channel ``c`` of every member is unit ``c``'s slice
    (the one description of each unit, shared by planning, scoring and the graph block rule)."""
    check_choice(unit, UNITS, "decoder unit")
    t, hd, b = shape.tensor, shape.head_dim, shape.biases

    def rows(proj: str, inner: int = 1) -> List[Member]:
        out = [Member(t(proj), 0, "producer", inner=inner)]
        return out + ([Member(t(proj, "bias"), 0, "producer", inner=inner)] if proj in b else [])

    if unit == "ffn":
        return shape.intermediate, rows("gate_proj") + rows("up_proj") + [Member(t("down_proj"), 1, "consumer")]
    if unit == "kv_groups":
        span = shape.groups * hd
        return shape.kv_heads, (rows("q_proj", span) + rows("k_proj", hd) + rows("v_proj", hd)
                                + [Member(t("o_proj"), 1, "consumer", inner=span)])
    if unit == "q_heads":
        return shape.heads, rows("q_proj", hd) + [Member(t("o_proj"), 1, "consumer", inner=hd)]
    return 1, [Member(n, 0, "producer", inner=s[0] if s else 1) for n, s in shape.params]


# ----------------------------------------------------------------------------- calibration statistics

@dataclass
class DecoderStats:
    """What one calibration pass measured (per layer, means over ``tokens`` calibration tokens).

    ``influence[l]``: block influence ``1 - mean cos(input, output)`` of layer ``l``; ``layers[l]``:
    ``attn_in_sq`` / ``mlp_in_sq`` (mean square of each input feature of q/k/v and gate/up), ``o_sq`` /
    ``o_abs`` (mean square / mean |.| of each input of o_proj: the heads' outputs), ``o_gram`` (second moments
    of each KV group's block of o_proj inputs, ``(kv_heads, groups * head_dim, groups * head_dim)``),
    ``down_sq`` / ``down_abs`` (the same for the SwiGLU neurons, the inputs of down_proj).
    """

    tokens: int
    influence: List[float]
    layers: List[Dict[str, torch.Tensor]] = field(repr=False)


class _Acc:
    """Float64 sums of one layer's statistics."""

    def __init__(self, s: LayerShape):
        self.shape, self.tokens, self.cos = s, 0, 0.0
        self.sums: Dict[str, torch.Tensor] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.double()
        self.sums[key] = self.sums[key] + value if key in self.sums else value


def _rows(x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
    """(tokens, features) float32 rows of an activation, padding tokens left out."""
    x = x.detach().float()
    if keep is not None and keep.shape == x.shape[:-1]:
        return x[keep]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def decoder_stats(model: nn.Module, data: Any, *, batch_size: int = 8) -> DecoderStats:
    """Run calibration data through the model once and gather what the data-aware scores and the layer
    ranking need (see :class:`DecoderStats`).

    ``data``: token ids ``(windows, seq)`` (e.g. :func:`prunekit.zoo.llm.calibration_windows`) or a list of
    batches (tensors of ids, or dicts of model keyword arguments; an ``attention_mask`` leaves padding out).
    The model runs in eval mode without a KV cache; its modes are restored and its hooks removed after.
    """
    prefix, shapes = decoder_layout(model)
    _, blocks = find_blocks(model)
    batches = calibration_batches(data, batch_size)
    accs = [_Acc(s) for s in shapes]
    state: Dict[str, Any] = {"keep": None, "inputs": {}}
    handles = []

    def on_block(i: int):
        def pre(mod, args, kwargs):
            state["inputs"][i] = args[0] if args else kwargs["hidden_states"]

        def post(mod, args, kwargs, out):
            h_out = out[0] if isinstance(out, (tuple, list)) else out
            a, b = _rows(state["inputs"].pop(i), state["keep"]), _rows(h_out, state["keep"])
            accs[i].cos += float(torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).double().sum())
            accs[i].tokens += a.shape[0]
        return pre, post

    def on_input(i: int, key: str):
        s = shapes[i]

        def pre(mod, args):
            x = _rows(args[0], state["keep"])
            acc = accs[i]
            acc.add(f"{key}_sq", x.pow(2).sum(0))
            if key in ("o", "down"):
                acc.add(f"{key}_abs", x.abs().sum(0))
            if key == "o":
                g = x.reshape(x.shape[0], s.kv_heads, s.groups * s.head_dim)
                acc.add("o_gram", torch.einsum("nka,nkb->kab", g, g))
        return pre

    for i, block in enumerate(blocks):
        pre, post = on_block(i)
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
        for key, mod in (("attn_in", block.self_attn.q_proj), ("mlp_in", block.mlp.gate_proj),
                         ("o", block.self_attn.o_proj), ("down", block.mlp.down_proj)):
            handles.append(mod.register_forward_pre_hook(on_input(i, key)))
    try:
        with eval_mode(model):
            for b in batches:
                if isinstance(b, Mapping):
                    mask = b.get("attention_mask")
                    state["keep"] = mask.bool() if isinstance(mask, torch.Tensor) else None
                    model(**b, use_cache=False)
                else:
                    state["keep"] = None
                    model(input_ids=b, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not accs or accs[0].tokens == 0:
        raise PrunekitError("the calibration data reached no decoder layer (no tokens counted)")
    layers = []
    for acc in accs:
        layers.append({k: (v / acc.tokens).float() for k, v in acc.sums.items()})
    return DecoderStats(tokens=accs[0].tokens, influence=[1.0 - a.cos / a.tokens for a in accs], layers=layers)


def block_influence(model: nn.Module, data: Any, *, batch_size: int = 8) -> List[float]:
    """ShortGPT's block influence of every decoder layer: ``1 - mean cos(input, output)`` over the
    calibration tokens (see :func:`decoder_stats`)."""
    return decoder_stats(model, data, batch_size=batch_size).influence


# ----------------------------------------------------------------------------- scores

def _per_position(w: torch.Tensor, m: Member, fn) -> torch.Tensor:
    """``fn`` of the (positions, rest) matrix of a member's tensor, one value per position along its dim."""
    x = w.detach().movedim(m.dim, 0).reshape(w.shape[m.dim], -1).double()
    return fn(x)


def _channel_sum(per_pos: torch.Tensor, m: Member, channels: int) -> torch.Tensor:
    return per_pos[m.positions(range(channels))].sum(1)


def _check_stats(stats: Optional[DecoderStats], shapes: List[LayerShape], criterion: str) -> DecoderStats:
    if stats is None:
        raise PrunekitError(f"criterion {criterion!r} needs calibration statistics: pass data=<token ids (windows, "
                            "seq)> or stats=prunekit.surgery.decoder_stats(model, data)"
                            + ("" if criterion == "influence" else ", or a data-free criterion ('l2', 'l1')"))
    if not isinstance(stats, DecoderStats):
        raise InvalidTypeError(f"stats must be what decoder_stats returned, got {type(stats).__name__}")
    if len(stats.layers) != len(shapes) or any(
            s.get("o_sq") is None or s["o_sq"].numel() != sh.heads * sh.head_dim
            or s["down_sq"].numel() != sh.intermediate for s, sh in zip(stats.layers, shapes)):
        raise PrunekitError("stats were collected on a model of other shapes (layers, heads or neurons differ): "
                            "collect them on the model being planned")
    return stats


def unit_scores(model: nn.Module, unit: str, criterion: str = "l2", stats: Optional[DecoderStats] = None
                ) -> List[torch.Tensor]:
    """Per layer, the ``(units,)`` float64 scores of ``unit`` by ``criterion`` (high = keep); for
    ``unit="layers"`` one score per layer (its block influence)."""
    check_choice(unit, UNITS, "decoder unit")
    _, shapes = decoder_layout(model)
    if unit == "layers":
        check_choice(criterion, ("influence",), "criterion for unit='layers'")
        st = _check_stats(stats, shapes, criterion)
        return [torch.tensor([v], dtype=torch.float64) for v in st.influence]
    check_choice(criterion, WIDTH_CRITERIA, "criterion for decoder units")
    st = _check_stats(stats, shapes, criterion) if criterion in DATA_CRITERIA else None
    params = dict(model.named_parameters())
    out = []
    for i, s in enumerate(shapes):
        channels, members = unit_members(s, unit)
        layer_stats = st.layers[i] if st is not None else {}
        out.append(_layer_scores(params, s, unit, channels, members, criterion, layer_stats))
    return out


def _layer_scores(params, s: LayerShape, unit: str, channels: int, members: List[Member], criterion: str,
                  st: Mapping[str, torch.Tensor]) -> torch.Tensor:
    if criterion in ("l1", "l2"):
        p = 1 if criterion == "l1" else 2
        total = sum(_channel_sum(_per_position(params[m.name], m, lambda x: x.abs().pow(p).sum(1)), m, channels)
                    for m in members)
        return total if p == 1 else total.sqrt()
    consumer = next(m for m in members if m.role == "consumer")
    w_out = params[consumer.name].detach().double()
    key = "down" if unit == "ffn" else "o"
    if criterion == "activation":
        return st[f"{key}_abs"].double()[consumer.positions(range(channels))].mean(1)
    if criterion == "wanda":
        total = torch.zeros(channels, dtype=torch.float64)
        for m in members:
            if not m.name.endswith(".weight"):
                continue
            if m.role == "consumer":
                rms = st[f"{key}_sq"].double().sqrt()
                per_pos = w_out.abs().sum(0) * rms
            else:
                rms = st["mlp_in_sq" if unit == "ffn" else "attn_in_sq"].double().sqrt()
                per_pos = params[m.name].detach().double().abs() @ rms
            total += _channel_sum(per_pos, m, channels)
        return total
    # "output": E ||W_out[:, unit] x_unit||^2
    if unit == "ffn":
        return st["down_sq"].double() * w_out.pow(2).sum(0)
    gram = st["o_gram"].double()                                    # (kv, G*hd, G*hd)
    span = s.groups * s.head_dim
    w = w_out.reshape(w_out.shape[0], s.kv_heads, span)            # columns by KV group
    wtw = torch.einsum("oka,okb->kab", w, w)
    if unit == "kv_groups":
        return (wtw * gram).sum((1, 2))
    hd = s.head_dim
    per_head = [(wtw[k, j * hd:(j + 1) * hd, j * hd:(j + 1) * hd] * gram[k, j * hd:(j + 1) * hd, j * hd:(j + 1) * hd]).sum()
                for k in range(s.kv_heads) for j in range(s.groups)]
    return torch.stack(per_head)


# ----------------------------------------------------------------------------- selection and plans

def _count(amount: Amount, n: int, what: str) -> int:
    """How many of ``n`` units an amount removes: a fraction in [0, 1) (rounded) or a count in [0, n)."""
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or (
            isinstance(amount, float) and not math.isfinite(amount)):
        raise PrunekitError(f"amount={amount!r} must be a fraction in [0, 1) or a count of {what}")
    if isinstance(amount, float):
        if not 0.0 <= amount < 1.0:
            raise PrunekitError(f"amount={amount} is out of range: a fraction of {what} must be in [0, 1)")
        count = math.floor(amount * n + 0.5)
    else:
        count = amount
        if count < 0:
            raise PrunekitError(f"amount={amount} is out of range: a count of {what} must be >= 0")
    if count >= n:
        raise PrunekitError(f"amount={amount!r} would remove all {n} {what}; keep at least one "
                            f"(at most {n - 1} can go)")
    if amount and count == 0:
        raise PrunekitError(f"amount={amount!r} removes no {what} ({n} of them: the smallest step is 1 of {n}, "
                            f"amount={1 / n:.3g})")
    return count


def _q_count(amount: Amount, s: LayerShape) -> int:
    """Query heads removed per KV group: a fraction of the query heads, or a count that every group shares."""
    allowed = ", ".join(str(s.kv_heads * r) for r in range(s.groups))
    if isinstance(amount, int) and not isinstance(amount, bool):
        if amount % s.kv_heads or not 0 <= amount < s.heads:
            raise PrunekitError(f"amount={amount} query heads cannot be taken evenly from {s.kv_heads} KV groups of "
                                f"{s.groups}: every group loses the same number, so a layer may lose {allowed} of "
                                f"its {s.heads} query heads")
        return amount // s.kv_heads
    return _count(amount, s.groups, f"query heads per KV group ({s.groups} per group, {s.kv_heads} groups)")


def _gqa_refusal(layer: str, kept: Sequence[int], groups: int) -> PrunekitError:
    live = [k for k in kept if k]
    allowed = ", ".join(str(len(live) * g) for g in range(1, groups + 1))
    return PrunekitError(
        f"{layer}: the plan leaves its KV groups with {list(kept)} query heads; every kept KV group must keep the "
        f"same number (num_key_value_groups must stay an integer): with {len(live)} KV group(s) kept, the layer may "
        f"keep {allowed} query heads (1 to {groups} per group). Remove query heads evenly from every group "
        "(unit='q_heads'), or whole KV groups with their query heads (unit='kv_groups')")


def _check_gqa(s: LayerShape, dead_q: Sequence[int]) -> Tuple[List[int], List[int]]:
    """(kept query heads, kept KV heads) once ``dead_q`` query heads go; refused unless every kept group keeps
    the same number of query heads and at least one head is kept."""
    dead = set(dead_q)
    kept = [sum(1 for j in range(s.groups) if k * s.groups + j not in dead) for k in range(s.kv_heads)]
    if not any(kept):
        raise PrunekitError(f"{s.name}: the plan removes every attention head of the layer; keep at least one KV "
                            "group (or remove the whole layer with unit='layers')")
    if len({k for k in kept if k}) > 1:
        raise _gqa_refusal(s.name, kept, s.groups)
    return [h for h in range(s.heads) if h not in dead], [k for k in range(s.kv_heads) if kept[k]]


def _with_counts(s: LayerShape, **counts: int) -> LayerShape:
    return replace(s, **counts)


def _check_uniform(shapes: Sequence[LayerShape]) -> None:
    counts = {s.counts() for s in shapes}
    if len(counts) > 1:
        desc = "; ".join(f"{s.name}: {s.heads} query / {s.kv_heads} KV heads, {s.intermediate} neurons"
                         for s in shapes[:6])
        raise PrunekitError(
            f"the decoder layers would differ in shape ({desc}{'; ...' if len(shapes) > 6 else ''}): transformers "
            "reads one num_attention_heads / num_key_value_heads / intermediate_size per model (its per_layer_config "
            "is not read by Llama/Qwen2/Mistral), so a compacted model could not be saved or reloaded. Remove the "
            "same number of units from every layer")


def _entries(model: nn.Module, shapes: List[LayerShape], unit: str, pruned: Mapping[int, Sequence[int]]) -> Plan:
    """One structured TensorPlan per (tensor, dim); coupled slices name their lead tensor."""
    params = dict(model.named_parameters())
    plan = Plan()
    for i, idx in sorted(pruned.items()):
        if not idx:
            continue
        _, members = unit_members(shapes[i], unit)
        lead = members[0].name
        for m in members:
            pos = sorted(set(m.positions(sorted(idx)).reshape(-1).tolist()))
            shape = tuple(params[m.name].shape)
            key = m.name if m.name not in plan.tensors else f"{m.name}#dim{m.dim}"
            plan.tensors[key] = TensorPlan(m.name, shape, "structured", units=shape[m.dim], pruned_units=len(pos),
                                           dim=m.dim, pruned_idx=pos,
                                           coupled_to=None if m.name == lead or unit == "layers" else lead)
    return plan


def _validate(shapes: List[LayerShape], unit: str, pruned: Mapping[int, List[int]]) -> Dict[str, int]:
    """Refuse a selection the compacted model could not express; return the sizes it leaves."""
    n_layers = len(shapes)
    if unit == "layers":
        if len(pruned) >= n_layers:
            raise PrunekitError(f"the plan removes all {n_layers} decoder layers; keep at least one")
        s = shapes[0]
        return {"heads": s.heads, "kv_heads": s.kv_heads, "intermediate": s.intermediate,
                "layers": n_layers - len(pruned)}
    for i, idx in pruned.items():
        channels, _ = unit_members(shapes[i], unit)
        bad = [u for u in idx if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < channels]
        if bad or len(set(idx)) != len(idx):
            raise PrunekitError(f"{shapes[i].name}: unit indices must be distinct ints in [0, {channels}), got {idx}")
    after = []
    for i, s in enumerate(shapes):
        idx = pruned.get(i, [])
        if unit == "ffn":
            if len(idx) >= s.intermediate:
                raise PrunekitError(f"{s.name}: the plan removes all {s.intermediate} MLP neurons; keep at least one")
            after.append(_with_counts(s, intermediate=s.intermediate - len(idx)))
            continue
        dead_q = idx if unit == "q_heads" else [k * s.groups + j for k in idx for j in range(s.groups)]
        kept_q, kept_kv = _check_gqa(s, dead_q)
        after.append(_with_counts(s, heads=len(kept_q), kv_heads=len(kept_kv)))
    _check_uniform(after)
    s = after[0]
    return {"heads": s.heads, "kv_heads": s.kv_heads, "intermediate": s.intermediate, "layers": n_layers}


def decoder_plan(model: nn.Module, unit: str, pruned: Union[Mapping[int, Sequence[int]], Sequence[int]], *,
                 meta: Optional[Mapping[str, Any]] = None) -> Plan:
    """The :class:`~prunekit.plan.Plan` that removes the given units: ``pruned`` maps a layer index to the
    indices of its units (neurons, KV groups, or query heads numbered 0..heads-1 within the layer), or for
    ``unit="layers"`` lists layer indices. Selections the compacted model could not express are refused
    (unequal query heads per KV group, different counts per layer, everything removed) before anything is
    built; the model is never changed.
    """
    check_choice(unit, UNITS, "decoder unit")
    _, shapes = decoder_layout(model)
    if unit == "layers":
        if isinstance(pruned, Mapping) or isinstance(pruned, (str, bytes)):
            raise PrunekitError("for unit='layers', pruned lists layer indices, e.g. [3, 7]")
        layers = list(pruned)
        bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(shapes)]
        if bad or len(set(layers)) != len(layers):
            raise PrunekitError(f"layer indices must be distinct ints in [0, {len(shapes)}), got {layers}")
        by_layer = {i: [0] for i in layers}
        after = _validate(shapes, unit, by_layer)
    else:
        if not isinstance(pruned, Mapping):
            raise PrunekitError(f"for unit={unit!r}, pruned maps layer index -> unit indices, e.g. {{0: [1, 5]}}")
        bad = [i for i in pruned if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(shapes)]
        if bad:
            raise PrunekitError(f"layer indices must be ints in [0, {len(shapes)}), got {bad}")
        by_layer = {i: list(v) for i, v in pruned.items()}
        after = _validate(shapes, unit, by_layer)
    plan = _entries(model, shapes, unit, by_layer)
    selected = sorted(by_layer) if unit == "layers" else {str(i): sorted(v) for i, v in sorted(by_layer.items())}
    plan.meta = {"applier": "decoder", "pattern": "structured", "unit": unit, "pruned": selected,
                 "layers": len(shapes), "before": {"heads": shapes[0].heads, "kv_heads": shapes[0].kv_heads,
                                                   "intermediate": shapes[0].intermediate, "layers": len(shapes)},
                 "after": after, **dict(meta or {})}
    if unit != "layers":
        plan.notes.append("every decoder layer loses the same number of units (transformers keeps one count per "
                          "model); each layer picks its own by its scores")
    return plan


def plan_decoder(model: nn.Module, amount: Amount, *, unit: str = "ffn", criterion: Optional[str] = None,
                 data: Any = None, stats: Optional[DecoderStats] = None, batch_size: int = 8) -> Plan:
    """Plan structured pruning of a decoder LLM (see the module docstring); the model is not changed.

    ``amount``: a fraction in [0, 1) of each layer's units (of all layers for ``unit="layers"``), rounded to
    the nearest count, or a count (per layer; for ``"q_heads"`` a multiple of the KV heads). ``criterion``:
    ``"output"`` (the default for width units), ``"activation"``, ``"wanda"``, ``"l2"``, ``"l1"``, or
    ``"influence"`` (the only one, and the default, for layers). Data-aware ones need ``data`` (calibration
    token ids) or ``stats`` (:func:`decoder_stats`, reusable across plans); ``"l2"`` / ``"l1"`` need none, but
    on a trained LLM magnitude is a poor guide (SmolLM2-135M, 25% of the SwiGLU neurons: perplexity x1.4 dense
    by ``"output"``, x1.5 by ``"wanda"``, about x20,000 by ``"l2"``).
    """
    check_choice(unit, UNITS, "decoder unit")
    criterion = criterion if criterion is not None else ("influence" if unit == "layers" else "output")
    check_choice(criterion, ("influence",) if unit == "layers" else WIDTH_CRITERIA,
                 f"criterion for unit={unit!r}")
    _, shapes = decoder_layout(model)
    _check_uniform(shapes)
    s = shapes[0]
    # the amount is checked before any (slow) calibration pass
    if unit == "layers":
        n = _count(amount, len(shapes), f"decoder layers ({len(shapes)})")
    elif unit == "q_heads":
        n = _q_count(amount, s)
    else:
        n = _count(amount, s.intermediate if unit == "ffn" else s.kv_heads,
                   f"MLP neurons per layer ({s.intermediate})" if unit == "ffn" else f"KV groups per layer ({s.kv_heads})")
    if criterion in DATA_CRITERIA and stats is None and data is not None:
        stats = decoder_stats(model, data, batch_size=batch_size)
    scores = unit_scores(model, unit, criterion, stats)
    if unit == "layers":
        flat = torch.cat(scores)
        pruned: Any = sorted(torch.argsort(flat, stable=True)[:n].tolist())
    elif unit == "q_heads":
        pruned = {}
        for i, sc in enumerate(scores):
            idx = []
            for k in range(s.kv_heads):
                grp = sc[k * s.groups:(k + 1) * s.groups]
                idx += [k * s.groups + int(j) for j in torch.argsort(grp, stable=True)[:n]]
            pruned[i] = sorted(idx)
    else:
        pruned = {i: sorted(torch.argsort(sc, stable=True)[:n].tolist()) for i, sc in enumerate(scores)}
    meta = {"amount": amount, "criterion": criterion, "tokens": stats.tokens if stats is not None else None}
    if unit == "layers":
        meta["influence"] = [float(v) for v in torch.cat(scores)]
    return decoder_plan(model, unit, pruned, meta=meta)


# ----------------------------------------------------------------------------- compaction

@dataclass
class _LayerCut:
    removed: bool = False
    keep_q: Optional[List[int]] = None      # query heads kept
    keep_kv: Optional[List[int]] = None     # KV heads kept
    keep_ffn: Optional[List[int]] = None    # neurons kept


def _plan_keeps(model: nn.Module, plan: Plan) -> Dict[str, torch.Tensor]:
    """Keep-mask of every tensor the plan prunes (its entries AND-ed), checked against the model."""
    if not isinstance(plan, Plan):
        raise InvalidTypeError(f"plan must be a prunekit Plan, got {type(plan).__name__}")
    params = dict(model.named_parameters())
    keeps: Dict[str, torch.Tensor] = {}
    for tp in plan:
        if tp.name not in params:
            raise PrunekitError(f"the plan prunes {tp.name!r}, which {type(model).__name__} does not have")
        if tuple(params[tp.name].shape) != tuple(tp.shape):
            raise PrunekitError(f"the plan was made for {tp.name} of shape {tuple(tp.shape)}, the model's is "
                                f"{tuple(params[tp.name].shape)} (compact the original or masked model, once)")
        k = tp.keep_mask()
        keeps[tp.name] = keeps[tp.name] & k if tp.name in keeps else k
    return keeps


def _dead(keeps: Mapping[str, torch.Tensor], name: str, dim: int, size: int, block: int = 1) -> List[int]:
    """Indices of the ``block``-wide slices of ``name`` along ``dim`` that the plan prunes wholly."""
    k = keeps.get(name)
    if k is None:
        return []
    alive = k.movedim(dim, 0).reshape(size // block, -1).any(1)
    return (~alive).nonzero().reshape(-1).tolist()


def _all_pruned(keeps: Mapping[str, torch.Tensor], name: str) -> bool:
    k = keeps.get(name)
    return k is not None and not bool(k.any())


def _read_cuts(model: nn.Module, plan: Plan, shapes: List[LayerShape]) -> List[_LayerCut]:
    """What compaction removes from each layer: every slice the plan leaves wholly zero that can go exactly."""
    keeps = _plan_keeps(model, plan)
    cuts, after = [], []
    for s in shapes:
        outputs = [s.tensor("o_proj"), s.tensor("down_proj")]
        outputs += [s.tensor(p, "bias") for p in ("o_proj", "down_proj") if p in s.biases]
        if all(_all_pruned(keeps, n) for n in outputs):   # both residual branches add exactly 0: the identity
            cuts.append(_LayerCut(removed=True))
            continue
        dead_q = _dead(keeps, s.tensor("o_proj"), 1, s.heads * s.head_dim, s.head_dim)
        keep_q, keep_kv = _check_gqa(s, dead_q)
        dead_n = set(_dead(keeps, s.tensor("down_proj"), 1, s.intermediate))
        if len(dead_n) == s.intermediate:
            raise PrunekitError(f"{s.name}: the plan removes every MLP neuron of the layer but keeps its attention; "
                                "keep at least one neuron (or remove the whole layer with unit='layers')")
        keep_ffn = [i for i in range(s.intermediate) if i not in dead_n]
        cuts.append(_LayerCut(False, keep_q, keep_kv, keep_ffn))
        after.append(_with_counts(s, heads=len(keep_q), kv_heads=len(keep_kv), intermediate=len(keep_ffn)))
    if not after:
        raise PrunekitError(f"the plan removes all {len(shapes)} decoder layers; keep at least one")
    _check_uniform(after)
    return cuts


def _rows_of(heads: Sequence[int], hd: int) -> torch.Tensor:
    return (torch.as_tensor(list(heads), dtype=torch.long)[:, None] * hd + torch.arange(hd)).reshape(-1)


def _slice_linear(m: nn.Linear, dim: int, keep: torch.Tensor) -> None:
    if keep.numel() == m.weight.shape[dim]:
        return
    cuts: Cuts = {"weight": {dim: keep}}
    if dim == 0 and m.bias is not None:
        cuts["bias"] = {0: keep}
    handler_for(m)(m, cuts)


def _slice_layer(layer: nn.Module, s: LayerShape, cut: _LayerCut) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    q_rows = _rows_of(cut.keep_q, s.head_dim)
    kv_rows = _rows_of(cut.keep_kv, s.head_dim)
    _slice_linear(attn.q_proj, 0, q_rows)
    _slice_linear(attn.k_proj, 0, kv_rows)
    _slice_linear(attn.v_proj, 0, kv_rows)
    _slice_linear(attn.o_proj, 1, q_rows)
    neurons = torch.as_tensor(cut.keep_ffn, dtype=torch.long)
    _slice_linear(mlp.gate_proj, 0, neurons)
    _slice_linear(mlp.up_proj, 0, neurons)
    _slice_linear(mlp.down_proj, 1, neurons)


def compact_decoder(model: nn.Module, plan: Plan) -> nn.Module:
    """A new, smaller model without the units ``plan`` removes; ``model`` (original or masked) is not changed.

    The plan is applied as masks to a copy (so the result equals ``prunekit.apply.masking.apply(model, plan)``
    on every input), then every slice the plan leaves wholly zero and that can go exactly is removed: query
    heads whose o_proj columns are pruned, KV heads none of whose query heads remain, neurons whose down_proj
    column is pruned, layers whose o_proj and down_proj (and biases) are pruned. Other pruned entries stay as
    zeros. Refused, before anything is copied: a layer's KV groups left with unequal query heads, layers left
    with different counts, a layer left without heads or neurons, every layer removed. The result is the same
    class with its config updated: save it with :func:`prunekit.deploy.hf.save_pretrained` (or the model's own
    ``save_pretrained``); ``AutoModelForCausalLM.from_pretrained`` reloads it.
    """
    prefix, shapes = decoder_layout(model)
    cuts = _read_cuts(model, plan, shapes)             # every check before copying
    slim = copy.deepcopy(model)
    masking.apply(slim, plan)
    strip_masks_and_hooks(slim)
    parent_name, _, attr = prefix.rpartition(".")
    parent = slim.get_submodule(parent_name) if parent_name else slim
    layers = getattr(parent, attr)
    kept = []
    for i, (layer, s, cut) in enumerate(zip(layers, shapes, cuts)):
        if cut.removed:
            continue
        _slice_layer(layer, s, cut)
        kept.append(i)
    if len(kept) != len(layers):
        setattr(parent, attr, nn.ModuleList([layers[i] for i in kept]))
        config = _config_of(parent)
        types = getattr(config, "layer_types", None) if config is not None else None
        if isinstance(types, (list, tuple)) and len(types) == len(shapes):
            config.layer_types = [types[i] for i in kept]
    sync_decoder(parent, attr)
    return slim


def _config_of(base: nn.Module) -> Any:
    config = getattr(base, "config", None)
    return config if config is not None and hasattr(config, "num_hidden_layers") else None


def sync_decoder(base: nn.Module, layers_attr: str = "layers") -> None:
    """Make a decoder's module attributes and config agree with its (sliced) tensors: each attention's
    ``num_key_value_groups`` and ``layer_idx``, each MLP's ``intermediate_size``, and the config's head counts,
    ``head_dim``, ``intermediate_size`` and ``num_hidden_layers``. Refuses layers of different shapes."""
    layers = getattr(base, layers_attr)
    shapes = [layer_shape(f"{layers_attr}.{i}", layer) for i, layer in enumerate(layers)]
    _check_uniform(shapes)
    for i, (layer, s) in enumerate(zip(layers, shapes)):
        _sync_attention(layer.self_attn)
        _sync_mlp(layer.mlp)
        for m in (layer, layer.self_attn):
            if hasattr(m, "layer_idx"):
                m.layer_idx = i
    config = _config_of(base)
    if config is None or not shapes:
        return
    s = shapes[0]
    config.num_attention_heads, config.num_key_value_heads = s.heads, s.kv_heads
    config.head_dim = s.head_dim     # explicit: without it transformers derives hidden_size // num_attention_heads
    config.intermediate_size = s.intermediate
    config.num_hidden_layers = len(layers)
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and len(types) != len(layers):
        raise PrunekitError(f"config.layer_types lists {len(types)} layers, the model has {len(layers)}")


def _sync_attention(attn: nn.Module) -> None:
    hd = attn.head_dim
    heads, kv = attn.q_proj.out_features // hd, attn.k_proj.out_features // hd
    if kv < 1 or heads % kv:
        raise PrunekitError(f"{type(attn).__name__}: {heads} query heads do not split evenly over {kv} KV heads")
    attn.num_key_value_groups = heads // kv
    for name, value in (("num_heads", heads), ("num_key_value_heads", kv), ("num_attention_heads", heads)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def _sync_mlp(mlp: nn.Module) -> None:
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = mlp.gate_proj.out_features


# ----------------------------------------------------------------------------- the graph surgery's view

@register_block_rule(*_DECODER_LAYERS)
def _decoder_layer_rule(prop: Propagation, name: str, m: nn.Module) -> None:
    """KV groups and SwiGLU neurons of a Llama/Qwen2/Mistral layer (query heads within groups need the
    equal-count rule, which channel groups cannot state: plan those with :func:`plan_decoder`)."""
    try:
        shape = layer_shape(name, m)
    except PrunekitError:
        return
    for unit in ("kv_groups", "ffn"):
        channels, members = unit_members(shape, unit)
        g = prop.new_group(channels)
        for mem in members:
            prop.add(g, mem.name, mem.dim, mem.role, Seg(g, inner=mem.inner))


@register_layer_handler(*_ATTENTIONS, attrs=("num_key_value_groups",), refresh=True)
def _attention_handler(m: nn.Module, cuts: Cuts) -> None:
    _sync_attention(m)


@register_layer_handler(*_MLPS, attrs=("intermediate_size",), refresh=True)
def _mlp_handler(m: nn.Module, cuts: Cuts) -> None:
    _sync_mlp(m)


@register_layer_handler(*_BASE_MODELS, refresh=True)
def _base_model_handler(m: nn.Module, cuts: Cuts) -> None:
    sync_decoder(m)
