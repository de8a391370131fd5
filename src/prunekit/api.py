"""The user-facing pruning calls: choose tensors → score → select → apply.

    plan = prunekit.prune(model, 0.9, criterion="l1", scope="global")

is ``select_targets`` + ``compute_scores`` + :func:`prunekit.plan.select` +
:func:`prunekit.masking.apply`. ``plan_pruning`` stops before applying, so a
plan can be inspected, saved, or applied to another copy of the model.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import masking
from .criteria import CRITERIA, Criterion, ScoreContext, get_criterion
from .biascorr import SUPPORTED as BIAS_LAYERS
from .biascorr import apply_with_correction
from .criteria.calibrate import COLLECTORS, calibrate
from .criteria.rowwise import select_rows
from .plan import Amount, Plan, TensorPlan, select
from .threshold import Elementwise

DEFAULT_TYPES: Tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d")
Patterns = Optional[Union[str, Sequence[str]]]


def _as_list(p: Patterns) -> List[str]:
    if p is None:
        return []
    return [p] if isinstance(p, str) else list(p)


def _type_matcher(types: Optional[Iterable[Union[str, type]]]):
    wanted = list(DEFAULT_TYPES if types is None else types)
    classes = []
    for t in wanted:
        if isinstance(t, type):
            classes.append(t)
        elif isinstance(getattr(nn, str(t), None), type):
            classes.append(getattr(nn, t))
        else:
            raise ValueError(f"unknown module type {t!r}; give torch.nn class names such as "
                             f"{', '.join(DEFAULT_TYPES)}, 'Embedding', or classes")
    return tuple(classes)


def _matches(name: str, module_name: str, patterns: List[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(module_name, p) for p in patterns)


def classifier_name(model: nn.Module) -> Optional[str]:
    """The final classifier: the last Linear/Conv module in registration order."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            last = name
    return last


def select_targets(model: nn.Module, *, types=None, include: Patterns = None, exclude: Patterns = None,
                   include_classifier: bool = False, param: str = "weight") -> List[str]:
    """Dotted names of the parameters to prune.

    Default: the weights of Linear and Conv layers, without the final classifier
    (pruning it hurts accuracy most and saves least). ``include``/``exclude`` are
    glob patterns matched against module or parameter names (``"features.*"``).
    """
    classes = _type_matcher(types)
    inc, exc = _as_list(include), _as_list(exclude)
    clf = None if include_classifier else classifier_name(model)
    found = []
    for mod_name, module in model.named_modules():
        p = module._parameters.get(param)
        if p is None and (param + "_orig") in module._parameters:
            raise ValueError(f"{mod_name}.{param} is pruned by torch.nn.utils.prune; call "
                             f"torch.nn.utils.prune.remove(module, {param!r}) before using prunekit")
        if p is None or not isinstance(module, classes):
            continue
        name = f"{mod_name}.{param}" if mod_name else param
        if inc and not _matches(name, mod_name, inc):
            continue
        if _matches(name, mod_name, exc):
            continue
        if mod_name == clf and not (inc and _matches(name, mod_name, inc)):
            continue  # an explicit include still wins over the classifier default
        found.append(name)
    for pat in inc:
        if not any(fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n.rpartition(".")[0], pat) for n in found):
            avail = [n for n, m in model.named_modules() if isinstance(m, classes)]
            raise ValueError(f"include pattern {pat!r} matches no prunable layer; layers of the "
                             f"selected types: {', '.join(avail) or '(none)'}")
    if not found:
        raise ValueError("no parameters selected for pruning (check types/include/exclude; "
                         "the final classifier is excluded unless include_classifier=True)")
    return found


def _checked(fn: Criterion, param: torch.Tensor, ctx: ScoreContext):
    def scores() -> torch.Tensor:
        s = fn(param, ctx)
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != tuple(param.shape):
            got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"criterion for {ctx.name} returned {got}; expected a tensor of shape "
                             f"{tuple(param.shape)}")
        return s.detach().float()
    scores.shape = tuple(param.shape)  # lets select() validate without computing scores
    return scores


def compute_scores(model: nn.Module, names: Sequence[str], criterion: Union[str, Criterion] = "l1", *,
                   seed: int = 0, stats: Optional[Mapping[str, Dict[str, Any]]] = None):
    """Lazy scores per parameter: recomputed on demand, never all held at once."""
    fn = get_criterion(criterion)
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out = {}
    for name in names:
        if name not in params:
            raise KeyError(f"unknown parameter {name!r}")
        p = params[name]
        if getattr(fn, "elementwise", None) is not None:
            out[name] = Elementwise(p, fn.elementwise)
            continue
        ctx = ScoreContext(name, modules.get(name.rpartition(".")[0]), seed, dict((stats or {}).get(name, {})))
        out[name] = _checked(fn, p, ctx)
    return out


