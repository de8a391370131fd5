"""The names the CLI's flags take (models, criteria, datasets, ...), without importing torch.

``prunekit --help``, ``prunekit <command> --help`` and argparse's errors must answer without importing torch
(seconds on a busy machine), but the names they list live in registries and tuples of torch-heavy modules. So
this module keeps a copy of each (``STATIC``), which ``tests/unit/test_cli_light.py`` checks equals the live
registry: adding a criterion, model, scope, ... without adding it here fails the tests, so the copy cannot
drift. Where the defining module is already imported, its live contents are read instead: a plugin that
registered a name (it imported the registry to do so) sees it listed. The values a run accepts are always
checked against the live registries (``_common.check_*``, ``resolve_config``), never against this copy.

Nothing here imports torch (nor anything that does): keep it that way.
"""
from __future__ import annotations

import sys
from typing import Any, Dict, Iterable, List, Optional, Tuple

# kind -> (defining module, its attribute: a Registry or a tuple, the names as of this version, in its order)
STATIC: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {
    "model": ("prunekit.zoo.models", "MODELS",
              ("lenet300", "lenet5", "mlp", "mobilenetv2_cifar", "resnet18_cifar", "vgg_small")),
    "dataset": ("prunekit.zoo.data", "DATASETS", ("mnist", "digits", "idx")),
    "criterion": ("prunekit.criteria", "CRITERIA", ("l1", "magnitude", "random", "taylor", "wanda")),
    "pruner": ("prunekit.pruners", "PRUNERS", ("sequential", "sparsegpt")),
    "kind": ("prunekit.experiment", "KINDS", ("oneshot", "gradual", "iterative", "surgery")),
    "scope": ("prunekit.spec", "SCOPES", ("layer", "global", "row")),
    "pattern": ("prunekit.select.ranking", "PATTERNS", ("unstructured", "structured", "nm")),
    "optimizer": ("prunekit.train.config", "OPTIMIZERS", ("sgd", "adam", "adamw")),
    "lr_schedule": ("prunekit.train.config", "LR_SCHEDULES", ("constant", "cosine", "linear")),
    "allocation": ("prunekit.select.allocation", "ALLOCATIONS", ("uniform", "magnitude", "owl", "sensitivity")),
    "advise_target": ("prunekit.advise", "TARGETS", ("cpu", "gpu", "sparse")),
    "advise_kind": ("prunekit.advise", "KINDS", ("dense", "structured", "unstructured", "nm")),
    "advise_default": ("prunekit.advise", "DEFAULT_CANDIDATES",
                       ("dense", "structured:0.25", "structured:0.5", "structured:0.75", "unstructured:0.5",
                        "unstructured:0.8", "unstructured:0.9", "unstructured:0.95", "nm:2:4")),
    "sensitivity_pattern": ("prunekit.analysis.sensitivity", "PATTERNS", ("unstructured", "structured")),
    "sensitivity_weights": ("prunekit.analysis.sensitivity", "WEIGHTS", ("params", "uniform")),
    "exporter": ("prunekit.deploy.export", "EXPORTERS", ("auto", "dynamo", "torchscript")),
}

# the other forms --model, --data and --checkpoint take (copies of prunekit.zoo.sources.FORMS, of
# prunekit.zoo.userdata's readers and of the weights files prunekit.deploy.io reads; tests/unit/test_byo_cli.py
# checks they agree)
MODEL_FORMS = ("timm:NAME", "hf:DIR", "path/to/file.py:FUNCTION", "package.module:FUNCTION")
DATA_FORMS = ("an image folder (DIR/<class>/<image>)", "a .npz file", "a .pt file", "a .csv file")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth")


def _read(obj: Any) -> List[str]:
    return list(obj.names()) if hasattr(obj, "names") else list(obj)


def names(kind: str) -> List[str]:
    """The names of ``kind``: the live registry where its module is imported already, else the static copy."""
    module, attr, static = STATIC[kind]
    loaded = sys.modules.get(module)
    if loaded is not None and hasattr(loaded, attr):
        return _read(getattr(loaded, attr))
    return list(static)


def live(kind: str) -> List[str]:
    """The names of ``kind`` read from the registry itself (imports it: torch). For checks and tests."""
    import importlib

    module, attr, _ = STATIC[kind]
    return _read(getattr(importlib.import_module(module), attr))


def model_names() -> List[str]:
    """The built-in models (the model registry)."""
    return names("model")


def criterion_names() -> List[str]:
    """Every ``--criterion`` of ``prunekit prune``: the registered criteria and whole-model pruners."""
    return sorted(set(names("criterion")) | set(names("pruner")))


def dataset_names() -> List[str]:
    """The bundled datasets as a user spells them (``idx`` takes a folder: ``idx:<dir>``)."""
    return [f"{d}:<dir>" if d == "idx" else d for d in names("dataset")]


def listed(names_: Iterable[str], default: Optional[str] = None) -> str:
    """``a, b (default), c`` for a help text (``%`` doubled: argparse formats help with it)."""
    return ", ".join(f"{n} (default)" if n == default else str(n) for n in names_).replace("%", "%%")
