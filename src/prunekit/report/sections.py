"""Report sections for sensitivity analysis, lottery tickets and decoder LLM pruning.

They read four optional keys of the results dict (see :mod:`prunekit.report.render`):

* ``"sensitivity"``: the dict of ``sensitivity.json`` (``SensitivityResult.to_dict()``);
* ``"allocation"``: the dict of ``allocation.json`` written by ``prunekit sensitivity``;
* ``"lottery"``: the dict of ``lottery.json`` (``LotteryRecord.to_dict()``);
* ``"llm"``: the dict of ``llm.json`` (format ``prunekit.llm/1``) of ``prunekit llm prune`` / ``llm sweep``.

Like the rest of the report they work on plain JSON-safe dicts and tolerate
missing pieces: what is there is shown, what is not is said in one line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from prunekit.report import figures as F
from prunekit.report.blocks import MISSING, Block, Figures, fmt_int, fmt_pct, fmt_pp, table
from prunekit.report.figures import num

__all__ = ["section_figures", "sensitivity_blocks", "lottery_blocks", "llm_blocks", "SECTION_FIGURES"]

_LLM_FIGURES = ("llm_perplexity", "llm_block_sparsity", "llm_block_influence")
# figure keys shown inside their section, not under "Figures"
SECTION_FIGURES = ("sensitivity", "lottery") + _LLM_FIGURES
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
    return done + _llm_figures(_mapping(results, "llm"), out)


def _llm_figures(llm: Mapping[str, Any], out: Path) -> Figures:
    """llm_perplexity.png, llm_block_sparsity.png and llm_block_influence.png, when the data for them exists."""
    if not llm:
        return []
    done: Figures = []
    dense_ppl = num(_mapping(llm, "dense").get("perplexity"))
    if any(F.achieved_sparsity(r) is not None and (F.ppl_ratio(r, dense_ppl) or 0.0) > 0
           for r in F.llm_runs(llm, "unstructured")):
        done.append(("llm_perplexity", F.perplexity_curves(llm, out / "llm_perplexity.png"),
                     "Perplexity ÷ the dense model's (log scale) vs achieved sparsity: one line per method and "
                     "allocation, stars for N:M patterns, hollow markers after recovery; dashed: dense."))
    path = F.block_sparsity_plot(llm, out / "llm_block_sparsity.png")
    if path is not None:
        done.append(("llm_block_sparsity", path,
                     "Mean sparsity of each decoder block's tensors, for the runs that pruned blocks unevenly "
                     "(a uniform run would be a flat line at its target)."))
    influence = llm.get("block_influence")
    if isinstance(influence, list) and any(num(v) is not None for v in influence):
        done.append(("llm_block_influence", F.block_influence_plot(llm, out / "llm_block_influence.png"),
                     "Block influence of each decoder layer (ShortGPT: 1 − cosine similarity of the layer's "
                     "input and output on the calibration text): the lowest are the first removed by the "
                     "'layers' unit; red bars, when shown, are the layers a structured run removed."))
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


# --------------------------------------------------------------------------- decoder LLMs
_LLM_HEADERS = ["Kind", "Method / unit", "Allocation", "Target", "Achieved sparsity", "Perplexity", "× dense",
                "Time (s)", "After recovery: perplexity (× dense, loss)", "Params", "Tokens/s (× dense)"]


def _describe_llm(llm: Mapping[str, Any]) -> str:
    dense, ev, cal = (_mapping(llm, k) for k in ("dense", "evaluation", "calibration"))
    params = f" ({fmt_int(dense['params'])} parameters)" if num(dense.get("params")) is not None else ""
    text = f"Model {llm.get('model') or '?'}{params}"
    ppl = num(dense.get("perplexity"))
    if ppl is None:
        text += "; the dense perplexity was not measured."
    else:
        where = f" on {fmt_int(ev['tokens'])} tokens" if num(ev.get("tokens")) is not None else ""
        where += f" of {ev['text']}" if ev.get("text") else ""
        where += f" (context {fmt_int(ev['context'])})" if num(ev.get("context")) is not None else ""
        text += f": dense perplexity {ppl:.2f}{where}; × dense is a run's perplexity over this one."
    if cal:
        text += (f" Calibration: {cal.get('windows', '?')} windows of {cal.get('len', '?')} tokens of "
                 f"{cal.get('text', '?')}, seed {cal.get('seed', '?')}.")
    return text


def _number(value: Any, fmt: str) -> str:
    v = num(value)
    return MISSING if v is None else format(v, fmt)


def _recovery_cell(run: Mapping[str, Any], dense_ppl: Optional[float]) -> str:
    rec = run.get("recovered")
    if not isinstance(rec, Mapping):
        return MISSING
    ratio = F.ppl_ratio(rec, dense_ppl)
    how = [f"{ratio:.2f}×"] if ratio is not None else []
    how += [str(rec.get("loss") or "?")] + ([f"{fmt_int(rec['steps'])} steps"] if num(rec.get("steps")) else [])
    return f"{_number(rec.get('perplexity'), '.2f')} ({', '.join(how)})"


def _speed_cell(run: Mapping[str, Any]) -> str:
    tps, dense = num(run.get("tokens_per_s")), num(run.get("dense_tokens_per_s"))
    if tps is None:
        return MISSING
    return f"{tps:.1f}" + (f" ({tps / dense:.2f}×)" if dense else "")


def _llm_row(run: Mapping[str, Any], llm: Mapping[str, Any]) -> List[str]:
    dense = _mapping(llm, "dense")
    dense_ppl = num(dense.get("perplexity"))
    ratio = F.ppl_ratio(run, dense_ppl)
    common = [_number(run.get("perplexity"), ".2f"), MISSING if ratio is None else f"{ratio:.2f}×",
              _number(run.get("time_s"), ",.1f"), _recovery_cell(run, dense_ppl)]
    if F.llm_kind(run) != "structured":
        return ([F.llm_kind(run), F.llm_label(run), str(run.get("allocation") or "uniform"),
                 F.llm_target(run.get("target")), fmt_pct(run.get("sparsity"), 2)] + common + [MISSING, MISSING])
    params, full = num(run.get("params")), num(run.get("dense_params")) or num(dense.get("params"))
    removed = fmt_pct(1.0 - params / full, 2) if params is not None and full else MISSING
    return (["structured", F.llm_label(run), MISSING, _number(run.get("amount"), "g"), removed] + common
            + [fmt_int(params), _speed_cell(run)])


def _dense_row(llm: Mapping[str, Any]) -> List[List[str]]:
    dense = _mapping(llm, "dense")
    if num(dense.get("perplexity")) is None and num(dense.get("params")) is None:
        return []
    ratio = "1.00×" if num(dense.get("perplexity")) is not None else MISSING
    return [["dense", MISSING, MISSING, MISSING, fmt_pct(0.0, 2), _number(dense.get("perplexity"), ".2f"), ratio,
             MISSING, MISSING, fmt_int(dense.get("params")), _number(dense.get("tokens_per_s"), ".1f")]]


def _best_sentence(llm: Mapping[str, Any]) -> str:
    """'Best at 50%: sparsegpt+refit, 1.33× dense perplexity; best at 2:4: ...' (before any recovery)."""
    dense_ppl = num(_mapping(llm, "dense").get("perplexity"))
    parts = []
    for name, want in (("50%", 0.5), ("2:4", "2:4")):
        scored = [(F.ppl_ratio(r, dense_ppl), r) for r in F.llm_runs(llm, "unstructured")
                  if (r.get("target") == want if isinstance(want, str)
                      else num(r.get("target")) is not None and abs(num(r["target"]) - want) < 1e-9)]
        scored = [(x, r) for x, r in scored if x is not None]
        if scored:
            ratio, run = min(scored, key=lambda p: p[0])
            allocation = run.get("allocation") or "uniform"
            who = F.llm_label(run) + (f" ({allocation})" if allocation != "uniform" else "")
            parts.append(f"best at {name}: {who}, {ratio:.2f}× dense perplexity")
    return ("Before any recovery, " + "; ".join(parts) + ".") if parts else ""


def llm_blocks(results: Mapping[str, Any], figures: Figures) -> List[Block]:
    """The decoder LLM section: what was measured, the best runs, a table of every run, then the figures."""
    llm = _mapping(results, "llm")
    if not llm:
        return []
    blocks: List[Block] = [("h", 2, "Decoder LLM pruning"), ("p", _describe_llm(llm))]
    runs = F.llm_runs(llm)
    if not runs:
        return blocks + [("p", "llm.json holds no runs that can be shown: nothing more to show.")]
    best = _best_sentence(llm)
    blocks += [("p", best)] if best else []
    blocks.append(table(_LLM_HEADERS, _dense_row(llm) + [_llm_row(r, llm) for r in runs]))
    removed = [f"{F.llm_label(r)} {_number(r.get('amount'), 'g')}: removed {r['removed']}"
               for r in F.llm_runs(llm, "structured") if r.get("removed")]
    blocks += [("ul", removed)] if removed else []
    blocks.append(("p", "Achieved sparsity: of the pruned weights for an unstructured run, the share of the "
                        "parameters removed for a structured one (a physically smaller model). Tokens/s: greedy "
                        "decoding at batch 1, × over the dense model timed alongside it."))
    for key in _LLM_FIGURES:
        blocks += _figure(figures, key)
    return blocks
