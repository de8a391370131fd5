"""Per-layer sensitivity analysis, and per-layer sparsities chosen from it.

    result = analyze(model, test_loader, sparsities=(0.5, 0.7, 0.9, 0.95))
    sensitivity_curves(result.to_dict(), "sensitivity.png")  # prunekit.report.figures: one curve per layer
    alloc = result.allocate(0.9)                     # {name: sparsity}, 90% of the weights overall
    apply_allocation(model, alloc)                   # prunes each layer by its own amount

:func:`analyze` prunes each target layer *alone* at every sparsity of a grid,
evaluates, and puts the layer back exactly as it was (values, masks, kept
originals), so the model it was given is unchanged afterwards, even when the
evaluation raises.

:meth:`SensitivityResult.allocate` picks per-layer sparsities that meet a
global, parameter-weighted target with the least *predicted* loss. The
prediction assumes that layer losses add up (the usual assumption of
sensitivity-based allocation): each layer's cost is its measured metric drop,
linearly interpolated between grid points. The method is a greedy over
marginal costs on the lower convex hull of each curve: segments are taken in
order of cost per weight removed until the target is met, the last one
partially. On convex piecewise-linear costs this fractional-knapsack greedy is
exactly optimal (the same answer as a Lagrangian sweep), and it meets the
target exactly, not just within one grid step.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit._util import atomic_write_text, check_choice, progress_enabled
from prunekit.analysis.metrics import evaluate as eval_loader
from prunekit.apply import masking
from prunekit.apply.biascorr import apply_with_correction
from prunekit.criteria import Criterion, get_criterion
from prunekit.criteria.score import compute_scores
from prunekit.errors import InvalidTypeError, PrunekitError, UnknownNameError
from prunekit.plan import Plan
from prunekit.select.allocation import interp, least_cost_allocation
from prunekit.select.amount import Amount, resolve_floor
from prunekit.select.coupling import couple_biases
from prunekit.select.ranking import select
from prunekit.select.rows import select_rows
from prunekit.targets import select_targets

FORMAT = "prunekit.sensitivity/1"
DEFAULT_SPARSITIES = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
# metric -> higher is better
METRICS = {"accuracy": True, "top5": True, "loss": False}
PATTERNS = ("unstructured", "structured")  # N:M fixes the sparsity: nothing to sweep
SELECT_KEYS = ("dim", "norm", "normalize")  # the select() options a per-layer trial may take
WEIGHTS = ("params", "uniform")
Evaluator = Union[Callable[[nn.Module], Any], Iterable]


# ----------------------------------------------------------------------------- result

@dataclass
class SensitivityResult:
    """Metric of the model with each layer pruned alone, at each sparsity of a grid."""

    metric: str
    baseline: float                                # the metric with no layer pruned further
    sparsities: List[float]
    curves: Dict[str, List[float]]                 # layer -> metric at each sparsity
    params: Dict[str, int]                         # layer -> number of weights
    base_sparsity: Dict[str, float] = field(default_factory=dict)  # sparsity from masks it already had
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return METRICS[self.metric]

    def drop(self, value: float) -> float:
        """How much worse ``value`` is than the baseline (positive = worse)."""
        return self.baseline - value if self.higher_is_better else value - self.baseline

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> Dict[str, Any]:
        """The dict of ``sensitivity.json`` (what :func:`prunekit.report.figures.sensitivity_curves` draws)."""
        return {"format": FORMAT, "metric": self.metric, "baseline": self.baseline, "sparsities": self.sparsities,
                "curves": self.curves, "params": self.params, "base_sparsity": self.base_sparsity,
                "meta": self.meta}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "SensitivityResult":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PrunekitError(f"not a prunekit sensitivity result (invalid JSON: {e})") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise PrunekitError(f"not a prunekit sensitivity result: expected format {FORMAT!r}")
        try:
            res = cls(metric=str(d["metric"]), baseline=float(d["baseline"]),
                      sparsities=[float(s) for s in d["sparsities"]],
                      curves={str(k): [float(v) for v in vs] for k, vs in d["curves"].items()},
                      params={str(k): int(v) for k, v in d["params"].items()},
                      base_sparsity={str(k): float(v) for k, v in d.get("base_sparsity", {}).items()},
                      meta=dict(d.get("meta", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PrunekitError(f"malformed sensitivity result: {e}") from e
        res._check()
        return res

    def save(self, path: Union[str, os.PathLike]) -> Path:
        path = Path(path)
        atomic_write_text(path, self.to_json())  # readers never see half a file
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SensitivityResult":
        return cls.from_json(Path(path).read_text())

    def _check(self) -> None:
        check_choice(self.metric, tuple(METRICS), "metric")
        if set(self.curves) != set(self.params):
            raise PrunekitError("malformed sensitivity result: curves and params name different layers")
        for name, values in self.curves.items():
            if len(values) != len(self.sparsities):
                raise PrunekitError(f"malformed sensitivity result: {name} has {len(values)} values for "
                                 f"{len(self.sparsities)} sparsities")

    # ------------------------------------------------------------------ allocation
    def cost_curve(self, name: str) -> List[Tuple[float, float]]:
        """(sparsity, predicted drop) points of one layer, starting at its own sparsity with 0.

        Drops are made non-decreasing in sparsity: removing more weights is not
        expected to help, so a better value at a higher sparsity is noise.
        """
        base = self.base_sparsity.get(name, 0.0)
        pts, worst = [(base, 0.0)], 0.0
        for s, v in zip(self.sparsities, self.curves[name]):
            if s > base + 1e-12:
                worst = max(worst, self.drop(v))
                pts.append((s, worst))
        return pts

    def allocate(self, target: float, *, min_keep: Amount = 0.01,
                 weights: Union[str, Mapping[str, float]] = "params") -> Dict[str, float]:
        """Per-layer sparsities meeting ``target`` with the least predicted loss.

        ``target`` is the weighted mean sparsity over the analysed layers:
        ``weights="params"`` weights each layer by its number of weights (so the
        target is the fraction of all their weights removed), ``"uniform"`` gives
        every layer the same weight, and a mapping gives your own (e.g. MACs per
        layer for a compute budget). A layer never goes past the highest sparsity
        measured (no extrapolation) nor leaves fewer than ``min_keep`` of its
        weights (a fraction, or an int count). Deterministic.
        """
        w = self._weights(weights)
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 <= target < 1.0:
            raise PrunekitError(f"target={target!r} must be a fraction in [0, 1)")
        try:
            return least_cost_allocation({n: self.cost_curve(n) for n in self.curves}, w, target,
                                         {n: self._cap(n, min_keep) for n in self.curves})
        except PrunekitError as e:  # say how to get further
            raise PrunekitError(f"{e} (measured up to {max(self.sparsities)}, min_keep={min_keep}); measure higher "
                                "sparsities or lower min_keep") from None

    def _weights(self, weights: Union[str, Mapping[str, float]]) -> Dict[str, float]:
        if isinstance(weights, str):
            check_choice(weights, WEIGHTS, "weights")
            return {n: float(self.params[n]) if weights == "params" else 1.0 for n in self.curves}
        missing = [n for n in self.curves if n not in weights]
        if missing:
            raise UnknownNameError(f"weights has no entry for {', '.join(missing)}")
        out = {n: float(weights[n]) for n in self.curves}
        if any(v < 0 or not math.isfinite(v) for v in out.values()) or not any(out.values()):
            raise PrunekitError("weights must be finite, >= 0 and not all zero")
        return out

    def _cap(self, name: str, min_keep: Amount) -> float:
        n = self.params[name]
        return min(max(self.sparsities), 1.0 - resolve_floor(min_keep, n) / n)

    def predicted_drop(self, allocation: Mapping[str, float]) -> float:
        """The sum of the layers' interpolated drops at ``allocation`` (the additive prediction)."""
        return sum(interp(self.cost_curve(n), s) for n, s in allocation.items())

    def achieved(self, allocation: Mapping[str, float],
                 weights: Union[str, Mapping[str, float]] = "params") -> float:
        """The weighted mean sparsity of ``allocation``."""
        w = self._weights(weights)
        return sum(w[n] * allocation[n] for n in w) / sum(w.values())

    # ------------------------------------------------------------------ presenting
    def rows(self, allocation: Optional[Mapping[str, float]] = None) -> List[Dict[str, Any]]:
        """One row per layer: weights, the metric at each sparsity, and the allocation if given."""
        out = []
        for name, values in self.curves.items():
            row: Dict[str, Any] = {"layer": name, "params": self.params[name]}
            row.update({f"s={s:g}": v for s, v in zip(self.sparsities, values)})
            if allocation is not None:
                row["allocated"] = round(float(allocation[name]), 4)
            out.append(row)
        return out


