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
          "latency_ms": 0.05, "batch": 1, "threads": 2,  # latency: the median of the timings...
          "latency_q1_ms": 0.049, "latency_q3_ms": 0.052,  # ...their quartiles (the noise),
          "latency_min_ms": 0.048, "latency_max_ms": 0.09, "latency_repeats": 30},  # range, count
      "dense_layers": [...same rows as a method's "layers"...],   # compacted layers are compared to these
      "methods": [
        {"name": "oneshot_l1",                   # identifier (keys of history / heatmaps)
         "label": "one-shot L1 (unstructured)",  # shown to the reader
         "points": [                             # the tradeoff sweep, may be a single point
            {"target_sparsity": 0.5, "sparsity": 0.5,   # sparsity: of the whole model
             "pruned_sparsity": 0.5,                 # of the layers the method prunes
             "compacted": False,                     # True: channels physically removed (surgery)
             ...same keys as dense...}, ...],
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
      "llm": {...},                              # optional: llm.json of `prunekit llm prune` / `llm sweep`
      "notes": ["allocation.json not found"],    # optional: said at the top (e.g. missing files)
      "conclusion": {...},                       # optional: the recommendation, an advice document
    }                                            # (prunekit.experiment.conclusion, advise's rule)

Every key is optional and any metric may be missing or ``None`` (e.g. latency not
measured): the table shows "—", a column that is empty for every row is dropped,
and a figure is written only when the data for it exists. A method without
``final`` uses its last point; one without ``points`` plots its ``final`` point.
The sensitivity, lottery and decoder LLM sections are in :mod:`prunekit.report.sections`;
:func:`prunekit.report.runs.collect_run` gathers all of it from a run folder.
"""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from prunekit._util import to_jsonable
from prunekit.errors import PrunekitError
from prunekit.report import figures as F
from prunekit.report.blocks import (
    MISSING,
    NOISE_MARK,
    NOISE_TIE,
    Block,
    Figures,
    fmt_int,
    fmt_kb,
    fmt_latency,
    fmt_ms,
    fmt_pct,
    fmt_pp,
    fmt_ratio,
    fmt_speedup,
    table,
)
from prunekit.report.figures import num
from prunekit.report.sections import (
    SECTION_FIGURES,
    llm_blocks,
    lottery_blocks,
    section_figures,
    sensitivity_blocks,
)

__all__ = ["build_report", "to_jsonable", "fmt_pct", "fmt_pp", "fmt_int", "fmt_ratio",
           "fmt_kb", "fmt_ms"]


def _fmt_value(value: Any) -> str:
    """Free-form config/env value as text."""
    if value is None:
        return MISSING
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _fmt_cell(value: Any) -> str:
    """A value inside a table of records: lists as 'a, b', mappings as 'k=v, k=v' (no raw JSON)."""
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_fmt_cell(v)}" for k, v in value.items()) or MISSING
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt_cell(v) for v in value) or MISSING
    return _fmt_value(value)


# --------------------------------------------------------------------------- figures
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "x"


def _has(results: Mapping[str, Any], x: str, ys: Sequence[str]) -> bool:
    """Does any method have a point with ``x`` and one of ``ys``?"""
    return any(F._series(F.method_points(m), x, y)[0]
               for m in results.get("methods") or [] for y in ys)


def _labels(results: Mapping[str, Any]) -> Dict[str, str]:
    return {str(m.get("name", i)): F._label(m, i) for i, m in enumerate(results.get("methods") or [])}


def _compacted(method: Mapping[str, Any]) -> bool:
    """Were the method's layers physically shrunk (surgery)? Its layer rows then describe the smaller model."""
    return bool(_final(method).get("compacted")) or method.get("kind") == "surgery"


def _layers(method: Mapping[str, Any], dense_layers: Any) -> List[Dict[str, Any]]:
    """The method's layer rows; for a compacted model each one's sparsity is the share of the dense layer's
    weights that are zero or removed (a layer shrunk from 235,500 to 3,925 weights is 98.3% sparse, not 0%)."""
    layers = [dict(l) for l in method.get("layers") or [] if isinstance(l, Mapping)]
    if not _compacted(method):
        return layers
    dense = {str(l.get("name")): num(l.get("params")) for l in dense_layers or [] if isinstance(l, Mapping)}
    for layer in layers:
        full, nz = dense.get(str(layer.get("name"))), num(layer.get("nonzeros"))
        layer["params_dense"] = full
        layer["sparsity"] = 1.0 - nz / full if full and nz is not None else None
    return layers


def _clock_note(results: Mapping[str, Any]) -> str:
    if not _paired(results):
        return ("Models timed one after another drift with the machine's load by more than their own spread: "
                "read small differences as noise.")
    return ("A model timed against dense in alternation is drawn at the dense median ÷ its measured speedup "
            "(bars: the speedup's interquartile range), so that the machine's drift between separately timed "
            "models does not move it; its own median is in the tables.")


def _curve_figures(results: Mapping[str, Any], out: Path) -> Figures:
    methods = results.get("methods") or []
    done: Figures = []
    if _has(results, "sparsity", ["accuracy"]):
        done.append(("tradeoff", F.tradeoff_curve(results, out / "tradeoff.png"),
                     "Top-1 accuracy vs achieved sparsity of the whole model for each method's sweep; "
                     "the dashed line is the dense model."))
    if _has(results, "sparsity", ["size_compressed_bytes", "latency_ms"]):
        done.append(("size_latency", F.size_latency_curves(results, out / "size_latency.png"),
                     "Compressed model size (KB) and measured latency (ms: median, bars from the first to the "
                     "third quartile) vs sparsity of the whole model; dashed lines are the dense model, the grey "
                     "band its interquartile range. " + _clock_note(results)))
    if _has(results, "latency_ms", ["accuracy"]):
        done.append(("accuracy_latency", F.tradeoff_curve(results, out / "accuracy_latency.png",
                                                          x="latency_ms", y="accuracy"),
                     "Top-1 accuracy vs measured latency (median, interquartile bars; grey band: the dense "
                     "model's): only physically smaller (compacted) models move left of the dense model. "
                     + _clock_note(results)))
    dense_layers = results.get("dense_layers")
    bars = [{"label": F._label(m, i), "layers": _layers(m, dense_layers)} for i, m in enumerate(methods)]
    if any(F.num(l.get("sparsity")) is not None for m in bars for l in m["layers"]):
        done.append(("layer_sparsity", F.layer_sparsity_bars(bars, out / "layer_sparsity.png"),
                     "Share of each layer's weights that are zero, per method; for a compacted (surgery) "
                     "model, the share of the dense layer's weights that were removed."))
    history = results.get("history") or {}
    if isinstance(history, Mapping) and any(
            isinstance(e, Mapping) and (F.num(e.get("accuracy")) is not None
                                        or F.num(e.get("sparsity")) is not None)
            for h in history.values() for e in h or []):
        done.append(("history", F.history_curve(history, out / "history.png", _labels(results)),
                     "Accuracy (solid, left axis) and sparsity of the pruned layers (dashed, right axis) "
                     "over fine-tuning steps."))
    return done


def _same_weights(a: Any, b: Any) -> bool:
    x, y = F._to_numpy(a), F._to_numpy(b)
    return x.shape == y.shape and bool(np.array_equal(x, y))


def _heatmap_figures(results: Mapping[str, Any], out: Path,
                     heatmaps: Optional[Mapping[str, Any]]) -> Figures:
    """One figure per layer: its dense ("before") weights once, then the weights after each method."""
    labels, done, used = _labels(results), [], set()
    groups: Dict[str, List[Tuple[Any, List[Tuple[str, Any]]]]] = {}  # layer -> [(before, [(label, after)])]
    for key, (before, after) in (heatmaps or {}).items():
        method, _, layer = str(key).partition("/")
        if not layer:
            method, layer = "", method
        label = labels.get(method, method) or "after pruning"
        same = [g for g in groups.setdefault(layer, []) if _same_weights(g[0], before)]
        if same:
            same[0][1].append((label, after))
        else:  # another "before" (another dense model): its own figure
            groups[layer].append((before, [(label, after)]))
    for layer, entries in groups.items():
        for before, afters in entries:
            name = f"heatmap_{_slug(layer)}"
            while name in used:  # two layers that slug alike must not overwrite each other
                name += "_"
            used.add(name)
            path = F.weight_heatmaps(before, afters, out / f"{name}.png", f"Layer {layer}")
            done.append((name, path, f"|W| of layer {layer} before pruning (the dense model, shown once) and "
                                     f"after each of {len(afters)} method(s); white cells are pruned (zero) "
                                     "weights, or fully pruned blocks when the matrix is max-pooled for display. "
                                     "A compacted (surgery) method is shown as its mask on the dense shape."))
    return done


# --------------------------------------------------------------------------- document
_SUMMARY_HEADERS = ["Method", "Target sparsity", "Sparsity (whole model)", "Sparsity (pruned layers)",
                    "Accuracy (Δ vs dense)", "MACs ÷ (dense / effective)", "Size (compressed)",
                    "Latency, median [IQR]", "Measured speedup [IQR]"]


def _tie(results: Mapping[str, Any]) -> float:
    """The latency tie the conclusion used (advise's rule), else advise's default."""
    conclusion = results.get("conclusion")
    settings = conclusion.get("settings") if isinstance(conclusion, Mapping) else None
    tie = num(settings.get("latency_tie")) if isinstance(settings, Mapping) else None
    return tie if tie is not None else NOISE_TIE


def _macs_ratio(dense: Mapping[str, Any], point: Mapping[str, Any]) -> str:
    d, e = num(dense.get("macs")), num(point.get("macs_effective"))
    return fmt_ratio(d / e) if d is not None and e else MISSING


def _metric_row(name: str, point: Mapping[str, Any], dense: Mapping[str, Any],
                tie: float = NOISE_TIE) -> List[str]:
    acc, base = num(point.get("accuracy")), num(dense.get("accuracy"))
    acc_cell = fmt_pct(acc)
    if acc is not None and base is not None and point is not dense:
        acc_cell += f" ({fmt_pp(acc - base)})"
    return [name, fmt_pct(point.get("target_sparsity"), 1), fmt_pct(point.get("sparsity"), 1),
            fmt_pct(point.get("pruned_sparsity"), 1), acc_cell, _macs_ratio(dense, point),
            fmt_kb(point.get("size_compressed_bytes")), fmt_latency(point), fmt_speedup(dense, point, tie)]


def _final(method: Mapping[str, Any]) -> Mapping[str, Any]:
    final = method.get("final")
    points = F.method_points(method)
    return final if isinstance(final, Mapping) else (points[-1] if points else {})


def _paired(results: Mapping[str, Any]) -> bool:
    """Were the speedups timed against dense in alternation (``speedup_measured``)?"""
    return any(num(p.get("speedup_measured")) is not None
               for m in results.get("methods") or [] for p in F.method_points(m))


def _latency_note(results: Mapping[str, Any], tie: float) -> str:
    dense = results.get("dense") or {}
    repeats = dense.get("latency_repeats")
    how = (f"the median of {repeats} timed batch-{dense.get('batch', 1)} forward passes" if repeats
           else "measured")
    if _paired(results):
        speedup = ("Measured speedup: each model timed against the dense one in alternation (dense, model, "
                   "model, dense, ...), the median of the rounds' dense / model ratios and [their interquartile "
                   "range]: alternation cancels the drift of a busy machine that separate medians keep, so "
                   f"compare models by this column, not by their latencies. {NOISE_MARK} marks a speedup inside "
                   f"the noise (1× within its interquartile range, or within {tie:.0%}): neither faster nor slower.")
    else:
        speedup = (f"Measured speedup is dense latency / this latency; {NOISE_MARK} marks a difference inside the "
                   f"noise (the two interquartile ranges overlap, or the medians are within {tie:.0%}): do not "
                   "read it as faster or slower.")
    return f"Latency is {how}, [brackets] its interquartile range (first to third quartile). {speedup}"


def _summary(results: Mapping[str, Any]) -> List[Block]:
    dense = results.get("dense") or {}
    tie = _tie(results)
    rows = [_metric_row("dense", dense, dense, tie)] if dense else []
    rows += [_metric_row(F._label(m, i), _final(m), dense, tie)
             for i, m in enumerate(results.get("methods") or [])]
    if not rows:
        if any(isinstance(results.get(k), Mapping) for k in ("sensitivity", "allocation", "lottery", "llm")):
            return []  # a run of `prunekit sensitivity`, `lottery` or `llm`: its own sections say it all
        return [("h", 2, "Summary"), ("p", "No results to show.")]
    return [("h", 2, "Summary"), table(_SUMMARY_HEADERS, rows),
            ("ul", ["Sparsity (whole model): the share of all the model's parameters (biases and unpruned "
                    "layers included) that are zero or removed. Sparsity (pruned layers): the share within the "
                    "layers the method prunes, what the console prints as sparsity_pruned_layers.",
                    "Accuracy change is in percentage points (pp) against the dense model.",
                    "MACs ÷ (dense / effective): the dense model's multiply-adds over those left with non-zero "
                    "weights (the effective MACs, per layer under Methods). A compacted (surgery) model really runs only those; a masked model still runs all "
                    "the dense MACs on a CPU or GPU, so its measured speedup stays near 1×: the ratio is what "
                    "hardware that skips zeros could gain, not a speedup.",
                    _latency_note(results, tie)])]


_STRUCT_HEADERS = ["Method", "Point", "Params (before → after)", "Params ×", "MACs (before → after)",
                   "MACs ×", "Latency, median [IQR] (before → after)", "Measured speedup [IQR]", "Accuracy (Δ)"]


def _arrow(before: Any, after: Any, fmt) -> str:
    return f"{fmt(before)} → {fmt(after)}"


def _times(before: Any, after: Any) -> str:
    b, a = num(before), num(after)
    return fmt_ratio(b / a) if b is not None and a else MISSING


def _structured_rows(results: Mapping[str, Any]) -> List[List[str]]:
    """One row per point of a compacted (physically smaller) model, against the dense one."""
    dense = results.get("dense") or {}
    tie = _tie(results)
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
                         _arrow(dense, p, fmt_latency), fmt_speedup(dense, p, tie), delta])
    return rows


