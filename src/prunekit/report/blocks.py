"""The building blocks of the HTML report: cell formatting and table blocks, shared by every section."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Mapping, Sequence, Tuple

from prunekit.report.figures import latency_interval, num

MISSING = "—"
NOISE_MARK = "≈"   # a measured difference inside the timing noise
NOISE_TIE = 0.05   # medians this close are a tie, as advise's LATENCY_TIE
NBSP = "\u00a0"
DASH = "\u2060–\u2060"  # an en dash no line breaks at: "[0.041–0.043]" stays on one line of a narrow cell


# A "block" is a renderer-neutral piece of the document; Markdown and HTML are two
# views of the same block list, so the two reports can never disagree on content.
Block = Tuple[Any, ...]


Figures = List[Tuple[str, Path, str]]  # (key, path, caption)


# --------------------------------------------------------------------------- formatting
def fmt_pct(value: Any, digits: int = 2) -> str:
    """0.9812 -> '98.12%'."""
    v = num(value)
    return MISSING if v is None else f"{100 * v:.{digits}f}%"


def fmt_pp(delta: Any) -> str:
    """Difference of two fractions in percentage points: -0.011 -> '-1.10 pp'."""
    v = num(delta)
    return MISSING if v is None else f"{100 * v:+.2f} pp"


def fmt_int(value: Any) -> str:
    """266610 -> '266,610'."""
    v = num(value)
    return MISSING if v is None else f"{round(v):,}"


def fmt_ratio(value: Any) -> str:
    """12.34 -> '12.3×'."""
    v = num(value)
    return MISSING if v is None else f"{v:,.1f}×"


def fmt_kb(nbytes: Any) -> str:
    """1067300 -> '1,042.3 KB'."""
    v = num(nbytes)
    return MISSING if v is None else f"{v / 1024:,.1f} KB"


def fmt_ms(value: Any) -> str:
    """Latency with enough digits for sub-millisecond models."""
    v = num(value)
    if v is None:
        return MISSING
    return f"{v:.3f} ms" if v < 10 else f"{v:,.1f} ms"


def fmt_latency(point: Mapping[str, Any]) -> str:
    """Median latency with its interquartile range when recorded: '0.043 ms [0.042–0.045]' (breaking only
    before the bracket)."""
    text, iqr = fmt_ms(point.get("latency_ms")), latency_interval(point)
    if text == MISSING or iqr is None:
        return text
    digits = 3 if iqr[1] < 10 else 1
    return f"{text.replace(' ', NBSP)} [{iqr[0]:.{digits}f}{DASH}{iqr[1]:.{digits}f}]"


def within_noise(a: Mapping[str, Any], b: Mapping[str, Any], tie: float = NOISE_TIE) -> bool:
    """Are two latencies the same as far as the timing can tell? Their medians within ``tie`` of each other,
    or their interquartile ranges overlapping."""
    ma, mb = num(a.get("latency_ms")), num(b.get("latency_ms"))
    if ma is None or mb is None or ma <= 0 or mb <= 0:
        return False
    if max(ma, mb) <= min(ma, mb) * (1.0 + tie):
        return True
    ia, ib = latency_interval(a), latency_interval(b)
    return ia is not None and ib is not None and ia[0] <= ib[1] and ib[0] <= ia[1]


def fmt_speedup(dense: Mapping[str, Any], point: Mapping[str, Any], tie: float = NOISE_TIE) -> str:
    """Measured speedup over dense, marked '≈' when inside the noise. Preferred: ``speedup_measured``, the
    median ratio of the two timed in alternation, shown with its interquartile range and '≈' when 1× lies in
    that range or within ``tie``; else dense latency / this latency, '≈' as :func:`within_noise` says."""
    if point is dense:
        return "reference" if num(dense.get("latency_ms")) is not None else MISSING
    paired = num(point.get("speedup_measured"))
    if paired is not None:
        q1, q3 = num(point.get("speedup_q1")), num(point.get("speedup_q3"))
        noise = abs(paired - 1.0) <= tie * max(1.0, paired) or (q1 is not None and q3 is not None and q1 <= 1 <= q3)
        iqr = f" [{q1:.2f}{DASH}{q3:.2f}]" if q1 is not None and q3 is not None else ""
        return f"{paired:.2f}×{iqr}" + (f" {NOISE_MARK}" if noise else "")
    d, v = num(dense.get("latency_ms")), num(point.get("latency_ms"))
    if d is None or v is None or v <= 0:
        return MISSING
    return f"{d / v:.2f}×" + (f" {NOISE_MARK}" if within_noise(dense, point, tie) else "")


def table(headers: Sequence[str], rows: List[List[str]], numeric: bool = True) -> Block:
    """Table block without the columns (other than the first) that are empty in every row."""
    keep = [0] + [j for j in range(1, len(headers)) if any(r[j] != MISSING for r in rows)]
    return ("table", [headers[j] for j in keep], [[r[j] for j in keep] for r in rows], numeric)
