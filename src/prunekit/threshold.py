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

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import torch

_BINS = 4096
_CHUNK = 1 << 20          # elements per chunk: bounds temporaries to a few MB
_MAX_GATHER = 1 << 21     # values of one bin we are willing to hold at once
_SAMPLE = 1 << 18         # scores sampled to bracket the k-th value


@dataclass(frozen=True)
class Elementwise:
    """Scores that are an elementwise function of one tensor, e.g. ``|w|``.

    They are computed chunk by chunk into one reused buffer: materialising a
    full score tensor per pass costs more (page faults of a fresh allocation)
    than the comparisons themselves.
    """

    tensor: torch.Tensor
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (chunk, out) -> out

    def numel(self) -> int:
        return self.tensor.numel()


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


def _chunks(src: ScoreSource) -> Iterator[torch.Tensor]:
    if isinstance(src, Elementwise):
        flat = src.tensor.detach().reshape(-1)
        buf = torch.empty(min(_CHUNK, flat.numel()), dtype=flat.dtype)
        for start in range(0, flat.numel(), _CHUNK):
            c = flat[start:start + _CHUNK]
            yield src.fn(c, buf[:c.numel()])
        return
    flat = src().detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start:start + _CHUNK]


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
    for src in sources:
        for c in _chunks(src):
            total += c.numel()
            if torch.isnan(c).any():
                raise ValueError("scores contain NaN; a criterion must return finite scores (or -inf)")
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
    for src in sources:
        for c in _chunks(src):
            below += int((c < lo).sum())
            inside = c[(c >= lo) & (c <= hi)]
            idx = ((inside.double() - lo) * scale).long().clamp_(0, bins - 1)
            counts += torch.bincount(idx, minlength=bins)
    return below, counts


def _gather(sources: Sequence[ScoreSource], a: float, b: float):
    """Exact count of scores < a and the scores in [a, b] (or None if too many)."""
    below, kept, n_in, n_all, n_above = 0, [], 0, 0, 0
    for src in sources:
        for c in _chunks(src):
            n_all += c.numel()
            below += int((c < a).sum())
            n_above += int((c > b).sum())
            sel = c[(c >= a) & (c <= b)]
            n_in += sel.numel()
            if n_in <= _MAX_GATHER:
                kept.append(sel.double())
    if below + n_in + n_above != n_all:  # NaN compares false to everything
        raise ValueError("scores contain NaN; a criterion must return finite scores (or -inf)")
    if n_in > _MAX_GATHER:
        return below, None, n_in
    return below, (torch.cat(kept) if kept else torch.empty(0, dtype=torch.float64)), n_in


def _sample(sources: Sequence[ScoreSource], size: int) -> torch.Tensor:
    """A fixed-seed uniform sample of all scores, proportional to each source's size."""
    gen = torch.Generator().manual_seed(0)  # speed only: the result is exact whatever the sample
    sizes = [_numel(src) for src in sources]
    total = sum(sizes)
    parts = []
    for src, n in zip(sources, sizes):
        m = min(n, max(1, math.ceil(size * n / total)))
        idx = torch.randint(0, n, (m,), generator=gen)
        parts.append(_values_at(src, idx).double())
    return torch.cat(parts).sort().values


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
        raise ValueError(f"k must be in [0, {total}], got {k}")
    if k == 0:
        return Threshold(-math.inf, 0, 0)
    found = _bracket_by_sampling(sources, k, total)
    return found if found is not None else _by_histogram(sources, k)


def masks_from_threshold(sources: Sequence[ScoreSource], thr: Threshold) -> Iterator[torch.Tensor]:
    """Keep-masks (True = keep), one per source, with exactly ``thr.k`` entries pruned.

    A generator, so that the caller can pack each mask before the next is made.
    """
    ties = thr.ties
    for src in sources:
        s = full_scores(src)
        keep = s >= thr.value
        if ties > 0:
            eq = (s == thr.value).reshape(-1).nonzero().squeeze(1)
            take = eq[:ties]
            keep.view(-1)[take] = False
            ties -= take.numel()
        yield keep


def count_pruned(source: ScoreSource, thr: Threshold) -> int:
    """Scores strictly below the threshold in one source (ties excluded)."""
    return sum(int((c < thr.value).sum()) for c in _chunks(source))
