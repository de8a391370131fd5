"""Matplotlib figures for the pruning report.

Every public plotting function draws one figure, writes it as a PNG and returns
its path. They build ``matplotlib.figure.Figure`` objects directly (rendered by
the Agg canvas) instead of going through pyplot, so they touch no global state
and need no display: safe in library code, tests, threads and headless CI.

Metric values that are missing, ``None``, NaN or infinite are skipped, never
plotted as zeros, so a run without (say) latency measurements still plots.
Fractions (accuracy, sparsity) are drawn in percent, byte sizes in KB.
"""
from __future__ import annotations

import math
import numbers
import re
import textwrap
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, MaxNLocator

from prunekit.errors import PrunekitError

DPI = 110
# Colour of pruned (exactly zero) weights in heatmaps: white is far from every
# colour of the viridis map, so pruned entries cannot be mistaken for small ones.
PRUNED_COLOR = "white"
DEFAULT_MAX_SIDE = 400
GRID_MAX_SIDE = 240  # heatmap panels of a per-layer grid are ~300 px: one displayed cell per pixel or more
LABEL_WIDTH = 38     # legend labels wrap at this many characters, so a legend never outgrows its figure
PERCENT_KEYS = frozenset({"accuracy", "top5", "sparsity", "pruned_sparsity", "target_sparsity"})
AXIS_LABELS = {
    "sparsity": "Sparsity, whole model (%)",
    "pruned_sparsity": "Sparsity, pruned layers (%)",
    "target_sparsity": "Target sparsity (%)",
    "accuracy": "Top-1 accuracy (%)",
    "top5": "Top-5 accuracy (%)",
    "loss": "Loss",
    "compression_ratio": "Compression ratio (×)",
    "theoretical_speedup": "MACs ÷ (dense / effective) (×)",
    "latency_ms": "Latency (ms)",
    "size_bytes": "Size (KB)",
    "size_compressed_bytes": "Compressed size (KB)",
    "nonzeros": "Nonzero parameters",
    "macs_effective": "Effective MACs",
}

__all__ = [
    "heatmap_matrix",
    "weight_sparsity",
    "method_points",
    "weight_heatmap",
    "weight_heatmaps",
    "layer_sparsity_bars",
    "tradeoff_curve",
    "size_latency_curves",
    "history_curve",
    "sensitivity_curves",
    "lottery_curve",
    "block_index",
    "llm_kind",
    "llm_runs",
    "llm_label",
    "llm_target",
    "achieved_sparsity",
    "ppl_ratio",
    "perplexity_curves",
    "block_sparsity_plot",
    "block_influence_plot",
]