# ----------------------------------------------------------------------------- analysis

def evaluator(evaluate: Evaluator, metric: str, max_batches: Optional[int]) -> Callable[[nn.Module], float]:
    if callable(evaluate):
        def run(model: nn.Module) -> float:
            out = evaluate(model)
            return float(out[metric]) if isinstance(out, Mapping) else float(out)
        return run
    if not hasattr(evaluate, "__iter__"):
        raise InvalidTypeError(f"evaluate must be a function model -> number (or dict) or a loader of (x, y) batches, "
                        f"got {type(evaluate).__name__}")

    return lambda model: float(eval_loader(model, evaluate, max_batches=max_batches)[metric])


def _checked_value(value: float, where: str) -> float:
    if not math.isfinite(value):
        raise PrunekitError(f"the evaluation returned {value} {where}; it must return a finite number")
    return value


class _LayerState:
    """The exact state of the module owning one parameter, to put back after a trial prune."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.params = {k: p.detach().clone() for k, p in module._parameters.items() if p is not None}
        self.buffers = dict(module._buffers)  # the tensors themselves: apply() replaces, never edits, them
        self.non_persistent = set(module._non_persistent_buffers_set)

    @torch.no_grad()
    def restore(self) -> None:
        for k, v in self.params.items():
            self.module._parameters[k].copy_(v)
        self.module._buffers.clear()
        self.module._buffers.update(self.buffers)
        self.module._non_persistent_buffers_set.clear()
        self.module._non_persistent_buffers_set.update(self.non_persistent)


def _layer_plan(model, scores, amount, pattern, opts, select_kwargs) -> Plan:
    """One layer's plan: per-layer ranking, or Wanda's per-row ranking (``scope="row"``)."""
    name = next(iter(scores))
    module = model.get_submodule(name.rpartition(".")[0])
    current = masking.get_mask(module, name.rpartition(".")[2])
    current = {name: current} if current is not None else None
    if opts["scope"] == "row":
        plan = select_rows(scores, float(amount), min_keep=0, current=current)
    else:
        plan = select(scores, amount, scope="layer", pattern=pattern, min_keep=0, current=current, **select_kwargs)
    couple_biases(model, plan)  # as prunekit.prune does: a structured row takes its bias entry
    return plan


def _apply(model, plan: Plan, opts) -> None:
    """Mask, then (bias_correction) move the biases by the removed weights' mean contribution."""
    if opts["bias_correction"]:
        apply_with_correction(model, plan, opts["stats"])
    else:
        masking.apply(model, plan)


