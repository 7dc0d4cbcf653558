"""The CGOPipe engine: token-identical to transformers under many policies, executes the paper's
order, and refuses a policy over the memory budget before touching a weight."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from moe_lightning.config import CpuSpec, GpuSpec, HardwareSpec, LinkSpec, Policy
from moe_lightning.engine.cgopipe import CGOPipeRunner, pack_micro_batches
from moe_lightning.engine.executor import Executor
from moe_lightning.engine.generation import GenerationParams, generate
from moe_lightning.errors import MemoryBudgetError
from moe_lightning.schedule.cgopipe import PipeShape, decode_graph
from tests.conftest import PARITY_NEW_TOKENS, gpu_bytes_before, prompt_workload

MAX_NEW = PARITY_NEW_TOKENS
CPU = torch.device("cpu")




POLICIES = [
    # (policy, padded)
    (Policy(batch_size=10, micro_batch_size=10, expert_kernel="loop"), False),                 # 1 micro-batch
    (Policy(batch_size=10, micro_batch_size=3, expert_gpu_fraction=0.5, expert_kernel="loop"), False),
    (Policy(batch_size=8, micro_batch_size=2, expert_gpu_fraction=1.0, expert_kernel="loop"), True),
    (Policy(batch_size=10, micro_batch_size=2, attn_on_gpu=True, expert_kernel="loop"), False),
    (Policy(batch_size=6, micro_batch_size=3, attn_on_gpu=True, expert_gpu_fraction=0.5, kv_gpu_fraction=0.5,
            expert_kernel="loop"), True),
    (Policy(batch_size=10, micro_batch_size=4, expert_gpu_fraction=0.25, kv_gpu_fraction=0.5, pages_per_layer=5,
            prefetch_depth=1, expert_kernel="grouped"), False),
    (Policy(batch_size=4, micro_batch_size=1, expert_kernel="padded"), False),                  # 4 micro-batches
    (Policy(batch_size=10, micro_batch_size=5, expert_kernel="auto"), False),
]


def _policy_id(p: Policy, pad: bool) -> str:
    return (f"N{p.batch_size}-mu{p.micro_batch_size}-rw{p.expert_gpu_fraction}-Ag{int(p.attn_on_gpu)}"
            f"-rc{p.kv_gpu_fraction}-{p.expert_kernel}{'-padded' if pad else ''}")


@pytest.mark.parametrize("policy, padded", POLICIES, ids=[_policy_id(p, pad) for p, pad in POLICIES])
def test_tokens_identical_to_transformers(tiny, prompts, hf_outputs, policy, padded, device):
    spec, source = tiny
    before = gpu_bytes_before(device)   # CUDA: what the process held already, cuBLAS's workspaces included
    runner = CGOPipeRunner(spec, source, HardwareSpec(), policy, prompt_workload(prompts, padded), device)
    result = generate(runner, prompts, GenerationParams(max_new_tokens=MAX_NEW, eos_token_id=2),
                      policy.batch_size)
    assert result.output_ids == hf_outputs
    stats = runner.stats()
    if policy.expert_gpu_fraction < 1:
        assert stats["link_bytes"]["h2d"] > 0  # experts really streamed
    assert stats["peak_gpu_bytes"] - before <= sum(runner.plan.gpu.values()) + 4096 * len(runner.plan.gpu)
    if device.type == "cuda":  # the CUDA path really ran: streams and pinned staging
        assert runner.executor.streams and (not runner.experts.ring or runner.experts.ring[0].is_pinned())


def test_policies_cover_the_acceptance_space():
    ps = [p for p, _ in POLICIES]
    assert {p.expert_gpu_fraction for p in ps} >= {0.0, 0.5, 1.0}
    assert {p.attn_on_gpu for p in ps} == {False, True}
    assert {True, False} == {pad for _, pad in POLICIES}
    assert min(p.num_micro_batches for p in ps) == 1 and max(p.num_micro_batches for p in ps) >= 4


def test_issue_order_is_cgopipe():
    """The order one host thread issues a 2-layer, 3-micro-batch decode step (weights streamed in 3
    pages per layer, copy worker 2 pages ahead), checked line by line against the paper's loop."""
    g = decode_graph(PipeShape(num_layers=2, num_micro_batches=3, num_pages=3, prefetch=2))
    expected = [
        # prologue: layer 0's pages, the copy worker two pages ahead; then attention for k = 0, 1
        "W_CtoPin(0,0)", "W_CtoPin(0,1)", "W_PinToGPU(0,0)", "W_CtoPin(0,2)", "W_PinToGPU(0,1)",
        "W_CtoPin(1,0)", "W_PinToGPU(0,2)", "W_CtoPin(1,1)",
        "PreAttn(0,0)", "OffloadQKV(0,0)", "CPUAttn(0,0)",
        "PreAttn(0,1)", "OffloadQKV(0,1)", "CPUAttn(0,1)",
        # (i, j) = (0, 0): LoadHidden, W_PinToGPU(i+1, j), PostAttn, attention of j+2, W_CtoPin(i+1, j+2)
        "LoadHidden(0,0)", "W_PinToGPU(1,0)", "PostAttn(0,0)", "PreAttn(0,2)", "OffloadQKV(0,2)", "CPUAttn(0,2)",
        "W_CtoPin(1,2)",
        "LoadHidden(0,1)", "W_PinToGPU(1,1)", "PostAttn(0,1)", "PreAttn(1,0)", "OffloadQKV(1,0)", "CPUAttn(1,0)",
        "LoadHidden(0,2)", "W_PinToGPU(1,2)", "PostAttn(0,2)", "PreAttn(1,1)", "OffloadQKV(1,1)", "CPUAttn(1,1)",
        "LoadHidden(1,0)", "PostAttn(1,0)", "PreAttn(1,2)", "OffloadQKV(1,2)", "CPUAttn(1,2)",
        "LoadHidden(1,1)", "PostAttn(1,1)",
        "LoadHidden(1,2)", "PostAttn(1,2)",
    ]
    assert g.ops() == expected
    # PostAttn(i, j) waits for every page of layer i; a page of buffer i % 2 waits for layer i-2.
    post = g.tasks[g.get("PostAttn", 1, 0)]
    assert {g.get("W_PinToGPU", 1, p) for p in range(3)} <= set(post.deps)