# --------------------------------------------------------------------------- helpers
def num(value: Any) -> Optional[float]:
    """A finite real number as float, else None (bools are flags, not metrics)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _scaled(value: Any, key: str) -> Optional[float]:
    """Metric value in the unit it is plotted in (percent, KB, or as is)."""
    value = num(value)
    if value is None:
        return None
    if key in PERCENT_KEYS:
        return 100.0 * value
    if key.endswith("_bytes"):
        return value / 1024.0
    return value


def _color(index: int) -> Any:
    # One colour per method index, so a method keeps its colour in every figure.
    return colormaps["tab10"](index % 10)


def _marker(index: int) -> str:
    # Markers as well as colours: methods with equal results would otherwise hide each other.
    return "osD^vPX*"[index % 8]


def _label(method: Mapping[str, Any], index: int) -> str:
    return str(method.get("label") or method.get("name") or f"method {index + 1}")


def _wrap(text: str, width: int = LABEL_WIDTH) -> str:
    return "\n".join(textwrap.wrap(str(text), width)) or str(text)


def method_points(method: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    """The sweep points of a method; a method with only a ``final`` point gives [final]."""
    points = [p for p in (method.get("points") or []) if isinstance(p, Mapping)]
    final = method.get("final")
    if not points and isinstance(final, Mapping):
        points = [final]
    return points


def _series(points: Iterable[Mapping[str, Any]], x: str, y: str) -> Tuple[List[float], List[float]]:
    """(xs, ys) of the points that have both values, sorted by x so lines do not zigzag."""
    pairs = sorted(
        (a, b)
        for a, b in ((_scaled(p.get(x), x), _scaled(p.get(y), y)) for p in points)
        if a is not None and b is not None
    )
    return [a for a, _ in pairs], [b for _, b in pairs]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # a renderer to measure legends with before saving
    return fig


def _outside_legend(fig: Figure, handles: Sequence[Any], fontsize: float = 9, **kwargs: Any) -> Any:
    """One legend right of every axes, never over the data; the figure widens by the legend's width, so the
    axes keep the size they were given and the legend stays inside the saved canvas."""
    if not handles:
        return None
    legend = fig.legend(handles=list(handles), loc="outside right upper", fontsize=fontsize, framealpha=0.95,
                        **kwargs)
    extra = legend.get_window_extent(fig.canvas.get_renderer()).width / fig.dpi + 0.2
    width, height = fig.get_size_inches()
    fig.set_size_inches(width + extra, height)
    return legend


def _save(fig: Figure, path: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    fig.clear()  # frees the artists now; a Figure without pyplot has no other "close"
    return path


def _note_if_empty(ax: Any, text: str = "no data") -> None:
    """Say so on empty axes instead of leaving a blank frame the reader must puzzle over."""
    if not ax.lines and not ax.patches and not ax.images:
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


# --------------------------------------------------------------------------- heatmaps
def _to_numpy(weights: Any) -> np.ndarray:
    if hasattr(weights, "detach"):  # torch tensor, without importing torch here
        weights = weights.detach().cpu().float().numpy()
    return np.asarray(weights, dtype=np.float64)


def _as_matrix(weights: Any) -> np.ndarray:
    """|W| as a 2-D matrix: conv weights (out, in, k, k) become out × in·k·k."""
    w = np.abs(_to_numpy(weights))
    if w.ndim == 0:
        return w.reshape(1, 1)
    if w.ndim == 1:
        return w.reshape(1, -1)
    return w.reshape(w.shape[0], -1)


def weight_sparsity(weights: Any) -> float:
    """Fraction of entries that are exactly zero (0.0 for an empty array)."""
    w = _to_numpy(weights)
    return float(np.mean(w == 0)) if w.size else 0.0


def heatmap_matrix(weights: Any, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """|W| as a 2-D matrix, block-max-pooled so that no side exceeds ``max_side``.

    Max pooling (not averaging or striding) keeps the pruning pattern honest: a
    displayed cell is zero exactly when its whole block of weights was pruned, and
    any surviving weight keeps its block visible. NaNs count as zero.
    """
    if max_side < 1:
        raise PrunekitError(f"max_side must be >= 1, got {max_side}")
    m = np.nan_to_num(_as_matrix(weights), nan=0.0)
    rows, cols = m.shape
    fr, fc = max(1, math.ceil(rows / max_side)), max(1, math.ceil(cols / max_side))
    if fr == 1 and fc == 1:
        return m
    # Zero padding cannot change a block max of |W| >= 0, and ceil-division
    # guarantees every block keeps at least one real entry.
    padded = np.zeros((math.ceil(rows / fr) * fr, math.ceil(cols / fc) * fc))
    padded[:rows, :cols] = m
    return padded.reshape(padded.shape[0] // fr, fr, padded.shape[1] // fc, fc).max(axis=(1, 3))


def weight_heatmap(before: Any, after: Any, path: Any, title: str = "", *,
                   max_side: int = DEFAULT_MAX_SIDE) -> Path:
    """Side-by-side |W| before / after pruning; pruned entries drawn in ``PRUNED_COLOR``."""
    shown = [heatmap_matrix(w, max_side) for w in (before, after)]
    nonzero = np.concatenate([s[s > 0] for s in shown])
    # Shared scale so the two panels compare; the 99.5th percentile keeps one
    # outlier weight from washing every other cell out to the bottom colour.
    vmax = float(np.percentile(nonzero, 99.5)) if nonzero.size else 1.0
    cmap = colormaps["viridis"].with_extremes(bad=PRUNED_COLOR)
    fig = _new_figure(11, 4.8)
    axes = fig.subplots(1, 2)
    for ax, name, raw, mat in zip(axes, ("before", "after"), (before, after), shown):
        rows, cols = _as_matrix(raw).shape
        # extent keeps the ticks in original row/column indices even when pooled.
        image = ax.imshow(np.ma.masked_equal(mat, 0.0), cmap=cmap, vmin=0.0, vmax=vmax,
                          aspect="auto", interpolation="nearest",
                          extent=(-0.5, cols - 0.5, rows - 0.5, -0.5))
        ax.set_title(f"{name}: {rows}×{cols}, sparsity {100 * weight_sparsity(raw):.1f}%")
        ax.set_xlabel("input (in·k·k)")
        ax.set_ylabel("output")
        ax.set_facecolor(PRUNED_COLOR)
    fig.colorbar(image, ax=list(axes), label="|W|", extend="max", shrink=0.9)
    axes[1].legend(handles=[Patch(facecolor=PRUNED_COLOR, edgecolor="0.3", label="pruned (0)")],
                   loc="upper right", framealpha=0.9)
    pooled = any(s.shape != _as_matrix(w).shape for s, w in zip(shown, (before, after)))
    fig.suptitle((title or "Weights") + (" (block max-pooled for display)" if pooled else ""))
    return _save(fig, path)


def weight_heatmaps(before: Any, afters: Sequence[Tuple[str, Any]], path: Any, title: str = "", *,
                    max_side: int = GRID_MAX_SIDE, ncols: int = 3) -> Path:
    """|W| of one layer before pruning, drawn once, and after each method (``afters``: (label, weights)),
    in a grid on one colour scale; pruned entries drawn in ``PRUNED_COLOR``."""
    panels = [("before pruning (dense)", before)] + [(str(k), w) for k, w in afters]
    shown = [heatmap_matrix(w, max_side) for _, w in panels]
    nonzero = np.concatenate([m[m > 0] for m in shown])
    vmax = float(np.percentile(nonzero, 99.5)) if nonzero.size else 1.0
    cmap = colormaps["viridis"].with_extremes(bad=PRUNED_COLOR)
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = _new_figure(3.7 * ncols + 0.9, 3.25 * nrows + 0.5)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    rows, cols = _as_matrix(before).shape
    for k, (ax, (name, raw), mat) in enumerate(zip(axes, panels, shown)):
        image = ax.imshow(np.ma.masked_equal(mat, 0.0), cmap=cmap, vmin=0.0, vmax=vmax, aspect="auto",
                          interpolation="nearest", extent=(-0.5, cols - 0.5, rows - 0.5, -0.5))
        ax.set_title(_wrap(name, 44) + f"\nsparsity {100 * weight_sparsity(raw):.1f}%", fontsize=8.5)
        ax.set_facecolor(PRUNED_COLOR)
        ax.tick_params(labelsize=7)
        if k % ncols == 0:
            ax.set_ylabel("output", fontsize=8)
        if k >= len(panels) - ncols:
            ax.set_xlabel("input (in·k·k)", fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=list(axes), label="|W| (shared scale)", extend="max", shrink=0.6)
    pooled = shown[0].shape != (rows, cols)
    fig.suptitle(f"{title or 'Weights'}: {rows}×{cols}" + ("; block max-pooled for display" if pooled else "")
                 + "; white = pruned (0)")
    return _save(fig, path)


# --------------------------------------------------------------------------- bars and curves
def _layer_names(methods: Sequence[Mapping[str, Any]]) -> List[str]:
    """Union of layer names across methods, in order of first appearance (model order)."""
    names: List[str] = []
    for method in methods:
        for layer in method.get("layers") or []:
            name = str(layer.get("name"))
            if name not in names:
                names.append(name)
    return names


def layer_sparsity_bars(methods: Sequence[Mapping[str, Any]], path: Any,
                        title: str = "Per-layer sparsity") -> Path:
    """Grouped horizontal bars: one group per layer, one bar per method, in percent."""
    names = _layer_names(methods)
    height = 0.8 / max(1, len(methods))
    fig = _new_figure(9, 1.6 + len(names) * max(0.45, 0.22 * len(methods)))
    ax = fig.add_subplot()
    for i, method in enumerate(methods):
        by_name = {str(l.get("name")): _scaled(l.get("sparsity"), "sparsity")
                   for l in method.get("layers") or []}
        rows = [(j, by_name[n]) for j, n in enumerate(names) if by_name.get(n) is not None]
        if not rows:
            continue
        bars = ax.barh([j - 0.4 + height * (i + 0.5) for j, _ in rows], [v for _, v in rows],
                       height=height * 0.92, color=_color(i), label=_wrap(_label(method, i)))
        if len(names) <= 30:  # value labels stay readable only for modest layer counts
            ax.bar_label(bars, fmt="%.1f%%", padding=2, fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()  # first layer at the top, like a model summary
    ax.set_xlim(0, 112)  # room for the value labels of fully pruned layers
    ax.set_xlabel("Sparsity of the layer (% of its dense weights that are zero or removed)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    _outside_legend(fig, ax.get_legend_handles_labels()[0], fontsize=8)  # inside it would hide bars
    _note_if_empty(ax)
    return _save(fig, path)


def _dense_line(ax: Any, dense: Mapping[str, Any], key: str, unit: str) -> None:
    value = _scaled(dense.get(key), key)
    if value is not None:
        # Significant digits, not fixed decimals: sub-millisecond latencies must not round to 0.
        text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
        ax.axhline(value, ls="--", color="0.25", lw=1.3, label=f"dense ({text}{unit})")


def _plot_methods(ax: Any, results: Mapping[str, Any], x: str, y: str) -> None:
    for i, method in enumerate(results.get("methods") or []):
        xs, ys = _series(method_points(method), x, y)
        if xs:
            ax.plot(xs, ys, marker=_marker(i), ms=6, lw=1.8, color=_color(i),
                    label=_wrap(_label(method, i)))
        if "latency_ms" in (x, y):
            _latency_bars(ax, method_points(method), x, y, _color(i))


def latency_interval(point: Mapping[str, Any]) -> Optional[Tuple[float, float]]:
    """(first, third) quartile of a point's latency samples in ms, when they were recorded."""
    q1, q3 = num(point.get("latency_q1_ms")), num(point.get("latency_q3_ms"))
    return (q1, q3) if q1 is not None and q3 is not None else None


