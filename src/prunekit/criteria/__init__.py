"""SCORE: criteria rate every entry of a tensor (low = prune first).

- :mod:`~prunekit.criteria.base`: the :class:`Criterion` contract, ``register_criterion``, the registry;
- :mod:`~prunekit.criteria.magnitude` (``l1``/``magnitude``), :mod:`~prunekit.criteria.random`,
  :mod:`~prunekit.criteria.taylor`, :mod:`~prunekit.criteria.wanda`: the built-in criteria;
- :mod:`~prunekit.criteria.stats`: calibration collectors (``collect``, ``calibrate``) for data-aware ones;
- :mod:`~prunekit.criteria.score`: ``compute_scores``, lazy per-tensor scores for the selection stage.
"""
from prunekit.criteria import magnitude, random, taylor, wanda  # noqa: F401  (register the built-ins)
from prunekit.criteria.base import (
    CRITERIA,
    Criterion,
    ScoreContext,
    criterion_name,
    data_aware,
    get_criterion,
    register_criterion,
)
from prunekit.criteria.score import Elementwise, LazyScores, compute_scores
from prunekit.criteria.stats import COLLECTORS, calibrate, collect, register_collector

__all__ = ["CRITERIA", "Criterion", "ScoreContext", "criterion_name", "data_aware", "get_criterion",
           "register_criterion", "COLLECTORS", "calibrate", "collect", "register_collector", "Elementwise",
           "LazyScores", "compute_scores"]
