"""Sparsity schedules: pure functions of the step.

A schedule maps a step (an optimizer step, or an epoch: the caller decides)
to the target total sparsity at that step. Pure functions make them trivial to
test, plot and resume: nothing is stored but the step.

- ``oneshot``: the final sparsity from step ``at`` on.
- ``steps``: an explicit list of (step, sparsity) points, held until the next.
- ``linear``: straight line from ``initial`` to ``final`` between ``start`` and ``end``.
- ``cubic``: Zhu & Gupta 2017, "To prune, or not to prune":
  s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3 for t in {t0, t0 + Δt, ..., t0 + n Δt};
  pruning fast early, when many redundant weights exist, and slowly near the end.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, List, Sequence, Tuple

from prunekit.errors import PrunekitError
from prunekit.registry import Registry

SCHEDULES = Registry("schedule")
register_schedule = SCHEDULES.register
Schedule = Callable[[int], float]


def _check_fraction(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise PrunekitError(f"{what}={value!r} must be a sparsity in [0, 1)")
    return float(value)


@register_schedule("oneshot")
def oneshot(step: int, *, final: float, at: int = 0) -> float:
    return _check_fraction(final, "final") if step >= at else 0.0


@register_schedule("steps")
def steps(step: int, *, points: Sequence[Tuple[int, float]]) -> float:
    """Piecewise constant: the sparsity of the last point at or before ``step``."""
    current = 0.0
    for at, value in sorted((int(a), v) for a, v in points):
        if at > step:
            break
        current = _check_fraction(value, "sparsity")
    return current


@register_schedule("linear")
def linear(step: int, *, final: float, initial: float = 0.0, start: int = 0, end: int) -> float:
    _check_fraction(final, "final")
    _check_fraction(initial, "initial")
    if end <= start:
        raise PrunekitError(f"end={end} must be greater than start={start}")
    t = min(max(step - start, 0), end - start) / (end - start)
    return initial + (final - initial) * t


@register_schedule("cubic")
def cubic(step: int, *, final: float, initial: float = 0.0, start: int = 0, n: int, every: int = 1) -> float:
    """Zhu & Gupta's gradual schedule; the value only changes every ``every`` (Δt) steps."""
    _check_fraction(final, "final")
    _check_fraction(initial, "initial")
    if n < 1 or every < 1:
        raise PrunekitError(f"n={n} and every={every} must be >= 1")
    if step < start:
        return 0.0 if initial == 0.0 else initial
    t = min((step - start) // every * every, n * every)  # hold between pruning steps
    # written as initial + growth (not the paper's final + (initial - final) * ...) so that
    # rounding can never take the value below ``initial``: the schedule stays monotone
    return initial + (final - initial) * (1.0 - (1.0 - t / (n * every)) ** 3)


def make_schedule(name: str, **params) -> Schedule:
    """``make_schedule("cubic", final=0.9, n=10, every=100)`` → a function of the step."""
    fn = SCHEDULES.get(name)
    sched = functools.partial(fn, **params)
    sched(0)  # validate the parameters now, not in the middle of a run
    return sched


def change_points(schedule: Schedule, total_steps: int) -> List[Tuple[int, float]]:
    """(step, sparsity) at every step where the target changes, within [0, total_steps]."""
    out, last = [], None
    for t in range(total_steps + 1):
        s = schedule(t)
        if last is None or not math.isclose(s, last, abs_tol=1e-12):
            out.append((t, s))
            last = s
    return out
