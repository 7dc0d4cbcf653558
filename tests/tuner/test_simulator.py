"""The schedule simulator: the discrete-event model on hand-built graphs with makespans worked out by
hand, and whole simulated runs checked for consistency, monotonicity and link-bound utilisation."""

from __future__ import annotations

import dataclasses

import pytest

from moe_lightning.config import HardwareSpec, LinkSpec, ModelSpec, Policy, Workload
from moe_lightning.schedule.cgopipe import PipeShape, decode_graph
from moe_lightning.schedule.graph import Resource, TaskGraph
from moe_lightning.tuner.costs import TaskCosts, experts_hit
from moe_lightning.tuner.presets import load_preset
from moe_lightning.tuner.simulator import simulate_graph, simulate_run

GPU, CPU, H2D, D2H, COPY = Resource.GPU, Resource.CPU, Resource.H2D, Resource.D2H, Resource.COPY


def times(records) -> dict[str, tuple[float, float]]:
    return {r.task.op: (r.start_s, r.end_s) for r in records}


def by_op(durations: dict[str, float]):
    return lambda task: durations[task.op]


def test_fifo_per_resource_in_issue_order():
    g = TaskGraph("fifo")
    for op in ("a", "b", "c"):
        g.add(GPU, op, 0, 0)
    t = times(simulate_graph(g, by_op({"a": 1.0, "b": 2.0, "c": 3.0})))
    assert t == {"a": (0.0, 1.0), "b": (1.0, 3.0), "c": (3.0, 6.0)}


def test_dependencies_overlap_and_head_of_line_blocking():
    g = TaskGraph("mixed")
    a = g.add(H2D, "A", 0, 0)                 # 0-2
    b = g.add(GPU, "B", 0, 0)                 # 0-1
    c = g.add(GPU, "C", 0, 0, [a])            # waits for A: 2-5
    d = g.add(CPU, "D", 0, 0, [b])            # 1-5, overlaps C
    e = g.add(D2H, "E", 0, 0, [c, d])         # 5-6
    g.add(H2D, "F", 0, 0)                     # FIFO behind A, overlaps C: 2-3
    g.add(CPU, "G", 0, 0, [e])                # 6-7
    g.add(CPU, "H", 0, 0)                     # no deps, but issued after G on the CPU: 7-8
    g.add(COPY, "I", 0, 0)                    # alone on its resource: 0-4
    dur = {"A": 2, "B": 1, "C": 3, "D": 4, "E": 1, "F": 1, "G": 1, "H": 1, "I": 4}
    records = simulate_graph(g, by_op(dur))
    assert times(records) == {"A": (0, 2), "B": (0, 1), "C": (2, 5), "D": (1, 5), "E": (5, 6),
                              "F": (2, 3), "G": (6, 7), "H": (7, 8), "I": (0, 4)}
    assert max(r.end_s for r in records) == 8.0
    assert [r.task.id for r in records] == list(range(len(g)))


def test_cgopipe_decode_graph_makespan_by_hand():
    # 2 layers, 2 micro-batches, nothing streamed; every task 1 s. The GPU chain per step is
    # PreAttn(0,0) PreAttn(0,1) PostAttn(0,0) PreAttn(1,0) PostAttn(0,1) PreAttn(1,1) PostAttn(1,0)
    # PostAttn(1,1), each waiting on D2H -> CPU -> H2D round trips; worked out below.
    g = decode_graph(PipeShape(num_layers=2, num_micro_batches=2, num_pages=0))
    t = {r.task.label: (r.start_s, r.end_s) for r in simulate_graph(g, lambda task: 1.0)}
    assert t["PreAttn(0,0)"] == (0, 1) and t["PreAttn(0,1)"] == (1, 2)
    assert t["OffloadQKV(0,0)"] == (1, 2) and t["CPUAttn(0,0)"] == (2, 3) and t["LoadHidden(0,0)"] == (3, 4)
    assert t["PostAttn(0,0)"] == (4, 5)
    assert t["OffloadQKV(0,1)"] == (2, 3) and t["CPUAttn(0,1)"] == (3, 4) and t["LoadHidden(0,1)"] == (4, 5)
    assert t["PreAttn(1,0)"] == (5, 6)          # issued after PostAttn(0,0), needs it
    assert t["PostAttn(0,1)"] == (6, 7)         # FIFO behind PreAttn(1,0)
    assert t["PreAttn(1,1)"] == (7, 8)
    assert t["CPUAttn(1,0)"] == (7, 8) and t["LoadHidden(1,0)"] == (8, 9) and t["PostAttn(1,0)"] == (9, 10)
    assert t["CPUAttn(1,1)"] == (9, 10) and t["LoadHidden(1,1)"] == (10, 11) and t["PostAttn(1,1)"] == (11, 12)
    assert max(end for _, end in t.values()) == 12