def _trial_prune(model, name, amount, criterion, pattern, seed, select_kwargs, opts) -> None:
    scores = compute_scores(model, [name], criterion, seed=seed, stats=opts["stats"])
    _apply(model, _layer_plan(model, scores, amount, pattern, opts, select_kwargs), opts)


def _options(pattern: str, scope: str, stats, bias_correction: bool) -> Dict[str, Any]:
    """Checked options of a trial: ``scope`` "layer" or "row", and what bias correction needs."""
    check_choice(scope, ("layer", "row"), "scope")
    if scope == "row" and pattern != "unstructured":
        raise PrunekitError("scope='row' (Wanda's per-row ranking) works with pattern='unstructured' only")
    if bias_correction and stats is None:
        raise PrunekitError("bias_correction needs stats holding input means: "
                         "prunekit.criteria.calibrate('wanda' or 'input_mean', model, data)")
    return {"scope": scope, "stats": stats, "bias_correction": bool(bias_correction)}


def _check_select_kwargs(select_kwargs: Mapping[str, Any]) -> None:
    bad = sorted(set(select_kwargs) - set(SELECT_KEYS))
    if bad:
        raise PrunekitError(f"unknown option(s) {', '.join(bad)}; allowed: {', '.join(SELECT_KEYS)} "
                         "(each layer is pruned alone, so scope and min_keep do not apply)")


def _validate(model, names, sparsities, criterion, pattern, metric) -> Tuple[List[str], List[float]]:
    check_choice(metric, tuple(METRICS), "metric")
    check_choice(pattern, PATTERNS, "pattern")
    get_criterion(criterion)
    grid = sorted({float(s) for s in sparsities})
    if not grid:
        raise PrunekitError("sparsities is empty: give fractions in (0, 1) such as 0.5, 0.9")
    for s in grid:
        if not 0.0 < s < 1.0:
            raise PrunekitError(f"sparsity {s} must be a fraction in (0, 1)")
    names = list(names) if names is not None else select_targets(model)
    if not names:
        raise PrunekitError("names is empty: give the dotted names of the parameters to analyse")
    for n in names:
        masking.owner_of(model, n)  # KeyError with close matches for a typo
    return names, grid


