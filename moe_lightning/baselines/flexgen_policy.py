"""FlexGen's policy search as FlexGen does it, for this project's MoE models; what `flexgen` and
`flexgen_c` run.

A port of `FMInference/FlexGen@19753bc:experimental/cost_model.py` (`solve_lp`, `get_nb_ub`, `solve`)
with MoE-Lightning's Mixtral adaptation (`caoshiyi/artifacts@0e2dd65:benchmarks/flexgen/cost_models/`);
the terms are in `flexgen_cost`, the fitted constants in `flexgen_constants`.

- The LP, for one GPU batch size `gbs` and block size `bls = gbs * num_gb`: variables the placement
  percentages and `T_pre`, `T_gen`; minimise `T = l T_pre + (n - 1) l T_gen` (FlexGen minimises `T / bls`,
  the same optimum at fixed `bls`) under FlexGen's term, combination and memory constraints. With no disk
  tier `wn = cn = hn = 0` (MoE-Lightning's port sets `nmem = 0`, which forces the same), so `wc = 1 - wg`,
  `cc = 1 - cg`, `hc = 1 - hg` and the free variables are `(wg, cg, hg, T_pre, T_gen)`; the disk
  constraint is then `0 <= 0` and is left out. Each term is affine in the percentages, so its row is read
  off the term function at the corners: the LP and the tests use the same functions.
- The search: `gbs` = 1, 2, 3, 4, 8, 16, ...; for each, `get_nb_ub` doubles `num_gb` until the LP is
  infeasible and binary-searches the last feasible one; `num_gb` = 1, 2, ..., that bound (every integer),
  stopping at the first drop in throughput `bls n / T`; the search ends at the first `gbs` with no
  feasible `num_gb`. The best throughput wins (ties: the first found).
- Solver: a simplex (`baselines.lp`) instead of PuLP's CBC; an LP optimum is an LP optimum.

Deviations, each because this runtime or an MoE needs it:
- `bls <= max_batch_size` (default: the workload's number of requests) counts as a feasibility limit:
  FlexGen's search is bounded only by memory, but a block larger than the requests cannot run here;
- the constants: MoE-Lightning's Mixtral refits on the `t4`/`l4` profiles (FlexGen's own T4 set is OPT's),
  else a set derived from the profile (`flexgen_constants.derive_constants`); the plan names the set;
- mapping the LP's placement onto this runtime's `Policy`: the engine places weights per expert and keeps
  attention, router, norms and embeddings on the GPU, so `wg` becomes `n_res = floor(wg E)` resident
  experts per layer (MoE-Lightning's own convention); KV is placed per micro-batch, so `cg` becomes
  `floor(cg num_gb) / num_gb`; the engine keeps hidden states on the GPU, so `hg` becomes 1; weights are
  streamed a whole layer at a time, one layer ahead (`pages_per_layer = prefetch_depth = 1`);
  `attn_on_gpu` says whether CPU-resident KV is streamed to the GPU (`flexgen`, S4) or attended by the CPU
  (`flexgen_c`, FlexGen's `cpu_cache_compute`). FlexGen's model charges CPU-resident KV as CPU attention
  either way, so both get the same LP optimum;
- "manually adjusted" (FlexGen's paper, for policies that ran out of memory): when the mapped policy does
  not fit this engine's pools (`moe_lightning.memory.memory_plan(...).fits`, which counts what FlexGen's
  formulas leave out: embeddings, the pinned staging ring, float32 router/expert intermediates and
  logits, the dense KV of the longest prompt, the link's KV stream buffer), it is shrunk: the largest
  `num_gb` at the same `gbs` (then at smaller `gbs`) for which some placement at or below FlexGen's
  (resident experts, GPU batches of KV) fits, with the fitting placement FlexGen's model rates fastest.
  The plan records that and why (`adjusted`, `adjustment`) and FlexGen's prediction for both;
- throughputs within a relative 1e-9 are ties (first found wins, as in exact arithmetic): where the model
  is flat in the batch (all on the GPU), rounding would otherwise pick it.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from moe_lightning.baselines.flexgen_constants import constants_for
from moe_lightning.baselines.flexgen_cost import (
    DECODE_LOAD,
    DECODE_REST,
    PREFILL_GROUPS,
    Constants,
    Percents,
    Shape,
    capacities,
    cpu_peak_g,
    cpu_peak_p,
    gpu_peak_g,
    gpu_peak_p,
    latency_s,
    shape_of,
    t_gen,
    t_pre,
)
from moe_lightning.baselines.lp import solve_lp
from moe_lightning.config import HardwareSpec, ModelSpec, Policy, Workload
from moe_lightning.errors import MemoryBudgetError
from moe_lightning.memory import MemoryPlan, memory_plan

PAGES, PREFETCH = 1, 1        # FlexGen streams a whole layer, one layer ahead
# Throughputs within this relative distance are equal: where FlexGen's model is flat (everything on the
# GPU, no fixed cost per batch) rounding must not pick the batch; exact arithmetic keeps the first found.
TIE = 1e-9
MEMORY_ROWS = ((gpu_peak_p, 0), (gpu_peak_g, 0), (cpu_peak_p, 1), (cpu_peak_g, 1))  # (peak, device)


@dataclass(frozen=True)
class LPSolution:
    """FlexGen's LP optimum for one (gbs, bls)."""

    percents: Percents
    t_pre_s: float             # per layer
    t_gen_s: float             # per layer and generated token
    throughput_tok_s: float    # bls * n / T


