"""Small exact linear-program solvers for FlexGen's policy LP (FlexGen itself calls PuLP's CBC).

`scipy` is not a dependency of this project, and FlexGen's LP is tiny (three placement percentages and
two latency bounds, about a dozen inequalities), so it is solved here:

- `solve_lp`: a two-phase tableau simplex with Bland's rule (no cycling). FlexGen's search solves one LP
  per (GPU batch size, number of GPU batches), thousands of them, so each must take about a millisecond;
- `solve_lp_vertices`: the reference, by enumerating the vertices of the feasible polytope (every
  choice of `n` active constraints solved as an `n x n` system; `C(m + 2n, n)` solves, tens of
  milliseconds). Exact for a bounded feasible set; the tests check the simplex against it.

Rows are scaled by their largest coefficient so that one tolerance serves bytes and seconds alike.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TOL = 1e-9
MAX_PIVOTS = 10_000


@dataclass(frozen=True)
class LPResult:
    x: np.ndarray
    fun: float


def solve_lp(c: Sequence[float], a_ub, b_ub, bounds: Sequence[tuple[float, float]]) -> LPResult | None:
    """min c.x  s.t.  a_ub x <= b_ub,  lo <= x <= hi (lo finite, hi may be inf). None when infeasible
    (or unbounded)."""
    c = np.asarray(c, dtype=float)
    n = c.size
    a = np.asarray(a_ub, dtype=float).reshape(-1, n)
    b = np.asarray(b_ub, dtype=float).reshape(-1)
    lo = np.array([float(v[0]) for v in bounds])
    hi = np.array([float(v[1]) for v in bounds])
    if not np.isfinite(lo).all():
        raise ValueError("solve_lp needs a finite lower bound on every variable")
    # y = x - lo >= 0; finite upper bounds become rows y_v <= hi - lo.
    upper = np.flatnonzero(np.isfinite(hi))
    rows = np.vstack([a, np.eye(n)[upper]])
    rhs = np.concatenate([b - a @ lo, (hi - lo)[upper]])
    scale = np.abs(rows).max(axis=1)
    empty = scale == 0
    if (rhs[empty] < -TOL).any():           # 0 <= negative
        return None
    rows, rhs = rows[~empty] / scale[~empty, None], rhs[~empty] / scale[~empty]
    y = _two_phase(rows, rhs, c)
    if y is None:
        return None
    x = lo + y
    return LPResult(x=x, fun=float(c @ x))


def _two_phase(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray | None:
    """min c.y, a y <= b, y >= 0 (b of any sign). Columns: y, one slack per row, one artificial per
    row with b < 0 (its row negated so that every right-hand side is >= 0)."""
    m, n = a.shape
    neg = np.flatnonzero(b < 0)
    width = n + m + neg.size
    t = np.zeros((m, width + 1))
    t[:, :n], t[:, n:n + m], t[:, -1] = a, np.eye(m), b
    t[neg] *= -1.0
    basis = np.arange(n, n + m)
    for j, row in enumerate(neg):
        t[row, n + m + j] = 1.0
        basis[row] = n + m + j
    allowed = np.ones(width, dtype=bool)
    if neg.size:
        cost1 = np.zeros(width)
        cost1[n + m:] = 1.0
        if not _simplex(t, basis, cost1, allowed):
            return None
        if t[basis >= n + m, -1].sum() > TOL * (1.0 + np.abs(b).sum()):
            return None                      # phase 1 left an artificial above zero: infeasible
        allowed[n + m:] = False
        for row in np.flatnonzero(basis >= n + m):   # drive the zero artificials out of the basis
            cols = np.flatnonzero(allowed & (np.abs(t[row, :width]) > TOL))
            if cols.size:
                _pivot(t, basis, row, int(cols[0]))
    cost2 = np.zeros(width)
    cost2[:n] = c
    if not _simplex(t, basis, cost2, allowed):
        return None
    y = np.zeros(width)
    y[basis] = t[:, -1]
    return np.maximum(y[:n], 0.0)


def _simplex(t: np.ndarray, basis: np.ndarray, cost: np.ndarray, allowed: np.ndarray) -> bool:
    """Pivot `t` to an optimum of min cost.z (Bland's rule); False if unbounded."""
    for _ in range(MAX_PIVOTS):
        reduced = cost - cost[basis] @ t[:, :-1]
        enter = np.flatnonzero(allowed & (reduced < -TOL))
        if enter.size == 0:
            return True
        j = int(enter[0])
        col = t[:, j]
        ok = np.flatnonzero(col > TOL)
        if ok.size == 0:
            return False
        ratios = t[ok, -1] / col[ok]
        ties = ok[ratios <= ratios.min() + TOL]
        row = int(ties[np.argmin(basis[ties])])
        _pivot(t, basis, row, j)
    raise RuntimeError("simplex did not converge")


def _pivot(t: np.ndarray, basis: np.ndarray, row: int, col: int) -> None:
    t[row] /= t[row, col]
    others = np.arange(t.shape[0]) != row
    t[others] -= np.outer(t[others, col], t[row])
    basis[row] = col


def solve_lp_vertices(c, a_ub, b_ub, bounds) -> LPResult | None:
    """The same LP by vertex enumeration (every bound finite). None when infeasible."""
    c = np.asarray(c, dtype=float)
    n = c.size
    a = [np.asarray(a_ub, dtype=float).reshape(-1, n)]
    b = [np.asarray(b_ub, dtype=float).reshape(-1)]
    for v, (lo, hi) in enumerate(bounds):
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError("solve_lp_vertices needs finite bounds on every variable")
        e = np.zeros(n)
        e[v] = 1.0
        a += [e[None], -e[None]]
        b += [np.array([hi]), np.array([-lo])]
    a_all, b_all = np.concatenate(a), np.concatenate(b)
    scale = np.maximum(np.abs(a_all).max(axis=1), 1e-300)
    a_all, b_all = a_all / scale[:, None], b_all / scale
    combos = np.array(list(itertools.combinations(range(len(b_all)), n)))
    mats, rhs = a_all[combos], b_all[combos]
    ok = np.abs(np.linalg.det(mats)) > 1e-12
    if not ok.any():
        return None
    xs = np.linalg.solve(mats[ok], rhs[ok][..., None])[..., 0]       # [K, n]
    slack = xs @ a_all.T - b_all                                      # [K, rows]
    feasible = (slack <= TOL * (1.0 + np.abs(b_all))).all(axis=1)
    if not feasible.any():
        return None
    xs = xs[feasible]
    values = xs @ c
    best = int(np.argmin(values))
    return LPResult(x=xs[best], fun=float(values[best]))
