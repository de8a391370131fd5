"""Exact k-th smallest score across many tensors, without concatenating them.

``torch.nn.utils.prune.global_unstructured`` concatenates every score into one
tensor and sorts it: on a 100M-parameter model that is ~11x the model's memory.
Here the scores are produced tensor by tensor (each source is a callable that
recomputes its scores), walked in fixed-size chunks, and only a histogram and
the few values of one bin are ever kept:

1. one pass for the range of finite scores (and the count of ``-inf``, which
   marks units that are already pruned and must stay pruned);
2. a histogram pass; the bin that holds the k-th value is found from the
   cumulative counts;
3. a pass that gathers the values inside that bin and picks the exact one.
   If the bin is still huge (many near-ties), the range shrinks to that bin and
   step 2 repeats.

Ties at the threshold are broken by position (source order, then flat index),
which makes the number of pruned units exact and the result deterministic.
"""
from __future__ import annotations

import ctypes
import math
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from prunekit.bits import pack_bits
from prunekit.criteria.score import Elementwise
from prunekit.errors import PrunekitError

_BINS = 4096
_CHUNK = 1 << 20          # elements per chunk (a multiple of 8): temporaries of a few MB
_MAX_GATHER = 1 << 20     # values of one bracket we are willing to hold at once (4 MB as float32)
_SAMPLE = 1 << 19         # scores sampled to bracket the k-th value (keeps the bracket ~0.5% of all)




# A source is either an Elementwise or a callable that returns the whole score tensor.
ScoreSource = Union[Elementwise, Callable[[], torch.Tensor]]


@dataclass(frozen=True)
class Threshold:
    """Prune every score ``< value`` and the first ``ties`` scores ``== value``."""

    value: float
    ties: int
    k: int


def _numel(src: ScoreSource) -> int:
    if isinstance(src, Elementwise):
        return src.numel()
    shape = getattr(src, "shape", None)  # lazy sources may carry their shape
    return math.prod(shape) if shape is not None else src().numel()


def _chunks(src: ScoreSource, buf: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
    """Flat chunks of a source's scores. Elementwise sources are computed into ``buf``
    (one buffer per pass over all sources: allocating per source churns the heap)."""
    if isinstance(src, Elementwise):
        flat = src.tensor.detach().reshape(-1)
        if buf is None or buf.numel() < min(_CHUNK, flat.numel()) or buf.dtype != flat.dtype:
            buf = torch.empty(min(_CHUNK, flat.numel()), dtype=flat.dtype)
        for start in range(0, flat.numel(), _CHUNK):
            c = flat[start:start + _CHUNK]
            yield src.fn(c, buf[:c.numel()])
        return
    flat = src().detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start:start + _CHUNK]


def _load_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


_MALLOC_TRIM = _load_malloc_trim() if sys.platform.startswith("linux") else None


TRIM_MIN_SCORES = 1 << 22   # below ~16 MB of scores a pass leaves nothing worth trimming


def release_freed_memory(scores: Optional[int] = None) -> None:
    """Give freed heap memory back to the OS after a pass over big scores (``scores`` of them; small passes
    skip the trim: it walks the whole heap, ~0.5 ms each, which per-layer planning would pay many times).

    glibc keeps the multi-MB chunk buffers of one pass in the heap after they are
    freed, and the next pass often cannot reuse them: peak RSS then grew to 20-60%
    of the model's size although live memory never exceeded ~5%.
    """
    if _MALLOC_TRIM is not None and (scores is None or scores >= TRIM_MIN_SCORES):
        _MALLOC_TRIM(0)


def _workspace(sources: Sequence[ScoreSource]):
    """(score buffer, two bool buffers) sized for the largest chunk of ``sources``."""
    n = min(_CHUNK, max((_numel(s) for s in sources), default=1))
    return torch.empty(n), torch.empty(n, dtype=torch.bool), torch.empty(n, dtype=torch.bool)


def _values_at(src: ScoreSource, idx: torch.Tensor) -> torch.Tensor:
    if isinstance(src, Elementwise):
        raw = src.tensor.detach().reshape(-1)[idx]
        return src.fn(raw, torch.empty_like(raw))
    return src().detach().reshape(-1)[idx]


def full_scores(src: ScoreSource) -> torch.Tensor:
    """The whole score tensor of one source (shape of the source's tensor)."""
    if isinstance(src, Elementwise):
        return src.fn(src.tensor.detach(), torch.empty_like(src.tensor))
    return src().detach()


