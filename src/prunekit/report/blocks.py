"""The building blocks of the HTML report: cell formatting and table blocks, shared by every section."""
from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence, Tuple

from prunekit.report.figures import num

MISSING = "—"


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


def table(headers: Sequence[str], rows: List[List[str]], numeric: bool = True) -> Block:
    """Table block without the columns (other than the first) that are empty in every row."""
    keep = [0] + [j for j in range(1, len(headers)) if any(r[j] != MISSING for r in rows)]
    return ("table", [headers[j] for j in keep], [[r[j] for j in keep] for r in rows], numeric)
