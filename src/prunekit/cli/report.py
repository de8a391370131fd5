"""``prunekit report``: render a report folder from a results.json written by demo or prune."""
from __future__ import annotations

import json
from pathlib import Path

HELP = "render report.html / report.md / figures from a run folder (or its results.json)"


def add_arguments(p) -> None:
    p.add_argument("run", help="a run folder written by 'prunekit demo' or 'prunekit prune', or its results.json")
    p.add_argument("--out", help="report folder (default: <run>/report)")


def run(args) -> int:
    from ..report import build_report

    src = Path(args.run)
    path = src / "results.json" if src.is_dir() else src
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give a run folder of 'prunekit demo' or 'prunekit prune'")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    out = Path(args.out) if args.out else path.parent / "report"
    written = build_report(results, out)
    print(f"report written: {written['html']}")
    return 0
