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
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from prunekit.errors import PrunekitError

DPI = 110
# Colour of pruned (exactly zero) weights in heatmaps: white is far from every
# colour of the viridis map, so pruned entries cannot be mistaken for small ones.
PRUNED_COLOR = "white"
DEFAULT_MAX_SIDE = 400
PERCENT_KEYS = frozenset({"accuracy", "top5", "sparsity", "target_sparsity"})
AXIS_LABELS = {
    "sparsity": "Sparsity (%)",
    "target_sparsity": "Target sparsity (%)",
    "accuracy": "Top-1 accuracy (%)",
    "top5": "Top-5 accuracy (%)",
    "loss": "Loss",
    "compression_ratio": "Compression ratio (×)",
    "theoretical_speedup": "Theoretical speedup (×)",
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
    "layer_sparsity_bars",
    "tradeoff_curve",
    "size_latency_curves",
    "history_curve",
    "sensitivity_curves",
    "lottery_curve",
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
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


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


def _legend(ax: Any, **kwargs: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


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
                       height=height * 0.92, color=_color(i), label=_label(method, i))
        if len(names) <= 30:  # value labels stay readable only for modest layer counts
            ax.bar_label(bars, fmt="%.1f%%", padding=2, fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()  # first layer at the top, like a model summary
    ax.set_xlim(0, 112)  # room for the value labels of fully pruned layers
    ax.set_xlabel("Sparsity (% of weights that are zero)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # below the plot: inside it would hide bars
        fig.legend(loc="outside lower center", ncol=min(3, len(methods)))
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
                    label=_label(method, i))


def tradeoff_curve(results: Mapping[str, Any], path: Any, x: str = "sparsity",
                   y: str = "accuracy") -> Path:
    """``y`` against ``x`` for every method's sweep, the dense model as a dashed line."""
    fig = _new_figure(8, 5)
    ax = fig.add_subplot()
    _plot_methods(ax, results, x, y)
    _dense_line(ax, results.get("dense") or {}, y, "%" if y in PERCENT_KEYS else "")
    xlabel, ylabel = AXIS_LABELS.get(x, x), AXIS_LABELS.get(y, y)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel.split(' (')[0]} vs {xlabel.split(' (')[0].lower()}")
    ax.grid(alpha=0.3)
    _legend(ax, loc="best")
    _note_if_empty(ax)
    return _save(fig, path)


def size_latency_curves(results: Mapping[str, Any], path: Any) -> Path:
    """Two panels against sparsity: compressed size (KB) and latency (ms); dense dashed."""
    fig = _new_figure(12, 4.8)
    panels = (("size_compressed_bytes", " KB", "Compressed size"),
              ("latency_ms", " ms", "Latency"))
    for ax, (key, unit, name) in zip(fig.subplots(1, 2), panels):
        _plot_methods(ax, results, "sparsity", key)
        _dense_line(ax, results.get("dense") or {}, key, unit)
        ax.set_xlabel(AXIS_LABELS["sparsity"])
        ax.set_ylabel(AXIS_LABELS[key])
        ax.set_title(f"{name} vs sparsity")
        ax.set_ylim(bottom=0)  # sizes and times start at zero; a cropped axis exaggerates gains
        ax.grid(alpha=0.3)
        _legend(ax, loc="best", fontsize=9)
        _note_if_empty(ax, "not measured")
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
                    label=labels.get(name, name))
        xs, ys = _series(steps, "step", "sparsity")
        if xs:
            ax2.plot(xs, ys, ls="--", lw=1.4, color=_color(i), alpha=0.8)
    ax.set_xlabel("Fine-tuning step")
    ax.set_ylabel(AXIS_LABELS["accuracy"])
    ax2.set_ylabel("Sparsity (%, dashed)")
    ax2.set_ylim(0, 100)
    ax.set_title("Accuracy and sparsity during fine-tuning")
    ax.grid(alpha=0.3)
    style = [Line2D([], [], color="0.2", label="accuracy (left)"),
             Line2D([], [], color="0.2", ls="--", label="sparsity (right)")]
    handles = ax.get_legend_handles_labels()[0] + style
    ax.legend(handles=handles, loc="lower left", fontsize=9)
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
    _legend(ax, loc="best", fontsize=7)
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
    ax.set_xlabel(AXIS_LABELS["sparsity"])
    ax.set_ylabel(AXIS_LABELS["accuracy"])
    meta = lottery.get("meta") if isinstance(lottery.get("meta"), Mapping) else {}
    what = " on ".join(str(meta[k]) for k in ("model", "data") if meta.get(k) is not None)
    ax.set_title(title or "Lottery ticket vs random re-init" + (f": {what}" if what else ""))
    ax.grid(alpha=0.3)
    _legend(ax, loc="best")
    _note_if_empty(ax)
    return _save(fig, path)