def test_negative_durations_are_refused():
    g = TaskGraph("bad")
    g.add(GPU, "a", 0, 0)
    with pytest.raises(ValueError):
        simulate_graph(g, lambda task: -1.0)


SMALL = dataclasses.replace(load_preset("model", "mid-mixtral"), num_layers=2)
CPU_HW = load_preset("hardware", "cpu")


def test_simulate_run_numbers_are_consistent():
    wl = Workload(prompt_len_avg=20, prompt_len_max=40, gen_len=4, num_requests=10)
    policy = Policy(batch_size=4, micro_batch_size=2)
    sim = simulate_run(SMALL, CPU_HW, wl, policy, admission=False)   # static batches of N
    assert sim.num_batches == 3 and sim.generated_tokens == 10 * 4
    assert len(sim.decode_step_s) == 3 * 3 and sim.decode_steps_simulated == 9
    assert sim.decode_s == pytest.approx(sum(sim.decode_step_s))
    assert sim.throughput_tok_s == pytest.approx(40 / (sim.prefill_s + sim.decode_s))
    assert sim.decode_tok_s == pytest.approx(30 / sim.decode_s)
    assert all(0 < sim.utilisation[r] <= 1 for r in ("gpu", "cpu", "h2d", "d2h", "copy"))
    # Every graph streams every layer's experts once; each decode step loads every micro-batch's
    # attention output (nq * hd values per sequence) once per layer.
    s = SMALL
    graphs = 3 + 9
    hidden = 9 * s.num_layers * 4 * s.num_heads * s.head_dim * s.dtype_bytes
    hidden -= 3 * s.num_layers * 2 * s.num_heads * s.head_dim * s.dtype_bytes  # last batch: 2 sequences
    assert sim.link_bytes["h2d"] == graphs * s.num_layers * s.num_experts * s.expert_bytes + hidden
    m = sim.metrics()
    assert m.generated_tokens == 40 and m.throughput_tok_s == pytest.approx(sim.throughput_tok_s)
    assert len(sim.timeline.graphs) == 4  # records kept for the first graphs only


def test_interpolated_steps_match_simulated_ones():
    wl = Workload(prompt_len_avg=30, prompt_len_max=60, gen_len=40, num_requests=8)
    policy = Policy(batch_size=8, micro_batch_size=2)
    full = simulate_run(SMALL, CPU_HW, wl, policy)
    some = simulate_run(SMALL, CPU_HW, wl, policy, max_decode_steps=5)
    assert some.decode_steps_simulated == 5 * some.num_batches and some.notes   # 5 per admission round
    assert some.decode_s == pytest.approx(full.decode_s, rel=0.01)
    assert some.utilisation["h2d"] == pytest.approx(full.utilisation["h2d"], abs=0.01)


def test_padding_and_gpu_kv_follow_the_engine():
    wl = Workload(prompt_len_avg=20, prompt_len_max=40, gen_len=3, num_requests=8)
    budget = 8 * (40 + 3)   # one KV budget for both: all 8 fit, padded or not
    pad = simulate_run(SMALL, CPU_HW, dataclasses.replace(wl, padding=True), Policy(batch_size=8, micro_batch_size=2),
                       kv_tokens=budget)
    nopad = simulate_run(SMALL, CPU_HW, wl, Policy(batch_size=8, micro_batch_size=2), kv_tokens=budget)
    assert pad.num_batches == nopad.num_batches == 1 and pad.prefill_s > nopad.prefill_s
    # At the paper's cache_size (the average prompt), the unpadded run admits in rounds, as the engine does.
    assert simulate_run(SMALL, CPU_HW, wl, Policy(batch_size=8, micro_batch_size=2), kv_tokens=192).num_batches > 1
    gpu_kv = Policy(batch_size=8, micro_batch_size=2, kv_gpu_fraction=0.5)
    sim = simulate_run(SMALL, CPU_HW, wl, gpu_kv)
    ops = {r.task.op for _, _, recs in sim.timeline.graphs for r in recs}
    assert {"GPUAttn", "CPUAttn"} <= ops


