"""Reports of pruning runs: HTML, Markdown, metrics.json and PNG figures.

``build_report(results, out_dir)`` is the entry point; the results schema is
documented in :mod:`prunekit.report.render`.
"""
from prunekit.report.render import build_report

__all__ = ["build_report"]