ORIGIN = Percents.gpu_cpu(0.0, 0.0, 0.0)
CORNERS = (Percents.gpu_cpu(1.0, 0.0, 0.0), Percents.gpu_cpu(0.0, 1.0, 0.0), Percents.gpu_cpu(0.0, 0.0, 1.0))


def _affine(f: Callable[[Percents], float]) -> tuple[float, np.ndarray]:
    """`f` (affine in wg, cg, hg with the rest on the CPU) as its value at 0 and its slopes."""
    at0 = f(ORIGIN)
    return at0, np.array([f(p) - at0 for p in CORNERS])


def solve_placement(x: Shape, k: Constants, gmem: float, cmem: float) -> LPSolution | None:
    """FlexGen's `solve_lp` for `x.gbs`, `x.bls`; None where FlexGen's status is -1 (infeasible)."""
    rows, rhs = [], []

    def add(const: float, coef: np.ndarray, t_pre_coef: float, t_gen_coef: float, bound: float) -> None:
        rows.append([*coef, t_pre_coef, t_gen_coef])
        rhs.append(bound - const)

    for group in PREFILL_GROUPS:                    # T_pre >= sum of the group
        parts = [_affine(lambda p, f=f: f(x, k, p)) for f in group]
        add(sum(c for c, _ in parts), sum(a for _, a in parts), -1.0, 0.0, 0.0)
    load_c, load_a = _affine(lambda p: DECODE_LOAD(x, k, p))
    for f in DECODE_REST:                           # T_gen >= ctog_g + each of the rest
        c, a = _affine(lambda p, f=f: f(x, k, p))
        add(load_c + c, load_a + a, 0.0, -1.0, 0.0)
    for peak, device in MEMORY_ROWS:
        c, a = _affine(lambda p, peak=peak: peak(x, p))
        add(c, a, 0.0, 0.0, (gmem, cmem)[device])
    cost = [0.0, 0.0, 0.0, x.l, (x.n - 1) * x.l]
    r = solve_lp(cost, rows, rhs, [(0.0, 1.0)] * 3 + [(0.0, math.inf)] * 2)
    if r is None:
        return None
    p = Percents.gpu_cpu(*(float(v) for v in np.clip(r.x[:3], 0.0, 1.0)))
    return LPSolution(percents=p, t_pre_s=t_pre(x, k, p), t_gen_s=t_gen(x, k, p),
                      throughput_tok_s=float(x.bls * x.n / latency_s(x, k, p)))


def gbs_candidates(start: int = 1):
    """FlexGen's GPU batch sizes: 1, 2, 3, 4, then doubling."""
    gbs = start
    while True:
        yield gbs
        gbs = gbs + 1 if gbs < 4 else gbs * 2


