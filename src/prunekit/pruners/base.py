"""The contract of a whole-model pruner, and its registry.

Some methods are not a score per entry: SparseGPT prunes layer by layer and rewrites the weights it
keeps. They are :class:`Pruner` entries in :data:`PRUNERS`; ``prunekit.prune(model, amount,
criterion=name)`` looks the name up there first, so a new pruner is one registration away and never a
special case in the API.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from torch import nn

from prunekit.plan import Plan
from prunekit.registry import Registry
from prunekit.select.amount import Amount
from prunekit.spec import Calibration, PruneSpec

PRUNERS = Registry("pruner")


class Pruner:
    """Prunes a whole model in one call; declares what it supports so that requests are checked first."""

    name: str = "pruner"
    patterns: Tuple[str, ...] = ("unstructured",)
    scopes: Tuple[str, ...] = ("layer",)
    needs_data: bool = True
    rewrites_weights: bool = True       # kept weights change: keep_original / bias correction cannot apply
    options: Tuple[str, ...] = ()        # extra keyword options it takes (e.g. blocksize)

    def prune(self, model: nn.Module, amount: Optional[Amount], spec: PruneSpec, calib: Calibration,
              **options: Any) -> Plan:
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "patterns": self.patterns, "scopes": self.scopes, "needs_data": self.needs_data,
                "options": self.options}


def register_pruner(name: str, *, overwrite: bool = False):
    """Decorator for a Pruner subclass: registers one instance under ``name``."""

    def deco(cls: type) -> type:
        inst = cls()
        inst.name = name
        PRUNERS.register(name, overwrite=overwrite)(inst)
        return cls

    return deco