def _range_pass(sources: Sequence[ScoreSource]):
    n_neginf, lo, hi, total = 0, math.inf, -math.inf, 0
    buf = _workspace(sources)[0]
    for src in sources:
        for c in _chunks(src, buf):
            total += c.numel()
            if torch.isnan(c).any():
                raise PrunekitError("scores contain NaN; a criterion must return finite scores (or -inf)")
            neg = torch.isneginf(c)
            n_neg = int(neg.sum())
            if n_neg:
                n_neginf += n_neg
                c = c[~neg]
                if c.numel() == 0:
                    continue
            lo = min(lo, float(c.min()))
            hi = max(hi, float(c.max()))
    return n_neginf, lo, hi, total


def _histogram(sources: Sequence[ScoreSource], lo: float, hi: float, bins: int):
    """Counts of scores < lo, and of scores in each of ``bins`` equal bins of [lo, hi]."""
    below = 0
    counts = torch.zeros(bins, dtype=torch.int64)
    scale = bins / (hi - lo)
    buf = _workspace(sources)[0]
    for src in sources:
        for c in _chunks(src, buf):
            below += int((c < lo).sum())
            inside = c[(c >= lo) & (c <= hi)]
            idx = ((inside.double() - lo) * scale).long().clamp_(0, bins - 1)
            counts += torch.bincount(idx, minlength=bins)
    return below, counts


def _gather(sources: Sequence[ScoreSource], a: float, b: float):
    """Exact count of scores < a and the scores in [a, b] (or None if too many).

    Comparisons go into reused buffers and the selected values into one
    preallocated buffer: many short-lived temporaries fragment the heap and were
    measured to cost more peak memory than the selection itself.
    """
    below = n_in = n_all = n_above = 0
    out = torch.empty(0)  # grown to _MAX_GATHER in the scores' own dtype (float32: half the memory)
    buf, m1, m2 = _workspace(sources)
    for src in sources:
        for c in _chunks(src, buf):
            n = c.numel()
            n_all += n
            below += int(torch.lt(c, a, out=m1[:n]).sum())
            n_above += int(torch.gt(c, b, out=m1[:n]).sum())
            torch.le(c, b, out=m2[:n]).logical_and_(torch.ge(c, a, out=m1[:n]))
            cnt = int(m2[:n].sum())
            if n_in + cnt <= _MAX_GATHER:
                if out.numel() == 0 or torch.promote_types(out.dtype, c.dtype) != out.dtype:
                    wider = torch.empty(_MAX_GATHER, dtype=torch.promote_types(out.dtype, c.dtype))
                    wider[:n_in] = out[:n_in]
                    out = wider
                out[n_in:n_in + cnt] = c[m2[:n]]
            n_in += cnt
    del buf, m1, m2
    release_freed_memory(n_all)
    if below + n_in + n_above != n_all:  # NaN compares false to everything
        raise PrunekitError("scores contain NaN; a criterion must return finite scores (or -inf)")
    if n_in > _MAX_GATHER:
        return below, None, n_in
    return below, out[:n_in], n_in


def _sample(sources: Sequence[ScoreSource], size: int) -> torch.Tensor:
    """A fixed-seed uniform sample of all scores, proportional to each source's size."""
    gen = torch.Generator().manual_seed(0)  # speed only: the result is exact whatever the sample
    sizes = [_numel(src) for src in sources]
    total = sum(sizes)
    parts = []
    for src, n in zip(sources, sizes):
        m = min(n, max(1, math.ceil(size * n / total)))
        idx = torch.randint(0, n, (m,), generator=gen)
        parts.append(_values_at(src, idx).float())
    sample = torch.cat(parts).sort().values
    del parts
    release_freed_memory(total)
    return sample


def _from_bracket(sources, k: int, a: float, b: float):
    """(threshold or None, count below a, count in [a, b]).

    The threshold is found when the k-th value lies in [a, b] and the bracket is
    small enough to hold in memory.
    """
    below_a, values, n_in = _gather(sources, a, b)
    if values is None or not below_a < k <= below_a + n_in:
        return None, below_a, n_in
    v = float(torch.kthvalue(values, k - below_a).values)
    n_less = below_a + int((values < v).sum())
    return Threshold(v, k - n_less, k), below_a, n_in


def _bracket_by_sampling(sources: Sequence[ScoreSource], k: int, total: int):
    """Fast path: a sample brackets the k-th value; one exact pass confirms it."""
    sample = _sample(sources, _SAMPLE)
    q = k / total
    r = q * (sample.numel() - 1)
    # the rank of the true k-th value inside the sample is binomial: 5 sigma of slack
    slack = 5 * math.sqrt(sample.numel() * max(q * (1 - q), 1e-6)) + 8
    lo_i = max(int(r - slack), 0)
    hi_i = min(int(r + slack) + 1, sample.numel() - 1)
    a = float(sample[lo_i]) if lo_i > 0 else -math.inf
    b = float(sample[hi_i]) if hi_i < sample.numel() - 1 else math.inf
    return _from_bracket(sources, k, a, b)[0]