def _latency_bars(ax: Any, points: Sequence[Mapping[str, Any]], x: str, y: str, color: Any) -> None:
    """The interquartile range of each latency as an error bar: medians inside each other's bars are noise."""
    for p in points:
        iqr, mx, my = latency_interval(p), _scaled(p.get(x), x), _scaled(p.get(y), y)
        if iqr is None or mx is None or my is None:
            continue
        if y == "latency_ms":
            ax.errorbar([mx], [my], yerr=[[max(0.0, my - iqr[0])], [max(0.0, iqr[1] - my)]], fmt="none",
                        ecolor=color, elinewidth=1.2, capsize=3, alpha=0.8)
        else:
            ax.errorbar([mx], [my], xerr=[[max(0.0, mx - iqr[0])], [max(0.0, iqr[1] - mx)]], fmt="none",
                        ecolor=color, elinewidth=1.2, capsize=3, alpha=0.8)


PAIRED_LATENCY = "Latency (ms): dense median ÷ measured speedup"


def _dense_clock(results: Mapping[str, Any]) -> Tuple[Mapping[str, Any], bool]:
    """``results`` with the latency of every point timed against dense in alternation (``speedup_measured``)
    put on the dense model's clock: dense median / speedup, its quartiles likewise. Models timed one after
    another drift with a busy machine's load by more than their own spread; the paired ratio does not."""
    dense = num((results.get("dense") or {}).get("latency_ms"))
    if dense is None:
        return results, False
    changed, methods = False, []
    for method in results.get("methods") or []:
        points = []
        for p in method_points(method):
            s, q1, q3 = (num(p.get(k)) for k in ("speedup_measured", "speedup_q1", "speedup_q3"))
            if s and q1 and q3:
                p = {**p, "latency_ms": dense / s, "latency_q1_ms": dense / q3, "latency_q3_ms": dense / q1}
                changed = True
            points.append(p)
        methods.append({**method, "points": points})
    return {**results, "methods": methods}, changed


