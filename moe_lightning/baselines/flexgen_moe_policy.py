"""An MoE-aware variant of FlexGen's policy search (`flexgen_moe_policy`); NOT FlexGen's own model.

`moe_lightning.baselines.flexgen_policy` is the faithful port of FlexGen's cost model and search, and
what the `flexgen` and `flexgen_c` baselines use. This variant keeps FlexGen's shape (an LP over
placement percentages for each (GPU batch size, number of GPU batches)) but changes the model so that
it describes this runtime running an MoE, on the hardware profile's roofline:
- every compute term is a roofline `max(FLOPs / peak, bytes / bandwidth)` and the expert weights are
  re-read from HBM once per GPU batch (FlexGen has no HBM term);
- the latency of a layer is the max of ALL its terms (the paper's form; FlexGen's code adds the weight
  load to the max of the rest);
- attention on the GPU streams CPU-resident KV over the link (FlexGen charges it as CPU attention);
- the memory constraints are this runtime's own pools (`moe_lightning.memory`), not FlexGen's formulas;
- `(gbs, num_gb)` are powers of two (FlexGen enumerates gbs 1, 2, 3, 4, 8, ... and every num_gb);
- profile peaks instead of fitted constants.

The search: for each (GPU batch size, number of GPU batches) in the enumeration, a linear program
over the placement percentages of the weights (`w_g`), the KV cache (`c_g`) and the activations
(`h_g`) on the GPU (the rest on the CPU; this runtime has no disk tier) minimises the modelled
latency of generating `gen_len` tokens, `L * T_pre + (gen_len - 1) * L * T_gen`, with `T_pre`,
`T_gen` >= every per-layer term below (I/O and compute overlap, so a layer costs its slowest term);
the pair with the best throughput `N * gen_len / latency` wins.

Per layer and step, `N = gbs * num_gb` sequences, prompt `s` (the longest with padding, else the
average), decode context `ctx = s + gen_len / 2`, `W` the layer's expert bytes (over the link: as they
stream, MXFP4 experts 4-bit), `a = N * h1 * d` the hidden states:
- decode, attention on the GPU (S4): H2D `(1-w_g) W + (1-c_g) N ctx kv + (1-h_g) a`; D2H
  `(1-c_g) N kv_new + (1-h_g) a`; compute `T_ffn + T_proj + T_attn^gpu`;
- decode, attention on the CPU (FlexGen(c), `cpu_cache_compute`): the CPU-resident KV is attended by
  the CPU, so q/k/v go down and attention outputs come up instead of the cache; compute
  `T_ffn + T_proj + c_g T_attn^gpu + (1-c_g) T_attn^cpu` (FlexGen adds CPU and GPU compute: serial);
- prefill: H2D `(1-w_g) W + (1-h_g) N s h1 d`; D2H `(1-c_g) N s kv_new + (1-h_g) N s h1 d`; compute
  at the GPU roofline;
- every compute term is `max(FLOPs / peak, bytes / bandwidth)`, expert weights read once per GPU batch;
- memory: the GPU and CPU totals of `moe_lightning.memory` (the pools the engine allocates), which are
  affine in `(w_g, c_g, h_g)` between the corners evaluated exactly.

Mapped onto this runtime, and what that changes:
- the weight percentage applies to expert weights at expert granularity (`r_w = n_res / E`); the
  non-expert weights always live on the GPU (as the engine keeps them). The LP's `w_g` is snapped to
  the two neighbouring expert counts, the LP re-solved with `w_g` fixed, and the better one kept;
- `c_g` is snapped down to whole GPU batches (the engine places KV per micro-batch);
- activations: the engine keeps a batch's hidden states on the GPU, so `h_g` is bounded to 1 by
  default (`act_gpu_min`); the LP supports any bound, but a policy with `h_g < 1` could not run;
- weights are streamed one whole layer at a time (`pages_per_layer = 1`, `prefetch_depth = 1`).
Not modelled (as in FlexGen's model): kernel launch overheads, the CPU -> pinned staging copy, the
growth of the context during decode beyond its average, imbalance between experts.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from moe_lightning.baselines.lp import solve_lp
from moe_lightning.config import GB, HardwareSpec, ModelSpec, Policy, Workload
from moe_lightning.errors import MemoryBudgetError
from moe_lightning.memory import memory_plan, memory_pools

VARS = ("w_g", "c_g", "h_g")   # placement percentages on the GPU (fractions)
T_MAX_S = 1e7                  # an upper bound on the per-layer latency variables (keeps the LP bounded)
PAGES, PREFETCH = 1, 1         # FlexGen streams a whole layer, one layer ahead


@dataclass(frozen=True)
class Affine:
    """`const + coef . (w_g, c_g, h_g)`."""

    const: float
    coef: tuple[float, float, float]

    def at(self, v) -> float:
        return self.const + float(np.dot(self.coef, v))


def _on_cpu(amount: float, var: int) -> Affine:
    """`amount * (1 - v[var])`: the part of `amount` that is not on the GPU."""
    coef = [0.0, 0.0, 0.0]
    coef[var] = -amount
    return Affine(amount, tuple(coef))


def _sum(*terms: Affine) -> Affine:
    return Affine(sum(t.const for t in terms), tuple(np.sum([t.coef for t in terms], axis=0).tolist()))


def _scale(t: Affine, k: float) -> Affine:
    return Affine(t.const * k, tuple(c * k for c in t.coef))


def _roofline(flops: float, nbytes: float, peak: float, bw: float) -> float:
    return max(flops / peak, nbytes / bw)


@dataclass(frozen=True)
class CostModel:
    """FlexGen's per-layer latency terms for one (gbs, num_gb, attention placement)."""

    prefill: tuple[Affine, ...]
    decode: tuple[Affine, ...]
    num_layers: int
    gen_len: int

    def latency_s(self, v) -> float:
        t_pre = max(t.at(v) for t in self.prefill)
        t_gen = max(t.at(v) for t in self.decode)
        return self.num_layers * (t_pre + (self.gen_len - 1) * t_gen)