def test_faster_link_never_slows_the_run():
    wl = Workload(prompt_len_avg=30, prompt_len_max=60, gen_len=6, num_requests=8)
    policy = Policy(batch_size=8, micro_batch_size=2)
    previous = 0.0
    for gbps in (0.5, 1, 2, 5, 10, 50, 500):
        hw = dataclasses.replace(CPU_HW, link=LinkSpec(h2d_gbps=gbps, d2h_gbps=gbps))
        tok_s = simulate_run(SMALL, hw, wl, policy).throughput_tok_s
        assert tok_s >= previous * (1 - 1e-9), gbps
        previous = tok_s


def test_link_bound_decode_keeps_the_link_busy():
    spec, hw = load_preset("model", "mixtral-8x7b"), load_preset("hardware", "t4")
    wl = Workload(name="mtbench", prompt_len_avg=77, prompt_len_max=418, gen_len=8, num_requests=64)
    sim = simulate_run(spec, hw, wl, Policy(batch_size=64, micro_batch_size=16))
    assert sim.utilisation["h2d"] > 0.9
    assert sim.utilisation["h2d"] == max(sim.utilisation.values())


def test_plan_of_mixtral_on_t4_agrees_with_hrm():
    from moe_lightning.memory import kv_cache_tokens
    from moe_lightning.tuner.optimizer import optimize

    # One full batch (HRM prices full batches only; a partial last batch costs the simulator a step
    # as long as a full one's when the link is the bottleneck).
    spec, hw = load_preset("model", "mixtral-8x7b"), load_preset("hardware", "t4")
    wl = dataclasses.replace(load_preset("workload", "mtbench"), num_requests=256)
    plan = optimize(spec, hw, wl, max_batch_size=256)
    # The engine's pool holds N longest requests when memory allows (the CPU does here): one round.
    sim = simulate_run(spec, hw, wl, plan.policy)
    assert sim.num_batches == 1
    # The plan's reservation (what the N longest requests reserve in blocks, plus one longest request
    # per share) admits all 256 at once too; the bare cache_size N x (average + gen_len) admits 238 of
    # these skewed requests and runs the other 18 in a second round as long as the first.
    planned = simulate_run(spec, hw, wl, plan.policy, kv_tokens=kv_cache_tokens(plan.policy, wl, paged=True))
    assert planned.num_batches == 1
    bare = simulate_run(spec, hw, wl, plan.policy, kv_tokens=256 * (wl.prompt_len_avg + wl.gen_len))
    assert bare.num_batches == 2 and bare.throughput_tok_s < planned.throughput_tok_s
    assert sim.sim_wall_s < 10
    assert sim.throughput_tok_s == pytest.approx(plan.prediction.e2e_tok_s, rel=0.2)


@pytest.mark.parametrize("gen_len", [1, 2, 8])
def test_hrm_charges_the_decode_steps_the_simulator_runs(gen_len):
    """A batch runs gen_len - 1 decode steps, the prefill making each sequence's first token (the engine's
    loop, which the simulator times): gen_len 1 has no decode time, and the HRM's end-to-end tokens/s and
    decode time agree with the simulator's for every gen_len, within the tolerance of the test above (one
    full batch of Mixtral on a T4, link-bound)."""
    from moe_lightning.tuner.hrm import predict

    spec, hw = load_preset("model", "mixtral-8x7b"), load_preset("hardware", "t4")
    wl = dataclasses.replace(load_preset("workload", "mtbench"), num_requests=256, gen_len=gen_len)
    policy = Policy(batch_size=256, micro_batch_size=128, attn_on_gpu=False, ffn_on_gpu=True)
    pred, sim = predict(spec, hw, wl, policy), simulate_run(spec, hw, wl, policy)
    assert sim.num_batches == 1 and sim.decode_steps_total == gen_len - 1
    assert pred.e2e_tok_s == pytest.approx(sim.throughput_tok_s, rel=0.2)
    assert pred.decode_s == pytest.approx(sim.decode_s, rel=0.2, abs=1e-12)   # both 0 with gen_len 1
    assert (pred.decode_step_s is None) == (sim.decode_step_median_s is None) == (gen_len == 1)


