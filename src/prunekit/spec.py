"""The options of one pruning request, as two small validated dataclasses.

:class:`PruneSpec` is *what* to prune and *how* (criterion, scope, pattern, which tensors, floor,
seed); :class:`Calibration` is where data-aware criteria get their statistics. Both are checked when
they are built, before any work starts, and name the allowed values when something is off. The
one-call front door ``prunekit.prune(model, 0.9, criterion="l1", scope="global")`` builds them from
its keyword arguments; code that passes the same options around (schedules, sensitivity, pruners)
passes these objects instead of relaying ``**kwargs``.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

from prunekit._util import check_choice
from prunekit.criteria.base import Criterion, ScoreFn, criterion_name
from prunekit.errors import PrunekitError
from prunekit.select.allocation import check_allocation
from prunekit.select.amount import Amount, resolve_floor
from prunekit.select.nm import parse_nm
from prunekit.select.ranking import PATTERNS
from prunekit.targets import Patterns

SCOPES = ("layer", "global", "row")  # row: the same fraction of every output row (Wanda's rule)


@dataclass(frozen=True)
class PruneSpec:
    """What to prune and how (see :func:`prunekit.plan_pruning` for each option's meaning)."""

    criterion: Union[str, ScoreFn, Criterion] = "l1"
    scope: str = "layer"
    pattern: str = "unstructured"
    dim: int = 0
    norm: float = 1.0
    nm: Tuple[int, int] = (2, 4)
    types: Optional[Sequence[Any]] = None
    include: Patterns = None
    exclude: Patterns = None
    include_classifier: bool = False
    min_keep: Amount = 0.01
    seed: int = 0
    normalize: Optional[bool] = None
    allocation: str = "uniform"   # per-layer sparsities for layer/row scope: uniform, magnitude, owl

    def __post_init__(self) -> None:
        check_choice(self.scope, SCOPES, "scope")
        check_choice(self.pattern, PATTERNS, "pattern")
        check_allocation(self.allocation, self.scope)
        if self.allocation != "uniform" and self.pattern != "unstructured":
            raise PrunekitError(f"allocation={self.allocation!r} sets per-layer sparsities of unstructured pruning; "
                                f"pattern {self.pattern!r} fixes them otherwise")
        object.__setattr__(self, "nm", parse_nm(self.nm))
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise PrunekitError(f"seed={self.seed!r} must be an int")
        if isinstance(self.dim, bool) or not isinstance(self.dim, numbers.Integral):
            raise PrunekitError(f"dim={self.dim!r} must be an int (0: output rows, 1: input columns/channels)")
        if isinstance(self.norm, bool) or not isinstance(self.norm, numbers.Real) or not self.norm > 0:
            raise PrunekitError(f"norm={self.norm!r} must be a positive number (1, 2, float('inf'), ...)")
        resolve_floor(self.min_keep, 100)  # validates the type and range only
        if self.scope == "row" and self.pattern == "structured":
            raise PrunekitError("scope='row' works with pattern='unstructured' (or 'nm', which is per row anyway); "
                                "structured pruning removes whole rows or columns: use scope='layer' or 'global'")

    @property
    def criterion_name(self) -> str:
        return criterion_name(self.criterion)


@dataclass(frozen=True)
class Calibration:
    """Statistics for data-aware criteria: ``stats`` already collected, or ``data`` to collect them from.

    ``forward_fn(model, batch)`` runs one batch (default: ``model(batch[0])`` for an ``(x, y)`` pair);
    ``loss_fn`` is for criteria that need gradients (taylor). See :mod:`prunekit.criteria.stats`.
    """

    data: Optional[Iterable] = None
    stats: Optional[Mapping[str, Dict[str, Any]]] = None
    loss_fn: Optional[Callable] = None
    forward_fn: Optional[Callable] = None

    def __post_init__(self) -> None:
        if self.data is not None and self.stats is not None:
            raise PrunekitError("pass either stats (already collected) or data (to collect them), not both")
        if self.data is None and (self.loss_fn is not None or self.forward_fn is not None):
            raise PrunekitError("loss_fn and forward_fn are only used with data=... (calibration batches)")

    @property
    def empty(self) -> bool:
        return self.data is None and self.stats is None


@dataclass(frozen=True)
class Refinement:
    """How :func:`prunekit.prune` gets to a plan's masks on data, beyond one selection.

    ``steps``: prune in that many equal steps towards the target, the criterion's statistics collected
    again on the partly pruned model each time (a saliency measured on the dense model goes stale as its
    neighbours disappear; Taylor most of all). ``refit``: once the masks are final, the kept weights of
    every pruned Linear/Conv layer are solved by least squares towards the dense layer's outputs on the
    calibration inputs (:mod:`prunekit.pruners.refit`). Both read ``data=...`` and change the model as
    they go, so only ``prune`` takes them (``plan_pruning`` does not touch the model).
    """

    steps: int = 1
    refit: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 1:
            raise PrunekitError(f"steps={self.steps!r} must be an int >= 1 (1: one-shot)")
        if not isinstance(self.refit, bool):
            raise PrunekitError(f"refit={self.refit!r} must be True or False")

    @property
    def active(self) -> bool:
        return self.steps > 1 or self.refit


SPEC_FIELDS = tuple(f.name for f in fields(PruneSpec))
CALIBRATION_FIELDS = tuple(f.name for f in fields(Calibration))
REFINEMENT_FIELDS = tuple(f.name for f in fields(Refinement))


def split_options(options: Mapping[str, Any], spec: Optional[PruneSpec] = None,
                  extra: Sequence[str] = ()) -> Tuple[PruneSpec, Calibration, Dict[str, Any]]:
    """(PruneSpec, Calibration, the ``extra`` options) from keyword arguments; unknown names are refused.

    ``spec`` is a starting point that keyword arguments override.
    """
    unknown = [k for k in options if k not in SPEC_FIELDS + CALIBRATION_FIELDS + tuple(extra)]
    if unknown:
        allowed = ", ".join(SPEC_FIELDS + CALIBRATION_FIELDS + tuple(extra))
        raise PrunekitError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; allowed: "
                            f"{allowed}")
    spec_kw = {k: v for k, v in options.items() if k in SPEC_FIELDS}
    spec = dataclasses.replace(spec, **spec_kw) if spec is not None else PruneSpec(**spec_kw)
    calib = Calibration(**{k: v for k, v in options.items() if k in CALIBRATION_FIELDS})
    return spec, calib, {k: v for k, v in options.items() if k in extra}
