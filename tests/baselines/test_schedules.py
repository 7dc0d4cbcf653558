"""Each baseline's task graph has the structure its description says (DESIGN 2.4), checked on the
graph itself and, where the claim is about timing, on the simulator's run of it."""

from __future__ import annotations

import pytest

from moe_lightning.baselines.schedules import (
    SCHEDULES,
    fastdecode_decode,
    flexgen_decode_cpu_attention,
    flexgen_decode_gpu_attention,
    flexgen_prefill,
    unpaged_decode_gpu_attention,
    unpaged_prefill,
)
from moe_lightning.schedule.cgopipe import PipeShape, decode_graph
from moe_lightning.schedule.graph import TaskGraph
from moe_lightning.tuner.simulator import simulate_graph

WEIGHT_OPS = ("W_CtoPin", "W_PinToGPU")


def shape(L=3, m=3, P=1, prefetch=1, gpu_kv=()):
    return PipeShape(num_layers=L, num_micro_batches=m, num_pages=P, prefetch=prefetch, gpu_kv=frozenset(gpu_kv))


def pos(g: TaskGraph, op: str, i: int, j: int) -> int:
    tid = g.get(op, i, j)
    assert tid is not None, f"{op}({i},{j}) missing from {g.name}"
    return tid


def closure(g: TaskGraph, tid: int) -> set[int]:
    """Every task `tid` waits for, directly or not."""
    seen, stack = set(), list(g.tasks[tid].deps)
    while stack:
        d = stack.pop()
        if d not in seen:
            seen.add(d)
            stack.extend(g.tasks[d].deps)
    return seen


def test_flexgen_s4_issue_order_is_the_zig_zag():
    """2 layers x 2 GPU batches: per step, the next layer's whole weights (first batch only), the next
    batch's KV, compute, the previous batch's KV store."""
    g = flexgen_decode_gpu_attention(shape(L=2, m=2))
    assert g.ops() == [
        "W_CtoPin(0,0)", "W_PinToGPU(0,0)", "W_CtoPin(1,0)", "LoadKV(0,0)",
        "W_PinToGPU(1,0)", "LoadKV(0,1)", "GPULayer(0,0)",                     # step (0, 0)
        "LoadKV(1,0)", "GPULayer(0,1)", "StoreKV(0,0)",                        # step (0, 1)
        "LoadKV(1,1)", "GPULayer(1,0)", "StoreKV(0,1)",                        # step (1, 0)
        "GPULayer(1,1)", "StoreKV(1,0)",                                       # step (1, 1)
        "StoreKV(1,1)",
    ]


@pytest.mark.parametrize("L, m", [(3, 3), (4, 2), (2, 1)])
def test_flexgen_s4_loads_one_whole_layer_before_computing_it_and_syncs_each_step(L, m):
    g = flexgen_decode_gpu_attention(shape(L=L, m=m))
    h2d_weights = [t for t in g.tasks if t.op == "W_PinToGPU"]
    assert [(t.layer, t.micro_batch) for t in h2d_weights] == [(i, 0) for i in range(L)]  # one page per layer
    for i in range(L):
        w = pos(g, "W_PinToGPU", i, 0)
        for j in range(m):
            assert w in g.tasks[pos(g, "GPULayer", i, j)].deps
        if i >= 1:  # issued at the start of layer i-1: after step (i-2, m-1), before GPULayer(i-1, 0)
            assert w < pos(g, "GPULayer", i - 1, 0)
            if i >= 2:
                assert w > pos(g, "GPULayer", i - 2, m - 1)
    for k in range(1, L * m):
        i, j = divmod(k, m)
        compute = g.tasks[pos(g, "GPULayer", i, j)]
        prev = pos(g, "GPULayer", *divmod(k - 1, m))
        assert prev in compute.deps                                          # sync
        if k + 1 < L * m:                                                    # next batch's KV in this step
            load = g.tasks[pos(g, "LoadKV", *divmod(k + 1, m))]
            assert prev in load.deps and load.id < compute.id
            assert pos(g, "GPULayer", i, j) not in closure(g, load.id)       # ... overlapping this compute
        store = g.tasks[pos(g, "StoreKV", *divmod(k - 1, m))]
        assert store.id > compute.id and prev in store.deps                 # previous batch's KV stored after
    # no look-ahead beyond one batch: nothing of step k+2 can start before step k finished
    for k in range(L * m - 2):
        later = pos(g, "LoadKV", *divmod(k + 2, m)) if k + 2 < L * m else None
        if later is not None:
            assert pos(g, "GPULayer", *divmod(k, m)) in closure(g, later)


