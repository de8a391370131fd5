"""The front door: one call per pipeline step, composed from the stages below.

    plan = prunekit.prune(model, 0.9, criterion="l1", scope="global")

is ``select_targets`` (:mod:`prunekit.targets`) + ``compute_scores`` (:mod:`prunekit.criteria`) +
``select`` (:mod:`prunekit.select`) + ``apply`` (:mod:`prunekit.apply`). ``plan_pruning`` stops
before applying, so a plan can be inspected, saved, or applied to another copy of the model. Keyword
options build a :class:`~prunekit.spec.PruneSpec` and a :class:`~prunekit.spec.Calibration`, checked
before anything runs; a criterion name found in :data:`~prunekit.pruners.PRUNERS` (``sparsegpt``) goes
to that whole-model pruner.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit._util import progress_enabled
from prunekit.apply import masking
from prunekit.apply.biascorr import apply_with_correction
from prunekit.criteria.base import CRITERIA, data_aware, get_criterion
from prunekit.criteria.score import compute_scores
from prunekit.criteria.stats import COLLECTORS, FEATURE_LAYERS, calibrate
from prunekit.errors import PrunekitError, UnknownNameError
from prunekit.plan import Plan
from prunekit.pruners import PRUNERS
from prunekit.pruners.refit import refit_model
from prunekit.select.allocation import check_fraction, magnitude_allocation, owl_allocation
from prunekit.select.amount import Amount
from prunekit.select.coupling import couple_biases
from prunekit.select.probe import LossProbe, selection_trial, sensitivity_allocation
from prunekit.select.ranking import select
from prunekit.select.rows import select_rows
from prunekit.spec import REFINEMENT_FIELDS, Calibration, PruneSpec, Refinement, split_options
from prunekit.targets import select_targets


def plan_pruning(model: nn.Module, amount: Optional[Amount] = None, *, spec: Optional[PruneSpec] = None,
                 **options: Any) -> Plan:
    """Decide what to prune without touching the model.

    Options (the fields of :class:`~prunekit.spec.PruneSpec`): ``criterion`` (a registered name, a
    Criterion or ``fn(param, ctx)``), ``scope`` (``layer``, ``global``, ``row``), ``pattern``
    (``unstructured``, ``structured`` with ``dim``/``norm``, ``nm`` with ``nm=(N, M)``), ``types``,
    ``include``/``exclude`` globs, ``include_classifier``, ``min_keep`` (per-layer floor of global
    ranking), ``seed``, ``normalize``, ``allocation`` (per-layer sparsities for layer/row ranking: ``uniform``,
    ``magnitude``, ``owl``, ``sensitivity``: each layer's loss on ``data`` probed with the criterion itself,
    :mod:`prunekit.select.probe`). Data-aware criteria (``taylor``, ``wanda``) take ``stats`` from
    :func:`prunekit.criteria.collect`, or ``data`` (calibration batches, with ``forward_fn``/``loss_fn``),
    which runs them through the model with its state restored afterwards.
    """
    given = [k for k in REFINEMENT_FIELDS if k in options]
    if given:
        raise PrunekitError(f"{', '.join(given)} change the model as they go (masks between steps, refit weights); "
                            "plan_pruning leaves the model untouched: use prunekit.prune(..., data=...)")
    spec, calib, _ = split_options(options, spec)
    return _plan(model, amount, spec, calib)


@dataclass
class StepSchedule:
    """Where an iterative prune (``steps=n``) stands: step ``k`` of ``n`` prunes ``k/n`` of the final amounts,
    which step 1 allocates on the unpruned model and the later steps reuse (per-layer sparsities then stay
    those of a one-shot prune; re-allocating on a partly pruned model would move them)."""

    n: int
    k: int = 1
    final: Any = None

    def amount(self, allocated: Any) -> Any:
        if self.final is None:
            self.final = allocated
        if self.k == self.n:  # the final target exactly, not k/n * final up to rounding
            return self.final
        if isinstance(self.final, Mapping):
            return {name: a * self.k / self.n for name, a in self.final.items()}
        return self.final * self.k / self.n


def _plan(model: nn.Module, amount: Optional[Amount], spec: PruneSpec, calib: Calibration,
          step: Optional[StepSchedule] = None) -> Plan:
    _check_nm_amount(amount, spec)
    crit = _criterion(spec, calib)
    names = select_targets(model, types=spec.types, include=spec.include, exclude=spec.exclude,
                           include_classifier=spec.include_classifier)
    # the exact threshold reads every |w| and refuses NaN itself: a separate pass is only needed elsewhere
    streamed = crit.elementwise is not None and spec.scope != "row" and spec.pattern != "nm"
    if not streamed:
        _check_finite(model, names)
    stats = _stats(model, names, crit, spec, calib)
    current = masking.masks(model)
    current = {n: current[n] for n in names if n in current}
    scores = compute_scores(model, names, crit, seed=spec.seed, stats=stats)
    if spec.allocation == "sensitivity":
        amount = _probed_allocation(model, names, amount, spec, calib, scores, current)
    elif spec.allocation != "uniform":
        amount = allocate(spec.allocation, model, names, amount, spec.min_keep, scores)
    if step is not None:
        amount = step.amount(amount)
    if spec.scope == "row" and spec.pattern != "nm":
        plan = select_rows(scores, amount, min_keep=spec.min_keep, current=current)
    else:
        try:
            plan = select(scores, amount, scope="layer" if spec.scope == "row" else spec.scope,
                          pattern=spec.pattern, dim=spec.dim, norm=spec.norm, nm=spec.nm, min_keep=spec.min_keep,
                          current=current, normalize=spec.normalize)
        except PrunekitError:
            if streamed:
                _check_finite(model, names)  # name the tensor that holds the NaN, if it is a weight
            raise
    couple_biases(model, plan)
    plan.meta.update(criterion=spec.criterion_name, seed=spec.seed, targets=names, allocation=spec.allocation)
    return plan


def allocate(allocation: str, model: nn.Module, names, amount: Optional[Amount], min_keep: Amount,
             scores: Optional[Mapping[str, Any]] = None) -> Dict[str, float]:
    """``{name: sparsity}`` for a total ``amount`` (see :mod:`prunekit.select.allocation`); ``sensitivity``
    probes the model and is computed in :func:`plan_pruning` (:mod:`prunekit.select.probe`)."""
    check_fraction(allocation, amount)
    if allocation == "sensitivity":
        raise PrunekitError("allocation='sensitivity' probes the model with the criterion: use prunekit.prune(..., "
                            "allocation='sensitivity', data=...)")
    params = dict(model.named_parameters(remove_duplicate=False))
    if allocation == "magnitude":
        return magnitude_allocation({n: params[n] for n in names}, amount, min_keep)
    if scores is None:
        raise PrunekitError(f"allocation={allocation!r} needs the criterion's scores (a per-entry criterion)")
    return owl_allocation(scores, amount, {n: params[n].numel() for n in names})


def _probed_allocation(model: nn.Module, names, amount, spec: PruneSpec, calib: Calibration, scores, current):
    """``allocation="sensitivity"``: each layer pruned alone by this criterion and scope, its loss probed."""
    check_fraction(spec.allocation, amount)
    trial = selection_trial(scores, spec.scope, current, dict(model.named_parameters(remove_duplicate=False)))
    probe = LossProbe(calib.data, calib.forward_fn, calib.loss_fn)
    return sensitivity_allocation(model, names, amount, trial, probe, min_keep=spec.min_keep, current=current)


def _stats(model: nn.Module, names, crit, spec: PruneSpec, calib: Calibration):
    """The criterion's statistics: given, or collected from ``data`` (which may serve only the sensitivity
    probe, for a criterion that needs none; so may ``loss_fn`` for one that takes no gradient)."""
    if calib.data is None or not crit.needs_data:
        return calib.stats
    grads = getattr(COLLECTORS.get(crit.collector), "needs_grad", False)
    loss_fn = calib.loss_fn if grads or spec.allocation != "sensitivity" else None
    return calibrate(crit.collector, model, calib.data, names, forward_fn=calib.forward_fn, loss_fn=loss_fn)


def _check_finite(model: nn.Module, names) -> None:
    """NaN or inf weights would be ranked arbitrarily (or survive pruning): refused, naming the tensor."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name in names:
        p = params[name].detach()
        # a sum is one streaming read (~12x cheaper than isfinite on 100M weights) and any NaN or inf makes it
        # non-finite; only then (or on a rare overflow of huge weights) is the exact count taken
        if not bool(torch.isfinite(p.sum())):
            bad = int((~torch.isfinite(p)).sum())
            if bad:
                raise PrunekitError(f"{name} holds {bad} NaN or infinite weight(s): prunekit cannot rank them; fix "
                                    "the model (a diverged training run?) or exclude the tensor")


