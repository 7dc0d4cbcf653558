"""The systems' own policy choices: FlexGen's search as FlexGen does it (its LP, its enumeration,
mapped onto the runtime and checked against the engine's memory plan), the MoE-aware variant,
DeepSpeed's largest single batch, and the dispatch by system name. The cost-model terms themselves are
checked against hand-worked numbers in test_flexgen_cost.py."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest

from moe_lightning.baselines import flexgen_cost as fc
from moe_lightning.baselines.flexgen_constants import MOE_LIGHTNING_T4
from moe_lightning.baselines.flexgen_moe_policy import cost_model, flexgen_moe_policy, memory_model
from moe_lightning.baselines.flexgen_policy import (
    flexgen_policy,
    gbs_candidates,
    nb_upper_bound,
    search,
    solve_placement,
)
from moe_lightning.baselines.lp import solve_lp, solve_lp_vertices
from moe_lightning.baselines.policies import CHOOSERS, choose_policy, policy_summary
from moe_lightning.config import CpuSpec, GpuSpec, HardwareSpec, LinkSpec, ModelSpec, Policy, Workload
from moe_lightning.errors import ConfigError, MemoryBudgetError
from moe_lightning.memory import memory_plan

MIXTRAL = ModelSpec(name="mixtral-8x7b", num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32,
                    num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, vocab_size=32000, dtype="float16",
                    weights="random")
T4 = HardwareSpec(name="t4", gpu=GpuSpec(name="T4", memory_gib=15, bandwidth_gbps=300, peak_tflops=65),
                  cpu=CpuSpec(memory_gib=192, bandwidth_gbps=100, peak_tflops=0.8), link=LinkSpec(16, 16))
MTBENCH = Workload(name="mtbench", prompt_len_avg=77, prompt_len_max=418, gen_len=128, num_requests=1024)
SMALL_GPU = HardwareSpec(name="small", gpu=GpuSpec(memory_gib=0.0025, usable_fraction=1.0))
TINY_WL = Workload(prompt_len_avg=16, prompt_len_max=40, gen_len=16, num_requests=64)

CASES = [("mixtral-t4", MIXTRAL, T4, MTBENCH), ("tiny-cpu", ModelSpec(), HardwareSpec(), TINY_WL),
         ("tiny-small-gpu", ModelSpec(), SMALL_GPU, TINY_WL)]


@functools.cache
def mixtral_t4(padding: bool, attn_on_gpu: bool = True):
    """FlexGen's search on Mixtral-8x7B / T4 / MT-Bench (seconds each: computed once per session)."""
    return flexgen_policy(MIXTRAL, T4, dataclasses.replace(MTBENCH, padding=padding), attn_on_gpu=attn_on_gpu)


# ---- the LP solvers ----

def test_solve_lp_exact_and_infeasible():
    for solve in (solve_lp, solve_lp_vertices):
        r = solve([-1, -1], [[1, 2], [3, 1]], [4, 6], [(0, 10), (0, 10)])
        np.testing.assert_allclose(r.x, [1.6, 1.2], atol=1e-9)
        assert r.fun == pytest.approx(-2.8)
        assert solve([1, 1], [[1, 1]], [-1], [(0, 1), (0, 1)]) is None  # x + y <= -1 with x, y >= 0
    # an unbounded upper bound: min -x with x <= 3 from a row only
    assert solve_lp([-1.0], [[1.0]], [3.0], [(0.0, math.inf)]).x[0] == pytest.approx(3.0)


def test_simplex_agrees_with_vertex_enumeration():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, m = int(rng.integers(2, 5)), int(rng.integers(1, 7))
        a, b, c = rng.normal(size=(m, n)), rng.normal(size=m), rng.normal(size=n)
        bounds = [(float(rng.uniform(-1, 0)), float(rng.uniform(0, 2))) for _ in range(n)]
        fast, ref = solve_lp(c, a, b, bounds), solve_lp_vertices(c, a, b, bounds)
        assert (fast is None) == (ref is None)
        if ref is not None:
            assert fast.fun == pytest.approx(ref.fun, rel=1e-7, abs=1e-9)


# ---- FlexGen's search: its enumeration, on made-up throughputs ----

