"""``prunekit report``: render a report folder from a run folder (or one of its JSON files).

The run folder may hold results.json (demo, prune), sensitivity.json and allocation.json
(sensitivity), lottery.json (lottery) and advice.json (advise); every one found gets its section
(an advise folder is rendered as its recommendation and its table of measured candidates).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List

from prunekit.cli._common import percent_columns

HELP = "render report.html / report.md / figures from a run folder (demo, prune, sensitivity, lottery, advise, llm)"
ADVICE = "advice.json"


def add_arguments(p) -> None:
    p.add_argument("run", help="a run folder written by 'prunekit demo', 'prune', 'sensitivity', 'lottery', 'llm' or "
                               "'advise', or one of its JSON files")
    p.add_argument("--out", help="report folder (default: <run>/report)")


def _advice_file(src: Path):
    """advice.json of ``src`` (the file itself, or in the folder) when ``src`` holds nothing else to report."""
    from prunekit.report.runs import RUN_FILES

    if src.is_file():
        return src if src.name == ADVICE else None
    if (src / ADVICE).is_file() and not any((src / name).is_file() for name in RUN_FILES):
        return src / ADVICE
    return None


def advice_blocks(advice) -> List[Any]:
    """The report of an advise run: the recommendation and why, then every candidate as ``prunekit advise``
    printed it (accuracy as 98.04%), the notes and the settings."""
    from prunekit.report.blocks import MISSING

    rows = percent_columns(advice.rows(), {f"{advice.metric}_%": advice.metric})
    headers = [h or "recommended" for h in rows[0]] if rows else []
    cells = [[MISSING if v is None else "★" if v == "*" else f"{v:.4g}" if isinstance(v, float) else str(v)
              for v in r.values()] for r in rows]
    how = "measured on this machine" if advice.measured else "NOT measured on the target"
    blocks: List[Any] = [("h", 1, f"prunekit advise: target {advice.target}"),
                         ("h", 2, f"Recommended: {advice.recommended}"), ("p", f"Why: {advice.reason}"),
                         ("h", 2, "Candidates"),
                         ("p", f"Ranked by {advice.rank_by} ({how}), on {advice.device}; accuracy budget "
                               f"{advice.budget_pp:g} pp; latency medians (ms@B) and speedups over dense (x@B) "
                               f"at batch {', '.join(map(str, advice.batches))}."),
                         ("table", headers, cells, True)]
    notes = [f"{r['name']}: {n}" for r in advice.candidates for n in ([r["error"]] if r.get("error") else [])
             + list(r.get("notes") or [])]
    if notes:
        blocks += [("h", 2, "Notes"), ("ul", notes)]
    settings = {k: v for k, v in (advice.settings or {}).items() if not isinstance(v, (dict, list))}
    if settings:
        blocks += [("h", 2, "Settings"), ("table", ["Key", "Value"], [[str(k), str(v)] for k, v in settings.items()],
                                          False)]
    return blocks


def _advice_report(path: Path, out: Path) -> Dict[str, Path]:
    from prunekit.advise import Advice
    from prunekit.errors import PrunekitError
    from prunekit.report.render import render_html, render_markdown

    try:
        advice = Advice.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, TypeError, KeyError) as e:   # broken JSON, another format, missing fields
        raise PrunekitError(f"{path} is not an advice document of `prunekit advise`: {e}") from e
    blocks = advice_blocks(advice)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"html": out / "report.html", "markdown": out / "report.md"}
    paths["markdown"].write_text(render_markdown(blocks), encoding="utf-8")
    paths["html"].write_text(render_html(blocks, blocks[0][2]), encoding="utf-8")
    return paths


def run(args) -> int:
    src = Path(args.run)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / "report"
    advice = _advice_file(src)
    if advice is not None:
        written = _advice_report(advice, out)
    else:
        from prunekit.report import build_report
        from prunekit.report.runs import RUN_FILES, collect_run

        try:
            results, notes = collect_run(src)
        except FileNotFoundError:
            if not src.is_dir():
                raise
            raise FileNotFoundError(f"{src} holds none of {', '.join(RUN_FILES + (ADVICE,))}: give a run folder "
                                    "of 'prunekit demo', 'prune', 'sensitivity', 'lottery' or 'advise'") from None
        for note in notes:  # also at the top of the report; said here so a script's log shows it
            print(f"prunekit report: warning: {note}", file=sys.stderr)
        written = build_report(results, out)
    print(f"report written: {written['html']}")
    return 0