@pytest.mark.parametrize("serial", [False, True], ids=["pipelined", "serial-executor"])
def test_executed_overlap_follows_cgopipe(serial):
    """Run the real decode graph through the executor with handlers of known duration. Link-bound, as on
    the paper's hardware: page j of layer i+1 is in flight during PostAttn(i, j) and the link never idles
    once streaming starts. GPU-bound: CPU attention of micro-batch k+2 runs while the GPU computes
    PostAttn(k+1). The same checks on a serial executor must fail: they see overlap, not issue order."""
    L, m = 3, 4
    g = decode_graph(PipeShape(num_layers=L, num_micro_batches=m, num_pages=m, prefetch=2))
    label = lambda op, k: f"{op}({k // m},{k % m})"  # noqa: E731 - (layer, micro-batch) of position k

    def run(durations):
        def handler(task):
            time.sleep(durations.get(task.op, 0.001))

        return {r.task.label: r for r in Executor(CPU, serial=serial).run(g, {t.op: handler for t in g.tasks})}

    def overlaps(records, a: str, b: str) -> bool:
        return records[a].start_s < records[b].end_s and records[a].end_s > records[b].start_s

    link_bound = run({"PostAttn": 0.012, "W_PinToGPU": 0.03, "CPUAttn": 0.006, "W_CtoPin": 0.01})
    page_during_post = [overlaps(link_bound, f"W_PinToGPU({i + 1},{j})", f"PostAttn({i},{j})")
                        for i in range(L - 1) for j in range(m)]
    h2d = sorted((r for r in link_bound.values() if r.task.resource.value == "h2d"), key=lambda r: r.start_s)
    link_busy = sum(r.end_s - r.start_s for r in h2d) / (h2d[-1].end_s - h2d[0].start_s)
    gpu_bound = run({"PostAttn": 0.012, "W_PinToGPU": 0.003, "CPUAttn": 0.006, "W_CtoPin": 0.002})
    attention_beside = [overlaps(gpu_bound, label("CPUAttn", k + 2), label("PostAttn", k + 1))
                        for k in range(L * m - 2)]
    if serial:
        assert not any(page_during_post) and not any(attention_beside) and link_busy < 0.75
    else:
        assert all(page_during_post) and all(attention_beside) and link_busy > 0.75, (attention_beside, link_busy)


class CountingSource:
    """Wraps a weight source and counts reads."""

    def __init__(self, source):
        self.source, self.reads, self.spec, self.dtype = source, 0, source.spec, source.dtype

    def __getattr__(self, name):
        attr = getattr(self.source, name)
        if callable(attr):
            def counted(*a, **k):
                self.reads += 1
                return attr(*a, **k)
            return counted
        return attr


def test_over_budget_policy_refused_before_any_allocation(tiny, prompts):
    spec, source = tiny
    counting = CountingSource(source)
    small = HardwareSpec(name="small", gpu=GpuSpec(memory_gib=2**-12, usable_fraction=1.0),
                         cpu=CpuSpec(), link=LinkSpec())
    with pytest.raises(MemoryBudgetError) as exc:
        CGOPipeRunner(spec, counting, small, Policy(batch_size=10, micro_batch_size=5),
                      prompt_workload(prompts), CPU)
    msg = str(exc.value)
    assert "\n" not in msg and "non_expert_weights " in msg and "(262144 B)" in msg and "OVER" in msg
    assert counting.reads == 0