def _dense_band(ax: Any, dense: Mapping[str, Any], vertical: bool) -> None:
    iqr = latency_interval(dense)
    if iqr is not None:
        span = ax.axvspan if vertical else ax.axhspan
        span(iqr[0], iqr[1], color="0.5", alpha=0.18, lw=0, label="dense: interquartile range")


def _handles(*axes: Any) -> List[Any]:
    """Legend handles of several axes, each label once."""
    seen, out = set(), []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in seen:
                seen.add(label)
                out.append(handle)
    return out


def tradeoff_curve(results: Mapping[str, Any], path: Any, x: str = "sparsity",
                   y: str = "accuracy") -> Path:
    """``y`` against ``x`` for every method's sweep, the dense model as a dashed line; latencies timed against
    dense in alternation are drawn on the dense model's clock (see :func:`_dense_clock`)."""
    fig = _new_figure(8, 5)
    ax = fig.add_subplot()
    paired = False
    if "latency_ms" in (x, y):
        results, paired = _dense_clock(results)
    _plot_methods(ax, results, x, y)
    dense = results.get("dense") or {}
    _dense_line(ax, dense, y, "%" if y in PERCENT_KEYS else "")
    if "latency_ms" in (x, y):
        _dense_band(ax, dense, vertical=x == "latency_ms")
    labels = {**AXIS_LABELS, "latency_ms": PAIRED_LATENCY} if paired else AXIS_LABELS
    xlabel, ylabel = labels.get(x, x), labels.get(y, y)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel.split(' (')[0]} vs {xlabel.split(' (')[0].lower()}")
    ax.grid(alpha=0.3)
    _outside_legend(fig, _handles(ax))
    _note_if_empty(ax)
    return _save(fig, path)