def cost_model(spec: ModelSpec, hw: HardwareSpec, workload: Workload, gbs: int, num_gb: int,
               attn_on_gpu: bool) -> CostModel:
    g = hw.gpu.count
    p_g, b_g = hw.gpu.peak_tflops * 1e12 * g, hw.gpu.bandwidth_gbps * GB * g
    p_c, b_c = hw.cpu.peak_tflops * 1e12, hw.cpu.bandwidth_gbps * GB
    h2d, d2h = hw.link.h2d_gbps * GB * g, hw.link.d2h_gbps * GB * g
    d, H, F, k = spec.dtype_bytes, spec.hidden_size, spec.intermediate_size, spec.top_k
    nq = spec.num_heads
    N = gbs * num_gb
    # Per-layer terms averaged over the layers: dense layers stream no experts and run their MLP instead.
    f = spec.num_moe_layers / spec.num_layers
    W = f * spec.num_experts * spec.expert_bytes
    W_link = f * spec.num_experts * spec.expert_stream_bytes   # as they cross the link (MXFP4: 4-bit)
    mlp_flops = (1 - f) * 2 * spec.dense_mlp_params   # per token
    s = workload.prompt_len_max if workload.padding else workload.prompt_len_avg
    ctx = s + workload.gen_len / 2
    kv_new = spec.kv_token_layer_elements * d
    attn_w = spec.attention_params * d
    act = N * H * d
    W_, C_, A_ = 0, 1, 2

    # decode
    t_ffn = _roofline(f * 2 * N * H * F * 3 * k + N * mlp_flops, num_gb * W + 2 * act, p_g, b_g)
    t_proj = _roofline(2 * N * spec.attention_params, num_gb * attn_w, p_g, b_g)
    attn_flops, attn_bytes = 2 * N * ctx * nq * (spec.attn_k_dim + spec.attn_v_dim), N * ctx * kv_new
    t_attn_g = _roofline(attn_flops, attn_bytes, p_g, b_g)
    t_attn_c = _roofline(attn_flops, attn_bytes, p_c, b_c)
    if attn_on_gpu:
        up = _sum(_on_cpu(W_link, W_), _on_cpu(N * ctx * kv_new, C_), _on_cpu(act, A_))
        down = _sum(_on_cpu(N * kv_new, C_), _on_cpu(act, A_))
        comp = Affine(t_ffn + t_proj + t_attn_g, (0.0, 0.0, 0.0))
    else:
        up = _sum(_on_cpu(W_link, W_), _on_cpu(N * spec.attn_out_elements * d, C_), _on_cpu(act, A_))
        down = _sum(_on_cpu(N * spec.qkv_elements * d, C_), _on_cpu(act, A_))
        comp = _sum(Affine(t_ffn + t_proj + t_attn_g, (0.0, 0.0, 0.0)), _on_cpu(t_attn_c - t_attn_g, C_))
    decode = (_scale(up, 1 / h2d), _scale(down, 1 / d2h), comp)

    # prefill
    tokens = N * s
    up_p = _sum(_on_cpu(W_link, W_), _on_cpu(tokens * H * d, A_))
    down_p = _sum(_on_cpu(tokens * kv_new, C_), _on_cpu(tokens * H * d, A_))
    flops_p = (2 * tokens * (f * H * F * 3 * k + spec.attention_params) + tokens * mlp_flops
               + N * s * s * nq * (spec.attn_k_dim + spec.attn_v_dim))
    comp_p = Affine(_roofline(flops_p, num_gb * (W + attn_w), p_g, b_g), (0.0, 0.0, 0.0))
    prefill = (_scale(up_p, 1 / h2d), _scale(down_p, 1 / d2h), comp_p)
    return CostModel(prefill, decode, spec.num_layers, workload.gen_len)