def test_gbs_enumeration_is_flexgens():
    it = gbs_candidates()
    assert [next(it) for _ in range(8)] == [1, 2, 3, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("last, expected_calls", [(0, [1]), (1, [1, 2, 1]), (5, [1, 2, 4, 8, 6, 5]),
                                                 (8, [1, 2, 4, 8, 16, 12, 10, 9, 8])])
def test_nb_upper_bound_doubles_then_bisects(last, expected_calls):
    calls = []

    def feasible(nb):
        calls.append(nb)
        return nb <= last

    assert nb_upper_bound(feasible) == last
    assert calls == expected_calls       # FlexGen's get_nb_ub: 1, 2, 4, ... then binary search


def test_search_tries_every_nb_and_stops_at_the_first_drop():
    table = {
        (1, 1): 1.0, (1, 2): 2.0, (1, 3): 5.0, (1, 4): 4.0, (1, 5): 9.0,   # drop at 4: 9 is never seen
        (2, 1): 4.0,
        (3, 1): 6.0, (3, 2): 7.0,                                         # best: gbs 3, nb 2
    }
    asked = []

    def throughput(gbs, nb):
        asked.append((gbs, nb))
        return table.get((gbs, nb))

    assert search(throughput) == ((3, 2), 7.0)
    assert (1, 5) in asked and max(g for g, _ in asked) == 4     # nb_ub probes 5; gbs 4 ends the search
    assert search(throughput, gbs=1) == ((1, 3), 5.0)             # FlexGen's --gbs


def test_num_gpu_batches_is_not_a_power_of_two():
    # gbs fixed at 8 and at most 40 requests: get_nb_ub finds 5 (1, 2, 4 feasible, 8 not, then 6, 5);
    # T4's PCIe-bound decode amortises the weight load over the block, so more GPU batches is faster
    plan = flexgen_policy(MIXTRAL, T4, dataclasses.replace(MTBENCH, padding=True), gbs=8, max_batch_size=40)
    assert (plan.gpu_batch_size, plan.num_gpu_batches) == (8, 5)


# ---- FlexGen's search on Mixtral / T4 (the fitted MoE-Lightning constants) ----

def test_mixtral_t4_uses_moe_lightnings_t4_fit():
    assert mixtral_t4(True).constants == MOE_LIGHTNING_T4.name


def test_padding_shrinks_the_batch_that_runs():
    """FlexGen's LP takes all 1024 requests padded or not: its CPU peak, padded, stays within alpha *
    192 GiB (as FlexGen counts, GB = 2**30). The engine's dense cache at 418 + 128 tokens per sequence
    cannot hold them, so the padded policy that runs is shrunk below the unpadded one, and FlexGen's own
    model predicts less for it."""
    padded, unpadded = mixtral_t4(True), mixtral_t4(False)
    bls = lambda p: p.gpu_batch_size * p.num_gpu_batches
    assert bls(unpadded) == bls(padded) == MTBENCH.num_requests
    assert padded.flexgen_peaks_gb["cpu_peak_g"] > unpadded.flexgen_peaks_gb["cpu_peak_g"]
    assert padded.flexgen_peaks_gb["cpu_peak_g"] <= 0.8 * 192 * 2**30 / 1e9
    assert padded.adjusted and padded.policy.batch_size < unpadded.policy.batch_size
    assert padded.lp_tok_s < unpadded.lp_tok_s


def test_flexgen_lp_is_optimal_over_a_placement_grid():
    """At the chosen (gbs, num_gb), no grid point of (wg, cg, hg) inside FlexGen's memory constraints has
    a lower modelled latency than the LP's optimum (the model's functions, not the LP's rows)."""
    plan = mixtral_t4(True)
    x = fc.shape_of(MIXTRAL, dataclasses.replace(MTBENCH, padding=True), plan.gpu_batch_size,
                    plan.gpu_batch_size * plan.num_gpu_batches)
    gmem, cmem = fc.capacities(T4)
    best = solve_placement(x, MOE_LIGHTNING_T4, gmem, cmem)
    assert best.throughput_tok_s == pytest.approx(plan.lp_tok_s)
    t_best = fc.latency_s(x, MOE_LIGHTNING_T4, best.percents)
    for w in np.linspace(0, 1, 21):
        for c in np.linspace(0, 1, 11):
            for h in np.linspace(0, 1, 11):
                p = fc.Percents.gpu_cpu(w, c, h)
                if (max(fc.gpu_peak_p(x, p), fc.gpu_peak_g(x, p)) <= gmem
                        and max(fc.cpu_peak_p(x, p), fc.cpu_peak_g(x, p)) <= cmem):
                    assert fc.latency_s(x, MOE_LIGHTNING_T4, p) >= t_best * (1 - 1e-9)


def test_flexgen_and_flexgen_c_share_the_lp():
    s4, c = mixtral_t4(False, True), mixtral_t4(False, False)
    assert (s4.gpu_batch_size, s4.num_gpu_batches, s4.percents) == (c.gpu_batch_size, c.num_gpu_batches, c.percents)
    assert s4.policy.attn_on_gpu and not c.policy.attn_on_gpu


@pytest.mark.parametrize("padding", [True, False])
def test_mixtral_t4_is_adjusted_to_the_engines_pools(padding):
    """FlexGen's formulas leave out pools the engine allocates (the pinned staging ring, embeddings,
    float32 intermediates, the dense KV of the longest prompt), so on T4 its choice is shrunk."""
    plan = mixtral_t4(padding)
    lp_policy_n = plan.gpu_batch_size * plan.num_gpu_batches
    assert plan.adjusted and "does not fit the engine's pools" in plan.adjustment
    assert plan.policy.batch_size < lp_policy_n
    assert memory_plan(MIXTRAL, plan.policy, dataclasses.replace(MTBENCH, padding=padding)).fits(T4)
    assert 0 < plan.predicted_tok_s <= plan.lp_tok_s * 1.001


def test_mapping_without_adjustment_snaps_to_experts_and_gpu_batches():
    plan = flexgen_policy(ModelSpec(), HardwareSpec(), TINY_WL)
    p = plan.policy
    assert not plan.adjusted and plan.adjustment == ""
    assert (p.micro_batch_size, p.num_micro_batches) == (plan.gpu_batch_size, plan.num_gpu_batches)
    assert p.expert_gpu_fraction == math.floor(plan.percents["wg"] * 8 + 1e-6) / 8
    assert p.kv_gpu_fraction == math.floor(plan.percents["cg"] * plan.num_gpu_batches + 1e-6) / plan.num_gpu_batches
    assert plan.placement["hg"] == 1.0 and plan.constants.startswith("derived from profile 'cpu'")


@pytest.mark.parametrize("case, spec, hw, wl", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("attn_on_gpu", [True, False])
def test_flexgen_policy_fits_the_memory_plan(case, spec, hw, wl, attn_on_gpu):
    plan = mixtral_t4(wl.padding, attn_on_gpu) if case == "mixtral-t4" else \
        flexgen_policy(spec, hw, wl, attn_on_gpu=attn_on_gpu)
    p = plan.policy
    assert memory_plan(spec, p, wl).fits(hw)
    assert p.attn_on_gpu == attn_on_gpu and p.ffn_on_gpu and p.num_pages == 1 and p.prefetch_depth == 1
    assert p.batch_size <= wl.num_requests and plan.predicted_tok_s > 0 and plan.lp_solves > 0
    assert all(0 <= v <= 1 for v in plan.percents.values())
    assert plan.percents["wg"] + plan.percents["wc"] == pytest.approx(1.0)   # no disk tier
    # expert granularity and whole GPU batches of KV
    assert p.expert_gpu_fraction * spec.num_experts == pytest.approx(round(p.expert_gpu_fraction * spec.num_experts))
    assert p.kv_gpu_fraction * p.num_micro_batches == pytest.approx(round(p.kv_gpu_fraction * p.num_micro_batches))


def test_flexgen_reports_when_nothing_is_feasible():
    hw = HardwareSpec(name="nothing", gpu=GpuSpec(memory_gib=1e-6, usable_fraction=1.0))
    with pytest.raises(MemoryBudgetError, match="FlexGen's LP"):
        flexgen_policy(ModelSpec(), hw, TINY_WL)


# ---- the MoE-aware variant ----

@pytest.mark.parametrize("attn_on_gpu", [True, False])
def test_moe_variant_fits_the_memory_plan(attn_on_gpu):
    plan = flexgen_moe_policy(ModelSpec(), SMALL_GPU, TINY_WL, attn_on_gpu=attn_on_gpu)
    assert memory_plan(ModelSpec(), plan.policy, TINY_WL).fits(SMALL_GPU)
    assert plan.policy.attn_on_gpu == attn_on_gpu and plan.placement["h_g"] == 1.0


def test_moe_variant_memory_model_is_the_engines_plan():
    spec, wl = MIXTRAL, MTBENCH
    gpu, cpu = memory_model(spec, wl, 16, 4, True)
    for n_res, r_c in [(0, 0.0), (3, 0.25), (8, 1.0)]:
        plan = memory_plan(spec, Policy(batch_size=64, micro_batch_size=16, attn_on_gpu=True,
                                        expert_gpu_fraction=n_res / 8, kv_gpu_fraction=r_c, pages_per_layer=1,
                                        prefetch_depth=1), wl)
        v = (n_res / 8, r_c, 1.0)
        assert gpu.at(v) == pytest.approx(plan.gpu_total_bytes, abs=1e3 * 8)
        assert cpu.at(v) == pytest.approx(plan.cpu_total_bytes, abs=1e3 * 8)
    assert cost_model(spec, T4, wl, 16, 4, True).latency_s((0.0, 0.0, 1.0)) > 0


@pytest.mark.parametrize("name", list(CHOOSERS))
def test_every_system_chooses_a_runnable_policy(name):
    p = choose_policy(name, MIXTRAL, T4, MTBENCH)
    assert p.ffn_on_gpu and 1 <= p.batch_size <= MTBENCH.num_requests
    if name != "accelerate":  # accelerate places weights itself (device_map), not by this memory plan
        # CGOPipe plans its paged, unpadded KV pool; the baselines keep a dense one
        assert memory_plan(MIXTRAL, p, MTBENCH, paged=name == "cgopipe").fits(T4)
    if name == "deepspeed":
        assert p.num_micro_batches == 1 and p.expert_gpu_fraction == 0 and p.attn_on_gpu
    if name in ("flexgen", "deepspeed", "fastdecode", "flexgen_c", "flexgen_moe", "flexgen_moe_c"):
        assert p.num_pages == 1
    if name in ("flexgen_c", "fastdecode", "flexgen_moe_c"):
        assert not p.attn_on_gpu
    if name in ("flexgen", "flexgen_c"):
        assert p == mixtral_t4(False, name == "flexgen").policy
    assert "N=" in policy_summary(p)


def test_unknown_system_has_no_policy():
    with pytest.raises(ConfigError, match="no automatic policy"):
        choose_policy("reference", ModelSpec(), HardwareSpec(), TINY_WL)


def test_policies_are_deterministic():
    a = [choose_policy(n, ModelSpec(), HardwareSpec(), TINY_WL) for n in CHOOSERS]
    b = [choose_policy(n, ModelSpec(), HardwareSpec(), dataclasses.replace(TINY_WL)) for n in CHOOSERS]
    assert a == b


@pytest.mark.parametrize("name", ["cgopipe", "flexgen", "flexgen_c", "deepspeed", "fastdecode", "accelerate"])
def test_a_system_s_own_rule_keeps_the_given_kernel_and_refuses_a_given_batch(name):
    """`policy_source=auto`: the system's rule decides batching, placement and the page schedule; the
    expert kernel given is kept (the rule's default replaced it), and a given batch is refused."""
    from moe_lightning.config import RULE_FIELDS
    from moe_lightning.systems import SYSTEM_CONFIGS

    system = SYSTEM_CONFIGS[name](policy_source="auto")
    spec, hw, wl = ModelSpec(), HardwareSpec(), TINY_WL
    own = system.resolve_policy(spec, hw, wl, Policy())
    knobs = system.resolve_policy(spec, hw, wl, Policy(expert_kernel="loop"))
    assert knobs.expert_kernel == "loop"
    assert all(getattr(knobs, f) == getattr(own, f) for f in RULE_FIELDS)
    with pytest.raises(ConfigError, match=r"policy.micro_batch_size=1: system.policy_source=auto"):
        system.resolve_policy(spec, hw, wl, Policy(micro_batch_size=1))