def size_latency_curves(results: Mapping[str, Any], path: Any) -> Path:
    """Two panels against sparsity: compressed size (KB) and latency (ms, medians with their interquartile
    range); dense dashed; one legend for both, right of them."""
    fig = _new_figure(12, 4.8)
    panels = (("size_compressed_bytes", " KB", "Compressed size"),
              ("latency_ms", " ms", "Latency (median, IQR bars)"))
    axes = fig.subplots(1, 2)
    dense = results.get("dense") or {}
    clocked, paired = _dense_clock(results)
    for ax, (key, unit, name) in zip(axes, panels):
        _plot_methods(ax, clocked if key == "latency_ms" else results, "sparsity", key)
        _dense_line(ax, dense, key, unit)
        if key == "latency_ms":
            _dense_band(ax, dense, vertical=False)
        ax.set_xlabel(AXIS_LABELS["sparsity"])
        ax.set_ylabel(PAIRED_LATENCY if paired and key == "latency_ms" else AXIS_LABELS[key])
        ax.set_title(f"{name} vs sparsity")
        ax.set_ylim(bottom=0)  # sizes and times start at zero; a cropped axis exaggerates gains
        ax.grid(alpha=0.3)
        _note_if_empty(ax, "not measured")
    _outside_legend(fig, _handles(*axes))
    return _save(fig, path)


def history_curve(history: Mapping[str, Sequence[Mapping[str, Any]]], path: Any,
                  labels: Optional[Mapping[str, str]] = None) -> Path:
    """Accuracy (solid, left axis) and sparsity (dashed, right axis) per fine-tuning step.

    ``labels`` maps method names to display labels; its order fixes the colours so
    they match the other figures (methods absent from it come after).
    """
    labels = dict(labels or {})
    order = list(labels) + [name for name in history if name not in labels]
    fig = _new_figure(9, 5)
    ax = fig.add_subplot()
    ax2 = ax.twinx()
    for i, name in enumerate(order):
        entries = [e for e in history.get(name) or [] if isinstance(e, Mapping)]
        steps = [{**e, "step": e.get("step", k)} for k, e in enumerate(entries)]
        xs, ys = _series(steps, "step", "accuracy")
        if xs:
            ax.plot(xs, ys, marker=_marker(i), ms=4, lw=1.8, color=_color(i),
                    label=_wrap(labels.get(name, name)))
        xs, ys = _series(steps, "step", "sparsity")
        if xs:
            ax2.plot(xs, ys, ls="--", lw=1.4, color=_color(i), alpha=0.8)
    ax.set_xlabel("Fine-tuning step")
    ax.set_ylabel(AXIS_LABELS["accuracy"])
    ax2.set_ylabel("Sparsity, pruned layers (%, dashed)")
    ax2.set_ylim(0, 100)
    ax.set_title("Accuracy and sparsity during fine-tuning")
    ax.grid(alpha=0.3)
    style = [Line2D([], [], color="0.2", label="accuracy (left)"),
             Line2D([], [], color="0.2", ls="--", label="sparsity, pruned layers (right)")]
    handles = ax.get_legend_handles_labels()[0] + style
    _outside_legend(fig, handles)
    _note_if_empty(ax)
    return _save(fig, path)


