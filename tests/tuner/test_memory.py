"""memory_plan pool values for a tiny case worked out by hand, and the budget check."""

from dataclasses import replace

import pytest

from moe_lightning.config import CpuSpec, GpuSpec, HardwareSpec, LinkSpec, ModelSpec, Policy, Workload
from moe_lightning.errors import MemoryBudgetError
from moe_lightning.memory import POOL_ALIGN_ROOM as ROOM
from moe_lightning.memory import memory_plan, resident_experts_per_layer

# L=2, H=8, F=16, nq=2, nkv=1, hd=4, E=4, top-2, V=32, fp16 (2 bytes).
SPEC = ModelSpec(name="hand", num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1,
                 head_dim=4, num_experts=4, top_k=2, vocab_size=32, dtype="float16", weights="random")
WORKLOAD = Workload(prompt_len_avg=3, prompt_len_max=5, gen_len=3, num_requests=4)


def hw_with(gpu_bytes: float, cpu_bytes: float) -> HardwareSpec:
    return HardwareSpec(name="hand", gpu=GpuSpec(memory_gib=gpu_bytes / 2**30, usable_fraction=1.0),
                        cpu=CpuSpec(memory_gib=cpu_bytes / 2**30, usable_fraction=1.0), link=LinkSpec())


def test_pools_by_hand_attention_on_cpu():
    policy = Policy(batch_size=4, micro_batch_size=2, attn_on_gpu=False, ffn_on_gpu=True,
                    expert_gpu_fraction=0.5, kv_gpu_fraction=0.25, prefetch_depth=2)
    plan = memory_plan(SPEC, policy, WORKLOAD, lengths=[5, 1, 4, 2])
    # expert = 3*8*16 = 384 params = 768 B. Non-expert params: per layer attention 8*(2*8 + 2*4) = 192,
    # norms 2*8, router 4*8 -> 240; 2 layers = 480, embeddings + head 2*32*8 = 512, final norm 8 -> 1000.
    # Each tensor sits at a 256-byte offset: embedding and head 512 B each, the final norm (16 B) 256;
    # per layer 7 tensors of 16-128 B, 256 each -> 1792; 2 layers 3584 -> 4864.
    # KV per token 2*2*1*4*2 = 32 B; ctx = 5 + 3 = 8; kv_total = 4*8*32 = 1024; GPU share ceil(256) = 256.
    # Activations (d = 2 B). Prefill: the 4 longest prompts hold 5+4+2+1 = 12 tokens, the 2 longest 9.
    # A layer task of T tokens: T*((2*2 + 2*1)*4*2 + 3*8*2 + 2*72) = 240 T, plus the experts' workspace
    # (auto: the grouped kernel's at the prefill's 9 tokens, 9*2 assignments * 4*16*2 = 2304: of its
    # stages, gate|up and the GLU, 2F + 2F = 64 a row, are the largest at H = 8 < F = 16).
    # prefill: hidden 12*8*2 = 192, logits 4*32*2 = 256, max(task 240*9 + 2304 + the previous
    # micro-batch's K/V 2*9*1*4*2 = 144, gathered fp32 logits 4*32*4 + 2*32*4 = 768) = 4608 -> 5056.
    # decode: hidden 4*8*2 = 64, logits 256, task 240*2 + 2304 = 2784, two micro-batches in flight
    # 2*2*6*4*2 = 192, attention where the KV is on the GPU (r_c > 0) 2*2*8*(3*2 + 4) = 320 -> 3616.
    # The pools of several tensors (experts, KV) each reserve ROOM bytes for their offsets' padding.
    assert plan.gpu == {"non_expert_weights": 4864, "resident_experts": 2 * 2 * 768 + ROOM,
                        "streamed_experts": 2 * 2 * 768 + ROOM, "kv_cache": 256 + ROOM, "activations": 5056}
    # pinned ring: page = ceil(2*768 / 2 pages) = 768, times (2 + 1); hidden: 4*(8+8+8)*2 = 192.
    assert plan.cpu == {"streamed_experts": 2 * 2 * 768, "kv_cache": 768, "pinned_ring": 2304,
                        "hidden_states": 192}
    assert plan.gpu_total_bytes == 16320 + 3 * ROOM
    assert plan.cpu_total_bytes == 6336


def test_attention_on_gpu_adds_streamed_kv_double_buffer():
    base = dict(batch_size=4, micro_batch_size=2, ffn_on_gpu=True, expert_gpu_fraction=0.5,
                kv_gpu_fraction=0.25)
    on_cpu = memory_plan(SPEC, Policy(attn_on_gpu=False, **base), WORKLOAD)
    on_gpu = memory_plan(SPEC, Policy(attn_on_gpu=True, **base), WORKLOAD)
    # 2 buffers * mu 2 * ctx 8 * (K and V) 2 * nkv 1 * hd 4 * 2 B = 512: copies each task makes, so
    # activations, not a pool
    assert on_gpu.gpu["activations"] - on_cpu.gpu["activations"] == 512
    assert on_gpu.gpu["kv_cache"] == on_cpu.gpu["kv_cache"]
    assert on_gpu.cpu == on_cpu.cpu