def _check_nm_amount(amount: Optional[Amount], spec: PruneSpec) -> None:
    """N:M fixes the sparsity (1 - N/M): another amount cannot be honoured, so it is refused, not ignored."""
    if spec.pattern != "nm" or amount is None:
        return
    n, m = spec.nm
    if isinstance(amount, bool) or not isinstance(amount, float) or abs(amount - (1 - n / m)) > 1e-9:
        raise PrunekitError(f"pattern='nm' with nm=({n}, {m}) prunes exactly {1 - n / m:g} of each group; "
                            f"amount={amount!r} cannot be honoured: leave amount out (or choose another nm)")


def _criterion(spec: PruneSpec, calib: Calibration):
    """The criterion, with clear errors for calibration arguments it cannot use, before anything runs."""
    if isinstance(spec.criterion, str) and spec.criterion in PRUNERS:
        raise PrunekitError(f"{spec.criterion} rewrites the kept weights, so it cannot only plan: use "
                            f"prunekit.prune(model, amount, criterion={spec.criterion!r}, data=...)")
    if isinstance(spec.criterion, str) and spec.criterion not in CRITERIA:
        raise UnknownNameError(f"unknown criterion {spec.criterion!r}; known: "
                               f"{', '.join(CRITERIA.names() + PRUNERS.names())}")
    crit = get_criterion(spec.criterion)
    if spec.allocation == "sensitivity" and calib.data is None:
        raise PrunekitError("allocation='sensitivity' probes each layer's loss on calibration batches: pass "
                            "data=[(x, y), ...] (decoder LLMs: criterion='sequential' measures it block by block)")
    if calib.data is not None and not crit.needs_data and spec.allocation != "sensitivity":
        raise PrunekitError(f"data=... is used by data-aware criteria only ({', '.join(data_aware())}, or "
                            f"prune(..., criterion='sparsegpt'), or prune(..., bias_correction=True or "
                            f"refit=True)); "
                            f"got criterion={spec.criterion_name!r}")
    return crit


