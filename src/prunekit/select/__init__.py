"""SELECT: turn scores into a :class:`~prunekit.plan.Plan`.

- :mod:`~prunekit.select.ranking`: ``select()``: per layer or one global ranking; unstructured,
  structured (Ln norm of slices) or N:M;
- :mod:`~prunekit.select.rows`: ``select_rows()``: the same fraction of every output row (Wanda's rule);
- :mod:`~prunekit.select.nm`: the one N:M rule (``parse_nm``, ``check_nm``, selection);
- :mod:`~prunekit.select.threshold`: the exact global k-th score, streamed chunk by chunk;
- :mod:`~prunekit.select.amount`: the ``amount`` / ``min_keep`` conventions;
- :mod:`~prunekit.select.allocation`: per-layer sparsities (``magnitude``, ``owl``) for layer/row ranking;
- :mod:`~prunekit.select.probe`: ``allocation="sensitivity"``: each layer's calibration loss probed with the criterion;
- :mod:`~prunekit.select.coupling`: coupled tensors (a bias follows its weight's removed rows).
"""
from prunekit.select.allocation import ALLOCATIONS, magnitude_allocation, owl_allocation
from prunekit.select.amount import Amount, resolve_amount, resolve_floor
from prunekit.select.coupling import couple_biases
from prunekit.select.nm import check_nm, nm_pattern, parse_nm
from prunekit.select.ranking import PATTERNS, SCOPES, select
from prunekit.select.rows import select_rows

__all__ = ["ALLOCATIONS", "magnitude_allocation", "owl_allocation", "Amount", "resolve_amount", "resolve_floor", "couple_biases", "check_nm", "nm_pattern", "parse_nm",
           "PATTERNS", "SCOPES", "select", "select_rows"]
