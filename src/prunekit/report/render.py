"""Turn the results of pruning runs into a report a person can read.

``build_report(results, out_dir)`` writes one folder::

    out_dir/
      report.html    self-contained: inline CSS, PNGs embedded as base64 data URIs,
                     no scripts, no external resources (safe to mail or archive)
      report.md      the same content in Markdown, linking the PNG files
      metrics.json   the results dict, made JSON-safe (NaN/inf -> null)
      *.png          the figures

Input schema (a JSON-safe dict; numpy/torch scalars are accepted and converted)::

    results = {
      "title": "prunekit report: lenet300 on mnist",
      "created": "2026-11-24T21:00:00",          # ISO string
      "config": {...}, "env": {...},             # free-form dicts, shown as key/value tables
      "dense": {                                 # the unpruned baseline ("metric dict")
          "accuracy": 0.982, "top5": 0.999,      # fractions in [0, 1]
          "loss": 0.06,
          "params": 266610, "nonzeros": 266610,
          "sparsity": 0.0,                       # fraction of zero weights
          "compression_ratio": 1.0,              # params / nonzeros
          "macs": 266200, "macs_effective": 266200,
          "theoretical_speedup": 1.0,            # macs / macs_effective
          "size_bytes": 1067000, "size_compressed_bytes": 1067300,
          "latency_ms": 0.05, "batch": 1, "threads": 2},
      "methods": [
        {"name": "oneshot_l1",                   # identifier (keys of history / heatmaps)
         "label": "one-shot L1 (unstructured)",  # shown to the reader
         "points": [                             # the tradeoff sweep, may be a single point
            {"target_sparsity": 0.5, "sparsity": 0.5, ...same keys as dense...}, ...],
         "final": {...same keys as a point...},  # headline point in the summary table
         "layers": [{"name": "fc1", "type": "Linear", "params": 235500,
                     "nonzeros": 11775, "sparsity": 0.95,
                     "macs_dense": 235200, "macs_effective": 11760}, ...],
         "notes": ["layer fc3 kept its floor of 1% (min_keep)"]},   # optional
        ...],
      "history": {                               # optional: curves over fine-tuning
        "oneshot_l1": [{"step": 0, "sparsity": 0.0, "accuracy": 0.98}, ...]},
      "sensitivity": {...},                      # optional: sensitivity.json (SensitivityResult.to_dict())
      "allocation": {...},                       # optional: allocation.json of `prunekit sensitivity`
      "lottery": {...},                          # optional: lottery.json (prunekit.train.lottery.LotteryRecord)
      "notes": ["allocation.json not found"],    # optional: said at the top (e.g. missing files)
    }

Every key is optional and any metric may be missing or ``None`` (e.g. latency not
measured): the table shows "—", a column that is empty for every row is dropped,
and a figure is written only when the data for it exists. A method without
``final`` uses its last point; one without ``points`` plots its ``final`` point.
The sensitivity and lottery sections are in :mod:`prunekit.report.sections`;
:func:`prunekit.report.runs.collect_run` gathers all of it from a run folder.
"""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from prunekit._util import to_jsonable
from prunekit.errors import PrunekitError
from prunekit.report import figures as F
from prunekit.report.blocks import MISSING, Block, Figures, fmt_int, fmt_kb, fmt_ms, fmt_pct, fmt_pp, fmt_ratio, table
from prunekit.report.figures import num
from prunekit.report.sections import SECTION_FIGURES, lottery_blocks, section_figures, sensitivity_blocks

__all__ = ["build_report", "to_jsonable", "fmt_pct", "fmt_pp", "fmt_int", "fmt_ratio",
           "fmt_kb", "fmt_ms"]



















def _fmt_value(value: Any) -> str:
    """Free-form config/env value as text."""
    if value is None:
        return MISSING
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


# --------------------------------------------------------------------------- figures
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "x"


def _has(results: Mapping[str, Any], x: str, ys: Sequence[str]) -> bool:
    """Does any method have a point with ``x`` and one of ``ys``?"""
    return any(F._series(F.method_points(m), x, y)[0]
               for m in results.get("methods") or [] for y in ys)


def _labels(results: Mapping[str, Any]) -> Dict[str, str]:
    return {str(m.get("name", i)): F._label(m, i) for i, m in enumerate(results.get("methods") or [])}


