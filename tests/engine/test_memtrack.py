"""The GPU role's memory: what the engine really holds against what the memory plan reserves.

On CPU the engine counts the live bytes its GPU-role tasks allocate (`engine.memtrack`); on CUDA the
allocator's peak answers. The plan must cover the peak (pools plus activations), and be at most 15% over
it when the workload realises the plan's worst case: one micro-batch holding the longest prompts, or
every prompt at the longest."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_lightning.config import HardwareSpec, Policy, Workload
from moe_lightning.engine.cgopipe import CGOPipeRunner
from moe_lightning.engine.generation import GenerationParams, generate
from moe_lightning.engine.memtrack import ActivationTracker
from tests.conftest import gpu_bytes_before

GEN = 16


def test_tracker_counts_new_storage_once_until_it_is_freed():
    tracker = ActivationTracker()
    base = torch.ones(1000)
    with tracker.tracking():
        a = base * 2                 # new: 4000 B
        view = a[10:].view(-1, 10)   # a view: nothing new
        a.add_(1)                    # in place: nothing new
        b = torch.cat([a, a])        # new: 8000 B
    assert tracker.current == 12000 and tracker.peak == 12000
    del a
    assert tracker.current == 12000          # the view keeps a's storage alive
    del view, b
    assert tracker.current == 0 and tracker.peak == 12000
    c = base * 3                             # outside the block: not counted
    assert tracker.current == 0 and c.sum() > 0


def _prompts(lengths: list[int], seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]


MIXED = [9, 16, 18, 20, 28, 30, 31, 38, 47, 49, 50, 51, 53, 57, 63, 68, 70, 73, 75, 76, 78, 79, 84, 85, 85, 86,
         88, 94, 95, 95, 98, 100]
LONGEST = [100] * 16

# (policy, prompt lengths, padded): each realises the plan's worst case.
TIGHT = [
    (Policy(batch_size=32, micro_batch_size=32, expert_kernel="grouped"), MIXED, False),   # one micro-batch
    (Policy(batch_size=16, micro_batch_size=4, expert_kernel="grouped"), LONGEST, False),  # every prompt longest
    (Policy(batch_size=16, micro_batch_size=4, attn_on_gpu=True, expert_kernel="grouped"), LONGEST, False),
    (Policy(batch_size=16, micro_batch_size=4, kv_gpu_fraction=0.5, expert_kernel="grouped"), LONGEST, False),
    (Policy(batch_size=16, micro_batch_size=4, expert_gpu_fraction=0.5, expert_kernel="grouped"), MIXED[:16], True),
]


def _measure(tiny, policy: Policy, lengths: list[int], padded: bool, device: torch.device):
    spec, source = tiny
    prompts = _prompts(lengths)
    wl = Workload(prompt_len_avg=sum(lengths) // len(lengths), prompt_len_max=max(lengths), gen_len=GEN,
                  num_requests=len(lengths), padding=padded)
    before = gpu_bytes_before(device)
    runner = CGOPipeRunner(spec, source, HardwareSpec(), policy, wl, device, track_activations=True,
                           prompt_lengths=lengths)
    generate(runner, prompts, GenerationParams(max_new_tokens=GEN, eos_token_id=None), policy.batch_size)
    # The pools are allocated at the plan's sizes, byte for byte: the activations are the plan's only estimate.
    assert runner.pools.allocated_bytes == runner.plan.gpu_total_bytes - runner.plan.gpu["activations"]
    return runner.stats()["peak_gpu_bytes"] - before, runner.plan


@pytest.fixture(scope="module")
def tiny_bf16(tiny_path):
    from moe_lightning.config import ModelSpec
    from moe_lightning.engine.weights import resolve_model

    return resolve_model(ModelSpec(dtype="bfloat16"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("policy,lengths,padded", TIGHT, ids=[
    "mu=N", "longest", "attn-gpu", "kv-gpu-half", "padded-resident-half"])
def test_plan_covers_the_peak_and_is_at_most_15_percent_over(tiny, tiny_bf16, policy, lengths, padded, dtype,
                                                             device):
    """In bf16 the experts' intermediates are bf16 too (the plan once charged them in fp32)."""
    peak, plan = _measure(tiny if dtype == "float32" else tiny_bf16, policy, lengths, padded, device)
    assert peak <= plan.gpu_total_bytes, f"the engine held {peak} B, the plan reserves {plan.gpu_total_bytes} B"
    assert plan.gpu_total_bytes <= 1.15 * peak, (plan.gpu, peak)
    assert plan.gpu["activations"] > 0.3 * plan.gpu_total_bytes   # activations matter in these cases


