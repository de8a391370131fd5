"""Pieces shared by the subcommands: writing a run folder and printing its table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import yaml

from ..experiment import summary_rows
from ..metrics import format_table
from ..report import build_report
from ..report.render import to_jsonable


def write_yaml(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_jsonable(data), sort_keys=False))
    tmp.replace(path)


def write_run(out: Path, results: Dict[str, Any], heatmaps, config: Dict[str, Any]) -> Dict[str, Path]:
    """results.json + config.yaml (the resolved config) + the report, in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_yaml(out / "config.yaml", config)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(to_jsonable(results), indent=1, allow_nan=False))
    tmp.replace(out / "results.json")
    return build_report(results, out / "report", heatmaps=heatmaps)


def print_summary(results: Dict[str, Any]) -> None:
    print(format_table(summary_rows(results)))


def apply_quick(args, quick) -> None:
    """``--quick``: the tiny setting's values for every flag the user did not give."""
    if getattr(args, "quick", False):
        for dest, value in quick.items():
            if getattr(args, dest) is None:
                setattr(args, dest, value)