def test_costs_read_only_the_experts_hit():
    assert experts_hit(8, 0) == 0
    assert experts_hit(8, 1) == pytest.approx(1)
    assert 7.9 < experts_hit(8, 64) <= 8
    spec = ModelSpec(num_layers=2, hidden_size=256, intermediate_size=512)
    hw = HardwareSpec()
    costs = TaskCosts(spec, hw)
    assert costs.post_attn_s(1, 0, 1) < costs.post_attn_s(16, 0, 16)
    assert costs.page_bytes == 0
    streamed = TaskCosts.for_policy(spec, hw, Policy(batch_size=8, micro_batch_size=3))
    assert streamed.num_pages == 3
    assert sum(streamed.page_size(p) for p in range(3)) == spec.num_experts * spec.expert_bytes


def test_processor_sharing_on_a_cpu_only_host():
    """On a shared host two tasks that overlap each run at half speed; with separate devices they
    overlap for free. Hand-computed: GPU task 2 s and COPY task 1 s, independent."""
    from moe_lightning.schedule.graph import Resource, TaskGraph
    from moe_lightning.tuner.simulator import simulate_graph

    g = TaskGraph("two")
    a = g.add(Resource.GPU, "PostAttn", 0, 0)
    g.add(Resource.COPY, "W_CtoPin", 0, 0)
    g.add(Resource.H2D, "LoadHidden", 0, 1, [a])
    cost = {"PostAttn": 2.0, "W_CtoPin": 1.0, "LoadHidden": 0.5}
    free = simulate_graph(g, lambda t: cost[t.op])
    assert [(r.start_s, r.end_s) for r in free] == [(0.0, 2.0), (0.0, 1.0), (2.0, 2.5)]
    shared = simulate_graph(g, lambda t: cost[t.op], shared=True)
    # both run at 1/2 until the copy finishes at 2 s (1 s of work); the GPU task then has 1 s left alone
    assert [(r.start_s, r.end_s) for r in shared] == [(0.0, 3.0), (0.0, 2.0), (3.0, 3.5)]


# ---- host costs: the issuing thread's clock and the barriers ------------------------------------------

@pytest.mark.parametrize("shared", [False, True])
def test_the_issue_clock_delays_a_chain_of_tiny_tasks(shared):
    """One task issued every `issue_s`: a chain of n instant tasks ends at n * issue_s; with real work the
    clock runs ahead and costs only the first issue."""
    g, prev = TaskGraph("tiny"), None
    for n in range(8):
        prev = g.add((GPU, H2D)[n % 2], "t", n, 0, [prev])
    recs = simulate_graph(g, lambda t: 0.0, shared, issue_s=1e-3)
    assert [r.start_s for r in recs] == pytest.approx([(n + 1) * 1e-3 for n in range(8)])
    assert [r.issued_s for r in recs] == pytest.approx([(n + 1) * 1e-3 for n in range(8)])
    assert recs[-1].end_s == pytest.approx(8e-3)
    recs = simulate_graph(g, lambda t: 1.0, shared, issue_s=1e-3)
    assert recs[-1].end_s == pytest.approx(8 + 1e-3)
    assert simulate_graph(g, lambda t: 0.0, shared)[-1].end_s == 0.0   # instant issue: the old model


def test_a_barrier_waits_for_everything_issued_then_pays_its_cost():
    """A (GPU, 2 s) and B (H2D, 5 s), a barrier, then C (GPU, 1 s); issue 0.5 s per task, 0.25 s per
    barrier. Separate devices: A 0.5-2.5, B 1-6, host 6 + 0.25, C issued 6.75, ends 7.75. One shared host:
    A alone 0.5-1 (0.5 s done), then A and B at half speed until A ends at 4 (B 1.5 s done), B alone
    until 7.5; C issued 8.25, ends 9.25."""
    g = TaskGraph("barrier")
    g.add(GPU, "A", 0, 0)
    g.add(H2D, "B", 0, 0)
    g.sync()
    g.add(GPU, "C", 0, 0)
    dur = {"A": 2.0, "B": 5.0, "C": 1.0}
    free = simulate_graph(g, by_op(dur), issue_s=0.5, sync_s=0.25)
    # flat lists: pytest 9.2's approx refuses nested ones
    assert [t for r in free for t in (r.issued_s, r.start_s, r.end_s)] == pytest.approx(
        [0.5, 0.5, 2.5, 1.0, 1.0, 6.0, 6.75, 6.75, 7.75])
    shared = simulate_graph(g, by_op(dur), True, issue_s=0.5, sync_s=0.25)
    assert [t for r in shared for t in (r.start_s, r.end_s)] == pytest.approx([0.5, 4.0, 1.0, 7.5, 8.25, 9.25])