def needs_data(criterion: Any) -> bool:
    """Whether pruning with ``criterion`` (a criterion or a whole-model pruner) reads calibration batches."""
    if isinstance(criterion, str) and criterion in PRUNERS:
        return PRUNERS.get(criterion).needs_data
    return get_criterion(criterion).needs_data


def prune(model: nn.Module, amount: Optional[Amount] = None, *, keep_original: bool = False,
          bias_correction: bool = False, spec: Optional[PruneSpec] = None, **options: Any) -> Plan:
    """Score, select and apply in one call; returns the Plan that was applied.

    Options are those of :func:`plan_pruning`. The model is pruned in place with masks (dense speed,
    see :mod:`prunekit.apply.masking`); on any error it is left unchanged. A whole-model pruner
    (``criterion="sparsegpt"`` with ``data=...``) also rewrites the kept weights and takes its own
    options (``blocksize``, ``damp``, ...). ``bias_correction=True`` (needs ``data=...``, or
    wanda/input_mean ``stats``) also moves each pruned layer's bias by what its removed weights
    contributed on average (:mod:`prunekit.apply.biascorr`).

    With ``data=...``: ``steps=N`` (a data-aware criterion) prunes in N equal steps towards the target,
    collecting the criterion's statistics again on the partly pruned model each step; ``refit=True`` (any
    criterion) then solves the kept weights of each pruned Linear/Conv layer by least squares towards the
    dense layer's outputs, masks unchanged (:mod:`prunekit.pruners.refit`). Both are recorded in the plan's
    ``meta`` (``steps``, ``refit``).
    """
    name = (spec.criterion if spec is not None else options.get("criterion", "l1"))
    if isinstance(name, str) and name in PRUNERS:
        return _prune_with(PRUNERS.get(name), model, amount, options, spec, keep_original, bias_correction)
    spec, calib, extra = split_options(options, spec, extra=REFINEMENT_FIELDS)
    refine = Refinement(**extra)
    if refine.active:
        return _prune_refined(model, amount, spec, calib, refine, keep_original=keep_original,
                              bias_correction=bias_correction)
    if not bias_correction:
        plan = _plan(model, amount, spec, calib)
        masking.apply(model, plan, keep_original=keep_original)
        return plan
    if keep_original:
        raise PrunekitError("bias_correction rewrites biases, which keep_original could not give back: "
                            "use one or the other")
    calib, means = _calibrate_means(model, spec, calib)
    return apply_with_correction(model, _plan(model, amount, spec, calib), means)


