"""ANALYSIS: measure what a user decides on.

- :mod:`~prunekit.analysis.metrics`: accuracy, parameters and non-zeros, MACs, size, latency, tables;
- :mod:`~prunekit.analysis.nm_check`: ``validate_nm``, which tensors of a model break N:M;
- :mod:`~prunekit.analysis.sensitivity`: per-layer sensitivity curves and sparsity allocation.
"""
from prunekit.analysis.metrics import (
    count_macs,
    count_parameters,
    evaluate,
    format_table,
    layer_table,
    measure_latency,
    size_on_disk,
    summarize,
)
from prunekit.analysis.nm_check import validate_nm
from prunekit.analysis.sensitivity import SensitivityResult, allocation_plan, analyze, apply_allocation

__all__ = ["count_macs", "count_parameters", "evaluate", "format_table", "layer_table", "measure_latency",
           "size_on_disk", "summarize", "SensitivityResult", "allocation_plan", "analyze", "apply_allocation", "validate_nm"]