def analyze(model: nn.Module, evaluate: Evaluator, *, sparsities: Sequence[float] = DEFAULT_SPARSITIES,
            criterion: Union[str, Criterion] = "l1", names: Optional[Sequence[str]] = None,
            pattern: str = "unstructured", metric: str = "accuracy", seed: int = 0,
            max_batches: Optional[int] = None, progress: Optional[bool] = None,
            stats: Optional[Mapping[str, Any]] = None, scope: str = "layer", bias_correction: bool = False,
            **select_kwargs: Any) -> SensitivityResult:
    """Prune each layer alone at each sparsity, evaluate, and put it back.

    ``evaluate`` is a loader of ``(x, y)`` batches (scored by
    :func:`prunekit.analysis.metrics.evaluate`, at most ``max_batches``) or a function
    ``model -> number`` (or a dict holding ``metric``). ``names``: the
    parameters to analyse (default: those :func:`prunekit.prune` would prune).
    ``select_kwargs`` go to :func:`prunekit.select.select` (``dim``, ``norm`` for
    structured). A sparsity is the layer's *total*: masks it already has count
    towards it. The model is unchanged afterwards (values, masks, modes).
    Data-aware criteria take ``stats`` (:func:`prunekit.criteria.stats`);
    ``scope="row"`` ranks within each output row (Wanda); ``bias_correction``
    corrects each trial as :func:`prunekit.prune` would (needs means in ``stats``).
    """
    opts = _options(pattern, scope, stats, bias_correction)
    names, grid = _validate(model, names, sparsities, criterion, pattern, metric)
    _check_select_kwargs(select_kwargs)
    score = evaluator(evaluate, metric, max_batches)
    params = dict(model.named_parameters(remove_duplicate=False))
    masks = masking.masks(model)
    base = {n: float((~masks[n]).float().mean()) if n in masks else 0.0 for n in names}
    bar = tqdm(total=len(names) * len(grid) + 1, desc="sensitivity", disable=not progress_enabled(progress),
               leave=False)
    curves: Dict[str, List[float]] = {}
    with bar:
        baseline = _checked_value(score(model), "with no layer pruned")
        bar.update(1)
        for name in names:
            state = _LayerState(model.get_submodule(name.rpartition(".")[0]))
            curves[name] = []
            for s in grid:
                try:
                    _trial_prune(model, name, s, criterion, pattern, seed, select_kwargs, opts)
                    value = score(model)
                finally:
                    state.restore()  # even when pruning or evaluating fails: the model is given back as it was
                curves[name].append(_checked_value(value, f"for {name} at sparsity {s}"))
                bar.update(1)
                bar.set_postfix(layer=name, s=s)
    meta = {"criterion": criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "custom"),
            "pattern": pattern, "seed": seed, "scope": scope, "bias_correction": bool(bias_correction),
            **{k: v for k, v in select_kwargs.items() if isinstance(v, (int, float, str))}}
    return SensitivityResult(metric, baseline, grid, curves, {n: params[n].numel() for n in names}, base, meta)


# ----------------------------------------------------------------------------- using an allocation

def allocation_plan(model: nn.Module, allocation: Mapping[str, float], *, criterion: Union[str, Criterion] = "l1",
                    pattern: str = "unstructured", seed: int = 0, stats: Optional[Mapping[str, Any]] = None,
                    scope: str = "layer", **select_kwargs: Any) -> Plan:
    """One Plan pruning each named layer by its own amount (per-layer or, ``scope="row"``, per-row ranking),
    without touching the model. ``stats``: for data-aware criteria, as in :func:`analyze`."""
    check_choice(pattern, PATTERNS, "pattern")
    _check_select_kwargs(select_kwargs)
    opts = _options(pattern, scope, stats, False)
    if not allocation:
        raise PrunekitError("allocation is empty")
    for n in allocation:
        masking.owner_of(model, n)
    scores = compute_scores(model, list(allocation), criterion, seed=seed, stats=stats)
    plan = Plan(meta={"scope": scope, "pattern": pattern, "allocation": dict(allocation)})
    for n, s in allocation.items():
        plan.tensors.update(_layer_plan(model, {n: scores[n]}, float(s), pattern, opts, select_kwargs).tensors)
    plan.meta.update(criterion=criterion if isinstance(criterion, str) else "custom", seed=seed,
                     targets=list(allocation))
    return plan


def apply_allocation(model: nn.Module, allocation: Mapping[str, float], *, bias_correction: bool = False,
                     **kwargs: Any) -> Plan:
    """Prune ``model`` in place as ``allocation`` says; returns the Plan (the model is untouched on error).
    ``bias_correction`` (needs ``stats`` with input means) as in :func:`prunekit.prune`."""
    opts = _options(kwargs.get("pattern", "unstructured"), kwargs.get("scope", "layer"), kwargs.get("stats"),
                    bias_correction)  # checked before any work
    plan = allocation_plan(model, allocation, **kwargs)
    _apply(model, plan, opts)
    return plan
