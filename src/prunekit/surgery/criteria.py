"""Score channel groups with the elementwise criteria, and plan which channels to remove.

The score of channel ``c`` of a group combines its member slices: for each
parameter member, the Ln norm (``norm``) of the criterion's scores over the
slice of channel ``c``; then ``aggregate`` over members: ``sum`` (default),
``mean``, ``max``, or ``first`` (the group's first producer only).

:func:`plan_groups` returns an ordinary :class:`prunekit.plan.Plan` with one
structured TensorPlan per (member tensor, dim), so :func:`prunekit.apply.masking.apply`
zeroes all coupled slices and :func:`prunekit.surgery.compact` removes them.
A tensor sliced along two dims (a hidden layer loses rows *and* columns) has two
entries: the first under its name, the second under ``"<name>#dim<d>"``
(``TensorPlan.name`` is always the real tensor name); ``Plan.to_json`` keeps
those keys.
"""
from __future__ import annotations

import fnmatch
import math
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from prunekit._util import check_choice
from prunekit.apply import masking
from prunekit.criteria.score import compute_scores
from prunekit.errors import PrunekitError
from prunekit.plan import Plan, TensorPlan
from prunekit.select.amount import Amount
from prunekit.select.ranking import select
from prunekit.select.threshold import full_scores
from prunekit.surgery.graph import ChannelGraph, Group, Member, build_groups

AGGREGATES = ("sum", "mean", "max", "first")


def _score_source(s):
    """compute_scores gives an Elementwise or a lazy callable; full_scores wants a source."""
    return s if not isinstance(s, torch.Tensor) else (lambda: s)


def _channel_norms(scores: torch.Tensor, m: Member, channels: int, norm: float, normalize: bool) -> torch.Tensor:
    """Ln norm of the criterion scores over each channel's slice of one member."""
    x = scores.movedim(m.dim, 0).reshape(scores.shape[m.dim], -1).abs()
    pos = m.positions(range(channels))                     # (channels, positions per channel)
    if math.isinf(norm):
        return x.amax(dim=1).double()[pos].amax(dim=1)
    # summed in float64 without a float64 copy of the scores (memory-bound on big layers)
    per_pos = (x if norm == 1 else x.pow(norm)).sum(dim=1, dtype=torch.float64)
    out = per_pos[pos].sum(dim=1)
    if normalize:  # per entry, so wide and narrow slices compare fairly
        out = out / (pos.shape[1] * x.shape[1])
    return out.pow(1.0 / norm)


def group_scores(model: nn.Module, graph: ChannelGraph, criterion="l1", *, norm: float = 2.0,
                 aggregate: str = "sum", normalize: bool = False, seed: int = 0,
                 stats: Optional[Mapping[str, Dict[str, Any]]] = None) -> Dict[int, torch.Tensor]:
    """Score of every channel of every prunable group (``{group id: (channels,) float64}``).

    Tensors are scored one at a time (each score tensor is dropped before the next),
    so memory stays at one tensor's scores whatever the model size.
    """
    check_choice(aggregate, AGGREGATES, "aggregate")
    if not (isinstance(norm, (int, float)) and norm > 0):
        raise PrunekitError(f"norm={norm!r} must be a positive number (1, 2, float('inf'), ...)")
    groups = graph.prunable()
    uses: Dict[str, List[Tuple[Group, Member]]] = OrderedDict()
    for g in groups:
        members = [g.lead()] if aggregate == "first" else g.params()
        for m in members:
            if m.kind == "param":
                uses.setdefault(m.name, []).append((g, m))
    per_group: Dict[int, List[torch.Tensor]] = {g.id: [] for g in groups}
    lazy = compute_scores(model, list(uses), criterion, seed=seed, stats=stats)
    for name, pairs in uses.items():
        scores = full_scores(_score_source(lazy[name]))
        for g, m in pairs:
            per_group[g.id].append(_channel_norms(scores, m, g.channels, norm, normalize))
        del scores
    out = {}
    for g in groups:
        vs = torch.stack(per_group[g.id]) if per_group[g.id] else torch.zeros(1, g.channels, dtype=torch.float64)
        out[g.id] = {"sum": vs.sum(0), "mean": vs.mean(0), "max": vs.amax(0), "first": vs[0]}[aggregate]
    if normalize and aggregate == "sum":
        # a residual group has many members: their sum must not look more important than one layer
        out = {gid: v / max(1, len(per_group[gid])) for gid, v in out.items()}
    return out