def test_flexgen_s4_gpu_resident_kv_is_not_streamed():
    g = flexgen_decode_gpu_attention(shape(L=2, m=3, gpu_kv=(1,)))
    assert all(t.micro_batch != 1 for t in g.tasks if t.op in ("LoadKV", "StoreKV"))
    assert sum(t.op == "LoadKV" for t in g.tasks) == sum(t.op == "StoreKV" for t in g.tasks) == 4


def test_flexgen_prefill_zig_zag_offloads_previous_batch():
    g = flexgen_prefill(shape(L=2, m=2))
    assert g.ops() == ["W_CtoPin(0,0)", "W_PinToGPU(0,0)", "W_CtoPin(1,0)", "W_PinToGPU(1,0)",
                       "PrefillLayer(0,0)", "PrefillLayer(0,1)", "OffloadKV(0,0)", "PrefillLayer(1,0)",
                       "OffloadKV(0,1)", "PrefillLayer(1,1)", "OffloadKV(1,0)", "OffloadKV(1,1)"]


@pytest.mark.parametrize("gpu_kv", [(), (1,)])
def test_flexgen_c_s3_has_serial_dependencies(gpu_kv):
    """Every compute/activation task depends on the one issued before it: no look-ahead at all."""
    g = flexgen_decode_cpu_attention(shape(L=3, m=3, gpu_kv=gpu_kv))
    chain = [t for t in g.tasks if t.op not in WEIGHT_OPS]
    for prev, t in zip(chain, chain[1:]):
        assert prev.id in t.deps, f"{t.label} does not wait for {prev.label}"
    for i in range(2):  # CPU attention of batch 2 only after PostAttn of the batches before it
        assert {pos(g, "PostAttn", i, 0), pos(g, "PostAttn", i, 1)} <= closure(g, pos(g, "CPUAttn", i, 2))
    assert [(t.layer, t.micro_batch) for t in g.tasks if t.op == "W_PinToGPU"] == [(0, 0), (1, 0), (2, 0)]
    if gpu_kv:
        assert g.get("GPUAttn", 0, 1) is not None and g.get("CPUAttn", 0, 1) is None


def test_flexgen_c_weights_still_overlap_in_the_simulator():
    """S3 serialises compute, not FlexGen's weight stream: layer i+1's load runs during step (i, 0)."""
    g = flexgen_decode_cpu_attention(shape(L=3, m=2))
    recs = {r.task.label: r for r in simulate_graph(g, lambda t: 5.0 if t.op == "W_PinToGPU" else 1.0)}
    assert recs["W_PinToGPU(1,0)"].start_s < recs["PostAttn(0,1)"].end_s


def test_deepspeed_one_micro_batch_one_layer_prefetch():
    g = unpaged_decode_gpu_attention(shape(L=4, m=1))
    assert {t.micro_batch for t in g.tasks} == {0}
    for i in range(1, 4):
        w = pos(g, "W_PinToGPU", i, 0)
        assert w < pos(g, "GPULayer", i - 1, 0)                 # issued before the previous layer computes
        if i >= 2:
            assert pos(g, "GPULayer", i - 2, 0) in g.tasks[w].deps   # double buffer: two layers on the GPU
            assert pos(g, "W_PinToGPU", i, 0) > pos(g, "GPULayer", i - 2, 0)
    assert sum(t.op == "W_PinToGPU" for t in g.tasks) == 4
    p = unpaged_prefill(shape(L=4, m=1))
    assert [t.op for t in p.tasks if t.op not in WEIGHT_OPS] == ["PrefillLayer", "OffloadKV"] * 4


