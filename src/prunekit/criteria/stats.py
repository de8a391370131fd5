"""Statistics for data-aware criteria, collected with hooks that are always removed.

Two ways to get them::

    # you drive the data (any forward/backward you like)
    with prunekit.criteria.collect("wanda", model, names) as stats:
        for x, _ in calib:
            model(x)
    prunekit.prune(model, 0.5, criterion="wanda", scope="row", stats=stats)

    # one call: prunekit runs the data through the model (eval mode, state restored)
    stats = prunekit.criteria.calibrate("taylor", model, calib, names)
    prunekit.prune(model, 0.5, criterion="wanda", scope="row", data=calib)   # the same, inside prune

A *collector* (registered in :data:`COLLECTORS` under the criterion's name)
attaches hooks that accumulate raw sums into ``stats[param_name]``; the
criterion turns the sums into scores. Hooks are removed when the ``with`` block
ends, also when it ends with an exception.

Batches: ``forward_fn(model, batch)`` runs the model; the default takes a
tensor as the input, ``(x, y, ...)`` as ``model(x)``, a dict as ``model(**batch)``.
``loss_fn(output, target)`` (Taylor only) follows :func:`prunekit.train.loop`:
``target`` is ``batch[1]`` for ``(x, y)`` batches and the batch itself otherwise.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import nn

from prunekit import _util
from prunekit._util import progress_enabled
from prunekit.errors import InvalidTypeError, PrunekitError
from prunekit.registry import Registry
from prunekit.targets import owner_of

COLLECTORS = Registry("statistics collector")
register_collector = COLLECTORS.register

# input-feature statistics: the sums and row counts of what each layer reads (bias correction, Wanda)
SUM, ROWS = "input_sum", "input_rows"
FEATURE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # layers whose input features are collected


def feature_layer_weights(model: nn.Module) -> List[str]:
    return [f"{n}.weight" if n else "weight" for n, m in model.named_modules() if isinstance(m, FEATURE_LAYERS)]

Stats = Dict[str, Dict[str, Any]]


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Run one calibration batch: tensor -> model(x); (x, y, ...) -> model(x); dict -> model(**batch)."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)) and batch:
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise InvalidTypeError(f"cannot feed a calibration batch of type {type(batch).__name__}; give tensors, "
                    "(x, y) tuples or dicts, or pass forward_fn(model, batch)")


def batch_target(batch: Any) -> Any:
    """The loss target of a batch: ``y`` of ``(x, y)``, else the batch itself."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    return batch


def resolve_names(model: nn.Module, names: Optional[Sequence[str]], default: Callable[[nn.Module], List[str]]):
    """Validate dotted parameter names (KeyError with close matches, via masking) or take the default."""

    if names is None:
        names = default(model)
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise PrunekitError("no parameter names given to collect statistics for")
    for n in names:
        owner_of(model, n)
    return names


@contextlib.contextmanager
def collect(kind: str, model: nn.Module, names: Optional[Sequence[str]] = None, **options) -> Iterator[Stats]:
    """Context manager: hooks for criterion ``kind`` on ``names``; yields the stats dict it fills.

    ``names=None`` means every parameter the collector can handle. The hooks are
    removed on exit, whatever happens inside the block.
    """
    collector = COLLECTORS.get(kind)(model, names, **options)
    stats: Stats = {}
    handles = []
    try:
        handles.extend(collector.attach(stats))
        yield stats
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, eval_mode: bool = True) -> Iterator[None]:
    """Eval mode (dropout off) while calibrating; every module's flag, every ``requires_grad``
    and every ``.grad`` are put back afterwards, so calibration leaves no trace on the model."""
    grads = [(p, p.grad, p.requires_grad) for p in model.parameters()]
    try:
        with _util.eval_mode(model) if eval_mode else contextlib.nullcontext():
            yield
    finally:
        for p, g, rg in grads:
            p.grad = g
            p.requires_grad_(rg)


def check_reiterable(data: Iterable, what: str) -> None:
    if iter(data) is data:
        raise PrunekitError(f"{what} needs data it can iterate more than once (a list, a DataLoader or a "
                         "TensorLoader), not a one-shot iterator or generator")


