"""Find what a run folder holds and gather it into one results dict for :func:`build_report`.

A run folder may hold any of these (written by the CLI subcommands)::

    results.json      prunekit demo / prunekit prune: the dense model and each method's sweep
    sensitivity.json  prunekit sensitivity: per-layer curves (SensitivityResult)
    allocation.json   prunekit sensitivity: per-layer sparsities for a target, and what they measured
    lottery.json      prunekit lottery: ticket vs random re-init per round (LotteryRecord)

A file that is missing next to its partner (allocation.json without
sensitivity.json, say) or that cannot be read becomes a note shown at the top of
the report; the report fails only when nothing at all can be shown.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from prunekit.analysis.sensitivity import SensitivityResult
from prunekit.errors import PrunekitError
from prunekit.train.lottery import LotteryRecord

__all__ = ["RUN_FILES", "collect_run"]

RUN_FILES = ("results.json", "sensitivity.json", "allocation.json", "lottery.json")
ALLOCATION_FORMAT = "prunekit.allocation/1"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PrunekitError(f"{path} is not valid JSON: {e}") from e


def _sensitivity(path: Path) -> Dict[str, Any]:

    return SensitivityResult.load(path).to_dict()


def _allocation(path: Path) -> Dict[str, Any]:
    doc = _read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != ALLOCATION_FORMAT:
        raise PrunekitError(f"{path} is not an allocation of `prunekit sensitivity` (format {ALLOCATION_FORMAT!r})")
    if not isinstance(doc.get("sparsities"), dict):
        raise PrunekitError(f"{path} has no per-layer 'sparsities'")
    return doc


def _lottery(path: Path) -> Dict[str, Any]:

    return LotteryRecord.load(path).to_dict()


def _results(path: Path) -> Dict[str, Any]:
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise PrunekitError(f"{path} must hold a JSON object (the results of 'prunekit demo' or 'prunekit prune')")
    return doc


_LOADERS: Dict[str, Callable[[Path], Dict[str, Any]]] = {
    "sensitivity.json": _sensitivity, "allocation.json": _allocation, "lottery.json": _lottery}


def _locate(path: Path) -> Tuple[Path, Optional[Path]]:
    """(run folder, results file): a file that is not one of the named ones is read as results.json."""
    if path.is_dir():
        results = path / "results.json"
        return path, results if results.is_file() else None
    if path.is_file():
        return path.parent, None if path.name in _LOADERS else path
    raise FileNotFoundError(f"{path} not found: give a run folder of 'prunekit demo', 'prune', 'sensitivity' "
                            "or 'lottery', or one of its JSON files")


def _consistency(found: Dict[str, Any]) -> List[str]:
    sens, alloc = found.get("sensitivity"), found.get("allocation")
    notes = []
    if alloc is not None and sens is None:
        notes.append("allocation.json was found without sensitivity.json: the per-layer curves are missing.")
    if sens is not None and alloc is None:
        notes.append("sensitivity.json was found without allocation.json: no allocation is shown.")
    if sens is not None and alloc is not None and set(alloc["sparsities"]) != set(sens["curves"]):
        notes.append("allocation.json and sensitivity.json name different layers: they may come from two runs.")
    return notes


def _title(found: Dict[str, Any]) -> str:
    parts = []
    if "sensitivity" in found or "allocation" in found:
        parts.append("sensitivity analysis")
    if "lottery" in found:
        meta = found["lottery"].get("meta") or {}
        what = " on ".join(str(meta[k]) for k in ("model", "data") if meta.get(k) is not None)
        parts.append("lottery tickets" + (f" ({what})" if what else ""))
    return "prunekit report: " + " and ".join(parts)


def collect_run(path: Any) -> Tuple[Dict[str, Any], List[str]]:
    """(results dict for :func:`build_report`, notes on missing or unreadable files) of a run folder.

    ``path`` is a run folder or one of its JSON files (any other name is read as a
    results.json). Raises FileNotFoundError when the folder holds none of
    :data:`RUN_FILES`, ValueError when results.json is broken or nothing can be read.
    """
    folder, results_file = _locate(Path(path))
    results = _results(results_file) if results_file is not None else None
    found: Dict[str, Any] = {}
    problems: List[str] = []
    for name, load in _LOADERS.items():
        if (folder / name).is_file():
            try:
                found[name[:-len(".json")]] = load(folder / name)
            except (ValueError, OSError) as e:
                problems.append(f"{name} was skipped: {e}")
    if results is None and not found:
        if problems:
            raise PrunekitError("nothing to report: " + "; ".join(problems))
        raise FileNotFoundError(f"{folder} holds none of {', '.join(RUN_FILES)}: give a run folder of "
                                "'prunekit demo', 'prune', 'sensitivity' or 'lottery'")
    notes = problems + _consistency(found)
    out = dict(results) if results is not None else {"title": _title(found)}
    out.update(found)
    if notes:
        out["notes"] = list(out.get("notes") or []) + notes
    return out, notes
