"""Find what a run folder holds and gather it into one results dict for :func:`build_report`.

A run folder may hold any of these (written by the CLI subcommands)::

    results.json      prunekit demo / prunekit prune: the dense model and each method's sweep
    sensitivity.json  prunekit sensitivity: per-layer curves (SensitivityResult)
    allocation.json   prunekit sensitivity: per-layer sparsities for a target, and what they measured
    lottery.json      prunekit lottery: ticket vs random re-init per round (LotteryRecord)
    llm.json          prunekit llm prune / llm sweep: a decoder LLM's dense perplexity and each
                      pruning run (format prunekit.llm/1, checked by :func:`_llm`)

A file that is missing next to its partner (allocation.json without
sensitivity.json, say) or that cannot be read becomes a note shown at the top of
the report; the report fails only when nothing at all can be shown. So does a run of
llm.json that cannot be shown (a perplexity that is not a number, say): it is left out.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from prunekit.analysis.sensitivity import SensitivityResult
from prunekit.errors import PrunekitError
from prunekit.train.lottery import LotteryRecord

__all__ = ["RUN_FILES", "collect_run"]

RUN_FILES = ("results.json", "sensitivity.json", "allocation.json", "lottery.json", "llm.json")
ALLOCATION_FORMAT = "prunekit.allocation/1"
LLM_FORMAT = "prunekit.llm/1"
# fields of an llm.json run that must be numbers (or null); a run failing one is not shown at all, since a
# row or a point with a wrong number in it would mislead more than a missing one
_LLM_NUMBERS = ("sparsity", "perplexity", "ppl_ratio", "time_s", "params", "dense_params", "tokens_per_s",
                "dense_tokens_per_s")
_RECOVERY_NUMBERS = ("steps", "lr", "perplexity", "ppl_ratio", "time_s")
_NM = re.compile(r"^\d+:\d+$")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PrunekitError(f"{path} is not valid JSON: {e}") from e


def _read_format(path: Path, fmt: str, what: str) -> Dict[str, Any]:
    """The JSON object in ``path``, refused unless its ``format`` is ``fmt``."""
    doc = _read_json(path)
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise PrunekitError(f"{path} is not {what} (format {fmt!r})")
    return doc


def _sensitivity(path: Path) -> Dict[str, Any]:

    return SensitivityResult.load(path).to_dict()


def _allocation(path: Path) -> Dict[str, Any]:
    doc = _read_format(path, ALLOCATION_FORMAT, "an allocation of `prunekit sensitivity`")
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


def _is_number(value: Any) -> bool:
    """A JSON number or null (bools are not numbers, though Python says so)."""
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _numbers_only(doc: Dict[str, Any], key: str, where: str, notes: List[str]) -> None:
    """Drop ``doc[key]`` (an object of numbers, a list of numbers, or null) with a note when it is not one."""
    value = doc.get(key)
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
    if value is not None and (values is None or not all(_is_number(v) for v in values)):
        notes.append(f"llm.json: {where}{key} is not a list or an object of numbers: not shown")
        doc[key] = None


def _llm_run(run: Any, index: int) -> Tuple[Optional[Dict[str, Any]], List[str]]:
    """(the run, or None when it cannot be shown; notes on what was left out of it)."""
    if not isinstance(run, dict):
        return None, [f"llm.json: run {index} is not an object: skipped"]
    where = f"run {index} ({run.get('method') or run.get('unit') or run.get('kind') or '?'})"
    bad = [f"{k} ({run[k]!r})" for k in _LLM_NUMBERS if not _is_number(run.get(k))]
    target = run.get("target")
    if not (_is_number(target) or (isinstance(target, str) and _NM.match(target))):
        bad.append(f"target ({target!r}: a sparsity or 'N:M')")
    if bad:
        return None, [f"llm.json: {where} was skipped: not a number: {', '.join(bad)}"]
    run, notes = dict(run), []
    _numbers_only(run, "layer_sparsity", f"{where} ", notes)
    removed = run.get("removed_layers")
    if removed is not None and not (isinstance(removed, list)
                                    and all(isinstance(i, int) and not isinstance(i, bool) for i in removed)):
        notes.append(f"llm.json: {where} removed_layers is not a list of layer indices: not shown")
        run["removed_layers"] = None
    recovered = run.get("recovered")
    if recovered is not None and not (isinstance(recovered, dict)
                                      and all(_is_number(recovered.get(k)) for k in _RECOVERY_NUMBERS)):
        notes.append(f"llm.json: {where} recovered is malformed: the recovery is not shown")
        run["recovered"] = None
    return run, notes


def _llm(path: Path) -> Dict[str, Any]:
    """llm.json, its runs that can be shown, and in ``"skipped"`` what was left out (notes of the report)."""
    doc = _read_format(path, LLM_FORMAT, "a record of `prunekit llm`")
    if not isinstance(doc.get("runs"), list):
        raise PrunekitError(f"{path} has no list of 'runs'")
    doc, notes = dict(doc), []
    for key in ("dense", "evaluation", "calibration"):
        if doc.get(key) is not None and not isinstance(doc[key], dict):
            notes.append(f"llm.json: {key} is not an object: not shown")
            doc[key] = None
    if isinstance(doc.get("dense"), dict):
        dense = doc["dense"] = dict(doc["dense"])
        for key in [k for k, v in dense.items() if not _is_number(v)]:
            notes.append(f"llm.json: dense {key} ({dense.pop(key)!r}) is not a number: not shown")
    _numbers_only(doc, "block_influence", "", notes)
    runs = []
    for i, run in enumerate(doc["runs"], 1):
        kept, run_notes = _llm_run(run, i)
        notes += run_notes
        runs += [kept] if kept is not None else []
    doc["runs"], doc["skipped"] = runs, notes
    return doc


_LOADERS: Dict[str, Callable[[Path], Dict[str, Any]]] = {
    "sensitivity.json": _sensitivity, "allocation.json": _allocation, "lottery.json": _lottery,
    "llm.json": _llm}


def _locate(path: Path) -> Tuple[Path, Optional[Path]]:
    """(run folder, results file): a file that is not one of the named ones is read as results.json."""
    if path.is_dir():
        results = path / "results.json"
        return path, results if results.is_file() else None
    if path.is_file():
        return path.parent, None if path.name in _LOADERS else path
    raise FileNotFoundError(f"{path} not found: give a run folder of 'prunekit demo', 'prune', 'sensitivity', "
                            "'lottery' or 'llm', or one of its JSON files")


def _consistency(found: Dict[str, Any]) -> List[str]:
    sens, alloc = found.get("sensitivity"), found.get("allocation")
    notes = []
    if alloc is not None and sens is None:
        notes.append("allocation.json was found without sensitivity.json: the per-layer curves are missing.")
    if sens is not None and alloc is None:
        notes.append("sensitivity.json was found without allocation.json: no allocation is shown.")
    if sens is not None and alloc is not None and set(alloc["sparsities"]) != set(sens["curves"]):
        notes.append("allocation.json and sensitivity.json name different layers: they may come from two runs.")
    llm = found.get("llm")
    if llm is not None:
        notes += [str(n) for n in llm.get("skipped") or []]
    return notes


def _title(found: Dict[str, Any]) -> str:
    parts = []
    if "sensitivity" in found or "allocation" in found:
        parts.append("sensitivity analysis")
    if "lottery" in found:
        meta = found["lottery"].get("meta") or {}
        what = " on ".join(str(meta[k]) for k in ("model", "data") if meta.get(k) is not None)
        parts.append("lottery tickets" + (f" ({what})" if what else ""))
    if "llm" in found:
        model = found["llm"].get("model")
        parts.append("decoder LLM pruning" + (f" ({model})" if model is not None else ""))
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
                                "'prunekit demo', 'prune', 'sensitivity', 'lottery' or 'llm'")
    notes = problems + _consistency(found)
    out = dict(results) if results is not None else {"title": _title(found)}
    out.update(found)
    if notes:
        out["notes"] = list(out.get("notes") or []) + notes
    return out, notes