@pytest.mark.parametrize("case,slow_op", [(1, "OffloadKV"), (1, "OffloadQKV"), (2, "StoreKV")],
                         ids=["prefill-offload", "decode-offload-qkv", "gpu-attn-store-kv"])
def test_plan_covers_the_peak_however_slow_the_copies_are(tiny, monkeypatch, case, slow_op):
    """A loaded host (or a busy copy engine) finishes the GPU -> CPU copies late: the schedule makes the
    GPU wait instead of piling up the tensors those copies hold, so the plan still covers the peak. Each
    copy here is made 20 ms slower than the GPU work beside it."""
    import time

    copy = getattr(CGOPipeRunner, f"_op_{slow_op}")

    def slow(self, t):
        time.sleep(0.02)
        return copy(self, t)

    monkeypatch.setattr(CGOPipeRunner, f"_op_{slow_op}", slow)
    policy, lengths, padded = TIGHT[case]
    peak, plan = _measure(tiny, policy, lengths, padded, torch.device("cpu"))
    assert peak <= plan.gpu_total_bytes, f"the engine held {peak} B, the plan reserves {plan.gpu_total_bytes} B"


@pytest.mark.parametrize("policy", [Policy(batch_size=32, micro_batch_size=8, expert_kernel="auto"),
                                    Policy(batch_size=32, micro_batch_size=32, expert_kernel="auto"),
                                    Policy(batch_size=32, micro_batch_size=32, expert_kernel="loop"),
                                    Policy(batch_size=32, micro_batch_size=4, attn_on_gpu=True, expert_kernel="loop")],
                         ids=["paged-auto", "one-micro-batch-auto", "one-micro-batch-loop", "paged-attn-gpu"])
def test_plan_covers_the_peak_of_mixed_prompts(tiny, policy):
    """Below the plan's worst case: admission balances tokens across micro-batches (a refill round may
    still give one micro-batch the longest prompts), `auto` may pick a kernel lighter than the grouped
    one it is planned for, and the loop kernel is planned for every token on one expert."""
    peak, plan = _measure(tiny, policy, MIXED, False, torch.device("cpu"))
    assert peak <= plan.gpu_total_bytes


@pytest.fixture(scope="module")
def family_checkpoints():
    """Every family's tiny checkpoint (the parity tests' own), resolved once."""
    from moe_lightning.config import ModelSpec
    from moe_lightning.engine.tiny import ensure_tiny
    from moe_lightning.engine.weights import resolve_model
    from tests.models.test_families import FAMILIES

    built: dict[str, tuple] = {}

    def get(key: str, dtype: str = "float32"):
        if (key, dtype) not in built:
            path = ensure_tiny(FAMILIES[key], seed=11, max_shard_size="60KB", perturb=True)
            built[key, dtype] = resolve_model(ModelSpec(name="hf", path=str(path), dtype=dtype))
        return built[key, dtype]
    return get