def test_all_resident_has_no_stream_buffer_and_pages_round_up():
    full = memory_plan(SPEC, Policy(batch_size=4, micro_batch_size=2, expert_gpu_fraction=1.0), WORKLOAD)
    assert full.gpu["streamed_experts"] == 0 and full.cpu["streamed_experts"] == 0
    assert full.gpu["resident_experts"] == 2 * 4 * 768 + ROOM
    assert full.cpu["pinned_ring"] == 0
    odd = memory_plan(SPEC, Policy(batch_size=4, micro_batch_size=2, expert_gpu_fraction=0.25,
                                   pages_per_layer=5, prefetch_depth=1), WORKLOAD)
    assert odd.cpu["pinned_ring"] == 2 * -(-3 * 768 // 5)  # ceil(2304 / 5) = 461 per page


def test_resident_count_floors_with_tolerance():
    assert resident_experts_per_layer(SPEC, 0.3) == 1      # 1.2 -> 1
    assert resident_experts_per_layer(SPEC, 0.75) == 3
    three = ModelSpec(num_experts=3, top_k=2)
    assert resident_experts_per_layer(three, 1 / 3) == 1   # 0.999... + 1e-6 -> 1
    assert resident_experts_per_layer(three, 2 / 3) == 2


def test_fits_and_check_message():
    policy = Policy(batch_size=4, micro_batch_size=2, expert_gpu_fraction=0.5, kv_gpu_fraction=0.25)
    plan = memory_plan(SPEC, policy, WORKLOAD, lengths=[5, 1, 4, 2])   # the pools worked out above
    gpu = 16320 + 3 * ROOM
    assert plan.fits(hw_with(gpu, 6336))
    plan.check(hw_with(gpu, 6336))
    tight = hw_with(gpu - 1, 10**6)
    assert not plan.fits(tight)
    with pytest.raises(MemoryBudgetError) as err:
        plan.check(tight)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"({gpu} B" in msg and f"({gpu - 1} B)" in msg and f"activations {5056 / 2**30:.3g}" in msg and "OVER" in msg


def test_a_dense_layer_holds_its_mlp_and_no_experts():
    """The same model with layer 0 dense (an MLP of FFN dim 16 in place of router and experts)."""
    spec = replace(SPEC, dense_layers=[0], dense_intermediate_size=16)
    policy = Policy(batch_size=4, micro_batch_size=2, attn_on_gpu=False, ffn_on_gpu=True,
                    expert_gpu_fraction=0.5, kv_gpu_fraction=0.25, prefetch_depth=2)
    plan = memory_plan(spec, policy, WORKLOAD, lengths=[5, 1, 4, 2])
    # Layer 0: 2 norms, 4 projections, 3 MLP tensors (3*8*16*2 = 768 B: 256 each) -> 9 aligned slots of
    # 256 B, in place of 7: 4864 + 2*256 = 5376. Experts of one layer only: resident 2 and streamed 2.
    assert plan.gpu["non_expert_weights"] == 5376
    assert plan.gpu["resident_experts"] == 2 * 768 + ROOM
    assert plan.gpu["streamed_experts"] == 2 * 2 * 768 + ROOM      # the double buffer is one layer's, either way
    assert plan.cpu["streamed_experts"] == 2 * 768
    # The MLP's intermediates (SiLU(gate), up, their product: 3*16*2 = 96 B a token) are below the
    # experts' workspace here, so activations are unchanged.
    assert plan.gpu["activations"] == 5056
    assert spec.total_params == SPEC.total_params - 4 * 384 - 4 * 8 + 384


@pytest.mark.parametrize("chunk_bytes", [3_000_000, 256 * 2**20])
def test_the_plan_covers_a_paged_attention_chunk_of_any_shorter_context(monkeypatch, chunk_bytes):
    """A GPU's paged decode attention gathers as many sequences as fit `PAGED_ATTENTION_CHUNK_BYTES` at the
    contexts it meets (`kernels.cpu_attention`). Contexts shorter than the plan's fit more sequences in a
    chunk: the plan must cover the chunk at every context up to its own, not only a chunk of the longest
    (a 3 MB chunk planned as whole sequences of the longest context missed the sequence more that fits at
    a shorter one)."""
    from moe_lightning import memory
    from moe_lightning.config import ModelSpec
    from moe_lightning.kernels.cpu_attention import _gathered_tokens

    monkeypatch.setattr(memory, "PAGED_ATTENTION_CHUNK_BYTES", chunk_bytes)
    for spec in (ModelSpec(num_heads=32, num_kv_heads=8, head_dim=128), ModelSpec(
            architecture="deepseek_v3", num_heads=16, num_kv_heads=16, head_dim=64, kv_lora_rank=512,
            qk_nope_head_dim=128, v_head_dim=128, q_lora_rank=0)):
        args = (spec.num_heads, spec.cache_kv_heads, spec.attn_k_dim, spec.attn_v_dim, spec.v_in_k, 2)
        mu, planned_context, block = 64, 300, 16
        planned = memory.paged_attention_bytes(spec, 2, mu, planned_context, block)
        for context in range(1, planned_context + 1):
            tokens = _gathered_tokens([context] * mu, None, block)
            held = min(mu, memory.paged_attention_chunk(*args, tokens)) * memory.paged_attention_sequence_bytes(
                *args, tokens)
            assert held <= planned, (spec.architecture, context, held, planned)