def test_deepspeed_policy_is_one_micro_batch_largest_batch(tiny):
    from moe_lightning.baselines.policies import deepspeed_policy
    from moe_lightning.config import GpuSpec, HardwareSpec, Policy, Workload
    from moe_lightning.memory import memory_plan

    spec, _ = tiny
    wl = Workload(prompt_len_avg=200, prompt_len_max=400, gen_len=64, num_requests=4096)
    hw = HardwareSpec(name="small", gpu=GpuSpec(memory_gib=0.02, usable_fraction=1.0))
    p = deepspeed_policy(spec, hw, wl)
    assert p.num_micro_batches == 1 and p.expert_gpu_fraction == 0 and p.attn_on_gpu and p.num_pages == 1
    assert 1 <= p.batch_size < 4096 and memory_plan(spec, p, wl).fits(hw)
    bigger = [Policy(**{**p.__dict__, "batch_size": p.batch_size + 1, "micro_batch_size": p.batch_size + 1,
                        "kv_gpu_fraction": r_c}) for r_c in (0.0, 1.0)]
    assert not any(memory_plan(spec, q, wl).fits(hw) for q in bigger)


def test_fastdecode_issues_cpu_attention_ahead_like_cgopipe_but_weights_unpaged():
    L, m = 3, 4
    fd = fastdecode_decode(shape(L=L, m=m, P=1))
    cg = decode_graph(shape(L=L, m=m, P=m, prefetch=2))
    # the same CPU-attention look-ahead: compute tasks in the same order in both graphs
    strip = lambda g: [t.label for t in g.tasks if t.op not in WEIGHT_OPS]  # noqa: E731
    assert strip(fd) == strip(cg)
    for k in range(L * m - 2):
        (i, j), (i2, j2) = divmod(k, m), divmod(k + 2, m)
        cpu_attn = pos(fd, "CPUAttn", i2, j2)
        assert cpu_attn < pos(fd, "PostAttn", *divmod(k + 1, m))        # issued two micro-batches ahead
        assert pos(fd, "PostAttn", i, j) not in closure(fd, cpu_attn)  # ... and free to run during PostAttn(k)
    # weights: one block per layer, issued at (i, 0), never between the micro-batches of a layer
    for i in range(L - 1):
        w = pos(fd, "W_PinToGPU", i + 1, 0)
        assert pos(fd, "LoadHidden", i, 0) < w < pos(fd, "PostAttn", i, 0)
    assert sum(t.op == "W_PinToGPU" for t in fd.tasks) == L
    assert sum(t.op == "W_PinToGPU" for t in cg.tasks) == L * m


def test_fastdecode_whole_layer_blocks_the_small_transfers_that_cgopipe_interleaves():
    """The reason CGOPipe pages weights: an unpaged layer ahead of LoadHidden on the H2D link delays
    the next micro-batch; pages interleave with it."""
    L, m = 3, 4
    cost = {"W_PinToGPU": 8.0, "PostAttn": 2.0, "CPUAttn": 1.0}

    def step_time(g, per_page):
        recs = simulate_graph(g, lambda t: per_page if t.op == "W_PinToGPU" else cost.get(t.op, 0.1))
        return max(r.end_s for r in recs)

    fd = step_time(fastdecode_decode(shape(L=L, m=m, P=1)), cost["W_PinToGPU"])
    cg = step_time(decode_graph(shape(L=L, m=m, P=m, prefetch=2)), cost["W_PinToGPU"] / m)
    assert cg < fd