FAMILY_KEYS = ["qwen2_moe", "qwen3_moe", "olmoe", "dbrx", "deepseek_v2", "deepseek_v3", "gpt_oss", "gpt_oss_mxfp4"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", [0, 1], ids=["mu=N", "longest"])
@pytest.mark.parametrize("key", FAMILY_KEYS)
def test_every_family_is_planned_at_its_peak(family_checkpoints, key, case, dtype):
    """Each family's own tensors (shared experts, expert biases and gpt-oss's clamped GLU, DBRX's fused
    QKV, MLA's latent projections, dense layers) under the plan's worst cases: the plan covers the peak,
    and is at most 15% over it, in fp32 and bf16. Their tiny shapes have H > F, where the expert kernels'
    H-wide rows (gathered input, output, its weighted copy) outweigh gate|up; the weighted copy is in the
    router weights' dtype (bf16 for DBRX and gpt-oss in bf16: the plan once charged it in fp32, 14-20% over)."""
    policy, lengths, padded = TIGHT[case]
    peak, plan = _measure(family_checkpoints(key, dtype), policy, lengths, padded, torch.device("cpu"))
    assert peak <= plan.gpu_total_bytes, f"the engine held {peak} B, the plan reserves {plan.gpu_total_bytes} B"
    assert plan.gpu_total_bytes <= 1.15 * peak, (plan.gpu, peak)


@pytest.mark.parametrize("key", FAMILY_KEYS)
def test_the_plan_knows_the_dtype_of_each_familys_router_weights(family_checkpoints, key):
    """`memory.router_weight_bytes` against the weights each family's layer math hands the expert kernel."""
    from moe_lightning.engine.experts import moe_loop
    from moe_lightning.engine.reference import ReferenceRunner
    from moe_lightning.memory import router_weight_bytes

    spec, source = family_checkpoints(key, "bfloat16")
    seen = set()

    def spy(h, weights, ids, experts):
        seen.add(weights.element_size())
        return moe_loop(h, weights, ids, experts)

    ReferenceRunner(spec, source, moe_kernel=spy).prefill([[5, 7, 9]], 1)
    assert seen == {router_weight_bytes(spec)}


def test_eager_prefill_attention_is_planned(family_checkpoints, monkeypatch):
    """gpt-oss's prefill attention runs eagerly (sinks, windows) and materialises its scores: with long
    prompts they, not the experts, are the prefill's peak. Run in steps of fewer queries they hold less;
    the plan covers either, within 15%."""
    from moe_lightning import memory
    from moe_lightning.models import layers

    spec, source = family_checkpoints("gpt_oss")
    policy = Policy(batch_size=4, micro_batch_size=4, expert_kernel="grouped")
    peaks, plans = [], []
    for chunk in (256, 64):
        monkeypatch.setattr(layers, "PREFILL_QUERY_CHUNK", chunk)
        monkeypatch.setattr(memory, "PREFILL_QUERY_CHUNK", chunk)
        peak, plan = _measure((spec, source), policy, [250] * 4, False, torch.device("cpu"))
        assert peak <= plan.gpu_total_bytes, f"the engine held {peak} B, the plan reserves {plan.gpu_total_bytes} B"
        assert plan.gpu_total_bytes <= 1.15 * peak, (chunk, plan.gpu, peak)
        peaks.append(peak)
        plans.append(plan.gpu_total_bytes)
        if chunk == 256:   # the scores of one step, not the experts, are the prefill's peak
            assert memory.prefill_attention_bytes(spec, 250) > 0.5 * plan.gpu["activations"]
    assert peaks[1] < peaks[0] and plans[1] < plans[0]   # four steps: the experts' stage is the peak again


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_a_scratch_of_fewer_mxfp4_experts_is_planned(family_checkpoints, kernel):
    """policy.dequant_experts: `GroupedMoE` holds each group's gathered rows through the kernel's call and
    its weighted output after it; the plan charges them as if every routed row fell in one group, and
    covers the peak whichever kernel runs inside."""
    spec, source = family_checkpoints("gpt_oss_mxfp4")
    policy = Policy(batch_size=32, micro_batch_size=32, expert_gpu_fraction=0.25, dequant_experts=3,
                    expert_kernel=kernel)
    peak, plan = _measure((spec, source), policy, MIXED, False, torch.device("cpu"))
    assert peak <= plan.gpu_total_bytes, f"the engine held {peak} B, the plan reserves {plan.gpu_total_bytes} B"


@pytest.mark.parametrize("block_size,kernel", [(16, "loop"), (64, "dense")])
def test_plan_covers_kv_streamed_in_whole_blocks_to_gpu_attention(tiny, block_size, kernel):
    """Attention on the GPU over a CPU-resident paged cache: a sequence's KV crosses in whole blocks, up to
    63 tokens past its context, while the plan reserved its context alone, in a pool the engine allocated
    and never used (the copies are each task's own). One 1-token prompt, 9 new tokens: the peak had been
    6,176 B (16-token blocks) and 28,544 B (64) over the plan. Found by a randomized parity and memory fuzz."""
    spec, source = tiny
    wl = Workload(prompt_len_avg=1, prompt_len_max=1, gen_len=9, num_requests=1)
    policy = Policy(batch_size=1, micro_batch_size=1, attn_on_gpu=True, expert_gpu_fraction=0.0, expert_kernel=kernel)
    runner = CGOPipeRunner(spec, source, HardwareSpec(), policy, wl, torch.device("cpu"), kv_block_size=block_size,
                           track_activations=True, prompt_lengths=[1])
    generate(runner, [[5]], GenerationParams(max_new_tokens=9, eos_token_id=None), 1)
    peak, planned = runner.stats()["peak_gpu_bytes"], runner.plan.gpu_total_bytes
    assert peak <= planned, f"the engine held {peak} B, the plan reserves {planned} B"
    assert runner.pools.allocated_bytes == planned - runner.plan.gpu["activations"]   # nothing reserved unused


@pytest.mark.parametrize("key", ["deepseek_v2", "gpt_oss"])
def test_the_loop_kernel_holds_one_experts_rows_at_a_time(family_checkpoints, key):
    """The loop kernel is planned for one expert's rows at a time, every token on it at worst. Each expert's
    weighted output had stayed alive (a loop variable) through the next expert's whole FFN: with every token
    routed to the same two experts and H > F (these tiny shapes, where the FFN's stages are H-wide), T H d
    bytes over the plan. A randomized fuzz found it as DeepSeek-V2's prefill over a padded batch (its pads
    all route alike) went 3,464 B over the plan."""
    from moe_lightning.engine.experts import moe_loop
    from moe_lightning.memory import ROUTING_BYTES, expert_workspace
    from moe_lightning.models.layers import ExpertStack, clamped_swiglu

    spec, source = family_checkpoints(key)
    layer = spec.num_layers - 1   # a MoE layer in both
    w13, w2 = source.experts(layer)
    lw = source.layer(layer)
    stack = ExpertStack.single(w13, w2)
    if spec.expert_bias:   # gpt-oss: the experts' biases and clamped GLU, as its layer math passes them
        stack = dataclasses.replace(stack, b13=lw.b13, b2=lw.b2,
                                    act=clamped_swiglu(spec.swiglu_alpha, spec.swiglu_limit))
    T, H, d = 40, spec.hidden_size, spec.dtype_bytes
    h = torch.randn(T, H)
    ids = torch.tensor([[0, 1]] * T)                     # every token on experts 0 and 1
    weights = torch.full((T, 2), 0.5)
    tracker = ActivationTracker()
    with tracker.tracking():
        out = moe_loop(h, weights, ids, stack)
    assert out.abs().sum() > 0
    allowed = T * H * d + expert_workspace("loop", spec, T) + T * spec.top_k * ROUTING_BYTES   # output, FFN, routing
    assert tracker.peak <= allowed, f"the loop kernel held {tracker.peak} B, the plan {allowed} B"


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_grouped_moe_is_planned_with_the_kernels_output_over_its_rows(family_checkpoints, kernel):
    """`GroupedMoE` (policy.dequant_experts) hands the kernel each group's gathered rows as its tokens, so the
    kernel's output is R = T x top_k rows wide, not T; the plan counted the gathered rows but not that
    output: with every token on two experts of one group, R H d bytes over. A randomized fuzz found it as
    gpt-oss's MXFP4 prefill of a 33-token prompt (64 of its 66 rows in one group of 5) went 1,704 B over."""
    from moe_lightning.engine.experts import KERNELS
    from moe_lightning.engine.paged import GroupedMoE
    from moe_lightning.memory import ROUTING_BYTES, routed_experts_bytes
    from moe_lightning.models.layers import ExpertStack, clamped_swiglu

    spec, source = family_checkpoints("gpt_oss")   # biases and the clamped GLU: the kernels' largest stages
    layer = spec.num_layers - 1
    w13, w2 = source.experts(layer)
    lw = source.layer(layer)
    group = 4
    groups = [(f, f + group, lambda f=f: ExpertStack.single(w13[f:f + group], w2[f:f + group]))
              for f in range(0, spec.num_experts, group)]
    stack = ExpertStack([], [], [], b13=lw.b13, b2=lw.b2, act=clamped_swiglu(spec.swiglu_alpha, spec.swiglu_limit),
                        groups=groups)
    T, H, d, k = 40, spec.hidden_size, spec.dtype_bytes, spec.top_k
    h = torch.randn(T, H)
    ids = torch.tensor([[0, 1]] * T)                     # every token on experts 0 and 1: one group
    weights = torch.full((T, k), 0.5)
    tracker = ActivationTracker()
    with tracker.tracking():
        out = GroupedMoE(KERNELS[kernel])(h, weights, ids, stack)
    assert out.abs().sum() > 0
    # the MoE's output, what the plan charges it, the routing's indices
    allowed = T * H * d + routed_experts_bytes(spec, kernel, T, expert_groups=True) + T * k * ROUTING_BYTES
    assert tracker.peak <= allowed, f"GroupedMoE held {tracker.peak} B, the plan {allowed} B"


@pytest.mark.parametrize("key", ["gpt_oss", "qwen3_moe"])
def test_blocks_gathered_on_the_host_are_not_counted_as_the_gpus(family_checkpoints, key):
    """Attention on the GPU over a CPU-resident paged cache gathers a sequence's blocks on the host, then
    copies them across: on a GPU the gather is host memory, but the CPU's tracker counted it with the copy
    (the whole load task ran counted), one more layer's KV than the plan's two in flight. One 1-token
    prompt, 64-token blocks: 3,516 B (gpt-oss) over the plan. Found by a randomized parity and memory fuzz."""
    spec, source = family_checkpoints(key)
    wl = Workload(prompt_len_avg=1, prompt_len_max=1, gen_len=2, num_requests=1)
    policy = Policy(batch_size=1, micro_batch_size=1, attn_on_gpu=True, expert_gpu_fraction=0.0, expert_kernel="loop")
    runner = CGOPipeRunner(spec, source, HardwareSpec(), policy, wl, torch.device("cpu"), kv_block_size=64,
                           track_activations=True, prompt_lengths=[1])
    generate(runner, [[5]], GenerationParams(max_new_tokens=2, eos_token_id=None), 1)
    assert runner.link_bytes["h2d"] > 0
    peak, planned = runner.stats()["peak_gpu_bytes"], runner.plan.gpu_total_bytes
    assert peak <= planned, f"the engine held {peak} B, the plan reserves {planned} B"


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-chunk", "a-sequence-a-chunk"])
@pytest.mark.parametrize("kv_gpu_fraction", [0.0, 1.0], ids=["kv-streamed", "kv-on-gpu"])
@pytest.mark.parametrize("key", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_gpu_paged_attention_is_planned_at_its_gathered_chunks(family_checkpoints, monkeypatch, key, kv_gpu_fraction,
                                                               chunk_bytes):
    """On a GPU, paged decode attention gathers a chunk of sequences' K and V (and upcasts them) at a time
    (`kernels.cpu_attention._gathered`); the CPU runs it only when forced, as here. GQA, MLA (V a view of
    K) and gpt-oss (sinks, sliding window); whole micro-batches or a sequence per chunk. Short contexts in
    128-token blocks make the gathers the decode step's peak: without the plan's term for them, the
    streamed-KV cases went 101-193 KB over (Qwen3: 1,719,552 B held, 1,526,432 planned)."""
    import functools

    from moe_lightning import memory
    from moe_lightning.kernels import cpu_attention

    monkeypatch.setenv("MOE_LIGHTNING_CPU_ATTENTION", "torch")
    monkeypatch.setattr(cpu_attention, "paged_decode_attention_torch",
                        functools.partial(cpu_attention.paged_decode_attention_torch, gathered=True))
    if chunk_bytes is not None:
        monkeypatch.setattr(memory, "PAGED_ATTENTION_CHUNK_BYTES", chunk_bytes)
    spec, source = family_checkpoints(key)
    lengths = [5, 3, 2, 5, 3, 1, 4, 3]   # short contexts in 128-token blocks: the gathers are the step's peak
    wl = Workload(prompt_len_avg=3, prompt_len_max=5, gen_len=GEN, num_requests=len(lengths))
    policy = Policy(batch_size=8, micro_batch_size=8, attn_on_gpu=True, kv_gpu_fraction=kv_gpu_fraction,
                    expert_kernel="loop")
    runner = CGOPipeRunner(spec, source, HardwareSpec(), policy, wl, torch.device("cpu"), kv_block_size=128,
                           track_activations=True, prompt_lengths=lengths)
    generate(runner, _prompts(lengths), GenerationParams(max_new_tokens=GEN, eos_token_id=None), 8)
    peak, planned = runner.stats()["peak_gpu_bytes"], runner.plan.gpu_total_bytes
    assert peak <= planned, f"the engine held {peak} B, the plan reserves {planned} B"


def test_the_driver_drops_a_steps_logits_before_the_next_forward(family_checkpoints):
    """Admission mode: the driver held a step's gathered [N, V] fp32 logits (its `logits` variable) through
    the next forward, two steps' logits where the plan holds one. Where they outweigh a layer's work (a
    tiny model in bf16, a 512-token vocabulary) that is the peak: 1,792 B over the plan for OLMoE. Found by
    a randomized parity and memory fuzz."""
    spec, source = family_checkpoints("olmoe", "bfloat16")
    lengths = [2, 2, 1]
    wl = Workload(prompt_len_avg=1, prompt_len_max=2, gen_len=4, num_requests=3)
    policy = Policy(batch_size=3, micro_batch_size=2, expert_kernel="loop")
    runner = CGOPipeRunner(spec, source, HardwareSpec(), policy, wl, torch.device("cpu"), kv_block_size=5,
                           track_activations=True, prompt_lengths=lengths)
    generate(runner, _prompts(lengths), GenerationParams(max_new_tokens=4, eos_token_id=None), 3)
    peak, planned = runner.stats()["peak_gpu_bytes"], runner.plan.gpu_total_bytes
    assert peak <= planned, f"the engine held {peak} B, the plan reserves {planned} B"