# --------------------------------------------------------------------------- sensitivity and lottery tickets
def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Linear interpolation on sorted xs, clamped at the ends (where an allocation sits on a curve)."""
    return float(np.interp(x, xs, ys))


def sensitivity_curves(sens: Mapping[str, Any], path: Any,
                       allocation: Optional[Mapping[str, Any]] = None) -> Path:
    """One curve per layer, the metric vs the sparsity of that layer pruned alone.

    ``sens`` is the dict of ``sensitivity.json`` (``SensitivityResult.to_json``);
    ``allocation`` maps layer -> allocated sparsity: each is marked on its curve
    (a star, and a dotted vertical line in the layer's colour).
    """
    metric = str(sens.get("metric") or "accuracy")
    key = metric if metric in PERCENT_KEYS else "value"
    baseline = num(sens.get("baseline"))
    grid = [num(s) for s in sens.get("sparsities") or []]
    base = sens.get("base_sparsity") or {}
    alloc = {str(k): num(v) for k, v in (allocation or {}).items()}
    fig = _new_figure(8, 5)
    ax = fig.add_subplot()
    for i, (name, values) in enumerate((sens.get("curves") or {}).items()):
        own = num(base.get(name)) or 0.0
        # each curve starts at the layer's own sparsity with the baseline: that point is measured too
        pts = [{"sparsity": own, key: baseline}] + [
            {"sparsity": s, key: num(v)} for s, v in zip(grid, values or []) if s is not None and s > own]
        xs, ys = _series(pts, "sparsity", key)
        if not xs:
            continue
        ax.plot(xs, ys, marker=_marker(i), ms=4, lw=1.6, color=_color(i), label=str(name))
        a = alloc.get(str(name))
        if a is not None:
            ax.axvline(100.0 * a, color=_color(i), ls=":", lw=1)
            ax.plot([100.0 * a], [_interp(xs, ys, 100.0 * a)], marker="*", ms=13, color=_color(i),
                    markeredgecolor="0.15", ls="none")
    if baseline is not None:
        shown = _scaled(baseline, key)
        ax.axhline(shown, ls="--", color="0.25", lw=1.3,
                   label=f"no layer pruned ({shown:.4g}{'%' if key in PERCENT_KEYS else ''})")
    ax.set_xlabel("Sparsity of the one layer pruned (%)")
    ax.set_ylabel(AXIS_LABELS.get(metric, metric))
    ax.set_title(f"Sensitivity per layer ({sens.get('meta', {}).get('criterion', '?')}, "
                 f"{sens.get('meta', {}).get('pattern', '?')})" + ("; ★ allocated sparsity" if alloc else ""))
    ax.grid(alpha=0.3)
    _outside_legend(fig, _handles(ax), fontsize=7)
    _note_if_empty(ax)
    return _save(fig, path)


def lottery_curve(lottery: Mapping[str, Any], path: Any, title: str = "") -> Path:
    """Accuracy vs sparsity of the ticket and of the random re-init control; round 0 (dense) dashed.

    ``lottery`` is the dict of ``lottery.json`` (``LotteryRecord.to_dict``).
    """
    rounds = [r for r in lottery.get("rounds") or [] if isinstance(r, Mapping)]
    fig = _new_figure(8, 5)
    ax = fig.add_subplot()
    for i, (key, label) in enumerate((("accuracy", "lottery ticket (rewound)"),
                                      ("reinit_accuracy", "random re-init (same masks)"))):
        xs, ys = _series([{"sparsity": r.get("sparsity"), "accuracy": r.get(key)} for r in rounds[1:]],
                         "sparsity", "accuracy")
        if xs:
            ax.plot(xs, ys, marker=_marker(i), ms=6, lw=1.8, color=_color(i), label=label)
    dense = _scaled(rounds[0].get("accuracy"), "accuracy") if rounds else None
    if dense is not None:
        ax.axhline(dense, ls="--", color="0.25", lw=1.3, label=f"round 0: dense ({dense:.4g}%)")
    ax.set_xlabel(AXIS_LABELS["pruned_sparsity"])
    ax.set_ylabel(AXIS_LABELS["accuracy"])
    meta = lottery.get("meta") if isinstance(lottery.get("meta"), Mapping) else {}
    what = " on ".join(str(meta[k]) for k in ("model", "data") if meta.get(k) is not None)
    ax.set_title(title or "Lottery ticket vs random re-init" + (f": {what}" if what else ""))
    ax.grid(alpha=0.3)
    _outside_legend(fig, _handles(ax))
    _note_if_empty(ax)
    return _save(fig, path)


# --------------------------------------------------------------------------- decoder LLMs (llm.json)
# "model.layers.12.mlp.up_proj" (Llama, Mistral, Qwen), "model.decoder.layers.3..." (OPT), "layers_5_..." (names
# flattened with "_"), "transformer.h.3.attn.c_attn" (GPT-2); (?!\d) keeps "layers.1" from matching "layers.12"
_BLOCK_INDEX = re.compile(r"(?:layers[._]|(?:^|\.)h\.)(\d+)(?!\d)")
_ALLOCATION_MARKERS = "osD^vPX"   # one per allocation; "*" is kept for N:M runs
REMOVED_COLOR = "tab:red"


def block_index(name: Any) -> Optional[int]:
    """The decoder block a tensor belongs to, parsed from its name (None for a tensor outside the blocks, such
    as the embeddings): "model.layers.12.mlp.up_proj" -> 12, "transformer.h.3.attn.c_attn" -> 3."""
    match = _BLOCK_INDEX.search(str(name))
    return int(match.group(1)) if match else None


def llm_kind(run: Mapping[str, Any]) -> str:
    """"unstructured" or "structured" (a run without a kind is structured when it names a unit)."""
    return str(run.get("kind") or ("structured" if run.get("unit") else "unstructured"))


def llm_runs(llm: Mapping[str, Any], kind: Optional[str] = None) -> List[Mapping[str, Any]]:
    """The runs of an llm.json dict, all or those of one ``kind`` (see :func:`llm_kind`)."""
    runs = [r for r in llm.get("runs") or [] if isinstance(r, Mapping)]
    return [r for r in runs if kind is None or llm_kind(r) == kind]


def llm_label(run: Mapping[str, Any]) -> str:
    """'wanda', 'sparsegpt+refit'; a structured run by its unit ('layers')."""
    if run.get("unit") is not None and run.get("method") is None:
        return str(run["unit"])
    return str(run.get("method") or "?") + ("+refit" if run.get("refit") else "")


def llm_target(target: Any) -> str:
    """A run's target as shown: 0.5 -> '50%', '2:4' as is."""
    value = num(target)
    if value is not None:
        return f"{100 * value:g}%"
    return str(target) if target is not None else "?"


def _nm_fraction(target: Any) -> Optional[float]:
    """The sparsity an N:M target means: '2:4' -> 0.5."""
    n, _, m = str(target).partition(":")
    return 1.0 - int(n) / int(m) if n.isdigit() and m.isdigit() and int(m) > 0 else None


def achieved_sparsity(run: Mapping[str, Any]) -> Optional[float]:
    """The run's measured sparsity, else the one its target asks for (a fraction)."""
    for value in (num(run.get("sparsity")), num(run.get("target")), _nm_fraction(run.get("target"))):
        if value is not None:
            return value
    return None


def ppl_ratio(entry: Mapping[str, Any], dense_ppl: Optional[float]) -> Optional[float]:
    """Perplexity ÷ the dense model's: the recorded ``ppl_ratio``, else computed from ``perplexity``."""
    ratio, ppl = num(entry.get("ppl_ratio")), num(entry.get("perplexity"))
    if ratio is None and ppl is not None and dense_ppl:
        ratio = ppl / dense_ppl
    return ratio


def _dense_ppl(llm: Mapping[str, Any]) -> Optional[float]:
    dense = llm.get("dense")
    return num(dense.get("perplexity")) if isinstance(dense, Mapping) else None


def _recovered_point(ax: Any, run: Mapping[str, Any], xy: Tuple[float, float], style: Dict[str, Any],
                     series: str, dense_ppl: Optional[float]) -> None:
    """The run after recovery: a hollow marker of its series, a dotted line down from the pruned point."""
    rec = run.get("recovered")
    y = ppl_ratio(rec, dense_ppl) if isinstance(rec, Mapping) else None
    if y is None or y <= 0:
        return
    ax.plot([xy[0], xy[0]], [xy[1], y], ls=":", lw=1, color=style["color"])
    ax.plot([xy[0]], [y], ls="none", markerfacecolor="none", markeredgewidth=1.6, **style,
            label=_wrap(f"{series}: after recovery ({rec.get('loss') or '?'})"))


def _ratio_ticks(ax: Any) -> None:
    """Label a log axis of ratios at 1, 2, 5, 10, ... ("2×"): decades alone leave most runs unreadable."""
    def label(value: float, _: Any) -> str:
        lead = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
        return f"{value:g}×" if lead in (1, 2, 5) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(label))
    ax.yaxis.set_minor_formatter(FuncFormatter(label))