def _curve_figures(results: Mapping[str, Any], out: Path) -> Figures:
    methods = results.get("methods") or []
    done: Figures = []
    if _has(results, "sparsity", ["accuracy"]):
        done.append(("tradeoff", F.tradeoff_curve(results, out / "tradeoff.png"),
                     "Top-1 accuracy vs achieved sparsity for each method's sweep; "
                     "the dashed line is the dense model."))
    if _has(results, "sparsity", ["size_compressed_bytes", "latency_ms"]):
        done.append(("size_latency", F.size_latency_curves(results, out / "size_latency.png"),
                     "Compressed model size (KB) and measured latency (ms) vs sparsity; "
                     "dashed lines are the dense model."))
    if _has(results, "latency_ms", ["accuracy"]):
        done.append(("accuracy_latency", F.tradeoff_curve(results, out / "accuracy_latency.png",
                                                          x="latency_ms", y="accuracy"),
                     "Top-1 accuracy vs measured latency: only physically smaller (compacted) models "
                     "move left of the dense model's latency."))
    if any(F.num(l.get("sparsity")) is not None for m in methods for l in m.get("layers") or []):
        bars = [{"label": F._label(m, i), "layers": m.get("layers") or []} for i, m in enumerate(methods)]
        done.append(("layer_sparsity", F.layer_sparsity_bars(bars, out / "layer_sparsity.png"),
                     "Share of zero weights in each layer, per method."))
    history = results.get("history") or {}
    if isinstance(history, Mapping) and any(
            isinstance(e, Mapping) and (F.num(e.get("accuracy")) is not None
                                        or F.num(e.get("sparsity")) is not None)
            for h in history.values() for e in h or []):
        done.append(("history", F.history_curve(history, out / "history.png", _labels(results)),
                     "Accuracy (solid, left axis) and sparsity (dashed, right axis) "
                     "over fine-tuning steps."))
    return done


def _heatmap_figures(results: Mapping[str, Any], out: Path,
                     heatmaps: Optional[Mapping[str, Any]]) -> Figures:
    labels, done, used = _labels(results), [], set()
    for key, (before, after) in (heatmaps or {}).items():
        method, _, layer = str(key).partition("/")
        name = f"heatmap_{_slug(str(key))}"
        while name in used:  # two keys that slug alike must not overwrite each other
            name += "_"
        used.add(name)
        label = labels.get(method, method)
        title = f"{label}: {layer}" if layer else label
        path = F.weight_heatmap(before, after, out / f"{name}.png", title)
        done.append((name, path, f"|W| of layer {layer or key} before and after {label}; "
                                 "white cells are pruned (zero) weights, or fully pruned "
                                 "blocks when the matrix is max-pooled for display."))
    return done


# --------------------------------------------------------------------------- document
_SUMMARY_HEADERS = ["Method", "Target sparsity", "Sparsity", "Accuracy (Δ vs dense)",
                    "Nonzero params", "Compression", "MACs (effective)", "Speedup (theor.)",
                    "Size (compressed)", "Latency"]


def _metric_row(name: str, point: Mapping[str, Any], dense: Mapping[str, Any]) -> List[str]:
    acc, base = num(point.get("accuracy")), num(dense.get("accuracy"))
    acc_cell = fmt_pct(acc)
    if acc is not None and base is not None and point is not dense:
        acc_cell += f" ({fmt_pp(acc - base)})"
    return [name, fmt_pct(point.get("target_sparsity"), 1), fmt_pct(point.get("sparsity"), 1),
            acc_cell, fmt_int(point.get("nonzeros")), fmt_ratio(point.get("compression_ratio")),
            fmt_int(point.get("macs_effective")), fmt_ratio(point.get("theoretical_speedup")),
            fmt_kb(point.get("size_compressed_bytes")), fmt_ms(point.get("latency_ms"))]




def _final(method: Mapping[str, Any]) -> Mapping[str, Any]:
    final = method.get("final")
    points = F.method_points(method)
    return final if isinstance(final, Mapping) else (points[-1] if points else {})


def _summary(results: Mapping[str, Any]) -> List[Block]:
    dense = results.get("dense") or {}
    rows = [_metric_row("dense", dense, dense)] if dense else []
    rows += [_metric_row(F._label(m, i), _final(m), dense)
             for i, m in enumerate(results.get("methods") or [])]
    if not rows:
        if any(isinstance(results.get(k), Mapping) for k in ("sensitivity", "allocation", "lottery")):
            return []  # a run of `prunekit sensitivity` or `prunekit lottery`: its own sections say it all
        return [("h", 2, "Summary"), ("p", "No results to show.")]
    return [("h", 2, "Summary"), table(_SUMMARY_HEADERS, rows),
            ("p", "Accuracy change is in percentage points (pp) against the dense model. "
                  "Compression is params / nonzeros; the speedup is theoretical, from "
                  "effective MACs; latency is measured.")]


_STRUCT_HEADERS = ["Method", "Point", "Params (before → after)", "Params ×", "MACs (before → after)",
                   "MACs ×", "Latency (before → after)", "Speedup", "Accuracy (Δ)"]