def _couple_biases(model: nn.Module, plan: Plan) -> None:
    """Rows removed from a weight take their bias entries with them (torch's ln_structured does not)."""
    params = dict(model.named_parameters())
    for tp in list(plan):
        if tp.pattern != "structured" or tp.dim != 0 or not tp.name.endswith(".weight"):
            continue
        bname = tp.name[: -len("weight")] + "bias"
        b = params.get(bname)
        if b is None or bname in plan.tensors or b.dim() != 1 or b.shape[0] != tp.shape[0]:
            continue
        plan.tensors[bname] = TensorPlan(bname, tuple(b.shape), "structured", units=b.shape[0],
                                         pruned_units=len(tp.pruned_idx), dim=0,
                                         pruned_idx=list(tp.pruned_idx), coupled_to=tp.name)


def plan_pruning(model: nn.Module, amount: Optional[Amount] = None, *, criterion: Union[str, Criterion] = "l1",
                 scope: str = "layer", pattern: str = "unstructured", dim: int = 0, norm: float = 1.0,
                 nm: Tuple[int, int] = (2, 4), types=None, include: Patterns = None, exclude: Patterns = None,
                 include_classifier: bool = False, min_keep: Amount = 0.01, seed: int = 0,
                 stats: Optional[Mapping[str, Dict[str, Any]]] = None, normalize: Optional[bool] = None,
                 data: Optional[Iterable] = None, loss_fn: Optional[Callable] = None,
                 forward_fn: Optional[Callable] = None) -> Plan:
    """Decide what to prune without touching the model.

    Data-aware criteria (``taylor``, ``wanda``) take ``stats`` from
    :func:`prunekit.criteria.collect`, or ``data`` (calibration batches; with
    ``forward_fn``/``loss_fn``, see :mod:`prunekit.criteria.calibrate`), which
    runs them through the model with its state restored afterwards.
    ``scope="row"`` prunes the same fraction of every output row (Wanda's rule).
    """
    _check_data_args(criterion, scope, pattern, stats, data, loss_fn, forward_fn)
    names = select_targets(model, types=types, include=include, exclude=exclude,
                           include_classifier=include_classifier)
    if data is not None:
        stats = calibrate(criterion, model, data, names, forward_fn=forward_fn, loss_fn=loss_fn)
    current = masking.masks(model)
    current = {n: current[n] for n in names if n in current}
    scores = compute_scores(model, names, criterion, seed=seed, stats=stats)
    if scope == "row" and pattern != "nm":
        plan = select_rows(scores, amount, min_keep=min_keep, current=current)
    else:
        plan = select(scores, amount, scope="layer" if scope == "row" else scope, pattern=pattern, dim=dim,
                      norm=norm, nm=tuple(nm), min_keep=min_keep, current=current, normalize=normalize)
    _couple_biases(model, plan)
    plan.meta.update(criterion=criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "custom"),
                     seed=seed, targets=names)
    return plan


def prune(model: nn.Module, amount: Optional[Amount] = None, *, keep_original: bool = False,
          bias_correction: bool = False, **kwargs) -> Plan:
    """Score, select and apply in one call; returns the Plan that was applied.

    Keyword arguments are those of :func:`plan_pruning`. The model is pruned in
    place with masks (dense speed, see :mod:`prunekit.masking`); on any error
    it is left unchanged. ``criterion="sparsegpt"`` (with ``data=...``) runs
    :func:`prunekit.sparsegpt.sparsegpt_prune`, which also rewrites the kept weights.
    ``bias_correction=True`` (needs ``data=...``, or wanda/input_mean ``stats``) also moves each pruned
    layer's bias by what its removed weights contributed on average (:mod:`prunekit.biascorr`).
    """
    if kwargs.get("criterion") == "sparsegpt":  # a pruner that also rewrites the kept weights
        if bias_correction:
            raise ValueError("bias_correction is for criteria that only mask: sparsegpt already rewrites the "
                             "kept weights (and the mean with them)")
        from .sparsegpt import prune_with_sparsegpt
        return prune_with_sparsegpt(model, amount, keep_original=keep_original, **kwargs)
    if not bias_correction:
        plan = plan_pruning(model, amount, **kwargs)
        masking.apply(model, plan, keep_original=keep_original)
        return plan
    if keep_original:
        raise ValueError("bias_correction rewrites biases, which keep_original could not give back: "
                         "use one or the other")
    kwargs, means = _calibrate_means(model, dict(kwargs))
    return apply_with_correction(model, plan_pruning(model, amount, **kwargs), means)


