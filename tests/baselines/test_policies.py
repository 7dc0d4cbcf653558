"""The systems' own policy choices: FlexGen's LP (exact, feasible under the memory plan the engine
allocates), DeepSpeed's largest single batch, and the dispatch by system name."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moe_lightning.baselines.flexgen_policy import (
    cost_model,
    flexgen_policy,
    memory_model,
    solve_placement,
)
from moe_lightning.baselines.lp import solve_lp
from moe_lightning.baselines.policies import CHOOSERS, choose_policy, policy_summary
from moe_lightning.config import CpuSpec, GpuSpec, HardwareSpec, LinkSpec, ModelSpec, Policy, Workload
from moe_lightning.errors import ConfigError, MemoryBudgetError
from moe_lightning.memory import memory_plan

MIXTRAL = ModelSpec(name="mixtral-8x7b", num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32,
                    num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, vocab_size=32000, dtype="float16",
                    weights="random")
T4 = HardwareSpec(name="t4", gpu=GpuSpec(name="T4", memory_gb=15, bandwidth_gbps=300, peak_tflops=65),
                  cpu=CpuSpec(memory_gb=192, bandwidth_gbps=100, peak_tflops=0.8), link=LinkSpec(16, 16))
MTBENCH = Workload(name="mtbench", prompt_len_avg=77, prompt_len_max=418, gen_len=128, num_requests=1024)
SMALL_GPU = HardwareSpec(name="small", gpu=GpuSpec(memory_gb=0.0025, usable_fraction=1.0))
TINY_WL = Workload(prompt_len_avg=16, prompt_len_max=40, gen_len=16, num_requests=64)

CASES = [("mixtral-t4", MIXTRAL, T4, MTBENCH), ("tiny-cpu", ModelSpec(), HardwareSpec(), TINY_WL),
         ("tiny-small-gpu", ModelSpec(), SMALL_GPU, TINY_WL)]


def test_solve_lp_exact_and_infeasible():
    r = solve_lp([-1, -1], [[1, 2], [3, 1]], [4, 6], [(0, 10), (0, 10)])
    np.testing.assert_allclose(r.x, [1.6, 1.2], atol=1e-9)
    assert r.fun == pytest.approx(-2.8)
    assert solve_lp([1, 1], [[1, 1]], [-1], [(0, 1), (0, 1)]) is None  # x + y <= -1 with x, y >= 0


@pytest.mark.parametrize("case, spec, hw, wl", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("attn_on_gpu", [True, False])
def test_flexgen_lp_policy_fits_the_memory_plan(case, spec, hw, wl, attn_on_gpu):
    plan = flexgen_policy(spec, hw, wl, attn_on_gpu=attn_on_gpu)
    p = plan.policy
    assert memory_plan(spec, p, wl).fits(hw)
    assert p.attn_on_gpu == attn_on_gpu and p.ffn_on_gpu and p.num_pages == 1
    assert p.micro_batch_size == plan.gpu_batch_size and p.num_micro_batches == plan.num_gpu_batches
    assert p.batch_size <= wl.num_requests and plan.predicted_tok_s > 0
    assert all(0 <= v <= 1 for v in plan.placement_lp.values()) and plan.placement["h_g"] == 1.0
    # expert granularity and whole GPU batches of KV
    assert p.expert_gpu_fraction * spec.num_experts == pytest.approx(round(p.expert_gpu_fraction * spec.num_experts))
    assert p.kv_gpu_fraction * plan.num_gpu_batches == pytest.approx(round(p.kv_gpu_fraction * plan.num_gpu_batches))


def test_flexgen_lp_is_optimal_over_a_placement_grid():
    """At the chosen (gbs, num_gb), no grid point of (w_g, c_g) that satisfies the LP's memory
    constraints has a lower modelled latency than the LP's optimum."""
    spec, hw, wl = MIXTRAL, T4, MTBENCH
    plan = flexgen_policy(spec, hw, wl)
    gbs, nb = plan.gpu_batch_size, plan.num_gpu_batches
    cost = cost_model(spec, hw, wl, gbs, nb, True)
    gpu, cpu = memory_model(spec, wl, gbs, nb, True)
    lp = solve_placement(cost, gpu, cpu, hw, [(0, 1), (0, 1), (1, 1)])
    assert cost.latency_s(lp.x[:3]) == pytest.approx(lp.fun, rel=1e-9)
    for w in np.linspace(0, 1, 41):
        for c in np.linspace(0, 1, 41):
            v = (w, c, 1.0)
            if gpu.at(v) <= hw.gpu_budget_bytes and cpu.at(v) <= hw.cpu_budget_bytes:
                assert cost.latency_s(v) >= lp.fun * (1 - 1e-9)


def test_memory_model_is_the_engines_plan():
    spec, wl = MIXTRAL, MTBENCH
    gpu, cpu = memory_model(spec, wl, 16, 4, True)
    for n_res, r_c in [(0, 0.0), (3, 0.25), (8, 1.0)]:
        plan = memory_plan(spec, Policy(batch_size=64, micro_batch_size=16, attn_on_gpu=True,
                                        expert_gpu_fraction=n_res / 8, kv_gpu_fraction=r_c, pages_per_layer=1,
                                        prefetch_depth=1), wl)
        v = (n_res / 8, r_c, 1.0)
        assert gpu.at(v) == pytest.approx(plan.gpu_total_bytes, abs=1e3 * 8)
        assert cpu.at(v) == pytest.approx(plan.cpu_total_bytes, abs=1e3 * 8)


def test_flexgen_lp_reports_when_nothing_fits():
    hw = HardwareSpec(name="nothing", gpu=GpuSpec(memory_gb=1e-6, usable_fraction=1.0))
    with pytest.raises(MemoryBudgetError, match="FlexGen's LP"):
        flexgen_policy(ModelSpec(), hw, TINY_WL)


@pytest.mark.parametrize("name", list(CHOOSERS))
def test_every_system_chooses_a_runnable_policy(name):
    p = choose_policy(name, MIXTRAL, T4, MTBENCH)
    assert p.ffn_on_gpu and 1 <= p.batch_size <= MTBENCH.num_requests
    if name != "accelerate":  # accelerate places weights itself (device_map), not by this memory plan
        assert memory_plan(MIXTRAL, p, MTBENCH).fits(T4)
    if name == "deepspeed":
        assert p.num_micro_batches == 1 and p.expert_gpu_fraction == 0 and p.attn_on_gpu
    if name in ("flexgen", "deepspeed", "fastdecode", "flexgen_c"):
        assert p.num_pages == 1
    if name in ("flexgen_c", "fastdecode"):
        assert not p.attn_on_gpu
    assert "N=" in policy_summary(p)


def test_unknown_system_has_no_policy():
    with pytest.raises(ConfigError, match="no automatic policy"):
        choose_policy("reference", ModelSpec(), HardwareSpec(), TINY_WL)


def test_policies_are_deterministic():
    a = [choose_policy(n, ModelSpec(), HardwareSpec(), TINY_WL) for n in CHOOSERS]
    b = [choose_policy(n, ModelSpec(), HardwareSpec(), dataclasses.replace(TINY_WL)) for n in CHOOSERS]
    assert a == b