def _structured(results: Mapping[str, Any]) -> List[Block]:
    rows = _structured_rows(results)
    if not rows:
        return []
    return [("h", 2, "Structured pruning: before and after surgery"), table(_STRUCT_HEADERS, rows),
            ("p", "These models were compacted: pruned channels are physically removed, so parameters, "
                  "MACs and the measured latency (batch 1) fall together. × is dense / compacted; "
                  f"{NOISE_MARK} marks a latency difference inside the timing noise.")]


def _layer_table(layers: Sequence[Mapping[str, Any]]) -> Block:
    """Per-layer rows; a compacted model's (with ``params_dense``) also shows the dense layer's size."""
    compacted = any("params_dense" in l for l in layers)
    rows = [[str(l.get("name", MISSING)), str(l.get("type") or MISSING), fmt_int(l.get("params_dense")),
             fmt_int(l.get("params")), fmt_int(l.get("nonzeros")), fmt_pct(l.get("sparsity"), 1),
             fmt_int(l.get("macs_dense")), fmt_int(l.get("macs_effective"))] for l in layers]
    full = [num(l.get("params_dense" if compacted else "params")) for l in layers]
    params = [num(l.get("params")) for l in layers]
    nonzeros = [num(l.get("nonzeros")) for l in layers]
    if None not in full and None not in params and None not in nonzeros and sum(full) > 0:
        # The total row's sparsity is weighted by layer size, unlike a mean of the column.
        rows.append(["total", "", fmt_int(sum(full)) if compacted else MISSING, fmt_int(sum(params)),
                     fmt_int(sum(nonzeros)), fmt_pct(1 - sum(nonzeros) / sum(full), 1), "", ""])
    sparsity = "Sparsity (layer, vs its dense size)" if compacted else "Sparsity (layer)"
    return table(["Layer", "Type", "Params (dense)", "Params", "Nonzeros", sparsity, "MACs (all weights)",
                  "MACs (effective)"], rows)