def _arrow(before: Any, after: Any, fmt) -> str:
    return f"{fmt(before)} → {fmt(after)}"


def _times(before: Any, after: Any) -> str:
    b, a = num(before), num(after)
    return fmt_ratio(b / a) if b is not None and a else MISSING


def _structured_rows(results: Mapping[str, Any]) -> List[List[str]]:
    """One row per point of a compacted (physically smaller) model, against the dense one."""
    dense = results.get("dense") or {}
    rows = []
    for i, method in enumerate(results.get("methods") or []):
        points = [p for p in method.get("points") or [] if isinstance(p, Mapping) and p.get("compacted")]
        for p in points:
            acc, base = num(p.get("accuracy")), num(dense.get("accuracy"))
            delta = f"{fmt_pct(acc)} ({fmt_pp(acc - base)})" if acc is not None and base is not None else MISSING
            rows.append([F._label(method, i), fmt_pct(p.get("target_sparsity"), 0),
                         _arrow(dense.get("params"), p.get("params"), fmt_int),
                         _times(dense.get("params"), p.get("params")),
                         _arrow(dense.get("macs"), p.get("macs"), fmt_int),
                         _times(dense.get("macs"), p.get("macs")),
                         _arrow(dense.get("latency_ms"), p.get("latency_ms"), fmt_ms),
                         _times(dense.get("latency_ms"), p.get("latency_ms")), delta])
    return rows


def _structured(results: Mapping[str, Any]) -> List[Block]:
    rows = _structured_rows(results)
    if not rows:
        return []
    return [("h", 2, "Structured pruning: before and after surgery"), table(_STRUCT_HEADERS, rows),
            ("p", "These models were compacted: pruned channels are physically removed, so parameters, "
                  "MACs and the measured latency (batch 1) fall together. × is dense / compacted.")]


def _layer_table(layers: Sequence[Mapping[str, Any]]) -> Block:
    rows = [[str(l.get("name", MISSING)), str(l.get("type") or MISSING), fmt_int(l.get("params")),
             fmt_int(l.get("nonzeros")), fmt_pct(l.get("sparsity"), 1),
             fmt_int(l.get("macs_dense")), fmt_int(l.get("macs_effective"))] for l in layers]
    params = [num(l.get("params")) for l in layers]
    nonzeros = [num(l.get("nonzeros")) for l in layers]
    if None not in params and None not in nonzeros and sum(params) > 0:
        # The total row's sparsity is weighted by layer size, unlike a mean of the column.
        rows.append(["total", "", fmt_int(sum(params)), fmt_int(sum(nonzeros)),
                     fmt_pct(1 - sum(nonzeros) / sum(params), 1), "", ""])
    return table(["Layer", "Type", "Params", "Nonzeros", "Sparsity", "MACs (dense)",
                   "MACs (effective)"], rows)


def _method_section(method: Mapping[str, Any], index: int, dense: Mapping[str, Any]) -> List[Block]:
    label = F._label(method, index)
    name = str(method.get("name") or "")
    blocks: List[Block] = [("h", 3, label + (f" ({name})" if name and name != label else ""))]
    points = [p for p in method.get("points") or [] if isinstance(p, Mapping)]
    if len(points) > 1:
        rows = [_metric_row(f"point {k + 1}", p, dense) for k, p in enumerate(points)]
        blocks += [("h", 4, "Sweep"), table(["Point"] + _SUMMARY_HEADERS[1:], rows)]
    layers = [l for l in method.get("layers") or [] if isinstance(l, Mapping)]
    if layers:
        blocks += [("h", 4, "Layers"), _layer_table(layers)]
    notes = [str(n) for n in method.get("notes") or []]
    if notes:
        blocks += [("h", 4, "Notes"), ("ul", notes)]
    return blocks


def _flatten(data: Mapping[str, Any], prefix: str = "") -> List[List[str]]:
    rows: List[List[str]] = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", _fmt_value(value)])
    return rows


def document(results: Mapping[str, Any], figures: Figures) -> List[Block]:
    """The report as a renderer-neutral list of blocks."""

    blocks: List[Block] = [("h", 1, str(results.get("title") or "prunekit report"))]
    if results.get("created"):
        blocks.append(("p", f"Created: {results['created']}"))
    notes = [str(n) for n in results.get("notes") or [] if n]
    if notes:
        blocks.append(("ul", notes))
    blocks += _summary(results)
    blocks += _structured(results)
    general = [f for f in figures if f[0] not in SECTION_FIGURES]
    if general:
        blocks.append(("h", 2, "Figures"))
        blocks += [("figure", key, path, caption) for key, path, caption in general]
    blocks += sensitivity_blocks(results, figures)
    blocks += lottery_blocks(results, figures)
    methods = results.get("methods") or []
    if methods:
        blocks.append(("h", 2, "Methods"))
        for i, method in enumerate(methods):
            blocks += _method_section(method, i, results.get("dense") or {})
    for key, heading in (("config", "Configuration"), ("env", "Environment")):
        if isinstance(results.get(key), Mapping) and results[key]:
            blocks += [("h", 2, heading), table(["Key", "Value"], _flatten(results[key]), False)]
    return blocks