def _tie_threshold(sources, k: int, value: float) -> Threshold:
    below, _, _ = _gather(sources, value, value)
    return Threshold(value, k - below, k)


def _by_histogram(sources: Sequence[ScoreSource], k: int) -> Threshold:
    """Slow but always-terminating path: narrow [lo, hi] around the k-th value."""
    n_neginf, lo, hi, _ = _range_pass(sources)
    if k <= n_neginf:
        return Threshold(-math.inf, k, k)
    while True:
        mid = lo + (hi - lo) / 2
        if mid in (lo, hi):  # lo and hi are equal or adjacent floats: two candidates left
            below_hi, _, _ = _gather(sources, hi, hi)
            return _tie_threshold(sources, k, lo if below_hi >= k else hi)
        below, counts = _histogram(sources, lo, hi, _BINS)
        cum = below + torch.cumsum(counts, 0)
        j = min(int(torch.searchsorted(cum, torch.tensor(k, dtype=torch.int64))), _BINS - 1)
        width = (hi - lo) / _BINS
        # one bin of margin each side: the float bin edges may disagree with exact comparisons
        a = lo + max(j - 1, 0) * width
        b = hi if j >= _BINS - 2 else lo + (j + 2) * width
        found, below_a, n_in = _from_bracket(sources, k, a, b)
        if found is not None:
            return found
        if below_a < k <= below_a + n_in and (a, b) != (lo, hi):
            lo, hi = a, b  # still too many values in the bracket: zoom in
            continue
        # rounding missed, or one huge bin of near-ties: bisect instead
        mid_below, _, _ = _gather(sources, mid, mid)
        lo, hi = (lo, mid) if mid_below >= k else (mid, hi)


def kth_smallest(sources: Sequence[ScoreSource], k: int) -> Threshold:
    """The threshold that prunes exactly ``k`` scores (the k smallest) across ``sources``."""
    total = sum(_numel(src) for src in sources)
    if not 0 <= k <= total:
        raise PrunekitError(f"k must be in [0, {total}], got {k}")
    if k == 0:
        return Threshold(-math.inf, 0, 0)
    found = _bracket_by_sampling(sources, k, total)
    return found if found is not None else _by_histogram(sources, k)


def masks_from_threshold(sources: Sequence[ScoreSource], thr: Threshold) -> Iterator[Tuple[torch.Tensor, int]]:
    """(packed keep-mask, entries pruned) per source; exactly ``thr.k`` pruned in all.

    Masks are compared and packed chunk by chunk (1 bit per entry), so no
    full-size boolean mask or score tensor is ever held.
    """
    ties = thr.ties
    # all outputs first, then the workspace: long-lived masks allocated between short-lived
    # buffers would fragment the heap and keep freed memory from going back to the OS
    outputs = [torch.empty((_numel(src) + 7) // 8, dtype=torch.uint8) for src in sources]
    buf, keep_buf, _ = _workspace(sources)
    for src, packed in zip(sources, outputs):
        pruned, at = 0, 0
        for c in _chunks(src, buf):
            keep = torch.ge(c, thr.value, out=keep_buf[:c.numel()])
            if ties > 0:
                take = (c == thr.value).nonzero().squeeze(1)[:ties]
                keep[take] = False
                ties -= take.numel()
            pruned += c.numel() - int(keep.sum())
            pack_bits(keep, out=packed[at // 8:(at + c.numel() + 7) // 8])  # chunks are multiples of 8
            at += c.numel()
        yield packed, pruned
    del buf, keep_buf
    release_freed_memory(sum(_numel(src) for src in sources))


def count_split(sources: Sequence[ScoreSource], thr: Threshold) -> List[Tuple[int, int]]:
    """(scores < threshold, scores == threshold) per source."""
    buf, m1, _ = _workspace(sources)
    out = []
    for src in sources:
        below = eq = 0
        for c in _chunks(src, buf):
            below += int(torch.lt(c, thr.value, out=m1[:c.numel()]).sum())
            eq += int(torch.eq(c, thr.value, out=m1[:c.numel()]).sum())
        out.append((below, eq))
    del buf, m1
    release_freed_memory(sum(_numel(src) for src in sources))
    return out
