"""Policy optimizer: the policy `(N, mu, A_g, F_g, r_w, r_c)` that maximises the HRM's predicted
end-to-end tokens/s among those whose memory plan fits the hardware budget.

The search is exact for the model in `hrm` and `memory` (no coarse grid); every reduction of the space
below is a dominance argument on those two models:

- `N` (batch size): every value `1 .. N_cap`, `N_cap = min(num_requests, max_batch_size, the largest N
  whose KV cache fits GPU + CPU together)`; nothing beyond `N_cap` can fit or is asked for.
- `mu` (micro-batch size): predicted time depends on `mu` only through `n_mb = ceil(N / mu)`, and every
  memory pool is non-decreasing in `mu` at fixed `(N, n_mb)` (the pinned ring depends on `n_mb` only).
  So for each distinct `n_mb` only the smallest `mu` giving it, `ceil(N / n_mb)`, is searched; that is
  every distinct micro-batch count, about `2 sqrt(N)` values per `N`.
- `r_w` (expert_gpu_fraction): every resident-expert count `n_res = 0 .. E`, as `r_w = n_res / E`, when
  the FFN is on the GPU. With the FFN on the CPU the CPU reads every expert from CPU memory, which the
  memory plan holds only for streamed experts, so `r_w = 0` there.
- `r_c` (kv_gpu_fraction): with attention on the CPU, any GPU share of the KV cache costs GPU memory and
  D2H traffic and saves nothing, so `r_c = 0`. With attention on the GPU, predicted time is
  non-increasing in `r_c` (less KV crosses the link), CPU memory is non-increasing and only GPU memory
  grows, so the best `r_c` at each point is the largest that fits the GPU, to `kv_fraction_step`
  (0.001 by default: it is a continuous knob, and a finer step changes throughput by < 0.1% of the KV
  link term).
- `A_g`, `F_g`: all four placements (restrict with `placements=`).
- MXFP4 experts: `dequant_experts` (the scratch a layer's streamed experts are dequantized into: whole, or
  1/2, 1/4, 1/8 of it, each group again per micro-batch), tried where the whole scratch is what keeps a
  batch size off the GPU.
- Engine knobs `pages_per_layer` and `prefetch_depth` are fixed by the caller (they only size the pinned
  ring in this model). Ties (within `TIE_RTOL`) go to the larger N, then the larger micro-batch, then
  more resident experts (`_better`).

- Several GPUs: every layout T x E = gpu.count that the model's shapes allow (`parallel.layouts`),
  or the one asked for, each searched as one rank (`parallel.rank_view`: its shard, its GPU, its share of
  the host and of the batch, its collectives priced) over the same space in a group's units (N / E,
  mu / E), with the FFN on the GPUs; the best layout's throughput (E groups together) wins, ties to the
  earlier layout (fewer tensor ranks).

The cost is about `sum_N 2 sqrt(N)` points per (placement, n_res): ~0.2 M points for `N_cap = 256`, a
few million for `N_cap` in the low thousands; numpy evaluates them in well under a second per million.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from moe_lightning.config import GiB, HardwareSpec, ModelSpec, ParallelConfig, Policy, Workload
from moe_lightning.errors import ConfigError, MemoryBudgetError
from moe_lightning.memory import (
    CPU_POOLS,
    GPU_POOLS,
    POOL_ALIGN_ROOM,
    MemoryPlan,
    kv_tokens_for,
    memory_plan,
    memory_pools,
    padded_pool,
)
from moe_lightning.tuner.hrm import Prediction, decode_layer_times, predict, prefill_time, throughput
from moe_lightning.tuner.parallel import SINGLE, RankComm, layouts, parallel_problems, rank_view

ALL_PLACEMENTS = ((False, True), (True, True), (False, False), (True, False))  # (attn_on_gpu, ffn_on_gpu)
FFN_ON_GPU = ALL_PLACEMENTS[:2]   # the placements the engine runs (task=plan's default task.placements=engine)
# Predictions within this relative distance are ties; a pure roofline without fixed overheads plateaus
# (e.g. a tiny model, every term linear in N), and then the larger batch and the larger micro-batch win:
# they amortise the launch and synchronisation costs the model leaves out.
TIE_RTOL = 1e-9


@dataclass(frozen=True)
class Plan:
    """The optimizer's answer: the best policy, its prediction and memory, and the search's size."""

    policy: Policy
    prediction: Prediction
    hardware: HardwareSpec
    model_name: str
    workload_name: str
    points_evaluated: int
    search_s: float
    # the T x E layout (several GPUs); chunks: EPS-MoE's for decode
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rank_hardware: HardwareSpec | None = None   # one rank's share of `hardware` (None: `hardware` itself)
    layouts_searched: tuple[tuple[int, int, float], ...] = ()   # several GPUs: (T, E, best tok/s or 0: none fits)

    @property
    def budget_hardware(self) -> HardwareSpec:
        """What one rank's memory plan is checked against."""
        return self.rank_hardware or self.hardware

    @property
    def bottleneck(self) -> str:
        return self.prediction.bottleneck

    @property
    def memory(self) -> MemoryPlan:
        return self.prediction.memory


