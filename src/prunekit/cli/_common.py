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

from prunekit.cli._names import (
    DATA_FORMS,
    MODEL_FORMS,
    WEIGHT_SUFFIXES,
    criterion_names,
    dataset_names,
    listed,
    live,
    model_names,
)
from prunekit.errors import PrunekitError

__all__ = ["criterion_names", "dataset_names", "listed", "model_names", "check_data", "check_model",
           "check_checkpoint", "add_trust", "trusted",
           "add_threads", "apply_threads", "default_threads", "no_progress", "write_yaml", "write_json",
           "write_run", "print_summary", "quick_value", "pct", "percent_columns"]

# ----------------------------------------------------------------------------- checking names (live registries)


def check_data(spec: Any, options: Optional[Dict[str, Any]] = None) -> None:
    """A ``--data`` value names a bundled dataset (``idx`` with a folder) or your own data (a folder, a .npz, .pt
    or .csv file that exists), and its data ``options`` are well formed: say so before anything loads."""
    from prunekit.zoo.userdata import DataOptions, is_user_data, user_data_problem

    given = {k: v for k, v in (options or {}).items() if v is not None}
    name, _, folder = str(spec).partition(":")
    if isinstance(spec, str) and name in live("dataset") and (name == "idx") == bool(folder) \
            and not spec.endswith(":"):
        if given:
            raise PrunekitError(f"--input-size, --mean, --std, --label-column and --test-fraction are for your own "
                                f"data (a folder or file), not the bundled dataset {spec!r}")
        return
    problem = user_data_problem(spec) if isinstance(spec, str) and spec else "not a dataset"
    if problem is not None or not is_user_data(spec):
        raise PrunekitError(f"unknown dataset {spec!r} ({problem}); allowed: {', '.join(dataset_names())}, "
                            f"{', '.join(DATA_FORMS)}")
    DataOptions(**given)


def check_model(name: Any) -> None:
    """A ``--model`` value is a built-in model or a well-formed model source (its file or folder exists)."""
    from prunekit.zoo.sources import is_source, parse_source

    if is_source(name):
        parse_source(name)
        return
    if name not in live("model"):
        raise PrunekitError(f"unknown model {name!r}; allowed: {', '.join(live('model'))}, or "
                            f"{', '.join(MODEL_FORMS)}")


def check_checkpoint(path: Any) -> None:
    """A ``--checkpoint`` is a model folder saved by prunekit or a weights file of an allowed type."""
    p = Path(str(path)).expanduser()
    if p.is_dir():
        if not (p / "model.json").is_file():
            raise PrunekitError(f"checkpoint {p} is a folder without model.json: not one written by prunekit.save")
        return
    if p.suffix.lower() not in WEIGHT_SUFFIXES:
        raise PrunekitError(f"checkpoint {p}: unsupported file type {p.suffix or '(none)'!r}; allowed: a model folder "
                            f"saved by prunekit, or a state_dict file {', '.join(WEIGHT_SUFFIXES)}")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} not found")


# ----------------------------------------------------------------------------- running a factory's code

TRUST_HELP = ("allow building the model from the Python factory (file.py:FUNCTION, module:FUNCTION) a saved "
              "model's spec names: that runs its code, which prunekit otherwise refuses")


def add_trust(p) -> None:
    """``--trust-factory`` for a command that loads saved models."""
    p.add_argument("--trust-factory", action="store_true", help=TRUST_HELP)


def trusted(args, *asked: Any):
    """The block in which factories may be built: the ones the user named on the command line (``asked``: a
    --model), or any with ``--trust-factory``."""
    from prunekit.zoo.sources import trusting

    return trusting(True if getattr(args, "trust_factory", False) else [a for a in asked if a])


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
