"""prunekit: prune trained PyTorch models so that they get really smaller and faster.

score → select → plan → apply, a package per stage::

    import prunekit
    plan = prunekit.prune(model, 0.9, criterion="l1", scope="global")   # masks, dense speed
    prunekit.finetune(model, train_loader, epochs=2)                    # masks held fixed
    prunekit.save(model, "out/pruned", compressed=True)                # safetensors + JSON
    fresh.load_state_dict(prunekit.plain_state_dict(model))             # plain PyTorch: no mask buffers

The top level is the front door; everything else lives in its stage's package, imported on first use:
``prunekit.criteria`` (score), ``prunekit.select``, ``prunekit.plan``, ``prunekit.apply`` (masks, bias
correction), ``prunekit.pruners`` (SparseGPT), ``prunekit.surgery`` (physical removal), ``prunekit.train``,
``prunekit.analysis``, ``prunekit.deploy``, ``prunekit.zoo``, ``prunekit.report``.
"""
import importlib as _importlib
from typing import TYPE_CHECKING

from prunekit._version import __version__
from prunekit.errors import PrunekitError

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below imports each on first use
    from prunekit.api import plan_pruning, prune
    from prunekit.apply.masking import apply as apply_plan, keep_masks, plain_state_dict
    from prunekit.criteria.base import Criterion, register_criterion
    from prunekit.deploy.io import load, save
    from prunekit.plan import Plan
    from prunekit.spec import Calibration, PruneSpec
    from prunekit.train.loop import finetune

# the front door, imported on first use: `import prunekit` (which `prunekit --help` runs) must not import torch
_FRONT_DOOR = {  # name -> (defining module, its name there)
    "plan_pruning": ("prunekit.api", "plan_pruning"), "prune": ("prunekit.api", "prune"),
    "apply_plan": ("prunekit.apply.masking", "apply"), "keep_masks": ("prunekit.apply.masking", "keep_masks"),
    "plain_state_dict": ("prunekit.apply.masking", "plain_state_dict"),
    "Criterion": ("prunekit.criteria.base", "Criterion"),
    "register_criterion": ("prunekit.criteria.base", "register_criterion"),
    "load": ("prunekit.deploy.io", "load"), "save": ("prunekit.deploy.io", "save"), "Plan": ("prunekit.plan", "Plan"),
    "Calibration": ("prunekit.spec", "Calibration"), "PruneSpec": ("prunekit.spec", "PruneSpec"),
    "finetune": ("prunekit.train.loop", "finetune"),
}

_SUBPACKAGES = ("criteria", "select", "plan", "apply", "pruners", "surgery", "train", "analysis", "deploy", "zoo",
                "report", "spec", "targets", "errors", "advise", "experiment", "registry", "bits")

__all__ = ["__version__", "prune", "plan_pruning", "apply_plan", "keep_masks", "plain_state_dict", "finetune", "save",
           "load", "Plan", "PruneSpec",
           "Calibration", "Criterion", "register_criterion", "PrunekitError", *_SUBPACKAGES]


def __getattr__(name: str):
    """The front door's names and ``prunekit.surgery`` etc. import on first use, so ``import prunekit`` stays
    light (no torch)."""
    if name in _FRONT_DOOR:
        module, attr = _FRONT_DOOR[name]
        value = getattr(_importlib.import_module(module), attr)
        globals()[name] = value   # looked up once
        return value
    if name in _SUBPACKAGES:
        return _importlib.import_module(f"prunekit.{name}")
    raise AttributeError(f"module 'prunekit' has no attribute {name!r}")
