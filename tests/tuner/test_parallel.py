"""Several GPUs as T x E ranks: collectives and EPS-MoE's pipeline by hand, plans per rank that price
communication, and the simulator charging it."""

from __future__ import annotations

import dataclasses

import pytest

from moe_lightning.comm import all_reduce_s, all_to_all_s, best_eps_moe_s, eps_moe_s, pipeline_chunks
from moe_lightning.config import (
    CpuSpec,
    GpuSpec,
    HardwareSpec,
    InterconnectSpec,
    LinkSpec,
    ModelSpec,
    ParallelConfig,
    Policy,
    Workload,
)
from moe_lightning.errors import ConfigError, MemoryBudgetError
from moe_lightning.tuner.hrm import predict
from moe_lightning.tuner.optimizer import optimize
from moe_lightning.tuner.parallel import check_parallel, layouts, moe_layer_prefill_s, rank_view
from moe_lightning.tuner.presets import load_preset


def test_collectives_by_hand():
    # 1 MB over 4 ranks at 1 GB/s, 10 us a step: ring all-reduce 6 steps + 2 * 3/4 MB; all-to-all 3/4 MB.
    assert all_reduce_s(1e6, 4, latency_s=1e-5, bytes_per_s=1e9) == pytest.approx(6e-5 + 1.5e-3)
    assert all_to_all_s(1e6, 4, latency_s=1e-5, bytes_per_s=1e9) == pytest.approx(1e-5 + 0.75e-3)
    assert all_reduce_s(1e6, 1, latency_s=1e-5, bytes_per_s=1e9) == 0 == all_to_all_s(1e6, 1, latency_s=1e-5,
                                                                                       bytes_per_s=1e9)


def test_all_reduce_grows_with_ranks_on_a_slow_link_and_vanishes_with_bandwidth():
    slow = [all_reduce_s(8e6, t, latency_s=15e-6, bytes_per_s=8e9) for t in (2, 4, 8)]
    assert slow[0] < slow[1] < slow[2]
    fast = [all_reduce_s(8e6, 4, latency_s=0.0, bytes_per_s=b) for b in (1e9, 1e12, 1e18)]
    assert fast[0] > fast[1] > fast[2] and fast[2] < 1e-10


def test_eps_pipeline_by_hand():
    # 4 ms of dispatch (and as much combine) against 4 ms of GEMMs, no latency or launch: in a row 12 ms;
    # in 4 chunks each 1 ms: first dispatch 1 + GEMM 1 + last combine 1, and 3 more chunks of 2 ms each.
    assert eps_moe_s(4e-3, 4e-3, 1, latency_s=0, launch_s=0) == pytest.approx(12e-3)
    assert eps_moe_s(4e-3, 4e-3, 4, latency_s=0, launch_s=0) == pytest.approx(9e-3)
    best, chunks = best_eps_moe_s(4e-3, 4e-3, latency_s=0, launch_s=0)
    assert best < 9e-3 and chunks > 4
    # a 1 ms latency per message makes chunking cost more than it hides
    assert best_eps_moe_s(1e-4, 1e-4, latency_s=1e-3, launch_s=0)[1] == 1
    # the engine's chooser and the planner agree
    assert pipeline_chunks(4e6, 4e9, latency_s=1e-4, bytes_per_s=1e9, launch_s=2e-5, flops_per_s=1e12) == int(
        best_eps_moe_s(4e-3, 4e-3, latency_s=1e-4, launch_s=2e-5)[1])


def _ds_v2_like() -> ModelSpec:
    """DeepSeek-V2's MoE shapes (hidden 5120, 160 routed experts of FFN dim 1536, top-6, 128 heads, 60 layers)."""
    return dataclasses.replace(load_preset("model", "deepseek-v2-lite"), name="deepseek-v2-like", num_layers=60,
                               hidden_size=5120, intermediate_size=1536, num_heads=128, num_kv_heads=128,
                               num_experts=160, top_k=6, shared_expert_size=3072, dense_intermediate_size=12288,
                               q_lora_rank=1536, n_group=8, topk_group=3)