def memory_model(spec: ModelSpec, workload: Workload, gbs: int, num_gb: int,
                 attn_on_gpu: bool) -> tuple[Affine, Affine]:
    """GPU and CPU bytes of the engine's memory plan as affine functions of (w_g, c_g, h_g)."""
    E = spec.num_experts

    def totals(n_res: int, r_c: float) -> tuple[float, float, float]:
        gpu, cpu = memory_pools(spec, workload, batch_size=gbs * num_gb, micro_batch_size=gbs,
                                num_pages=PAGES, n_res=n_res, kv_gpu_fraction=r_c, attn_on_gpu=attn_on_gpu,
                                prefetch_depth=PREFETCH)
        return float(sum(gpu.values())), float(sum(cpu.values())), float(gpu["activations"])

    g0, c0, act = totals(0, 0.0)
    gw, cw, _ = totals(E, 0.0)
    gc, cc, _ = totals(0, 1.0)
    gpu = Affine(g0 - act, (gw - g0, gc - g0, act))
    cpu = Affine(c0 + act, (cw - c0, cc - c0, -act))
    return gpu, cpu


def solve_placement(cost: CostModel, gpu: Affine, cpu: Affine, hw: HardwareSpec,
                    bounds: list[tuple[float, float]]):
    """FlexGen's LP: x = (w_g, c_g, h_g, T_pre, T_gen); min L T_pre + (n-1) L T_gen."""
    L, n = cost.num_layers, cost.gen_len
    c = [0.0, 0.0, 0.0, L, (n - 1) * L]
    rows, rhs = [], []
    for t in cost.prefill:
        rows.append([*t.coef, -1.0, 0.0])
        rhs.append(-t.const)
    for t in cost.decode:
        rows.append([*t.coef, 0.0, -1.0])
        rhs.append(-t.const)
    rows += [[*gpu.coef, 0.0, 0.0], [*cpu.coef, 0.0, 0.0]]
    rhs += [hw.gpu_budget_bytes - gpu.const, hw.cpu_budget_bytes - cpu.const]
    return solve_lp(c, rows, rhs, [*bounds, (0.0, T_MAX_S), (0.0, T_MAX_S)])


@dataclass(frozen=True)
class FlexGenMoEPlan:
    policy: Policy
    predicted_tok_s: float
    gpu_batch_size: int
    num_gpu_batches: int
    placement_lp: dict[str, float]        # the LP's continuous optimum for the chosen (gbs, num_gb)
    placement: dict[str, float]           # what runs (expert / micro-batch granularity)
    pairs_evaluated: int
    lp_solves: int
    search_s: float
    infeasible_pairs: list[tuple[int, int]] = field(default_factory=list)


def batch_pairs(max_batch: int) -> list[tuple[int, int]]:
    """(gbs, num_gb) as FlexGen enumerates them: powers of two (and the cap itself) with gbs * num_gb <= cap."""
    pows = [2 ** e for e in range(int(math.log2(max(1, max_batch))) + 1)]
    sizes = sorted({*pows, max_batch})
    return [(gbs, nb) for gbs in sizes for nb in pows if gbs * nb <= max_batch]


