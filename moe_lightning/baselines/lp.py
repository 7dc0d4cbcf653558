"""A small exact linear-program solver (vertex enumeration) for FlexGen's policy LP.

`scipy` is not a dependency of this project, and FlexGen's LP has a handful of variables (placement
percentages and two latency bounds), so the optimum is found exactly by enumerating the vertices of the
feasible polytope: every choice of `n` active constraints among the inequalities and the (finite) bounds
is solved as an `n x n` system, infeasible points are dropped, and the best feasible vertex wins. An LP
whose feasible set is bounded has an optimal vertex, so this is exact; the cost is `C(m + 2n, n)` small
solves (about 10^4 for FlexGen's LP), batched in numpy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LPResult:
    x: np.ndarray
    fun: float


def solve_lp(c, a_ub, b_ub, bounds) -> LPResult | None:
    """min c.x  s.t.  a_ub x <= b_ub,  lo <= x <= hi (every bound finite). None when infeasible."""
    c = np.asarray(c, dtype=float)
    n = c.size
    a = [np.asarray(a_ub, dtype=float).reshape(-1, n)]
    b = [np.asarray(b_ub, dtype=float).reshape(-1)]
    for v, (lo, hi) in enumerate(bounds):
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("solve_lp needs finite bounds on every variable")
        e = np.zeros(n)
        e[v] = 1.0
        a += [e[None], -e[None]]
        b += [np.array([hi]), np.array([-lo])]
    a_all, b_all = np.concatenate(a), np.concatenate(b)
    # Row scaling keeps the feasibility tolerance meaningful across bytes and seconds.
    scale = np.maximum(np.abs(a_all).max(axis=1), 1e-300)
    a_all, b_all = a_all / scale[:, None], b_all / scale
    combos = np.array(list(itertools.combinations(range(len(b_all)), n)))
    mats, rhs = a_all[combos], b_all[combos]
    ok = np.abs(np.linalg.det(mats)) > 1e-12
    if not ok.any():
        return None
    xs = np.linalg.solve(mats[ok], rhs[ok][..., None])[..., 0]       # [K, n]
    slack = xs @ a_all.T - b_all                                      # [K, rows]
    feasible = (slack <= 1e-9 * (1.0 + np.abs(b_all))).all(axis=1)
    if not feasible.any():
        return None
    xs = xs[feasible]
    values = xs @ c
    best = int(np.argmin(values))
    return LPResult(x=xs[best], fun=float(values[best]))