def _method_section(method: Mapping[str, Any], index: int, dense: Mapping[str, Any],
                    dense_layers: Any = None, tie: float = NOISE_TIE) -> List[Block]:
    label = F._label(method, index)
    name = str(method.get("name") or "")
    blocks: List[Block] = [("h", 3, label + (f" ({name})" if name and name != label else ""))]
    points = [p for p in method.get("points") or [] if isinstance(p, Mapping)]
    if len(points) > 1:
        rows = [_metric_row(f"point {k + 1}", p, dense, tie) for k, p in enumerate(points)]
        blocks += [("h", 4, "Sweep"), table(["Point"] + _SUMMARY_HEADERS[1:], rows)]
    layers = _layers(method, dense_layers)
    if layers:
        blocks += [("h", 4, "Layers"), _layer_table(layers)]
    notes = [str(n) for n in method.get("notes") or []]
    if notes:
        blocks += [("h", 4, "Notes"), ("ul", notes)]
    return blocks


# --------------------------------------------------------------------------- conclusion
def _conclusion(results: Mapping[str, Any]) -> List[Block]:
    """The recommendation ``prunekit advise``'s rule makes from the measured points (``results["conclusion"]``,
    an advice document written by :func:`prunekit.experiment.conclusion`), with its reason."""
    c = results.get("conclusion")
    if not isinstance(c, Mapping) or not c.get("recommended"):
        if results.get("methods") and results.get("dense"):
            return [("h", 2, "Conclusion"),
                    ("p", "No recommendation: these results carry none (they were written before prunekit "
                          "recommended a method in its reports); run the command again to get one.")]
        return []
    rows = [r for r in c.get("candidates") or [] if isinstance(r, Mapping)]
    ok = [r for r in rows if r.get("within_budget")]
    tie, budget = _tie(results), num(c.get("budget_pp"))
    budget_text = MISSING if budget is None else f"{budget:g}"
    metric = str(c.get("metric") or "accuracy")
    batch = (c.get("batches") or [1])[0]
    table_rows = []
    for r in sorted(ok, key=lambda r: (num(r.get("latency_ms")) or 0.0)):
        speedup, drop = num(r.get("speedup")), num(r.get("drop_pp"))
        near = speedup is not None and abs(speedup - 1.0) <= tie * max(1.0, speedup)
        cell = MISSING if speedup is None else f"{speedup:.2f}×" + (f" {NOISE_MARK}" if near else "")
        table_rows.append([("★ " if r.get("name") == c["recommended"] else "") + str(r.get("name")),
                           fmt_pct(r.get("metric_value")),
                           "reference" if r.get("kind") == "dense" else fmt_pp(0.0 - drop / 100 if drop else 0.0),
                           fmt_ms(r.get("latency_ms")), "reference" if r.get("kind") == "dense" else cell,
                           fmt_kb(r.get("size_bytes"))])
    return [("h", 2, "Conclusion"), ("h", 3, f"Recommended: {c['recommended']}"),
            ("p", f"Why: {c.get('reason') or MISSING}."),
            ("p", f"Chosen by the rule of prunekit advise: among the points whose {metric} drop is within the "
                  f"budget of {budget_text} pp ({len(ok)} of {len(rows)} here, dense included), the fastest measured "
                  f"on this CPU at batch {batch}; latencies within {tie:.0%} of the fastest (the typical spread "
                  "of these timings, at least 5%) tie, and a tie goes to the smaller file. "
                  + ("A point timed against dense in alternation ranks at the dense median ÷ its measured "
                     "speedup (the latency shown here). " if _paired(results) else "")
                  + "A masked model runs "
                  "dense kernels here, so only a compacted (surgery) model can be measurably faster. Set "
                  "budget_pp in the run's config to change the budget."),
            table(["Within budget", metric.capitalize(), "Δ vs dense", "Latency (as ranked)", "Measured speedup",
                   "File size"], table_rows)]


