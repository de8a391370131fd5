"""Pieces shared by the subcommands: the names their flags take, writing a run folder and printing its table.

The names (models, criteria, datasets, ...) are read from the registries and tuples that define them
each time a parser is built or a value is checked, never copied into a help text: a model or
criterion registered before ``build_parser()`` runs is listed and accepted like a built-in one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import yaml

from prunekit._util import atomic_write_text, check_choice, to_jsonable
from prunekit.analysis.metrics import format_table
from prunekit.criteria import CRITERIA
from prunekit.errors import PrunekitError
from prunekit.experiment import summary_rows
from prunekit.pruners import PRUNERS
from prunekit.report import build_report
from prunekit.zoo.data import DATASETS
from prunekit.zoo.models import MODELS

# ----------------------------------------------------------------------------- names the flags take


def model_names() -> List[str]:
    """The built-in models (the model registry)."""
    return MODELS.names()


def criterion_names() -> List[str]:
    """Every ``--criterion`` of ``prunekit prune``: the registered criteria and whole-model pruners."""
    return sorted(set(CRITERIA.names()) | set(PRUNERS.names()))


def dataset_names() -> List[str]:
    """The bundled datasets as a user spells them (``idx`` takes a folder: ``idx:<dir>``)."""
    return [f"{d}:<dir>" if d == "idx" else d for d in DATASETS]


def listed(names: Iterable[str], default: Optional[str] = None) -> str:
    """``a, b (default), c`` for a help text (``%`` doubled: argparse formats help with it)."""
    return ", ".join(f"{n} (default)" if n == default else str(n) for n in names).replace("%", "%%")


def check_data(spec: Any) -> None:
    """A ``--data`` value names a bundled dataset (``idx`` with a folder): say so before anything loads."""
    name, _, folder = str(spec).partition(":")
    takes_folder = name == "idx"
    if not isinstance(spec, str) or name not in DATASETS or takes_folder != bool(folder) or spec.endswith(":"):
        raise PrunekitError(f"unknown dataset {spec!r}; allowed: {', '.join(dataset_names())}")


def check_model(name: Any) -> None:
    check_choice(name, model_names(), "model")


# ----------------------------------------------------------------------------- run folders


def write_yaml(path: Path, data: Dict[str, Any]) -> None:
    atomic_write_text(path, yaml.safe_dump(to_jsonable(data), sort_keys=False))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(to_jsonable(data), indent=1, allow_nan=False))


def write_run(out: Path, results: Dict[str, Any], heatmaps, config: Dict[str, Any]) -> Dict[str, Path]:
    """results.json + config.yaml (the resolved config) + the report, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "config.yaml", config)
    write_json(out / "results.json", results)
    return build_report(results, out / "report", heatmaps=heatmaps)


def print_summary(results: Dict[str, Any]) -> None:
    print(format_table(summary_rows(results)))


def apply_quick(args, quick) -> None:
    """``--quick``: the tiny setting's values for every flag the user did not give."""
    if getattr(args, "quick", False):
        for dest, value in quick.items():
            if getattr(args, dest) is None:
                setattr(args, dest, value)
