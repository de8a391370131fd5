"""Pieces shared by the subcommands: the names their flags take, ``--threads``, writing a run folder and
printing its table.

Importing this module must not import torch (``prunekit --help`` imports it): the library is imported inside
the functions that use it. The names (models, criteria, datasets, ...) come from :mod:`prunekit.cli._names`
when a parser is built (a static copy checked against the registries, or the live registry where it is
imported already: a model or criterion registered before ``build_parser()`` runs is listed like a built-in
one); a value is checked against the live registries.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from prunekit.cli._names import criterion_names, dataset_names, listed, live, model_names
from prunekit.errors import PrunekitError

__all__ = ["criterion_names", "dataset_names", "listed", "model_names", "check_data", "check_model",
           "add_threads", "apply_threads", "default_threads", "no_progress", "write_yaml", "write_json",
           "write_run", "print_summary", "quick_value", "pct", "percent_columns"]

# ----------------------------------------------------------------------------- checking names (live registries)


def check_data(spec: Any) -> None:
    """A ``--data`` value names a bundled dataset (``idx`` with a folder): say so before anything loads."""
    name, _, folder = str(spec).partition(":")
    takes_folder = name == "idx"
    if not isinstance(spec, str) or name not in live("dataset") or takes_folder != bool(folder) \
            or spec.endswith(":"):
        raise PrunekitError(f"unknown dataset {spec!r}; allowed: {', '.join(dataset_names())}")


def check_model(name: Any) -> None:
    from prunekit._util import check_choice

    check_choice(name, live("model"), "model")


# ----------------------------------------------------------------------------- threads and progress bars

THREADS_HELP = ("torch threads for the whole run; 0: torch's own default (OMP_NUM_THREADS, else one per core) "
                "(default: 1, or torch's default when OMP_NUM_THREADS is set: the small built-in models train "
                "fastest on one thread of a busy machine)")


def add_threads(p) -> None:
    """``--threads N`` for a command that computes; ``prunekit.cli.__main__`` applies it before ``run(args)``
    and leaves the count in effect in ``args.threads``."""
    p.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)


def default_threads() -> Optional[int]:
    """What ``--threads`` means when not given: 1, or None (torch's default) when OMP_NUM_THREADS is set."""
    return None if os.environ.get("OMP_NUM_THREADS", "").strip() else 1


@contextlib.contextmanager
def apply_threads(requested: Optional[int]) -> Iterator[int]:
    """The one place ``--threads`` is applied: torch.set_num_threads for the block (None: the default, 0: torch's
    own), the previous count restored afterwards; yields the count in effect."""
    if requested is not None and requested < 0:
        raise PrunekitError(f"--threads {requested} must be >= 0 (0: torch's default)")
    import torch

    n = default_threads() if requested is None else (requested or None)
    before = torch.get_num_threads()
    try:
        if n is not None:
            torch.set_num_threads(n)
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def no_progress(hide: bool) -> Iterator[None]:
    """``--no-progress``: every progress bar off for the block, the library's included (PRUNEKIT_PROGRESS=0)."""
    if not hide:
        yield
        return
    before = os.environ.get("PRUNEKIT_PROGRESS")
    os.environ["PRUNEKIT_PROGRESS"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PRUNEKIT_PROGRESS", None)
        else:
            os.environ["PRUNEKIT_PROGRESS"] = before


# ----------------------------------------------------------------------------- run folders


def atomic_write_text(path: Path, text: str) -> None:
    from prunekit._util import atomic_write_text as write

    write(path, text)


def _jsonable(data: Any) -> Any:
    from prunekit._util import to_jsonable

    return to_jsonable(data)


def write_yaml(path: Path, data: Dict[str, Any]) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(_jsonable(data), sort_keys=False))


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(_jsonable(data), indent=1, allow_nan=False))


def write_run(out: Path, results: Dict[str, Any], heatmaps, config: Dict[str, Any]) -> Dict[str, Path]:
    """results.json + config.yaml (the resolved config) + the report, in ``out``."""
    from prunekit.report import build_report

    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "config.yaml", config)
    write_json(out / "results.json", results)
    return build_report(results, out / "report", heatmaps=heatmaps)


# ----------------------------------------------------------------------------- accuracy as every command prints it


def pct(fraction: Any) -> Optional[str]:
    """An accuracy (a fraction in [0, 1]) as every command prints it: 0.98036 -> ``'98.04%'`` (None stays None).
    JSON outputs keep the fraction (``results.json``, ``eval --json``, ``lottery.json``, ``advice.json``)."""
    return None if fraction is None else f"{100 * float(fraction):.2f}%"


def percent_columns(rows: Sequence[Dict[str, Any]], columns: Dict[str, str]) -> List[Dict[str, Any]]:
    """Display rows whose ``columns`` (old name -> new name) hold percentages (98.04), renamed and shown as
    ``'98.04%'``, in place in the column order."""
    return [{columns.get(k, k): (f"{v:.2f}%" if k in columns and isinstance(v, (int, float)) else v)
             for k, v in row.items()} for row in rows]


def print_summary(results: Dict[str, Any]) -> None:
    from prunekit.analysis.metrics import format_table
    from prunekit.experiment import summary_rows

    print(format_table(percent_columns(summary_rows(results), {"accuracy_%": "accuracy"})))


def quick_value(configured: Any, tiny: Any) -> Any:
    """``--quick`` for a setting no flag gave: at most the tiny setting's value (a smaller one from the recipe
    or the defaults stands; None, i.e. all of it: the tiny value). A flag given on the command line wins."""
    return tiny if configured is None else min(configured, tiny)