def _prune_refined(model: nn.Module, amount: Optional[Amount], spec: PruneSpec, calib: Calibration,
                   refine: Refinement, *, keep_original: bool, bias_correction: bool) -> Plan:
    """``prune`` with ``steps`` > 1 and/or ``refit``: checked first, then all or nothing (the model as it was
    on any error, masks of earlier steps and refit weights included)."""
    plan_calib = _check_refinement(amount, spec, calib, refine, keep_original, bias_correction)
    names = select_targets(model, types=spec.types, include=spec.include, exclude=spec.exclude,
                           include_classifier=spec.include_classifier)
    with masking.restored_on_error(model, names) as dense:
        plan = _prune_in_steps(model, amount, spec, plan_calib, refine.steps, keep_original)
        if refine.refit:
            record = refit_model(model, {n: dense[n] for n in plan.tensors if n in dense}, calib.data,
                                 calib.forward_fn)
            plan.notes.extend(record.pop("notes"))
            plan.meta["refit"] = record
    plan.meta["steps"] = refine.steps
    return plan


def _prune_in_steps(model: nn.Module, amount: Optional[Amount], spec: PruneSpec, calib: Calibration, steps: int,
                    keep_original: bool) -> Plan:
    """Prune to ``amount`` in ``steps`` equal steps, the masks applied (and the statistics collected again)
    between them; returns the last step's plan, which holds the final masks."""
    schedule = StepSchedule(steps)
    plan = None
    for k in tqdm(range(1, steps + 1), desc="steps", leave=False, disable=steps == 1 or not progress_enabled(None)):
        schedule.k = k
        # the allocation is made once, at step 1, on the unpruned model: later steps scale its amounts
        step_spec = spec if k == 1 else dataclasses.replace(spec, allocation="uniform")
        plan = _plan(model, amount if k == 1 else schedule.final, step_spec, calib, schedule)
        masking.apply(model, plan, keep_original=keep_original)
    plan.meta["allocation"] = spec.allocation
    return plan


def _check_refinement(amount: Optional[Amount], spec: PruneSpec, calib: Calibration, refine: Refinement,
                      keep_original: bool, bias_correction: bool) -> Calibration:
    """Refuse what ``steps``/``refit`` cannot honour, before anything runs; returns the calibration the plan
    itself reads (the data is the refit's alone for a criterion that needs none)."""
    what = " and ".join(w for w, on in ((f"steps={refine.steps}", refine.steps > 1), ("refit=True", refine.refit))
                        if on)
    if calib.data is None:
        raise PrunekitError(f"{what} read(s) calibration batches: pass data=[(x, y), ...] (collected stats cannot "
                            "be collected again between steps, nor give a layer's inputs for a refit)")
    if bias_correction:
        raise PrunekitError(f"bias_correction and {what} cannot be combined: use one or the other (refit=True "
                            "repairs each layer's outputs, its mean included)")
    if keep_original and refine.refit:
        raise PrunekitError("refit=True rewrites the kept weights, which keep_original could not give back: "
                            "use one or the other")
    crit = get_criterion(spec.criterion)  # a whole-model pruner never gets here: prune() sent it to _prune_with
    if refine.steps > 1:
        _check_steps(amount, spec, crit)
    if not crit.needs_data and spec.allocation != "sensitivity":
        if calib.loss_fn is not None:
            raise PrunekitError(f"loss_fn is used by criteria that need gradients (taylor) or "
                                f"allocation='sensitivity', not by refit with criterion={spec.criterion_name!r}")
        return Calibration()  # the data serves the refit only
    return calib