def test_eps_prefill_pipelined_beats_unpipelined_on_nvlink():
    spec, hw = _ds_v2_like(), load_preset("hardware", "8xh100")
    assert hw.interconnect.kind == "nvlink" and hw.interconnect.bandwidth_gbps == 450
    t = moe_layer_prefill_s(spec, hw, ParallelConfig(tensor=1, expert=8), tokens=8192)
    assert t["gemm_s"] < t["pipelined_s"] < t["unpipelined_s"] and t["chunks"] > 1
    # dispatch: each of 8192 tokens' hidden row once per chosen expert, 7/8 of it leaving the rank
    assert t["dispatch_bytes"] == 8192 * 6 * 5120 * 2
    forced = moe_layer_prefill_s(spec, hw, ParallelConfig(tensor=1, expert=8, chunks=1), tokens=8192)
    assert forced["pipelined_s"] == pytest.approx(t["unpipelined_s"]) and forced["chunks"] == 1


def test_layouts_and_one_line_refusals():
    spec, hw = load_preset("model", "mixtral-8x22b"), load_preset("hardware", "4xt4")   # 48 q / 8 KV heads, 8 experts
    assert [(p.tensor, p.expert) for p in layouts(spec, hw)] == [(1, 4), (2, 2), (4, 1)]
    for bad, words in (((2, 1), "T x E must equal"), ((3, 1), "T x E must equal"),
                       ((1, 8), "T x E must equal")):
        with pytest.raises(ConfigError, match=words) as err:
            check_parallel(spec, hw, ParallelConfig(tensor=bad[0], expert=bad[1]))
        assert "\n" not in str(err.value)
    qwen = load_preset("model", "qwen1.5-moe-a2.7b")   # 60 experts
    with pytest.raises(ConfigError, match="parallel.expert=8 does not divide model.num_experts=60"):
        check_parallel(qwen, load_preset("hardware", "8xh100"), ParallelConfig(tensor=1, expert=8))
    no_link = dataclasses.replace(hw, interconnect=InterconnectSpec())
    with pytest.raises(ConfigError, match="no inter-GPU link"):
        check_parallel(spec, no_link, ParallelConfig(tensor=2, expert=2))


def test_old_profiles_without_an_interconnect_still_load():
    d = {"name": "old", "gpu": {"name": "g", "count": 2, "memory_gib": 15, "bandwidth_gbps": 300,
                                "peak_tflops": 65}, "cpu": {"name": "c"}, "link": {"h2d_gbps": 16, "d2h_gbps": 16}}
    hw = HardwareSpec.from_dict(d)
    assert hw.interconnect.kind == "none" and hw.interconnect.bandwidth_gbps == 0
    assert load_preset("hardware", "t4").interconnect.kind == "none"
    four = load_preset("hardware", "4xt4")
    assert four.interconnect.kind == "pcie" and four.gpu_budget_bytes == load_preset("hardware", "t4").gpu_budget_bytes


def test_mixtral_8x22b_plans_a_four_rank_split_on_4xt4_where_one_t4_does_not_fit():
    spec, hw, wl = load_preset("model", "mixtral-8x22b"), load_preset("hardware", "4xt4"), load_preset(
        "workload", "mtbench")
    one = dataclasses.replace(hw, gpu=dataclasses.replace(hw.gpu, count=1))   # the same host, one T4
    with pytest.raises(MemoryBudgetError):
        optimize(spec, one, wl)
    plan = optimize(spec, hw, wl)
    par = plan.parallel
    assert par.tensor * par.expert == 4 and len(plan.layouts_searched) == 3
    assert plan.memory.gpu_total_bytes <= hw.gpu_budget_bytes == one.gpu_budget_bytes   # one T4 per rank
    assert plan.policy.batch_size % par.expert == 0 and plan.prediction.t_comm > 0
    assert plan.prediction.e2e_tok_s == pytest.approx(max(v for _, _, v in plan.layouts_searched))
    asked = optimize(spec, hw, wl, parallel=ParallelConfig(tensor=4, expert=1))
    assert (asked.parallel.tensor, asked.parallel.expert, len(asked.layouts_searched)) == (4, 1, 1)


def test_communication_costs_time_and_vanishes_with_an_ideal_link():
    spec, hw, wl = load_preset("model", "mixtral-8x22b"), load_preset("hardware", "4xt4"), load_preset(
        "workload", "mtbench")
    policy = Policy(batch_size=256, micro_batch_size=64, attn_on_gpu=False, ffn_on_gpu=True)
    ideal = dataclasses.replace(hw, interconnect=InterconnectSpec(kind="nvlink", bandwidth_gbps=1e12, latency_us=0))
    for par in (ParallelConfig(tensor=4, expert=1), ParallelConfig(tensor=2, expert=2)):
        real, free = predict(spec, hw, wl, policy, parallel=par), predict(spec, ideal, wl, policy, parallel=par)
        assert real.t_comm > 1e-4 and free.t_comm == pytest.approx(0, abs=1e-9)
        assert real.t_gpu > free.t_gpu and real.decode_tok_s <= free.decode_tok_s