def flexgen_moe_policy(spec: ModelSpec, hw: HardwareSpec, workload: Workload, *, attn_on_gpu: bool = True,
                       act_gpu_min: float = 1.0, max_batch_size: int | None = None) -> FlexGenMoEPlan:
    """This variant's choice: the (gbs, num_gb, placement) with the best modelled throughput whose memory
    plan fits `hw`. Raises MemoryBudgetError when no pair fits."""
    start = time.perf_counter()
    E = spec.num_experts
    cap = min(workload.num_requests, max_batch_size or workload.num_requests)
    best: tuple[float, FlexGenMoEPlan] | None = None
    solves, infeasible = 0, []
    pairs = batch_pairs(cap)
    for gbs, num_gb in pairs:
        cost = cost_model(spec, hw, workload, gbs, num_gb, attn_on_gpu)
        gpu, cpu = memory_model(spec, workload, gbs, num_gb, attn_on_gpu)
        h_bounds = (act_gpu_min, 1.0)
        lp = solve_placement(cost, gpu, cpu, hw, [(0.0, 1.0), (0.0, 1.0), h_bounds])
        solves += 1
        if lp is None:
            infeasible.append((gbs, num_gb))
            continue
        w_lp = float(lp.x[0])
        found = None
        for n_res in sorted({math.floor(w_lp * E + 1e-6), math.ceil(w_lp * E - 1e-6)}):
            fixed = solve_placement(cost, gpu, cpu, hw, [(n_res / E, n_res / E), (0.0, 1.0), h_bounds])
            solves += 1
            if fixed is None:
                continue
            policy = _fit(spec, hw, workload, gbs, num_gb, attn_on_gpu, n_res, float(fixed.x[1]))
            if policy is None:
                continue
            v = (policy.expert_gpu_fraction, policy.kv_gpu_fraction, 1.0)
            tok_s = gbs * num_gb * workload.gen_len / cost.latency_s(v)
            if found is None or tok_s > found[0]:
                found = (tok_s, policy, v)
        if found is None:
            infeasible.append((gbs, num_gb))
            continue
        tok_s, policy, v = found
        if best is None or tok_s > best[0] * (1 + 1e-9) or (
                tok_s >= best[0] * (1 - 1e-9) and policy.batch_size > best[1].policy.batch_size):
            best = (tok_s, FlexGenMoEPlan(
                policy=policy, predicted_tok_s=tok_s, gpu_batch_size=gbs, num_gpu_batches=num_gb,
                placement_lp=dict(zip(VARS, map(float, lp.x[:3]))), placement=dict(zip(VARS, v)),
                pairs_evaluated=0, lp_solves=0, search_s=0.0))
    if best is None:
        smallest = Policy(batch_size=1, micro_batch_size=1, attn_on_gpu=attn_on_gpu, pages_per_layer=PAGES,
                          prefetch_depth=PREFETCH)
        raise MemoryBudgetError(f"FlexGen's LP (MoE-aware variant): no (gpu batch size, number of gpu batches) "
                                f"fits {spec.name} on {hw.name}; the smallest: "
                                f"{memory_plan(spec, smallest, workload).describe(hw)}")
    plan = best[1]
    return FlexGenMoEPlan(**{**plan.__dict__, "pairs_evaluated": len(pairs), "lp_solves": solves,
                          "search_s": time.perf_counter() - start, "infeasible_pairs": infeasible})


def _fit(spec, hw, workload, gbs, num_gb, attn_on_gpu, n_res, c_g) -> Policy | None:
    """The runnable policy nearest below the LP's (n_res, c_g): c_g down to whole GPU batches, lowered
    further until the exact memory plan fits."""
    batches = math.floor(c_g * num_gb + 1e-9)
    for b in range(batches, -1, -1):
        policy = Policy(batch_size=gbs * num_gb, micro_batch_size=gbs, attn_on_gpu=attn_on_gpu, ffn_on_gpu=True,
                        expert_gpu_fraction=n_res / spec.num_experts, kv_gpu_fraction=b / num_gb,
                        pages_per_layer=PAGES, prefetch_depth=PREFETCH)
        if memory_plan(spec, policy, workload).fits(hw):
            return policy
    return None
