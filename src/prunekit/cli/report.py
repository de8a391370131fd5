"""``prunekit report``: render a report folder from a run folder (or one of its JSON files).

The run folder may hold results.json (demo, prune), sensitivity.json and allocation.json
(sensitivity) and lottery.json (lottery); every one found gets its section.
"""
from __future__ import annotations

import sys
from pathlib import Path

HELP = "render report.html / report.md / figures from a run folder (demo, prune, sensitivity, lottery)"


def add_arguments(p) -> None:
    p.add_argument("run", help="a run folder written by 'prunekit demo', 'prune', 'sensitivity' or 'lottery', "
                               "or one of its JSON files")
    p.add_argument("--out", help="report folder (default: <run>/report)")


def run(args) -> int:
    from prunekit.report import build_report
    from prunekit.report.runs import collect_run

    src = Path(args.run)
    results, notes = collect_run(src)
    for note in notes:  # also at the top of the report; said here so a script's log shows it
        print(f"prunekit report: warning: {note}", file=sys.stderr)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / "report"
    written = build_report(results, out)
    print(f"report written: {written['html']}")
    return 0