def perplexity_curves(llm: Mapping[str, Any], path: Any) -> Path:
    """Perplexity ÷ dense vs achieved sparsity (log scale) of the unstructured runs of an llm.json dict.

    One line per method (+refit, one colour each) and allocation (one marker each) over the runs with a
    sparsity target; an N:M run is a star of its method's colour ("wanda 2:4"); a run after recovery is a
    hollow marker of its series ("after recovery (kl)"); the dense model is the dashed line at 1.
    """
    dense_ppl = _dense_ppl(llm)
    # (method, allocation or N:M pattern, is N:M) -> points; a float target joins its method's line
    points: Dict[Tuple[str, str, bool], List[Tuple[float, float, Mapping[str, Any]]]] = {}
    for run in llm_runs(llm, "unstructured"):
        x, y = achieved_sparsity(run), ppl_ratio(run, dense_ppl)
        if x is not None and y is not None and y > 0:
            nm = isinstance(run.get("target"), str)
            group = str(run["target"]) if nm else str(run.get("allocation") or "uniform")
            points.setdefault((llm_label(run), group, nm), []).append((100.0 * x, y, run))
    methods = list(dict.fromkeys(k[0] for k in points))
    allocations = list(dict.fromkeys(k[1] for k in points if not k[2]))
    fig = _new_figure(8, 5)
    ax = fig.add_subplot()
    for (method, group, nm), pts in points.items():
        pts.sort(key=lambda p: p[0])
        series = f"{method} {group}" if nm else f"{method} ({group})"
        style = dict(color=_color(methods.index(method)), ms=12 if nm else 6,
                     marker="*" if nm else _ALLOCATION_MARKERS[allocations.index(group) % len(_ALLOCATION_MARKERS)])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0 if nm else 1.8,
                ls="-" if group == "uniform" else "--", label=_wrap(series), **style)
        for x, y, run in pts:
            _recovered_point(ax, run, (x, y), style, series, dense_ppl)
    dense = f" (perplexity {dense_ppl:.4g})" if dense_ppl is not None else ""
    ax.axhline(1.0, ls="--", color="0.25", lw=1.3, label=f"dense{dense}")
    ax.set_yscale("log")
    _ratio_ticks(ax)
    ax.set_xlabel("Achieved sparsity of the pruned weights (%)")
    ax.set_ylabel("Perplexity ÷ dense (log scale)")
    ax.set_title(f"Perplexity vs sparsity{': ' + str(llm['model']) if llm.get('model') else ''}")
    ax.grid(alpha=0.3, which="both")
    _outside_legend(fig, _handles(ax), fontsize=8)
    return _save(fig, path)