def _check_steps(amount: Optional[Amount], spec: PruneSpec, crit) -> None:
    if spec.pattern == "nm":
        raise PrunekitError("steps=N needs a sparsity to step towards; pattern='nm' fixes it per group of M: "
                            "use steps=1 (the default)")
    if not crit.needs_data:
        raise PrunekitError(f"steps=N collects a data-aware criterion's statistics again between steps "
                            f"({', '.join(data_aware())}); criterion={spec.criterion_name!r} would choose the "
                            "same weights in one step: use steps=1")
    if isinstance(amount, bool) or not isinstance(amount, float):
        raise PrunekitError(f"steps=N divides a fraction into equal steps; amount={amount!r} is not a fraction "
                            "in [0, 1)")


def _prune_with(pruner, model, amount, options, spec, keep_original: bool, bias_correction: bool) -> Plan:
    misplaced = [k for k in REFINEMENT_FIELDS if k in options and k not in pruner.options]
    if misplaced:
        raise PrunekitError(f"{pruner.name} does not take {', '.join(misplaced)}: it chooses and rewrites the kept "
                            f"weights itself; steps=N and refit=True are for the masking criteria "
                            f"({', '.join(CRITERIA.names())})")
    spec, calib, extra = split_options(options, spec, extra=pruner.options)
    if pruner.rewrites_weights and (keep_original or bias_correction):
        what = "keep_original=True cannot undo" if keep_original else "bias_correction is for criteria that only " \
            "mask:"
        raise PrunekitError(f"{what} {pruner.name}: it rewrites the kept weights (and their mean with them)")
    if spec.pattern not in pruner.patterns:
        raise PrunekitError(f"{pruner.name} supports pattern {' or '.join(map(repr, pruner.patterns))}, not "
                            f"{spec.pattern!r}")
    if spec.scope not in pruner.scopes:
        raise PrunekitError(f"{pruner.name} takes scope {' or '.join(map(repr, pruner.scopes))}, not {spec.scope!r}")
    defaults = PruneSpec()
    ignored = [k for k in ("dim", "norm", "normalize", "min_keep") if getattr(spec, k) != getattr(defaults, k)]
    if ignored:
        raise PrunekitError(f"{pruner.name} does not take {', '.join(ignored)}")
    return pruner.prune(model, amount, spec, calib, **extra)


def _calibrate_means(model: nn.Module, spec: PruneSpec, calib: Calibration) -> Tuple[Calibration, Mapping[str, Any]]:
    """(calibration for plan_pruning, stats holding input means) for bias correction.

    Wanda's statistics already hold the means: one calibration pass serves both, and plan_pruning gets
    the stats instead of the data. Other criteria get a separate forward pass over ``data``.
    """
    if calib.data is None:
        if calib.stats is None:
            raise PrunekitError("bias_correction needs calibration data: pass data=... (batches), or stats "
                                "collected with prunekit.criteria.collect('input_mean' or 'wanda', ...)")
        return calib, calib.stats
    crit = get_criterion(spec.criterion)
    if not crit.needs_data and calib.loss_fn is not None:
        raise PrunekitError(f"loss_fn is only used by criteria that need gradients (taylor), not {crit.name!r}")
    names = [n for n in select_targets(model, types=spec.types, include=spec.include, exclude=spec.exclude,
                                       include_classifier=spec.include_classifier)
             if isinstance(model.get_submodule(n.rpartition(".")[0]), FEATURE_LAYERS)]
    if crit.collector == "wanda":  # its statistics hold the means too: one pass, handed to plan_pruning as stats
        stats = calibrate("wanda", model, calib.data, names, forward_fn=calib.forward_fn)
        return Calibration(stats=stats), stats
    means = calibrate("input_mean", model, calib.data, names, forward_fn=calib.forward_fn)
    if not crit.needs_data:  # data served the means only
        return Calibration(), means
    return calib, means