def batch_size_cap(spec: ModelSpec, hw: HardwareSpec, workload: Workload,
                   max_batch_size: int | None = None, paged_kv: bool = False) -> int:
    """Largest N worth searching: asked for, and whose KV cache fits GPU + CPU memory together."""
    prompt = workload.prompt_len_avg if paged_kv and not workload.padding else workload.prompt_len_max
    ctx = prompt + workload.gen_len
    kv_seq = ctx * spec.kv_bytes_per_token
    cap = min(workload.num_requests, (hw.gpu_budget_bytes + hw.cpu_budget_bytes) // kv_seq)
    if max_batch_size is not None:
        cap = min(cap, max_batch_size)
    return int(cap)


def candidate_pairs(n_cap: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, mu) for N in 1..n_cap and mu the smallest micro-batch size of each distinct ceil(N / mu)."""
    ns, mus = [], []
    for n in range(1, n_cap + 1):
        counts = np.arange(1, n + 1)
        mu = np.unique(-(-n // counts))
        ns.append(np.full(mu.shape, n))
        mus.append(mu)
    return np.concatenate(ns).astype(np.int64), np.concatenate(mus).astype(np.int64)


def _impossible(spec: ModelSpec, hw: HardwareSpec, workload: Workload, layout: str = "") -> MemoryBudgetError:
    ctx = workload.prompt_len_max + workload.gen_len
    kv_seq = ctx * spec.kv_bytes_per_token
    smallest = Policy(batch_size=1, micro_batch_size=1, attn_on_gpu=False, ffn_on_gpu=True)
    smallest_needs = memory_plan(spec, smallest, workload).describe(hw)
    return MemoryBudgetError(
        f"no policy fits {spec.name} on {hw.name}{layout} for workload {workload.name} (weights, every expert "
        f"streamed, {spec.streamed_weight_bytes / GiB:.4g} GiB, KV cache of one sequence "
        f"{kv_seq / GiB:.3g} GiB for {ctx} tokens, GPU + CPU budget "
        f"{(hw.gpu_budget_bytes + hw.cpu_budget_bytes) / GiB:.4g} GiB); the smallest policy "
        f"(batch_size=1, attention on CPU, all experts streamed): {smallest_needs}")


def _better(e2e: float, n: int, mu: int, n_res: int, best_e2e: float, best_n: int, best_mu: int,
            best_n_res: int) -> bool:
    """Higher predicted throughput wins; within TIE_RTOL, the larger batch, then the larger micro-batch,
    then more resident experts: once the link hides under compute the roofline rates every residency
    above that point alike, but each streamed expert still costs a copy's fixed overheads (and, on a
    host that plays the GPU, memory bandwidth) that the model leaves out."""
    if e2e > best_e2e * (1 + TIE_RTOL):
        return True
    if e2e < best_e2e * (1 - TIE_RTOL):
        return False
    return (n, mu, n_res) > (best_n, best_mu, best_n_res)


def planned_layouts(spec: ModelSpec, hw: HardwareSpec, parallel: ParallelConfig | None) -> list[ParallelConfig]:
    """The layouts to search: the one asked for (T x E > 1, checked), one GPU on a one-GPU machine, else
    every valid split of the machine's GPUs. Raises a one-line ConfigError when none is valid."""
    if parallel is not None and parallel.world_size > 1:
        problems = parallel_problems(spec, hw, parallel.tensor, parallel.expert)
        if problems:
            raise ConfigError("; ".join(problems))
        return [parallel]
    if hw.gpu.count == 1:
        return [parallel or SINGLE]
    found = [p if parallel is None else ParallelConfig(tensor=p.tensor, expert=p.expert, chunks=parallel.chunks,
                                                       backend=parallel.backend) for p in layouts(spec, hw)]
    if not found:
        g = hw.gpu.count
        why = "; ".join(dict.fromkeys(q for t in range(1, g + 1) if g % t == 0   # each reason once
                                      for q in parallel_problems(spec, hw, t, g // t)))
        raise ConfigError(f"no tensor x expert split of hardware={hw.name}'s {g} GPUs runs {spec.name}: {why}")
    return found


def optimize(spec: ModelSpec, hw: HardwareSpec, workload: Workload, *,
             max_batch_size: int | None = None,
             placements: tuple[tuple[bool, bool], ...] = ALL_PLACEMENTS,
             kv_fraction_step: float = 0.001, prefetch_depth: int = 2, pages_per_layer: int = 0,
             paged_kv: bool = True, lengths: Sequence[int] | None = None, last_batch: str = "full",
             calibrated: bool = False, parallel: ParallelConfig | None = None) -> Plan:
    """Best feasible policy by predicted end-to-end tokens/s (see the module docstring for the space).

    `paged_kv` (CGOPipe's unpadded block pool): the KV cache is planned at the average prompt
    (`memory.kv_cache_tokens`), as the engine admits against it; False: at the longest (dense caches).
    `lengths`: a prompts file's real prompt lengths (a synthetic workload's are known); `last_batch`:
    how the objective charges a last partial batch (`hrm.throughput`); `calibrated`: kernels at the
    profile's measured rates instead of the peaks (`hrm.decode_layer_times`). `parallel`: the T x E
    layout to plan for; None or 1 x 1 on a several-GPU machine: the best of every valid layout.

    Raises MemoryBudgetError when no batch of even one sequence fits, ConfigError when no layout is valid.
    """
    start = time.perf_counter()
    found = []
    evaluated = 0
    for layout in planned_layouts(spec, hw, parallel):
        view = rank_view(spec, hw, layout)
        rank_cap = None if max_batch_size is None else max_batch_size // layout.expert
        places = placements if view.comm is None else tuple(p for p in placements if p[1])
        best, n = _search(view.spec, view.hw, view.workload(workload), view.comm, max_batch_size=rank_cap,
                          placements=places, kv_fraction_step=kv_fraction_step, prefetch_depth=prefetch_depth,
                          pages_per_layer=pages_per_layer, paged_kv=paged_kv,
                          lengths=view.lengths(workload, lengths), last_batch=last_batch, calibrated=calibrated,
                          expert_ranks=layout.expert)
        evaluated += n
        found.append((layout, view, best))
    feasible = [(layout, view, best) for layout, view, best in found if best is not None]
    if not feasible:
        layout, view, _ = found[0]
        where = "" if view.comm is None else f" (one rank of tensor={layout.tensor} x expert={layout.expert})"
        raise _impossible(view.spec, view.hw, view.workload(workload), where)
    layout, view, best = max(feasible, key=lambda f: f[2][0] * f[0].expert)   # first of equals: fewer T
    policy = view.machine_policy(Policy(**best[1]))
    prediction = predict(spec, hw, workload, policy, paged_kv=paged_kv, lengths=lengths, last_batch=last_batch,
                         calibrated=calibrated, parallel=layout)
    prediction.memory.check(view.hw)  # the vectorised search and memory_plan must agree
    searched = tuple((f[0].tensor, f[0].expert, 0.0 if f[2] is None else f[2][0] * f[0].expert) for f in found)
    return Plan(policy=policy, prediction=prediction, hardware=hw, model_name=spec.name,
                workload_name=workload.name, points_evaluated=evaluated, search_s=time.perf_counter() - start,
                parallel=prediction.parallel or layout, rank_hardware=None if view.hw is hw else view.hw,
                layouts_searched=searched if hw.gpu.count > 1 or layout.world_size > 1 else ())


def _placements(spec: ModelSpec, placements: tuple[tuple[bool, bool], ...], scratch_groups: bool = True):
    """(attn_on_gpu, ffn_on_gpu, n_res, dequant_experts) in search order: each resident-expert count, and
    for MXFP4 experts streamed to the GPU (`scratch_groups`: one expert group), the whole layer's scratch
    (0) then 1/2, 1/4, 1/8 of it."""
    for attn_on_gpu, ffn_on_gpu in placements:
        for n_res in range(spec.num_experts + 1) if ffn_on_gpu else (0,):
            n_str = spec.num_experts - n_res
            groups = sorted({n_str // f for f in (2, 4, 8) if n_str // f >= 1}, reverse=True) \
                if scratch_groups and spec.expert_format == "mxfp4" and ffn_on_gpu and n_str > 1 else []
            for dq in (0, *groups):
                yield attn_on_gpu, ffn_on_gpu, n_res, dq


def _search(spec: ModelSpec, hw: HardwareSpec, workload: Workload, comm: RankComm | None, *,
            max_batch_size: int | None, placements: tuple[tuple[bool, bool], ...], kv_fraction_step: float,
            prefetch_depth: int, pages_per_layer: int, paged_kv: bool, lengths: Sequence[int] | None,
            last_batch: str, calibrated: bool,
            expert_ranks: int = 1) -> tuple[tuple[float, dict[str, Any]] | None, int]:
    """(best (e2e tok/s, policy fields) or None, points evaluated) of one rank (`spec`, `hw`, `workload`:
    its own; on one GPU the machine's)."""
    n_cap = batch_size_cap(spec, hw, workload, max_batch_size, paged_kv)
    if n_cap < 1:
        return None, 0
    N, mu = candidate_pairs(n_cap)
    n_mb = -(-N // mu)
    num_pages = np.full(N.shape, pages_per_layer, dtype=np.int64) if pages_per_layer else n_mb
    kv_tokens = kv_tokens_for(N, mu, workload, paged_kv, lengths=lengths)
    kv_total = kv_tokens * spec.kv_bytes_per_token
    gpu_budget, cpu_budget = hw.gpu_budget_bytes, hw.cpu_budget_bytes

    best: tuple[float, dict[str, Any]] | None = None
    best_res = 0   # the best's resident-expert count
    evaluated = 0
    # MXFP4 experts: scratches of fewer experts (`Policy.dequant_experts`) are tried only where the whole
    # layer's scratch left some batch size out for lack of GPU memory (otherwise they only cost passes).
    memory_bound: dict[tuple[bool, int], bool] = {}
    for attn_on_gpu, ffn_on_gpu, n_res, dq in _placements(spec, placements, scratch_groups=expert_ranks == 1):
        if dq and not memory_bound.get((attn_on_gpu, n_res), False):
            continue
        gpu, cpu = memory_pools(spec, workload, batch_size=N, micro_batch_size=mu, num_pages=num_pages,
                                n_res=n_res, kv_gpu_fraction=0.0 * N, attn_on_gpu=attn_on_gpu,
                                prefetch_depth=prefetch_depth, kv_tokens=kv_tokens, paged=paged_kv,
                                lengths=lengths, dequant_experts=dq)
        gpu_other = sum(gpu.values())  # kv GPU share is 0 here (the KV stream buffer is in the activations)
        evaluated += N.size
        if attn_on_gpu:
            room = np.clip((gpu_budget - gpu_other - POOL_ALIGN_ROOM) / kv_total, 0.0, 1.0)
            r_c = np.round(np.floor(room / kv_fraction_step + 1e-9) * kv_fraction_step, 9)
            r_c = np.minimum(r_c, 1.0)
            for _ in range(2):  # guard against float rounding at the GPU limit
                over = gpu_other + padded_pool(np.ceil(r_c * kv_total)) > gpu_budget
                r_c = np.where(over & (r_c > 0), np.maximum(r_c - kv_fraction_step, 0.0), r_c)
            kv_gpu = np.ceil(r_c * kv_total)
        else:
            r_c = 0.0 * N
            kv_gpu = 0.0 * N
        gpu_total = gpu_other + padded_pool(kv_gpu)   # the GPU KV pool with its alignment room
        cpu_total = sum(cpu.values()) - kv_gpu
        ok = (gpu_total <= gpu_budget) & (cpu_total <= cpu_budget)
        if not dq:   # some batch size over the GPU budget by less than the smallest scratch would free
            freed = (spec.num_experts - n_res - max(1, (spec.num_experts - n_res) // 8)) * spec.expert_bytes
            memory_bound[attn_on_gpu, n_res] = bool(((gpu_total > gpu_budget) & (gpu_total - freed <= gpu_budget)
                                                     & (cpu_total <= cpu_budget)).any())
        if not ok.any():
            continue
        idx = np.flatnonzero(ok)
        t = decode_layer_times(spec, hw, workload, batch_size=N[idx], num_micro_batches=n_mb[idx],
                               attn_on_gpu=attn_on_gpu, ffn_on_gpu=ffn_on_gpu, n_res=n_res,
                               kv_gpu_fraction=r_c[idx], lengths=lengths, calibrated=calibrated, comm=comm,
                               dequant_experts=dq)
        t_pre = prefill_time(spec, hw, workload, batch_size=N[idx], num_micro_batches=n_mb[idx],
                             n_res=n_res, kv_gpu_fraction=r_c[idx], lengths=lengths, calibrated=calibrated,
                             comm=comm, dequant_experts=dq)
        _, e2e = throughput(spec, workload, N[idx], t["t_layer"], t_pre, last_batch)
        top = float(e2e.max())
        near = idx[e2e >= top * (1 - TIE_RTOL)]
        i = int(near[np.lexsort((mu[near], N[near]))[-1]])  # ties: largest N, then fewest micro-batches
        if best is None or _better(top, int(N[i]), int(mu[i]), n_res, best[0], best[1]["batch_size"],
                                   best[1]["micro_batch_size"], best_res):
            best_res = n_res
            best = (top, dict(
                batch_size=int(N[i]), micro_batch_size=int(mu[i]), attn_on_gpu=attn_on_gpu,
                ffn_on_gpu=ffn_on_gpu, expert_gpu_fraction=n_res / spec.num_experts,
                kv_gpu_fraction=float(r_c[i]), pages_per_layer=pages_per_layer,
                prefetch_depth=prefetch_depth, dequant_experts=dq))
    return best, evaluated


# ---- reports -------------------------------------------------------------------------------------

def plan_document(plan: Plan) -> dict[str, Any]:
    """JSON-ready description of a plan (several GPUs: the layout, and one rank's memory and budget)."""
    mem, budget = plan.memory, plan.budget_hardware
    doc = {
        "model": plan.model_name,
        "hardware": plan.hardware.name,
        "workload": plan.workload_name,
        "policy": asdict(plan.policy),
        "prediction": plan.prediction.as_dict(),
        "bottleneck": plan.bottleneck,
        "memory": {
            "gpu": dict(mem.gpu), "cpu": dict(mem.cpu),
            "gpu_total_bytes": mem.gpu_total_bytes, "cpu_total_bytes": mem.cpu_total_bytes,
            "gpu_budget_bytes": budget.gpu_budget_bytes,
            "cpu_budget_bytes": budget.cpu_budget_bytes,
            "gpu_count": plan.hardware.gpu.count,
        },
        "search": {"points_evaluated": plan.points_evaluated, "search_s": plan.search_s},
    }
    if plan.hardware.gpu.count > 1 or plan.parallel.world_size > 1:
        doc["parallel"] = asdict(plan.parallel) | {"world_size": plan.parallel.world_size}
        doc["memory"]["per"] = "rank"   # each of the T x E ranks holds this much, all alike
        doc["search"]["layouts"] = [{"tensor": t, "expert": e, "e2e_tok_s": v} for t, e, v in plan.layouts_searched]
    return doc


def _fmt_gib(nbytes: float) -> str:
    return f"{nbytes / GiB:8.2f}"


def command_hint(plan: Plan) -> str:
    """The overrides that run this plan's policy and layout (`moe-lightning task=generate ...`)."""
    p, par = plan.policy, plan.parallel
    hint = (f"policy.batch_size={p.batch_size} policy.micro_batch_size={p.micro_batch_size} "
            f"policy.attn_on_gpu={str(p.attn_on_gpu).lower()} policy.ffn_on_gpu={str(p.ffn_on_gpu).lower()} "
            f"policy.expert_gpu_fraction={p.expert_gpu_fraction:.6g} policy.kv_gpu_fraction={p.kv_gpu_fraction:.6g}")
    if p.dequant_experts:
        hint += f" policy.dequant_experts={p.dequant_experts}"
    if plan.hardware.gpu.count > 1 or par.world_size > 1:
        hint += f" parallel.tensor={par.tensor} parallel.expert={par.expert}"
    return hint


def plan_table(plan: Plan) -> str:
    """A readable terminal table: policy, predicted throughput, bottleneck, memory per pool vs budget."""
    p, pred, hw, budget = plan.policy, plan.prediction, plan.hardware, plan.budget_hardware
    g, par = hw.gpu.count, plan.parallel
    several = g > 1 or par.world_size > 1
    lines = [f"HRM plan: {plan.model_name} on {hw.name} ({g}x {hw.gpu.name}), workload {plan.workload_name}",
             "", "policy"]
    rows = [
        ("batch_size (N)", p.batch_size), ("micro_batch_size (mu)", p.micro_batch_size),
        ("micro-batches per step", p.num_micro_batches),
        ("attn_on_gpu (A_g)", p.attn_on_gpu), ("ffn_on_gpu (F_g)", p.ffn_on_gpu),
        ("expert_gpu_fraction (r_w)", f"{p.expert_gpu_fraction:.4g}"),
        ("kv_gpu_fraction (r_c)", f"{p.kv_gpu_fraction:.4g}"),
        ("pages_per_layer", p.pages_per_layer or f"{p.num_pages} (one per micro-batch)"),
        ("prefetch_depth", p.prefetch_depth),
    ]
    if p.dequant_experts:
        rows.append(("dequant_experts", f"{p.dequant_experts} (MXFP4 experts dequantized per group, per micro-batch)"))
    if several:
        chunks = f", EPS-MoE chunks {par.chunks}" if par.expert > 1 else ""
        rows[:0] = [("parallel (T x E)", f"tensor={par.tensor} x expert={par.expert} ({par.world_size} ranks{chunks}; "
                                         "N and mu are the whole machine's)")]
        ic = hw.interconnect
        rows.append(("inter-GPU link", f"{ic.kind}, {ic.bandwidth_gbps:g} GB/s per direction, {ic.latency_us:g} us"
                                       + (", host links share one switch" if ic.shared_host_link else "")))
    lines += [f"  {k:<28}{v}" for k, v in rows]
    lines += ["", "prediction" + (" (per layer times: one rank's)" if several else ""),
              f"  {'decode tokens/s':<28}" + ("- (no decode step)" if pred.decode_tok_s is None else
                                               f"{pred.decode_tok_s:.2f}"),
              f"  {'end-to-end tokens/s':<28}{pred.e2e_tok_s:.2f}",
              f"  {'prefill / decode s':<28}{pred.prefill_s:.2f} / {pred.decode_s:.2f}",
              f"  {'per layer link/cpu/gpu ms':<28}{pred.t_link * 1e3:.3f} / {pred.t_cpu * 1e3:.3f} / "
              f"{pred.t_gpu * 1e3:.3f}"]
    if several:
        lines.append(f"  {'of which gpu: collectives':<28}{pred.t_comm * 1e3:.3f}")
    lines += [f"  {'bottleneck':<28}{pred.bottleneck}",
              "", f"memory (GiB; one rank of {par.world_size}: its GPU, its share of the host)" if several else
              f"memory (GiB; GPU per device over {g} GPU)",
              f"  {'pool':<22}{'GPU':>9}{'CPU':>9}"]
    for pool in dict.fromkeys(GPU_POOLS + CPU_POOLS):
        gpu_b = plan.memory.gpu.get(pool)
        cpu_b = plan.memory.cpu.get(pool)
        lines.append(f"  {pool:<22}{_fmt_gib(gpu_b) if gpu_b is not None else '       -':>9}"
                     f"{_fmt_gib(cpu_b) if cpu_b is not None else '       -':>9}")
    lines.append(f"  {'total':<22}{_fmt_gib(plan.memory.gpu_total_bytes):>9}"
                 f"{_fmt_gib(plan.memory.cpu_total_bytes):>9}")
    lines.append(f"  {'budget':<22}{_fmt_gib(budget.gpu_budget_bytes):>9}{_fmt_gib(budget.cpu_budget_bytes):>9}")
    lines.append("")
    if several and len(plan.layouts_searched) > 1:
        lines.append("layouts: " + ", ".join(f"T={t} x E={e}: " + (f"{v:.1f} tok/s" if v else "does not fit")
                                             for t, e, v in plan.layouts_searched))
    if not p.ffn_on_gpu:
        lines.append("note: ffn_on_gpu=false (the MoE FFN on the CPU) is the HRM's answer over the paper's four "
                     "placements; the engine does not run it (task.placements=engine plans what it runs)")
    lines.append(f"search: {plan.points_evaluated} points in {plan.search_s:.2f} s")
    if several:
        lines.append(f"run it: this command with task=generate (or task=bench) and {command_hint(plan)}")
        if par.expert > 1:
            lines.append(f"note: each of the {par.expert} expert groups runs its own 1/{par.expert} of the requests "
                         "(data-parallel attention, as EPS-MoE serves), with N and mu its share of the machine's")
    return "\n".join(lines)