# --------------------------------------------------------------------------- Markdown
def _md(text: str) -> str:
    # Markdown passes raw HTML through, so user text is entity-escaped here too.
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    lines: List[str] = []
    for block in blocks:
        kind = block[0]
        if kind == "h":
            lines += ["#" * block[1] + " " + _md(block[2]), ""]
        elif kind == "p":
            lines += [_md(block[1]), ""]
        elif kind == "ul":
            lines += [f"- {_md(item)}" for item in block[1]] + [""]
        elif kind == "figure":
            _, key, path, caption = block
            lines += [f"![{_md(caption)}]({Path(path).name})", "", f"*{_md(caption)}*", ""]
        elif kind == "table":
            _, headers, rows, numeric = block
            align = ["---"] + [("---:" if numeric else "---")] * (len(headers) - 1)
            lines += ["| " + " | ".join(_md(c) for c in row) + " |"
                      for row in [headers, align] + rows] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#222;
 background:#fafafa;margin:0;line-height:1.45}
main{max-width:1100px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:1.7em;border-bottom:2px solid #ddd;padding-bottom:6px}
h2{font-size:1.35em;margin-top:1.8em;border-bottom:1px solid #eee}
h3{font-size:1.15em;margin-top:1.5em}h4{font-size:1em;margin:1em 0 .4em;color:#555}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.9em}
th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f2f2f2;text-align:left}tr:nth-child(even) td{background:#fcfcfc}
table.num td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.kv td:last-child{font-family:Menlo,Consolas,monospace;word-break:break-all}
figure{margin:16px 0 24px}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em;margin-top:4px}
"""


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f'<table class="{"num" if numeric else "kv"}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _html_block(block: Block) -> str:
    kind = block[0]
    if kind == "h":
        return f"<h{block[1]}>{html.escape(block[2])}</h{block[1]}>"
    if kind == "p":
        return f"<p>{html.escape(block[1])}</p>"
    if kind == "ul":
        return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block[1]) + "</ul>"
    if kind == "figure":
        _, key, path, caption = block
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        return (f'<figure id="{html.escape(key)}"><img src="data:image/png;base64,{data}" '
                f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    if kind == "table":
        return _html_table(*block[1:])
    raise PrunekitError(f"unknown block kind {kind!r}")


def render_html(blocks: Sequence[Block], title: str) -> str:
    body = "\n".join(_html_block(b) for b in blocks)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
            f"<body><main>\n{body}\n</main></body>\n</html>\n")


# --------------------------------------------------------------------------- entry point
def build_report(results: Mapping[str, Any], out_dir: Any, *,
                 heatmaps: Optional[Mapping[str, Any]] = None) -> Dict[str, Path]:
    """Write report.html, report.md, metrics.json and the figures into ``out_dir``.

    ``heatmaps`` maps ``"<method>/<layer>"`` to ``(before, after)`` weight arrays
    (numpy or torch). Returns the written paths: keys ``"html"``, ``"markdown"``,
    ``"metrics"`` and one per figure (``"tradeoff"``, ``"size_latency"``,
    ``"layer_sparsity"``, ``"history"``, ``"heatmap_<method>_<layer>"``,
    ``"sensitivity"``, ``"lottery"``), each only when the data for it exists.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = to_jsonable(results)  # one sanitised copy feeds the JSON and both renderers
    metrics = out / "metrics.json"
    metrics.write_text(json.dumps(clean, indent=2, allow_nan=False, ensure_ascii=False) + "\n",
                       encoding="utf-8")

    figures = _curve_figures(clean, out) + _heatmap_figures(clean, out, heatmaps) + section_figures(clean, out)
    blocks = document(clean, figures)
    markdown, page = out / "report.md", out / "report.html"
    markdown.write_text(render_markdown(blocks), encoding="utf-8")
    page.write_text(render_html(blocks, str(clean.get("title") or "prunekit report")),
                    encoding="utf-8")
    paths = {"html": page, "markdown": markdown, "metrics": metrics}
    paths.update({key: path for key, path, _ in figures})
    return paths