# A hand-sized model on two hand-sized GPUs: T = 2 divides its 4 heads and 2 KV heads, E = 2 its 4 experts.
SPEC = ModelSpec(name="hand", num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                 head_dim=16, num_experts=4, top_k=2, vocab_size=64, dtype="float16", weights="random")
HW2 = HardwareSpec(name="hand2", gpu=GpuSpec(count=2, memory_gib=1, bandwidth_gbps=100, peak_tflops=1.0),
                   cpu=CpuSpec(cores=4, memory_gib=4, bandwidth_gbps=10, peak_tflops=0.1),
                   link=LinkSpec(h2d_gbps=1, d2h_gbps=1),
                   interconnect=InterconnectSpec(kind="pcie", bandwidth_gbps=0.01, latency_us=50))


@pytest.mark.parametrize("tensor, expert", [(2, 1), (1, 2)])
def test_the_simulator_charges_collectives(tensor, expert):
    from moe_lightning.tuner.simulator import simulate_run

    wl = Workload(prompt_len_avg=8, prompt_len_max=12, gen_len=4, num_requests=8)
    policy = Policy(batch_size=8, micro_batch_size=4, attn_on_gpu=False, ffn_on_gpu=True)
    par = ParallelConfig(tensor=tensor, expert=expert)
    fast = dataclasses.replace(HW2, interconnect=InterconnectSpec(kind="nvlink", bandwidth_gbps=1e9, latency_us=0))
    slow_run = simulate_run(SPEC, HW2, wl, policy, parallel=par)
    fast_run = simulate_run(SPEC, fast, wl, policy, parallel=par)
    assert slow_run.generated_tokens == fast_run.generated_tokens == 8 * 4   # every request, both groups'
    assert slow_run.total_s > fast_run.total_s
    assert any("simulated" in n and f"tensor={tensor}" in n for n in slow_run.notes)
    view = rank_view(SPEC, HW2, par)   # one rank: its shard and its share of the host
    assert (view.spec.num_heads, view.spec.num_experts) == (4 // tensor, 4 // expert)
    assert view.hw.gpu.count == 1 and view.hw.cpu.cores == 2


@pytest.mark.parametrize("admission", [False, True])
def test_simulated_expert_groups_keep_in_step_so_the_slowest_group_sets_the_pace(admission):
    """Each group runs every E-th request. Long prompts all in one group (either group) must be slower than
    the same prompts spread over both: the machine waits for its slowest group every forward."""
    from moe_lightning.tuner.simulator import simulate_run

    wl = Workload(prompt_len_avg=21, prompt_len_max=40, gen_len=4, num_requests=16)
    policy = Policy(batch_size=8, micro_batch_size=4, attn_on_gpu=False, ffn_on_gpu=True)
    par = ParallelConfig(expert=2)

    def run(lengths):
        return simulate_run(SPEC, HW2, wl, policy, lengths, parallel=par, admission=admission)

    spread = run([40, 40, 2, 2] * 4)        # each group: half long, half short
    first = run([40, 2] * 8)                # group 0 every long prompt
    second = run([2, 40] * 8)               # group 1 every long prompt
    assert first.total_s == pytest.approx(second.total_s, rel=1e-9)
    assert first.total_s > spread.total_s
    assert first.generated_tokens == spread.generated_tokens == 16 * 4
    assert [g["requests"] for g in first.groups] == [8, 8]
    for g in first.groups:   # every group takes part in every forward: its time is the machine's
        assert g["prefill_s"] + g["decode_s"] == pytest.approx(first.total_s)


def test_groups_with_equal_requests_are_simulated_once_and_counted_once():
    """The simulator's work (tasks, wall time) is reported as done: two groups with equal requests share one
    simulated run, which is counted once, not per group."""
    from moe_lightning.tuner.simulator import simulate_run

    wl = Workload(prompt_len_avg=8, prompt_len_max=8, gen_len=3, num_requests=4)
    policy = Policy(batch_size=2, micro_batch_size=2, attn_on_gpu=False, ffn_on_gpu=True)
    machine = simulate_run(SPEC, HW2, wl, policy, [8, 8, 8, 8], parallel=ParallelConfig(expert=2))
    view_wl = dataclasses.replace(wl, num_requests=2)
    from moe_lightning.tuner.parallel import rank_view

    view = rank_view(SPEC, HW2, ParallelConfig(expert=2))
    one = simulate_run(view.spec, view.hw, view_wl, view.policy(policy), [8, 8])
    assert machine.tasks_simulated == one.tasks_simulated > 0
    assert machine.decode_steps_total == 2 * one.decode_steps_total   # both groups decode, in step


def test_a_simulated_group_that_runs_out_of_requests_keeps_pace_with_ghost_forwards():
    """Three requests over two groups in static batches of one: group 0 runs two batches, group 1 one, then
    joins group 0's second batch with ghost forwards (a prefill and gen_len - 1 decode steps), as the
    engine's Lockstep does; the groups' forwards, own and ghost, are as many."""
    from moe_lightning.tuner.simulator import simulate_run

    wl = Workload(prompt_len_avg=8, prompt_len_max=8, gen_len=5, num_requests=3)
    policy = Policy(batch_size=2, micro_batch_size=2, attn_on_gpu=False, ffn_on_gpu=True)
    sim = simulate_run(SPEC, HW2, wl, policy, [8, 8, 8], parallel=ParallelConfig(expert=2), admission=False)
    g0, g1 = sim.groups
    assert (g0["forwards"], g0["ghost_forwards"]) == (2 * 5, 0)
    assert (g1["forwards"], g1["ghost_forwards"]) == (5, 5)
    # the machine's time: group 0's own forwards and the all-reduce that starts each of them
    assert g1["own_s"] < g0["own_s"] < sim.prefill_s + sim.decode_s < g0["own_s"] * 1.5
    assert sim.prefill_s == g0["prefill_s"] > g1["prefill_s"]
    assert sim.generated_tokens == 3 * 5


def test_a_simulated_study_on_several_gpus_searches_the_plans_layout_in_whole_expert_groups():
    from moe_lightning.run_config import RunConfig
    from moe_lightning.tuner.search import fits_layout, study_layout

    cfg = RunConfig(model=load_preset("model", "mixtral-8x22b"), hardware=load_preset("hardware", "4xt4"),
                    workload=dataclasses.replace(load_preset("workload", "mtbench"), num_requests=64))
    layout = study_layout(cfg, cfg.model)
    assert layout.tensor * layout.expert == 4
    two = ParallelConfig(tensor=2, expert=2)
    policy, plan, budget = fits_layout(cfg.model, cfg, Policy(batch_size=7, micro_batch_size=3), two, paged=True)
    assert (policy.batch_size, policy.micro_batch_size) == (8, 4)   # rounded up to whole groups
    assert budget.gpu.count == 1 and plan.fits(budget)
    assert study_layout(dataclasses.replace(cfg, hardware=load_preset("hardware", "t4")), cfg.model) is None


def test_a_simulated_study_on_several_gpus_searches_the_split_beside_the_policy(tmp_path):
    """With no `parallel` given, T is a trial parameter (every valid split's, E = GPUs / T); the HRM's
    split is the first trial's, and the trials try more than one split."""
    import optuna

    from moe_lightning.run_config import RunConfig
    from moe_lightning.tasks.tune import run_trials
    from moe_lightning.tuner.search import open_study, searched_tensor, seed_study, study_layout

    cfg = RunConfig(model=load_preset("model", "mixtral-8x22b"), hardware=load_preset("hardware", "4xt4"),
                    workload=dataclasses.replace(load_preset("workload", "mtbench"), num_requests=64, gen_len=8),
                    tuner=dataclasses.replace(RunConfig().tuner, objective="simulate", n_trials=10, seed=1,
                                              storage=f"sqlite:///{tmp_path / 's.db'}", study_name="split"),
                    run_dir=str(tmp_path))
    assert searched_tensor(cfg, cfg.model) == [1, 2, 4]
    given = dataclasses.replace(cfg, parallel=ParallelConfig(tensor=2, expert=2))
    assert searched_tensor(given, cfg.model) is None
    study = open_study(cfg, cfg.model)
    seed_study(study, cfg, cfg.model)
    run_trials(study, cfg, cfg.model, say=lambda line: None)
    trials = optuna.load_study(study_name="split", storage=cfg.tuner.storage).trials
    assert trials[0].params["tensor"] == study_layout(cfg, cfg.model).tensor   # the HRM's split seeds it
    assert len({t.params["tensor"] for t in trials}) > 1
    tried = [t.user_attrs["parallel"] for t in trials if "parallel" in t.user_attrs]
    assert tried and all(p["tensor"] * p["expert"] == 4 for p in tried)