def test_every_baseline_graph_is_valid_for_many_shapes():
    for L, m, P, pre in [(1, 1, 1, 1), (2, 3, 1, 1), (3, 2, 2, 2), (4, 3, 0, 1), (3, 5, 3, 1)]:
        for gpu_kv in ((), (0,), tuple(range(m))):
            s = shape(L=L, m=m, P=P, prefetch=pre, gpu_kv=gpu_kv)
            for sched in SCHEDULES.values():
                builders = [sched.prefill, sched.decode_gpu_attention]
                if sched.name != "deepspeed":
                    builders.append(sched.decode_cpu_attention)
                for build in builders:
                    g = build(s)
                    g.validate()
                    assert sum(t.op == "W_PinToGPU" for t in g.tasks) == L * P
                    computes = {(t.layer, t.micro_batch) for t in g.tasks
                                if t.op in ("GPULayer", "PostAttn", "PrefillLayer")}
                    assert computes == {(i, j) for i in range(L) for j in range(m)}


# ---- synchronisation: FlexGen's sync() after every step, nothing else synchronises -----------------

FLEXGEN_GRAPHS = [flexgen_decode_gpu_attention, flexgen_decode_cpu_attention, flexgen_prefill]


def steps(g: TaskGraph) -> list[range]:
    """The task ids of each synchronised step (between consecutive barriers, the tail after the last)."""
    bounds = [0, *g.syncs, len(g)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if a < b]


@pytest.mark.parametrize("build", FLEXGEN_GRAPHS)
@pytest.mark.parametrize("L, m, gpu_kv", [(3, 3, ()), (2, 2, (1,)), (3, 1, ())])
def test_flexgen_barrier_after_every_step_waits_for_the_weight_load(build, L, m, gpu_kv):
    """A barrier after the prologue and after every (i, j) step; every task of a step depends on every task
    of the step before, the whole-layer weight load issued at j == 0 included (FlexGen's `sync()` joins
    its copy threads and synchronises the device)."""
    g = build(shape(L=L, m=m, gpu_kv=gpu_kv))
    assert len(g.syncs) == L * m + 1
    parts = steps(g)
    for before, after in zip(parts, parts[1:]):
        for t in after:
            assert set(before) <= set(g.tasks[t].deps), f"{g.tasks[t].label} skips part of the step before it"
    compute = "PrefillLayer" if build is flexgen_prefill else ("PostAttn" if build is flexgen_decode_cpu_attention
                                                                else "GPULayer")
    for i in range(L - 1):
        w = pos(g, "W_PinToGPU", i + 1, 0)
        step = next(p for p in parts if pos(g, compute, i, 0) in p)
        assert w in step                                       # issued in step (i, 0) ...
        if m > 1:
            assert w in closure(g, pos(g, compute, i, 1))      # ... and waited for before step (i, 1)


@pytest.mark.parametrize("build, first_op", [(flexgen_decode_gpu_attention, "GPULayer"),
                                             (flexgen_decode_cpu_attention, "GPUAttn"),
                                             (flexgen_prefill, "PrefillLayer")])
def test_flexgen_step_after_a_slow_weight_load_waits_for_it(build, first_op):
    """Weight load 10 s, every other task 1 s: step (i, 1) starts only once layer i+1's weights, issued in
    step (i, 0), have landed, while step (i, 0) itself overlaps the load. (The old `_ZigZag` left the
    weight loads out of the sync: step (i, 1) started at once.) KV caches on the GPU, so that no KV or
    hidden-state copy queues behind the weights on the link and hides the sync."""
    L, m = 3, 2
    g = build(shape(L=L, m=m, gpu_kv=(0, 1)))
    recs = {r.task.label: r for r in simulate_graph(g, lambda t: 10.0 if t.op == "W_PinToGPU" else 1.0)}
    for i in range(L - 1):
        w = recs[f"W_PinToGPU({i + 1},0)"]
        assert recs[f"{first_op}({i},0)"].start_s < w.end_s
        assert recs[f"{first_op}({i},1)"].start_s >= w.end_s