def nb_upper_bound(feasible: Callable[[int], bool]) -> int:
    """FlexGen's `get_nb_ub`: double until infeasible, binary-search the boundary; 0 if nb = 1 fails."""
    nb = 1
    while feasible(nb):
        nb *= 2
    left, right = max(nb // 2, 1), nb
    while left < right:
        mid = (left + right) // 2
        if feasible(mid):
            left = mid + 1
        else:
            right = mid
    return left - 1


def search(throughput: Callable[[int, int], float | None],
           gbs: int | None = None) -> tuple[tuple[int, int] | None, float]:
    """FlexGen's `solve`: the (gbs, num_gb) with the best throughput (None: infeasible). A fixed `gbs`
    searches only its num_gb (FlexGen's `--gbs`)."""
    best, best_tok_s = None, 0.0
    for size in ([gbs] if gbs is not None else gbs_candidates()):
        nb_ub = nb_upper_bound(lambda nb, size=size: throughput(size, nb) is not None)
        if nb_ub == 0:
            break
        prev = 0.0
        for nb in range(1, nb_ub + 1):
            tok_s = throughput(size, nb) or 0.0
            if tok_s < prev * (1 - TIE):            # FlexGen stops at the first drop
                break
            prev = tok_s
            if tok_s > best_tok_s * (1 + TIE):
                best, best_tok_s = (size, nb), tok_s
    return best, float(best_tok_s)


@dataclass(frozen=True)
class FlexGenPlan:
    policy: Policy                       # what runs (mapped and, if needed, adjusted)
    predicted_tok_s: float               # FlexGen's model at the policy that runs
    lp_tok_s: float                      # FlexGen's LP optimum (its script's max_throughput)
    gpu_batch_size: int                  # the LP's choice
    num_gpu_batches: int
    percents: dict[str, float]           # the LP's wg, wc, cg, cc, hg, hc
    placement: dict[str, float]          # the policy's wg, cg, hg in FlexGen's terms
    t_pre_s: float                       # per layer, at the LP optimum
    t_gen_s: float
    flexgen_peaks_gb: dict[str, float]   # FlexGen's peak-memory formulas at the LP optimum (decimal GB)
    constants: str                       # which constant set
    adjusted: bool
    adjustment: str
    lp_solves: int
    search_s: float


def flexgen_policy(spec: ModelSpec, hw: HardwareSpec, workload: Workload, *, attn_on_gpu: bool = True,
                   constants: Constants | None = None, gbs: int | None = None,
                   max_batch_size: int | None = None) -> FlexGenPlan:
    """FlexGen's choice for `spec` on `hw` running `workload`, mapped onto a runnable `Policy`.
    Raises MemoryBudgetError when FlexGen's LP is infeasible for every batch or nothing fits the engine."""
    start = time.perf_counter()
    k = constants or constants_for(hw, spec)
    gmem, cmem = capacities(hw)
    cap = max_batch_size or workload.num_requests
    solved: dict[tuple[int, int], LPSolution | None] = {}

    def lp(size: int, nb: int) -> LPSolution | None:
        if (size, nb) not in solved:
            fits_cap = size * nb <= cap
            solved[size, nb] = solve_placement(shape_of(spec, workload, size, size * nb), k, gmem, cmem) \
                if fits_cap else None
        return solved[size, nb]

    best, lp_tok_s = search(lambda size, nb: getattr(lp(size, nb), "throughput_tok_s", None), gbs)
    if best is None:
        raise MemoryBudgetError(f"FlexGen's LP: no (gpu batch size, number of gpu batches) is feasible for "
                                f"{spec.name} on {hw.name} under FlexGen's memory constraints "
                                f"(GPU {gmem / 1e9:.1f} GB, CPU {cmem / 1e9:.1f} GB after alpha)")
    size, nb = best
    sol = solved[best]
    x = shape_of(spec, workload, size, size * nb)
    mapped = _mapped(spec, size, nb, sol.percents, attn_on_gpu)
    policy, adjustment = mapped, ""
    if not memory_plan(spec, mapped, workload).fits(hw):
        policy = _adjust(spec, hw, workload, k, size, nb, sol.percents, attn_on_gpu)
        adjustment = (f"FlexGen's choice {_brief(mapped)} does not fit the engine's pools "
                      f"({memory_plan(spec, mapped, workload).describe(hw)}); shrunk to {_brief(policy)}")
    run = _placement(spec, policy)
    run_shape = replace(x, gbs=policy.micro_batch_size, bls=policy.batch_size)
    p = sol.percents
    return FlexGenPlan(
        policy=policy, predicted_tok_s=float(run_shape.bls * run_shape.n / latency_s(run_shape, k, run)),
        lp_tok_s=lp_tok_s, gpu_batch_size=size, num_gpu_batches=nb,
        percents={"wg": p.wg, "wc": p.wc, "cg": p.cg, "cc": p.cc, "hg": p.hg, "hc": p.hc},
        placement={"wg": run.wg, "cg": run.cg, "hg": run.hg}, t_pre_s=sol.t_pre_s, t_gen_s=sol.t_gen_s,
        flexgen_peaks_gb={f.__name__: float(f(x, p)) / 1e9 for f, _ in MEMORY_ROWS}, constants=k.name,
        adjusted=bool(adjustment), adjustment=adjustment, lp_solves=len(solved),
        search_s=time.perf_counter() - start)


def _mapped(spec: ModelSpec, gbs: int, nb: int, p: Percents, attn_on_gpu: bool, n_res: int | None = None,
            kv_batches: int | None = None) -> Policy:
    """The runtime's policy for FlexGen's placement: whole experts, whole GPU batches of KV."""
    E = spec.num_experts
    n_res = math.floor(p.wg * E + 1e-6) if n_res is None else n_res
    kv_batches = math.floor(p.cg * nb + 1e-6) if kv_batches is None else kv_batches
    return Policy(batch_size=gbs * nb, micro_batch_size=gbs, attn_on_gpu=attn_on_gpu, ffn_on_gpu=True,
                  expert_gpu_fraction=n_res / E, kv_gpu_fraction=kv_batches / nb, pages_per_layer=PAGES,
                  prefetch_depth=PREFETCH)


def _placement(spec: ModelSpec, policy: Policy) -> Percents:
    """A runtime policy in FlexGen's percentages (hidden states on the GPU)."""
    n_res = math.floor(policy.expert_gpu_fraction * spec.num_experts + 1e-6)
    return Percents.gpu_cpu(n_res / spec.num_experts, policy.kv_gpu_fraction, 1.0)


def _adjust(spec: ModelSpec, hw: HardwareSpec, workload: Workload, k: Constants, gbs: int, nb: int,
            p: Percents, attn_on_gpu: bool) -> Policy:
    """Shrink FlexGen's choice until the engine's pools hold it: at the largest num_gb that has a fitting
    placement (a prefix: fewer sequences never need more memory), then at smaller GPU batch sizes."""
    for size in _sizes_below(gbs):
        top = nb if size == gbs else (gbs * nb) // size
        best_nb = last_true(1, top, lambda b, size=size: _best_fit(spec, hw, workload, k, size, b, p, attn_on_gpu)
                        is not None)
        if best_nb >= 1:
            return _best_fit(spec, hw, workload, k, size, best_nb, p, attn_on_gpu)
    raise MemoryBudgetError(f"FlexGen's policy cannot be shrunk to fit {spec.name} on {hw.name}: the smallest, "
                            f"{memory_plan(spec, _mapped(spec, 1, 1, p, attn_on_gpu, 0, 0), workload).describe(hw)}")


def _best_fit(spec: ModelSpec, hw: HardwareSpec, workload: Workload, k: Constants, gbs: int, nb: int,
              p: Percents, attn_on_gpu: bool) -> Policy | None:
    """At (gbs, nb), the placement at or below FlexGen's (resident experts, GPU batches of KV) that fits
    the engine and that FlexGen's model rates fastest. For a fixed expert count the engine's GPU bytes
    rise and its CPU bytes fall with the KV moved to the GPU, so the fitting KV counts form an interval,
    and FlexGen's latency is linear in `cg`: only the interval's ends can be best."""
    x = shape_of(spec, workload, gbs, gbs * nb)
    kv_top = math.floor(p.cg * nb + 1e-6)
    best: tuple[float, Policy] | None = None
    for n_res in range(math.floor(p.wg * spec.num_experts + 1e-6), -1, -1):
        def plan(kv: int, n_res: int = n_res) -> MemoryPlan:
            return memory_plan(spec, _mapped(spec, gbs, nb, p, attn_on_gpu, n_res, kv), workload)

        hi = last_true(0, kv_top, lambda kv, plan=plan: plan(kv).gpu_total_bytes <= hw.gpu_budget_bytes)
        # the CPU side fits from some kv upward: count down from kv_top
        lo = kv_top - last_true(0, kv_top, lambda i, plan=plan: plan(kv_top - i).cpu_total_bytes <= hw.cpu_budget_bytes)
        for kv in sorted({lo, hi}) if 0 <= lo <= hi else ():
            cand = _mapped(spec, gbs, nb, p, attn_on_gpu, n_res, kv)
            t = latency_s(x, k, _placement(spec, cand))
            if best is None or t < best[0] * (1 - TIE):
                best = (t, cand)
    return None if best is None else best[1]


def last_true(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The largest v in [lo, hi] with ok(v), for ok true then false; lo - 1 if none."""
    if hi < lo or not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _sizes_below(gbs: int) -> list[int]:
    """FlexGen's GPU batch sizes below `gbs`, largest first, after `gbs` itself."""
    return [gbs, *reversed(list(itertools.takewhile(lambda g: g < gbs, gbs_candidates())))]


def _brief(p: Policy) -> str:
    return (f"N={p.batch_size} mu={p.micro_batch_size} r_w={p.expert_gpu_fraction:.3g} "
            f"r_c={p.kv_gpu_fraction:.3g}")