def relative_scores(scores: Mapping[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """Each group's channel scores over the group's mean score (1.0: an average channel of its layer), so
    that one global ranking compares channels of different layers fairly. A group whose scores are all zero
    stays zero."""
    out = {}
    for gid, v in scores.items():
        mean = v.mean()
        out[gid] = v / mean if mean > 0 else torch.zeros_like(v)
    return out


def _already_pruned(current: Mapping[str, torch.Tensor], g: Group) -> Optional[torch.Tensor]:
    """Keep-vector of channels whose parameter slices are all masked already (gradual pruning)."""
    params = [m for m in g.params() if m.name in current]
    if not params or len(params) < len(g.params()):
        return None
    keep = torch.zeros(g.channels, dtype=torch.bool)
    for m in params:
        k = current[m.name].movedim(m.dim, 0).reshape(current[m.name].shape[m.dim], -1).any(dim=1)
        keep |= k[m.positions(range(g.channels))].any(dim=1)
    return keep


def _protected(g: Group, protect: Sequence[str]) -> Optional[str]:
    for m in g.members:
        if m.role != "consumer" and any(fnmatch.fnmatchcase(m.module, p) for p in protect):
            return m.module
    return None


def _round_keep(keep: torch.Tensor, scores: torch.Tensor, round_to: Optional[int]) -> torch.Tensor:
    """Keep a multiple of ``round_to`` channels (or all): give back the best pruned ones."""
    if not round_to:
        return keep
    n_keep, n = int(keep.sum()), keep.numel()
    target = min(n, math.ceil(n_keep / round_to) * round_to) if n_keep else 0
    if target > n_keep:
        pruned = (~keep).nonzero().squeeze(1)
        best = pruned[torch.argsort(scores[pruned], descending=True, stable=True)]
        keep = keep.clone()
        keep[best[:target - n_keep]] = True
    return keep


def _select_channels(scores: Dict[int, torch.Tensor], current: Dict[int, torch.Tensor], amount: Amount,
                     scope: str, min_keep: Amount) -> Tuple[Dict[int, torch.Tensor], List[int]]:
    """prunekit.select.select on one score vector per group: same amount, floor and tie rules."""
    keyed = {str(gid): v for gid, v in scores.items()}
    sel = select(keyed, amount, scope=scope, pattern="unstructured", min_keep=min_keep,
                 current={str(gid): k for gid, k in current.items()})
    keeps = {int(k): tp.keep_mask() for k, tp in sel.tensors.items()}
    return keeps, [int(k) for k, tp in sel.tensors.items() if tp.floor_hit]


def _plan_key(plan: Plan, name: str, dim: int) -> str:
    return name if name not in plan.tensors else f"{name}#dim{dim}"


def _tensor_entries(model: nn.Module, graph: ChannelGraph, pruned: Dict[int, List[int]]) -> Plan:
    """One structured TensorPlan per (parameter, dim); coupled slices of all groups merged."""
    params = dict(model.named_parameters())
    cut: Dict[str, Dict[int, set]] = OrderedDict()
    owners: Dict[Tuple[str, int], set] = {}
    for g in graph.groups:
        if g.id not in pruned:
            continue
        for m in g.params():
            pos = m.positions(pruned[g.id]).reshape(-1).tolist()
            cut.setdefault(m.name, {}).setdefault(m.dim, set()).update(pos)
            owners.setdefault((m.name, m.dim), set()).add(g.lead().name)
    plan = Plan()
    for name, dims in cut.items():
        shape = tuple(params[name].shape)
        for dim in sorted(dims):
            idx = sorted(dims[dim])
            plan.tensors[_plan_key(plan, name, dim)] = TensorPlan(
                name, shape, "structured", units=shape[dim], pruned_units=len(idx), dim=dim,
                pruned_idx=idx, coupled_to=_coupled_to(name, owners[(name, dim)]))
    return plan


def _coupled_to(name: str, leads: set) -> Optional[str]:
    """The lead tensor whose channels this entry follows (None for the lead itself or a concat)."""
    return next(iter(leads)) if len(leads) == 1 and name not in leads else None


def _mark_protected(graph: ChannelGraph, protect: Sequence[str]) -> None:
    for g in graph.groups:
        who = _protected(g, protect) if g.prunable else None
        if who is not None:
            g.prunable = False
            g.reasons.append(f"protected (module {who})")


def plan_groups(model: nn.Module, example_inputs, amount: Amount, *, criterion="l1", scope: str = "layer",
                norm: float = 2.0, aggregate: str = "sum", min_keep: Amount = 0.01,
                round_to: Optional[int] = None, protect: Union[str, Sequence[str]] = (), seed: int = 0,
                normalize: Optional[bool] = None, relative: Optional[bool] = None, exact: bool = True,
                leaf_modules: Sequence[str] = (), graph: Optional[ChannelGraph] = None,
                stats: Optional[Mapping[str, Dict[str, Any]]] = None) -> Plan:
    """Plan structured pruning of whole channel groups; see the module docstring.

    ``amount`` is a fraction (or count) of each group's channels (``scope="layer"``) or
    of all prunable channels ranked together (``scope="global"``, scores normalised per
    entry and per member). ``min_keep`` is the per-group floor, ``round_to`` keeps a
    multiple of that many channels (or the whole group), ``protect`` lists module-name
    globs whose output channels are kept. Pass ``graph`` to reuse :func:`build_groups`.

    ``relative`` (default: on for ``scope="global"``) divides each group's channel scores by the group's
    mean score before the global ranking. Raw Ln norms are not comparable across layers (a 3x3 conv's
    weights are an order of magnitude larger than a wide Linear's, a BatchNorm scale adds ~1 per channel),
    so without it one ranking empties some layers and leaves others whole; with it a channel competes by
    how it compares with its own layer. It does not change ``scope="layer"`` (a ranking within one group).
    """
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise PrunekitError(f"round_to={round_to!r} must be a positive int (e.g. 8) or None")
    graph = ChannelGraph.from_dict(graph.to_dict()) if graph is not None else \
        build_groups(model, example_inputs, leaf_modules=leaf_modules, exact=exact)
    _mark_protected(graph, [protect] if isinstance(protect, str) else list(protect))
    groups = graph.prunable()
    if not groups:
        raise PrunekitError("no prunable channel group in this model:\n" + graph.describe())
    normalize = (scope == "global") if normalize is None else normalize
    scores = group_scores(model, graph, criterion, norm=norm, aggregate=aggregate, normalize=normalize,
                          seed=seed, stats=stats)
    relative = (scope == "global") if relative is None else bool(relative)
    if relative:
        scores = relative_scores(scores)
    masks_now = masking.masks(model)
    current = {g.id: k for g in groups if (k := _already_pruned(masks_now, g)) is not None}
    keeps, floor_hits = _select_channels(scores, current, amount, scope, min_keep)
    pruned, given_back = {}, 0
    for g in groups:
        keep = _round_keep(keeps[g.id], scores[g.id], round_to)
        given_back += int(keep.sum() - keeps[g.id].sum())
        pruned[g.id] = (~keep).nonzero().squeeze(1).tolist()
    plan = _tensor_entries(model, graph, pruned)
    plan.meta = {"applier": "surgery", "pattern": "structured", "scope": scope, "amount": amount,
                 "criterion": criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "custom"),
                 "norm": norm, "aggregate": aggregate, "min_keep": min_keep, "round_to": round_to,
                 "protect": [protect] if isinstance(protect, str) else list(protect), "seed": seed,
                 "normalize": normalize, "relative": relative, "exact": exact,
                 "groups": _groups_meta(graph, pruned), "io_shapes": graph.io_shapes}
    plan.notes = list(graph.notes) + _notes(graph, pruned, floor_hits, min_keep)
    if given_back:
        plan.notes.append(f"round_to={round_to} kept {given_back} channels more than the amount asked")
    return plan


def _groups_meta(graph: ChannelGraph, pruned: Dict[int, List[int]]) -> List[Dict[str, Any]]:
    out = []
    for g in graph.groups:
        d = g.to_dict()
        d["pruned"] = list(pruned.get(g.id, []))
        d["lead"] = g.lead().name
        out.append(d)
    return out


def _notes(graph: ChannelGraph, pruned, floor_hits: List[int], min_keep) -> List[str]:
    notes = []
    for g in graph.groups:
        if not g.prunable:
            notes.append(f"group {g.id} ({g.lead().name}, {g.channels} ch) kept whole: {g.reason}")
        elif g.id in floor_hits:
            notes.append(f"group {g.id} ({g.lead().name}): the floor (min_keep={min_keep}) kept "
                         f"{g.channels - len(pruned[g.id])} of {g.channels} channels")
    inexact = [g for g in graph.groups if g.prunable and not g.exact and pruned.get(g.id)]
    if inexact:   # exact=False: say what it costs
        notes.append(f"{len(inexact)} group(s) ({', '.join(g.lead().name for g in inexact[:3])}"
                     f"{', ...' if len(inexact) > 3 else ''}) lose channels a LayerNorm normalises over: the kept "
                     "channels' values change, so the masked and compacted models differ; recover by fine-tuning "
                     "or distillation")
    return notes