def test_only_flexgen_synchronises():
    s = shape(L=3, m=3, gpu_kv=(1,))
    for name, sched in SCHEDULES.items():
        builders = [sched.prefill, sched.decode_gpu_attention]
        if name != "deepspeed":
            builders.append(sched.decode_cpu_attention)
        for build in builders:
            assert bool(build(s).syncs) == name.startswith("flexgen"), (name, build.__name__)
    assert not decode_graph(s).syncs


def test_the_executor_holds_each_flexgen_step_until_the_previous_one_is_done():
    """The engine's executor honours the barriers: nothing of step k+1 is even issued before every task
    of step k (the slow weight load included) has finished."""
    import time

    import torch

    from moe_lightning.engine.executor import Executor

    g = flexgen_decode_gpu_attention(shape(L=2, m=2))

    def handler(task):
        time.sleep(0.03 if task.op == "W_PinToGPU" else 0.002)

    recs = {r.task.id: r for r in Executor(torch.device("cpu")).run(g, {t.op: handler for t in g.tasks})}
    parts = steps(g)
    for before, after in zip(parts, parts[1:]):
        done = max(recs[t].end_s for t in before)
        assert all(recs[t].issued_s >= done for t in after)


@pytest.mark.parametrize("dense", [(0,), (1,), (0, 2), (1, 3), (0, 1)])
def test_dense_layers_stream_nothing_and_every_graph_stays_valid(dense):
    """Dense layers (no routed experts) have no weight tasks; the MoE layers around them still stream
    every page, each into the buffer of its ordinal among the MoE layers, and the simulator runs every
    graph to the end."""
    L, m, P = 4, 3, 2
    moe = [i for i in range(L) if i not in dense]
    s = PipeShape(num_layers=L, num_micro_batches=m, num_pages=P, prefetch=1, dense_layers=frozenset(dense))
    builders = [decode_graph] + [b for sched in SCHEDULES.values()
                                 for b in (sched.prefill, sched.decode_gpu_attention, sched.decode_cpu_attention)
                                 if not (sched.name == "deepspeed" and b == sched.decode_cpu_attention)]
    for build in builders:
        g = build(s)
        g.validate()
        loads = [(t.layer, t.micro_batch) for t in g.tasks if t.op == "W_PinToGPU"]
        assert sorted(loads) == [(i, p) for i in moe for p in range(P)], g.name
        copies = [(t.layer, t.micro_batch) for t in g.tasks if t.op == "W_CtoPin"]
        assert copies == [(i, p) for i in moe for p in range(P)], g.name   # in stream order
        for tid, t in enumerate(g.tasks):
            if t.op in ("PostAttn", "GPULayer", "PrefillLayer"):
                waits = {g.tasks[d].layer for d in t.deps if d is not None and g.tasks[d].op == "W_PinToGPU"}
                # a layer waits for its own pages only, none if dense (FlexGen's barriers aside)
                assert g.syncs or waits <= {t.layer}, g.name
                if t.layer in moe:   # ... and for every one of them
                    assert all(pos(g, "W_PinToGPU", t.layer, p) in closure(g, tid) for p in range(P))
        # MoE layer o+2 reuses the buffer of MoE layer o: its loads wait for o's last micro-batch.
        compute = next(op for op in ("PostAttn", "GPULayer", "PrefillLayer") if g.get(op, 0, 0) is not None)
        for a, b in zip(moe, moe[2:]):
            assert pos(g, compute, a, m - 1) in closure(g, pos(g, "W_PinToGPU", b, 0)), g.name
        assert max(r.end_s for r in simulate_graph(g, lambda t: 1.0)) > 0