def test_pools_hold_the_weights_the_engine_placed(tiny, prompts):
    """The plan's pools against bytes counted independently: the tensors the weight source hands out
    (non-expert weights) and the expert shapes by hand (tiny: 3 x 64 x 128 float32 per expert)."""
    spec, source = tiny
    policy = Policy(batch_size=10, micro_batch_size=5, expert_gpu_fraction=0.5)
    runner = CGOPipeRunner(spec, source, HardwareSpec(), policy, prompt_workload(prompts), CPU)
    placed = [runner.embedding, runner.norm, runner.lm_head,
              *(t for layer in runner.layers for t in vars(layer).values())]
    from_source = [source.embedding(), source.final_norm(), source.lm_head(),
                   *(t for i in range(spec.num_layers) for t in vars(source.layer(i)).values())]
    non_expert = sum(t.numel() * t.element_size() for t in from_source)
    assert sum(t.numel() * t.element_size() for t in placed) == non_expert
    expert = 3 * 64 * 128 * 4
    expected = {"non_expert_weights": non_expert, "resident_experts": 2 * 4 * expert,
                "streamed_experts": 2 * 4 * expert}
    assert spec.non_expert_params * 4 == non_expert                       # the plan counts the parameters right
    tensors = len(from_source)                                            # each carved at a 256-byte offset
    for pool, nbytes in expected.items():
        slack = 256 * tensors if pool == "non_expert_weights" else 4096      # offsets' padding
        assert nbytes <= runner.plan.gpu[pool] <= nbytes + slack, pool      # the plan counts them right
        assert nbytes <= runner.pools.used[pool] <= runner.plan.gpu[pool], pool   # and the engine holds them
        assert runner.pools.buffers[pool].numel() == runner.plan.gpu[pool]  # allocated as planned


def test_pack_micro_batches_longest_first_least_filled():
    lengths = [5, 40, 3, 22, 9, 31, 17, 1, 12]
    groups = pack_micro_batches(lengths, 3)
    assert sorted(b for g in groups for b in g) == list(range(9))
    assert all(len(g) <= 3 for g in groups) and len(groups) == 3
    loads = [sum(lengths[b] for b in g) for g in groups]
    assert max(loads) - min(loads) <= max(lengths) // 2  # balanced by tokens
    assert pack_micro_batches([4, 4], 1) == [[0], [1]]


def test_prompt_longer_than_the_plan_is_refused(tiny, prompts):
    spec, source = tiny
    small = dataclasses.replace(prompt_workload(prompts), prompt_len_max=8, prompt_len_avg=4)
    runner = CGOPipeRunner(spec, source, HardwareSpec(), Policy(batch_size=10, micro_batch_size=5), small, CPU)
    with pytest.raises(Exception, match="memory plan was made for"):
        runner.prefill(prompts, MAX_NEW)


@pytest.mark.parametrize("L, m, P, prefetch", [(3, 3, 5, 1), (2, 4, 2, 2), (3, 1, 3, 1), (2, 2, 7, 3), (4, 3, 3, 2)])
def test_every_page_copy_waits_for_its_staging(L, m, P, prefetch):
    """Whatever the pages per layer and prefetch depth: each W_PinToGPU depends on the W_CtoPin that
    filled its ring slot, and no W_CtoPin refills a slot before the previous page left it."""
    from moe_lightning.schedule.cgopipe import decode_graph_gpu_attention, prefill_graph

    for build in (decode_graph, decode_graph_gpu_attention, prefill_graph):
        g = build(PipeShape(num_layers=L, num_micro_batches=m, num_pages=P, prefetch=prefetch))
        ring = prefetch + 1
        for t in g.tasks:
            if t.op == "W_PinToGPU":
                assert g.get("W_CtoPin", t.layer, t.micro_batch) in t.deps
            if t.op == "W_CtoPin":
                q = t.layer * P + t.micro_batch
                if q >= ring:
                    assert g.get("W_PinToGPU", *divmod(q - ring, P)) in t.deps
        assert sum(t.op == "W_PinToGPU" for t in g.tasks) == L * P


@pytest.mark.parametrize("r_w, r_c, resident, gpu_kv", [(0.1, 0.4, 0, 0), (0.25, 0.5, 2, 1)])
def test_the_run_document_says_what_the_fractions_came_to(tiny_path, caplog, r_w, r_c, resident, gpu_kv):
    """r_w keeps whole experts and r_c whole micro-batches: a fraction too small for one is said (a warning)
    and recorded (`extra.effective_policy`), not silently dropped."""
    from moe_lightning.config import Policy, Sampling, Workload
    from moe_lightning.run_config import RunConfig
    from moe_lightning.systems import CGOPipeSystem
    from moe_lightning.tasks.generate import run_generation

    cfg = RunConfig(system=CGOPipeSystem(), workload=Workload(num_requests=4, gen_len=2), device="cpu",
                    policy=Policy(batch_size=8, micro_batch_size=4, expert_gpu_fraction=r_w, kv_gpu_fraction=r_c),
                    sampling=Sampling(ignore_eos=True))
    with caplog.at_level("WARNING", logger="moe_lightning.cgopipe"):
        eff = run_generation(cfg, progress=False).report.extra["effective_policy"]
    assert eff == {"resident_experts_per_layer": resident, "gpu_kv_micro_batches": gpu_kv, "micro_batches": 2}
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert ("keeps no expert resident" in warned) is (resident == 0)
    assert ("keeps no KV cache on the GPU" in warned) is (gpu_kv == 0)
