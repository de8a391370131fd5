"""How many units to prune: torch's convention for ``amount`` (a fraction in [0, 1) or an int count) and
the per-layer floor ``min_keep``; the one validator of each."""
from __future__ import annotations

import math
import numbers
from typing import Union

from prunekit.errors import InvalidTypeError, PrunekitError

Amount = Union[float, int]  # a fraction in [0, 1) of the units, or an int count of them


def resolve_amount(amount: Amount, units: int, what: str = "amount") -> int:
    """Number of units to prune; torch's convention (fraction or absolute count)."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise InvalidTypeError(f"{what} must be a float in [0, 1) or an int count, got {amount!r}")
    if isinstance(amount, numbers.Integral):
        if not 0 <= amount <= units:
            raise PrunekitError(f"{what}={amount} is a count of units: it must be in [0, {units}]")
        return int(amount)
    if not (0.0 <= amount < 1.0) or math.isnan(amount):
        raise PrunekitError(f"{what}={amount} must be a fraction in [0, 1) (or an int count of units)")
    return int(round(amount * units))


def resolve_floor(min_keep: Amount, units: int) -> int:
    """Per-layer floor: the fewest units global ranking may leave in a tensor."""
    if isinstance(min_keep, bool) or not isinstance(min_keep, numbers.Real):
        raise InvalidTypeError(f"min_keep must be a float in (0, 1) or an int >= 1, got {min_keep!r}")
    if isinstance(min_keep, numbers.Integral):
        if min_keep < 0:
            raise PrunekitError(f"min_keep={min_keep} must be an int >= 0 or a fraction in (0, 1)")
        return min(int(min_keep), units)
    if not 0.0 <= min_keep < 1.0:
        raise PrunekitError(f"min_keep={min_keep} must be a fraction in [0, 1) or an int count")
    return min(units, max(1, math.ceil(min_keep * units))) if min_keep > 0 else 0

