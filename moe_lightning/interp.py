"""Log-log interpolation of measured curves (kernel rates by rows or load, kernel times by load)."""

from __future__ import annotations

import math
from collections.abc import Sequence


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
