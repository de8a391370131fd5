"""Whole-model pruners (a registry, looked up by name): SparseGPT's layer-by-layer reconstruction."""
from prunekit.pruners import sparsegpt  # noqa: F401  (registers "sparsegpt")
from prunekit.pruners.base import PRUNERS, Pruner, register_pruner

__all__ = ["PRUNERS", "Pruner", "register_pruner"]