def batches(data: Iterable, max_batches: Optional[int], progress: Optional[bool], desc: str):
    """Iterate ``data`` (at most ``max_batches``) under a tqdm bar that PRUNEKIT_PROGRESS=0 turns off."""
    from tqdm.auto import tqdm


    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise PrunekitError(f"max_batches={max_batches!r} must be a positive int or None")
    total = len(data) if hasattr(data, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    bar = tqdm(data, total=total, desc=desc, leave=False, disable=not progress_enabled(progress))
    with bar:
        for i, batch in enumerate(bar):
            if max_batches is not None and i >= max_batches:
                break
            yield batch


def calibrate(kind: str, model: nn.Module, data: Iterable, names: Optional[Sequence[str]] = None, *,
              forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
              loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None, max_batches: Optional[int] = None,
              progress: Optional[bool] = None) -> Stats:
    """Run ``data`` through ``model`` under :func:`collect` and return the statistics.

    The model is in eval mode meanwhile; its training flags, ``requires_grad``
    and ``.grad`` are restored afterwards. Taylor runs a backward per batch
    (``loss_fn``, default cross-entropy on ``(x, y)`` batches); the others run
    forwards only, without autograd.
    """
    collector_cls = COLLECTORS.get(kind)
    forward_fn = forward_fn or default_forward
    needs_grad = getattr(collector_cls, "needs_grad", False)
    if loss_fn is not None and not needs_grad:
        raise PrunekitError(f"loss_fn is only used by criteria that need gradients (taylor), not {kind!r}")
    seen = 0
    with preserved_state(model), collect(kind, model, names) as stats:
        with torch.set_grad_enabled(needs_grad):
            for batch in batches(data, max_batches, progress, f"calibrating ({kind})"):
                if needs_grad:
                    collector_cls.step(model, batch, forward_fn, loss_fn)
                else:
                    forward_fn(model, batch)
                seen += 1
    if seen == 0:
        raise PrunekitError("the calibration data yielded no batch")
    missing = [n for n in resolve_names(model, names, collector_cls.default_names) if n not in stats]
    if missing:
        raise PrunekitError(f"calibration never reached {', '.join(missing)} (its module was not called, or "
                         "no gradient flowed to it); exclude it or check forward_fn")
    return stats


def feature_rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` as (rows, input features): the last dim for Linear, the channel dim for convolutions."""
    x = x.detach().float()
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def add_feature_sums(entry: Optional[dict], rows: torch.Tensor) -> dict:
    """Accumulate the per-feature sum of ``rows`` (float64: many small values) into a stats entry."""
    entry = {} if entry is None else entry
    s = rows.sum(0).double()
    if SUM in entry:
        entry[SUM].add_(s)
        entry[ROWS] += rows.shape[0]
    else:
        entry[SUM], entry[ROWS] = s, rows.shape[0]
    return entry


class InputFeatureCollector:
    """Forward pre-hooks on Linear/Conv layers that accumulate statistics of their inputs per input feature.

    Subclasses set ``what`` (for error messages) and implement ``accumulate(entry, rows) -> entry`` on the
    (rows, features) view of each input (:func:`feature_rows`).
    """

    needs_grad = False
    default_names = staticmethod(feature_layer_weights)
    what = "input statistics are taken"

    def __init__(self, model: nn.Module, names: Optional[Sequence[str]] = None):
        self.names = resolve_names(model, names, feature_layer_weights)
        self.modules = {}
        for name in self.names:
            mod_name, _, pname = name.rpartition(".")
            module = model.get_submodule(mod_name)
            if pname != "weight" or not isinstance(module, FEATURE_LAYERS):
                raise PrunekitError(f"{self.what} for the weight of {', '.join(t.__name__ for t in FEATURE_LAYERS)} "
                                 f"layers; {name} is the {pname!r} of a {type(module).__name__}")
            self.modules[name] = module

    def attach(self, stats: Stats) -> list:
        return [m.register_forward_pre_hook(self._hook(n, m, stats)) for n, m in self.modules.items()]

    def _hook(self, name: str, module: nn.Module, stats: Stats):
        @torch.no_grad()
        def hook(mod, args) -> None:
            stats[name] = self.accumulate(stats.get(name), feature_rows(module, args[0]))
        return hook

    @staticmethod
    def accumulate(entry: Optional[dict], rows: torch.Tensor) -> dict:
        raise NotImplementedError


@register_collector("input_mean")
class InputMeanCollector(InputFeatureCollector):
    """Sums each layer's inputs per input feature (for :func:`input_means`)."""

    what = "input means are taken"
    accumulate = staticmethod(add_feature_sums)


def input_means(stats: Mapping[str, Mapping], name: str) -> Optional[torch.Tensor]:
    """``E[x]`` per input feature of the layer owning ``name`` (None when the stats do not have it)."""
    entry = stats.get(name) or {}
    if SUM not in entry or not entry.get(ROWS):
        return None
    return (entry[SUM] / entry[ROWS]).float()
