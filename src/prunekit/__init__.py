"""prunekit: prune trained PyTorch models so that they get really smaller and faster.

score → select → plan → apply, a package per stage::

    import prunekit
    plan = prunekit.prune(model, 0.9, criterion="l1", scope="global")   # masks, dense speed
    prunekit.finetune(model, train_loader, epochs=2)                    # masks held fixed
    prunekit.save(model, "out/pruned", compressed=True)                # safetensors + JSON

The top level is the front door; everything else lives in its stage's package, imported on first use:
``prunekit.criteria`` (score), ``prunekit.select``, ``prunekit.plan``, ``prunekit.apply`` (masks, bias
correction), ``prunekit.pruners`` (SparseGPT), ``prunekit.surgery`` (physical removal), ``prunekit.train``,
``prunekit.analysis``, ``prunekit.deploy``, ``prunekit.zoo``, ``prunekit.report``.
"""
import importlib as _importlib

from prunekit._version import __version__
from prunekit.api import plan_pruning, prune
from prunekit.apply.masking import apply as apply_plan, keep_masks
from prunekit.criteria.base import Criterion, register_criterion
from prunekit.deploy.io import load, save
from prunekit.errors import PrunekitError
from prunekit.plan import Plan
from prunekit.spec import Calibration, PruneSpec
from prunekit.train.loop import finetune

_SUBPACKAGES = ("criteria", "select", "plan", "apply", "pruners", "surgery", "train", "analysis", "deploy", "zoo",
                "report", "spec", "targets", "errors", "advise", "experiment", "registry", "bits")

__all__ = ["__version__", "prune", "plan_pruning", "apply_plan", "keep_masks", "finetune", "save", "load", "Plan", "PruneSpec",
           "Calibration", "Criterion", "register_criterion", "PrunekitError", *_SUBPACKAGES]


def __getattr__(name: str):
    """``prunekit.surgery`` etc. import on first use, so ``import prunekit`` stays light."""
    if name in _SUBPACKAGES:
        return _importlib.import_module(f"prunekit.{name}")
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