def _calibrate_means(model: nn.Module, kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Mapping[str, Any]]:
    """(kwargs for plan_pruning, stats holding input means) for bias correction.

    Wanda's statistics already hold the means: one calibration pass serves both, and plan_pruning gets
    the stats instead of the data. Other criteria get a separate forward pass over ``data``.
    """
    data, stats = kwargs.get("data"), kwargs.get("stats")
    if data is None:
        if stats is None:
            raise ValueError("bias_correction needs calibration data: pass data=... (batches), or stats "
                             "collected with prunekit.criteria.collect('input_mean' or 'wanda', ...)")
        return kwargs, stats
    criterion = kwargs.get("criterion", "l1")
    if not _data_aware(criterion) and kwargs.get("loss_fn") is not None:
        raise ValueError(f"loss_fn is only used by criteria that need gradients (taylor), not {criterion!r}")
    names = [n for n in select_targets(model, types=kwargs.get("types"), include=kwargs.get("include"),
                                       exclude=kwargs.get("exclude"),
                                       include_classifier=kwargs.get("include_classifier", False))
             if isinstance(model.get_submodule(n.rpartition(".")[0]), BIAS_LAYERS)]
    if criterion == "wanda":  # its statistics hold the means too: one pass, handed to plan_pruning as stats
        kwargs["stats"] = calibrate("wanda", model, kwargs.pop("data"), names,
                                    forward_fn=kwargs.pop("forward_fn", None))
        return kwargs, kwargs["stats"]
    means = calibrate("input_mean", model, data, names, forward_fn=kwargs.get("forward_fn"))
    if not _data_aware(criterion):  # data served the means only
        kwargs.pop("data")
        kwargs.pop("forward_fn", None)
    return kwargs, means


def _data_aware(criterion: Any) -> bool:
    """A criterion that scores from calibration statistics (its collector has the same name)."""
    return isinstance(criterion, str) and criterion in COLLECTORS and criterion in CRITERIA


def _check_data_args(criterion, scope, pattern, stats, data, loss_fn, forward_fn) -> None:
    """Clear errors for the calibration arguments, before anything runs."""
    if criterion == "sparsegpt":
        raise ValueError("sparsegpt rewrites the kept weights, so it cannot only plan: use "
                         "prunekit.prune(model, amount, criterion='sparsegpt', data=...) or "
                         "prunekit.sparsegpt.sparsegpt_prune")
    if scope == "row" and pattern == "structured":
        raise ValueError("scope='row' works with pattern='unstructured' (or 'nm', which is per row anyway); "
                         "structured pruning removes whole rows or columns: use scope='layer' or 'global'")
    if scope not in ("layer", "global", "row"):
        raise ValueError(f"unknown scope {scope!r}; allowed: layer, global, row")
    if data is None:
        if loss_fn is not None or forward_fn is not None:
            raise ValueError("loss_fn and forward_fn are only used with data=... (calibration batches)")
        return
    if stats is not None:
        raise ValueError("pass either stats (already collected) or data (to collect them), not both")
    if not _data_aware(criterion):
        aware = [c for c in COLLECTORS.names() if _data_aware(c)]
        raise ValueError(f"data=... is used by data-aware criteria only ({', '.join(aware)}, "
                         f"or prune(..., criterion='sparsegpt'), or prune(..., bias_correction=True)); "
                         f"got criterion={criterion!r}")


def global_sparsity(model: nn.Module, names: Optional[Sequence[str]] = None) -> float:
    """Fraction of zeros over the given parameters (default: all masked ones)."""
    params = dict(model.named_parameters())
    names = list(names) if names is not None else [n for n, _, _ in masking.masked_parameters(model)]
    total = sum(params[n].numel() for n in names)
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    return zeros / total if total else 0.0


def current_plan(model: nn.Module) -> Plan:
    """The masks a model carries now, as an (unstructured) Plan that can be saved and re-applied."""
    from .compress import pack_bits

    plan = Plan(meta={"source": "masks of a model"})
    for name, keep in masking.masks(model).items():
        plan.tensors[name] = TensorPlan(name, tuple(keep.shape), "unstructured", units=keep.numel(),
                                        pruned_units=int((~keep).sum()), keep_bits=pack_bits(keep.reshape(-1)))
    return plan