# --------------------------------------------------------------------------- configuration
def _flatten(data: Mapping[str, Any], prefix: str = "") -> List[List[str]]:
    rows: List[List[str]] = []
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            rows += _flatten(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", _fmt_value(value)])
    return rows


def _records(value: Any) -> bool:
    """A non-empty list of mappings (such as the config's methods): shown as a table, not as JSON."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _records_table(records: Sequence[Mapping[str, Any]]) -> Block:
    keys = list(dict.fromkeys(k for r in records for k in r))
    rows = [[_fmt_cell(r[k]) if k in r else MISSING for k in keys] for r in records]
    return table([str(k) for k in keys], rows, False)


def _key_values(results: Mapping[str, Any], key: str, heading: str) -> List[Block]:
    data = results.get(key)
    if not isinstance(data, Mapping) or not data:
        return []
    blocks: List[Block] = [("h", 2, heading)]
    plain = {k: v for k, v in data.items() if not _records(v)}
    if plain:
        blocks.append(table(["Key", "Value"], _flatten(plain), False))
    for k, v in data.items():
        if _records(v):
            blocks += [("h", 3, f"{heading}: {k}"), _records_table(v)]
    return blocks


def document(results: Mapping[str, Any], figures: Figures) -> List[Block]:
    """The report as a renderer-neutral list of blocks."""

    blocks: List[Block] = [("h", 1, str(results.get("title") or "prunekit report"))]
    if results.get("created"):
        blocks.append(("p", f"Created: {results['created']}"))
    notes = [str(n) for n in results.get("notes") or [] if n]
    if notes:
        blocks.append(("ul", notes))
    blocks += _conclusion(results)
    blocks += _summary(results)
    blocks += _structured(results)
    general = [f for f in figures if f[0] not in SECTION_FIGURES]
    if general:
        blocks.append(("h", 2, "Figures"))
        blocks += [("figure", key, path, caption) for key, path, caption in general]
    blocks += sensitivity_blocks(results, figures)
    blocks += lottery_blocks(results, figures)
    blocks += llm_blocks(results, figures)
    methods = results.get("methods") or []
    if methods:
        blocks.append(("h", 2, "Methods"))
        for i, method in enumerate(methods):
            blocks += _method_section(method, i, results.get("dense") or {}, results.get("dense_layers"),
                                      _tie(results))
    for key, heading in (("config", "Configuration"), ("env", "Environment")):
        blocks += _key_values(results, key, heading)
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
main{max-width:1200px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:1.7em;border-bottom:2px solid #ddd;padding-bottom:6px}
h2{font-size:1.35em;margin-top:1.8em;border-bottom:1px solid #eee}
h3{font-size:1.15em;margin-top:1.5em}h4{font-size:1em;margin:1em 0 .4em;color:#555}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.9em}
th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f2f2f2;text-align:left}tr:nth-child(even) td{background:#fcfcfc}
table.num td:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
table.kv td:last-child{font-family:Menlo,Consolas,monospace;word-break:break-all}
figure{margin:16px 0 24px}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:.9em;margin-top:4px}
.scroll{overflow-x:auto;max-width:100%}
"""


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                   for row in rows)
    return (f'<div class="scroll"><table class="{"num" if numeric else "kv"}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{body}</tbody></table></div>')


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
    (numpy or torch); the methods of one layer share one figure and its "before" panel. Returns the written paths: keys ``"html"``, ``"markdown"``,
    ``"metrics"`` and one per figure (``"tradeoff"``, ``"size_latency"``,
    ``"layer_sparsity"``, ``"history"``, ``"heatmap_<layer>"`` (one per layer: "before" once, then
    every method's "after"),
    ``"sensitivity"``, ``"lottery"``, ``"llm_perplexity"``, ``"llm_block_sparsity"``,
    ``"llm_block_influence"``), each only when the data for it exists.
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