@pytest.mark.parametrize("shared", [False, True])
def test_sync_cost_is_charged_per_gpu_batch_for_flexgen_not_for_cgopipe(shared):
    """FlexGen's graph pays the barrier after its prologue and after every step (L*m) but the last when
    nothing follows it (FlexGen(c): the graph's end is that wait, charged per graph); CGOPipe's decode
    graph has no barrier and pays nothing."""
    from moe_lightning.baselines.schedules import flexgen_decode_cpu_attention, flexgen_decode_gpu_attention

    s = PipeShape(num_layers=3, num_micro_batches=2, num_pages=2, prefetch=1)
    def wall(g, sync_s):
        return max(r.end_s for r in simulate_graph(g, lambda t: 1.0 + 0.1 * t.id, shared, sync_s=sync_s))

    barriers = {decode_graph: 0, flexgen_decode_gpu_attention: 3 * 2 + 1, flexgen_decode_cpu_attention: 3 * 2}
    for build, expected in barriers.items():
        g = build(s)
        assert wall(g, 0.01) - wall(g, 0.0) == pytest.approx(expected * 0.01), build.__name__


def test_simulated_runs_charge_barriers_to_flexgen_only():
    from moe_lightning.baselines.schedules import FLEXGEN

    wl = Workload(prompt_len_avg=20, prompt_len_max=40, gen_len=4, num_requests=4)
    policy = Policy(batch_size=4, micro_batch_size=2, attn_on_gpu=True, pages_per_layer=1, prefetch_depth=1)
    hw = HardwareSpec()
    L, m = SMALL.num_layers, 2

    def run(schedule, sync_s):
        costs = TaskCosts.for_policy(SMALL, hw, policy, sync_s=sync_s)
        return simulate_run(SMALL, hw, wl, policy, costs=costs, schedule=schedule, admission=False)

    slow, fast = run(FLEXGEN, 1e-3), run(FLEXGEN, 0.0)
    assert slow.decode_s - fast.decode_s == pytest.approx(3 * (L * m + 1) * 1e-3)    # 3 decode steps
    assert slow.prefill_s - fast.prefill_s == pytest.approx((L * m + 1) * 1e-3)
    assert run(None, 1e-3).total_s == pytest.approx(run(None, 0.0).total_s)      # CGOPipe: no barrier


def test_sliding_window_layers_read_their_window_in_the_paged_mode_only():
    """A sliding layer's CPU attention reads each sequence's last `window` tokens when the cache is paged
    (unpadded); padded, the engine attends over the dense cache with a mask. Which middle layer slides
    does not matter (the context-dependent tasks are priced per layer kind, not by one representative)."""
    spec = dataclasses.replace(SMALL, num_layers=4)
    wl = Workload(prompt_len_avg=30, prompt_len_max=60, gen_len=6, num_requests=8)
    policy = Policy(batch_size=8, micro_batch_size=4, attn_on_gpu=False)

    def cpu_busy(workload: Workload, sliding: list[int]) -> float:
        s = dataclasses.replace(spec, sliding_window=8 if sliding else 0, sliding_layers=sliding)
        sim = simulate_run(s, CPU_HW, workload, policy)
        return sim.utilisation["cpu"] * sim.decode_s

    full, second, third = cpu_busy(wl, []), cpu_busy(wl, [1]), cpu_busy(wl, [2])
    assert second == pytest.approx(third, rel=1e-9)
    assert second < 0.95 * full
    padded = dataclasses.replace(wl, padding=True)
    assert cpu_busy(padded, [1]) == pytest.approx(cpu_busy(padded, []), rel=1e-9)