def _block_means(layer_sparsity: Mapping[str, Any]) -> Dict[int, float]:
    """Mean sparsity of each decoder block's tensors (unweighted: it shows how an allocation spreads)."""
    blocks: Dict[int, List[float]] = {}
    for name, value in layer_sparsity.items():
        index, v = block_index(name), num(value)
        if index is not None and v is not None:
            blocks.setdefault(index, []).append(v)
    return {i: sum(vs) / len(vs) for i, vs in sorted(blocks.items())}


def block_sparsity_plot(llm: Mapping[str, Any], path: Any) -> Optional[Path]:
    """Mean sparsity per decoder block of each run whose tensors were pruned unevenly (OWL, a sensitivity
    allocation, ...); runs with one sparsity everywhere are left out, and None (no figure) when none remain."""
    shown = []
    for run in llm_runs(llm):
        spars = run.get("layer_sparsity")
        values = [v for v in map(num, spars.values()) if v is not None] if isinstance(spars, Mapping) else []
        means = _block_means(spars) if values and max(values) - min(values) > 1e-9 else {}
        if means:
            shown.append((run, means))
    if not shown:
        return None
    fig = _new_figure(8, 4.5)
    ax = fig.add_subplot()
    for i, (run, means) in enumerate(shown):
        label = f"{llm_label(run)}, {run.get('allocation') or 'uniform'}, target {llm_target(run.get('target'))}"
        ax.plot(list(means), [100.0 * v for v in means.values()], marker=_marker(i), ms=5, lw=1.6,
                color=_color(i), label=_wrap(label))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Decoder block")
    ax.set_ylabel("Mean sparsity of the block's tensors (%)")
    ax.set_title("Sparsity per decoder block (non-uniform allocations)")
    ax.grid(alpha=0.3)
    _outside_legend(fig, _handles(ax), fontsize=8)
    return _save(fig, path)


def block_influence_plot(llm: Mapping[str, Any], path: Any) -> Path:
    """Block influence (ShortGPT: 1 − cos of a block's input and output) per decoder layer, as bars; the layers
    removed by the structured "layers" run that removed the most (its ``removed_layers``) are highlighted."""
    values = [num(v) for v in llm.get("block_influence") or []]
    layer_runs = [r for r in llm_runs(llm, "structured")
                  if r.get("unit") == "layers" and isinstance(r.get("removed_layers"), list)]
    widest = max(layer_runs, key=lambda r: len(r["removed_layers"]), default=None)
    removed = {i for i in widest["removed_layers"] if isinstance(i, int)} if widest else set()
    shown = [i for i, v in enumerate(values) if v is not None]
    fig = _new_figure(max(7.0, 2.5 + 0.28 * len(values)), 4.5)
    ax = fig.add_subplot()
    ax.bar(shown, [values[i] for i in shown], width=0.8,
           color=[REMOVED_COLOR if i in removed else _color(0) for i in shown])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("Decoder layer")
    ax.set_ylabel("Block influence (1 − cos)")
    ax.set_title("Block influence per layer: low = the layer changes its input little")
    ax.grid(axis="y", alpha=0.3)
    if removed & set(shown):
        _outside_legend(fig, [Patch(facecolor=_color(0), label="kept"),
                              Patch(facecolor=REMOVED_COLOR, label=_wrap(
                                  f"removed by the structured 'layers' run ({len(removed)} of {len(values)})"))],
                        fontsize=8)
    _note_if_empty(ax)
    return _save(fig, path)
