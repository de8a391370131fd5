"""Whole-model pruners (a registry, looked up by name): SparseGPT's layer-by-layer reconstruction and the
sequential block-by-block pruner of decoder LLMs with its layer solvers (magnitude, wanda, sparsegpt)."""
from prunekit.pruners import sequential, sparsegpt  # noqa: F401  (register "sequential", "sparsegpt")
from prunekit.pruners.base import PRUNERS, Pruner, register_pruner

__all__ = ["PRUNERS", "Pruner", "register_pruner"]
