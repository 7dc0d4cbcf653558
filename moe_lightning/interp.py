"""Log-log interpolation of measured curves (kernel rates by rows or load, kernel times by load)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def curve_rate(points: Sequence[float], rates: Sequence[float], x: float) -> float:
    """A measured rate at `x`: log-log between points, flat above the last; below the first point the
    time stays that of the first (a kernel cannot get faster with less work), so the rate shrinks."""
    if x < points[0]:
        return rates[0] * x / points[0]
    return loglog(points, rates, x)


def loglog(points: Sequence[float], values: Sequence[float], x: float) -> float:
    """`values` at `x`, linear in log-log between the measured `points` (increasing) around it; the end
    values outside them."""
    if x <= points[0]:
        return values[0]
    for x0, x1, y0, y1 in zip(points, points[1:], values, values[1:]):
        if x <= x1:
            w = math.log(x / x0) / math.log(x1 / x0)
            return math.exp((1 - w) * math.log(y0) + w * math.log(y1))
    return values[-1]
