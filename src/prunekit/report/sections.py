"""Report sections for sensitivity analysis and lottery tickets.

They read three optional keys of the results dict (see :mod:`prunekit.report.render`):

* ``"sensitivity"``: the dict of ``sensitivity.json`` (``SensitivityResult.to_dict()``);
* ``"allocation"``: the dict of ``allocation.json`` written by ``prunekit sensitivity``;
* ``"lottery"``: the dict of ``lottery.json`` (``LotteryRecord.to_dict()``).

Like the rest of the report they work on plain JSON-safe dicts and tolerate
missing pieces: what is there is shown, what is not is said in one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from prunekit.report import figures as F
from prunekit.report.blocks import MISSING, Block, Figures, fmt_int, fmt_pct, fmt_pp, table
from prunekit.report.figures import num

__all__ = ["section_figures", "sensitivity_blocks", "lottery_blocks", "SECTION_FIGURES"]

SECTION_FIGURES = ("sensitivity", "lottery")  # figure keys shown inside their section, not under "Figures"
_MEASURED = {"allocated": "per-layer allocation (from the curves)", "uniform_layer": "uniform per layer",
             "global_magnitude": "global magnitude"}


def _mapping(results: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = results.get(key)
    return value if isinstance(value, Mapping) else {}


def _fmt_metric(value: Any, metric: str) -> str:
    v = num(value)
    if v is None:
        return MISSING
    return fmt_pct(v) if metric in F.PERCENT_KEYS else f"{v:.4g}"


def _fmt_drop(value: Any, metric: str) -> str:
    v = num(value)
    if v is None:
        return MISSING
    return f"{100 * v:.2f} pp" if metric in F.PERCENT_KEYS else f"{v:.4g}"


def _fmt_delta(value: Any, base: Any, metric: str) -> str:
    v, b = num(value), num(base)
    if v is None or b is None:
        return MISSING
    return fmt_pp(v - b) if metric in F.PERCENT_KEYS else f"{v - b:+.4g}"


# --------------------------------------------------------------------------- figures
def _allocated(results: Mapping[str, Any]) -> Dict[str, Any]:
    sparsities = _mapping(results, "allocation").get("sparsities")
    return dict(sparsities) if isinstance(sparsities, Mapping) else {}


def section_figures(results: Mapping[str, Any], out: Path) -> Figures:
    """sensitivity.png and lottery.png in the report folder, when the data for them exists."""
    done: Figures = []
    sens = _mapping(results, "sensitivity")
    if isinstance(sens.get("curves"), Mapping) and sens["curves"]:
        done.append(("sensitivity", F.sensitivity_curves(sens, out / "sensitivity.png", _allocated(results)),
                     "Metric with each layer pruned alone vs that layer's sparsity; the dashed line is the "
                     "model with no layer pruned further; stars (and dotted lines) mark the allocated sparsities."))
    rounds = [r for r in _mapping(results, "lottery").get("rounds") or [] if isinstance(r, Mapping)]
    if any(num(r.get(k)) is not None for r in rounds for k in ("accuracy", "reinit_accuracy")):
        done.append(("lottery", F.lottery_curve(results["lottery"], out / "lottery.png"),
                     "Top-1 accuracy vs sparsity of the lottery ticket (survivors rewound, retrained) and of "
                     "the random re-init control (same masks, fresh random weights); dashed: round 0, dense."))
    return done


def _figure(figures: Figures, key: str) -> List[Block]:
    return [("figure", k, path, caption) for k, path, caption in figures if k == key]


# --------------------------------------------------------------------------- sensitivity
def _curve_table(sens: Mapping[str, Any], alloc: Mapping[str, Any]) -> Block:
    metric = str(sens.get("metric") or "accuracy")
    grid = [num(s) for s in sens.get("sparsities") or []]
    params = sens.get("params") if isinstance(sens.get("params"), Mapping) else {}
    rows = []
    for name, values in (sens.get("curves") or {}).items():
        values = list(values or []) + [None] * max(0, len(grid) - len(values or []))
        rows.append([str(name), fmt_int(params.get(name))] + [_fmt_metric(v, metric) for v in values[:len(grid)]]
                    + [fmt_pct(alloc.get(name), 1)])
    headers = ["Layer", "Weights"] + [f"s={100 * s:g}%" if s is not None else "s=?" for s in grid] + ["Allocated"]
    return table(headers, rows)


def _allocation_table(alloc: Mapping[str, Any], params: Mapping[str, Any]) -> Block:
    rows, total, kept = [], 0.0, 0.0
    for name, s in _allocated({"allocation": alloc}).items():
        n, s = num(params.get(name)), num(s)
        left = None if n is None or s is None else n * (1.0 - s)
        rows.append([str(name), fmt_int(n), fmt_pct(s, 2), fmt_int(left)])
        total, kept = (total + n, kept + left) if left is not None and total is not None else (None, None)
    if rows and total:
        # weighted by layer size, as the allocation's target is (weights="params")
        rows.append(["total", fmt_int(total), fmt_pct(1.0 - kept / total, 2), fmt_int(kept)])
    return table(["Layer", "Weights", "Allocated sparsity", "Weights kept"], rows)


def _measured_table(alloc: Mapping[str, Any], baseline: Any, metric: str) -> List[Block]:
    measured = alloc.get("measured")
    if not isinstance(measured, Mapping) or not measured:
        return []
    rows = [[_MEASURED.get(str(k), str(k)), _fmt_metric(v, metric), _fmt_delta(v, baseline, metric)]
            for k, v in measured.items()]
    target = num(alloc.get("target"))
    return [("h", 4, f"Measured at the same target ({fmt_pct(target, 1)})"),
            table(["Pruning", metric, "Δ vs no pruning"], rows),
            ("p", "The same overall sparsity, three ways of spreading it over the layers; no fine-tuning.")]


def sensitivity_blocks(results: Mapping[str, Any], figures: Figures) -> List[Block]:
    sens, alloc = _mapping(results, "sensitivity"), _mapping(results, "allocation")
    if not sens and not alloc:
        return []
    blocks: List[Block] = [("h", 2, "Sensitivity analysis")]
    metric = str(sens.get("metric") or alloc.get("metric") or "accuracy")
    baseline = sens.get("baseline", alloc.get("baseline"))
    if sens:
        meta = sens.get("meta") if isinstance(sens.get("meta"), Mapping) else {}
        blocks.append(("p", f"Each layer pruned alone ({meta.get('criterion', '?')}, {meta.get('pattern', '?')}) "
                            f"at each sparsity and evaluated: {metric} {_fmt_metric(baseline, metric)} with no "
                            "layer pruned further."))
        blocks += _figure(figures, "sensitivity")
        blocks += [("h", 3, "Curves"), _curve_table(sens, _allocated(results))]
    else:
        blocks.append(("p", "sensitivity.json was not found: the curves are missing; the allocation follows."))
    if not alloc:
        blocks.append(("p", "allocation.json was not found: no allocation to show."))
        return blocks
    params = sens.get("params") if isinstance(sens.get("params"), Mapping) else {}
    blocks += [("h", 3, "Allocation"),
               ("p", f"Per-layer sparsities meeting the target {fmt_pct(alloc.get('target'), 1)} "
                     f"({alloc.get('weights', 'params')}-weighted; achieved {fmt_pct(alloc.get('achieved'), 2)}) "
                     f"with the least predicted drop ({_fmt_drop(alloc.get('predicted_drop'), metric)}, "
                     "layer drops added up)."),
               _allocation_table(alloc, params)]
    return blocks + _measured_table(alloc, baseline, metric)


# --------------------------------------------------------------------------- lottery tickets
def _describe_run(lottery: Mapping[str, Any]) -> str:
    meta = lottery.get("meta") if isinstance(lottery.get("meta"), Mapping) else {}
    step = num(lottery.get("rewind_step"))
    rewind = "initialisation" if step == 0 else f"optimizer step {fmt_int(step)}" if step is not None else "?"
    what = " on ".join(str(meta[k]) for k in ("model", "data") if meta.get(k) is not None)
    epochs = f", {meta['epochs_per_round']} epoch(s) per round" if meta.get("epochs_per_round") is not None else ""
    seed = f", seed {meta['seed']}" if meta.get("seed") is not None else ""
    return (f"Iterative magnitude pruning{(' of ' + what) if what else ''}{seed}{epochs}: round 0 trains the "
            f"dense network; each later round prunes the surviving weights, rewinds them to their values at "
            f"{rewind} and trains again. The control trains the same masks from a fresh random initialisation.")


def _lottery_row(r: Mapping[str, Any], dense: Optional[float]) -> List[str]:
    def cell(key: str) -> str:
        v = num(r.get(key))
        return fmt_pct(v) + (f" ({fmt_pp(v - dense)})" if v is not None and dense is not None else "")

    t, c = num(r.get("accuracy")), num(r.get("reinit_accuracy"))
    return [str(r.get("round", "?")), fmt_pct(r.get("target"), 1), fmt_pct(r.get("sparsity"), 2),
            cell("accuracy"), cell("reinit_accuracy"), fmt_pp(t - c) if t is not None and c is not None else MISSING]


def lottery_blocks(results: Mapping[str, Any], figures: Figures) -> List[Block]:
    lottery = _mapping(results, "lottery")
    if not lottery:
        return []
    rounds = [r for r in lottery.get("rounds") or [] if isinstance(r, Mapping)]
    blocks: List[Block] = [("h", 2, "Lottery tickets"), ("p", _describe_run(lottery))]
    if not rounds:
        return blocks + [("p", "The lottery record holds no rounds: nothing to show.")]
    dense = num(rounds[0].get("accuracy"))
    blocks += _figure(figures, "lottery")
    first = _lottery_row(rounds[0], None)
    first[0] += " (dense)"
    rows = [first] + [_lottery_row(r, dense) for r in rounds[1:]]
    blocks += [table(["Round", "Target sparsity", "Sparsity", "Ticket accuracy (Δ vs dense)",
                       "Re-init accuracy (Δ vs dense)", "Ticket − re-init"], rows),
               ("p", "Δ is in percentage points against round 0 (dense). Sparsity is over the pruned layers.")]
    return blocks
