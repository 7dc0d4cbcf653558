"""HRM formulas against values computed by hand, on small numbers."""

import math
import statistics
from dataclasses import replace

import pytest

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
from moe_lightning.tuner.hrm import (
    attainable,
    attended_context,
    attention_cost,
    balance_point,
    ffn_cost,
    levels,
    predict,
    turning_point_p1,
    turning_point_p2,
)
from moe_lightning.tuner.presets import load_preset
from moe_lightning.workload_io import synthetic_lengths

SPEC = ModelSpec(name="hand", num_layers=2, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1,
                 head_dim=4, num_experts=4, top_k=2, vocab_size=32, dtype="float16", weights="random")
# GPU 1 TFLOP/s and 100 GB/s, CPU 0.1 TFLOP/s and 10 GB/s, link 1 GB/s each way.
HW = HardwareSpec(name="hand",
                  gpu=GpuSpec(memory_gib=1, bandwidth_gbps=100, peak_tflops=1.0, usable_fraction=1),
                  cpu=CpuSpec(memory_gib=1, bandwidth_gbps=10, peak_tflops=0.1, usable_fraction=1),
                  link=LinkSpec(h2d_gbps=1, d2h_gbps=1))
WORKLOAD = Workload(prompt_len_avg=4, prompt_len_max=5, gen_len=5, num_requests=4)   # 4 decode steps a batch
LENGTHS = [3, 5, 4, 4]   # the prompts' real lengths: mean 4, mean square 16.5
POLICY = Policy(batch_size=4, micro_batch_size=2, attn_on_gpu=False, ffn_on_gpu=True, expert_gpu_fraction=0.5)


def test_attention_cost_by_hand():
    cost = attention_cost(SPEC, 3, 10)
    assert cost.flops == 2 * 3 * 10 * 2 * 4 + 2 * 3 * 10 * 2 == 600
    assert cost.bytes == (3 * 2 * 4 + 2 * 3 * 10 * 1 * 4 + 3 * 2 * 4) * 2 == 576


def test_ffn_cost_by_hand():
    cost = ffn_cost(SPEC, 3, 2)
    assert cost.flops == 2 * 3 * 8 * 16 * 3 * 2 == 4608
    # activations (3*8 + 3*16) * 2 B, plus all 4 experts (768 B each) read once per micro-batch (2)
    assert cost.bytes == 144 + 2 * 4 * 768 == 6288
    assert ffn_cost(SPEC, 3, 4).bytes - cost.bytes == 2 * 4 * 768


def test_roofline_primitives():
    assert attainable(100.0, 10.0, 5.0, 2.0, 30.0) == 50.0     # memory bound
    assert attainable(100.0, 10.0, 50.0, 2.0, 30.0) == 60.0    # link bound
    assert attainable(40.0, 10.0, 50.0, 2.0, 30.0) == 40.0     # compute bound
    assert turning_point_p1(0.8e12, 100e9, 64.0, 16e9) == pytest.approx(50.0)   # CPU peak / link
    assert turning_point_p1(0.8e12, 100e9, 4.0, 16e9) == pytest.approx(25.0)    # CPU memory / link
    assert turning_point_p2(65e12, 300e9, 5.0, 16e9) == pytest.approx(93.75)
    assert balance_point(300e9, 5.0, 16e9) == pytest.approx(93.75)


def test_levels_are_one_gpus_never_pooled():
    """Several GPUs are several ranks (`tuner.parallel`), each with one GPU's peak, bandwidth, budget and link."""
    hw2 = replace(HW, gpu=replace(HW.gpu, count=2))
    one, two = levels(HW), levels(hw2)
    assert two == one
    assert hw2.gpu_budget_bytes == HW.gpu_budget_bytes == 2**30


def test_layer_time_and_throughput_by_hand():
    pred = predict(SPEC, HW, WORKLOAD, POLICY, lengths=LENGTHS)
    # context = 4 + (4 + 1)/2 = 6.5 (gen_len 5: steps 1..4 attend the prompt and 1..4 tokens). Attention on CPU:
    # 2*4*6.5*2*4 + 2*4*6.5*2 = 520 FLOPs, (2*4*2*4 + 2*4*6.5*1*4)*2 = 544 B -> max(544/10e9, 520/1e11).
    assert pred.t_cpu == pytest.approx(544 / 10e9)
    # FFN on GPU, 2 micro-batches: 6144 FLOPs, (32+64)*2 + 2*4*768 = 6336 B -> 6.336e-8 s.
    assert pred.t_gpu == pytest.approx(6336 / 100e9)
    # link H2D: 2 streamed experts (1536 B) + attention outputs 4*2*4*2 = 64 B; D2H: q,k,v 4*4*4*2 = 128 B.
    assert pred.t_link == pytest.approx(1600 / 1e9)
    assert pred.t_link_d2h == pytest.approx(128 / 1e9)
    assert pred.bottleneck == "link"
    assert pred.decode_tok_s == pytest.approx(4 / (2 * 1.6e-6))
    # prefill per layer: 16 tokens; FLOPs 2*16*(192+32+2*384) + 2*4*16.5*2*4 = 32800 -> 3.3e-8 s;
    # GPU bytes 2*((192+32)*2 + 4*768) + 16*2*4*2 = 7296 -> 7.3e-8 s; H2D 1536 B -> 1.536e-6 s (max).
    assert pred.prefill_s == pytest.approx(2 * 1536 / 1e9)
    # 4 x 5 tokens over the prefill and the 4 decode steps after it (the prefill makes each first token)
    assert pred.e2e_tok_s == pytest.approx(4 * 5 / (2 * 1.536e-6 + 4 * 2 * 1.6e-6))
    assert pred.decode_s == pytest.approx(4 * 2 * 1.6e-6)
    assert pred.decode_step_s == pytest.approx(2 * 1.6e-6)


def test_attention_on_gpu_streams_cpu_share_of_kv():
    policy = replace(POLICY, attn_on_gpu=True, kv_gpu_fraction=0.25)
    pred = predict(SPEC, HW, WORKLOAD, policy, lengths=LENGTHS)
    kv_layer = 4 * 6.5 * 2 * 1 * 4 * 2  # N * ctx * (K,V) * nkv * hd * 2 B = 416
    assert pred.t_link == pytest.approx((1536 + 0.75 * kv_layer) / 1e9)
    assert pred.t_cpu == 0.0
    attn_g = max(544 / 100e9, 520 / 1e12)
    assert pred.t_gpu == pytest.approx(attn_g + 6336 / 100e9)


def test_ffn_on_cpu_reads_experts_from_cpu_memory():
    policy = replace(POLICY, ffn_on_gpu=False, expert_gpu_fraction=0.0)
    pred = predict(SPEC, HW, WORKLOAD, policy, lengths=LENGTHS)
    assert pred.t_link == 0.0 and pred.t_gpu == 0.0
    assert pred.t_cpu == pytest.approx(544 / 10e9 + 6336 / 10e9)
    assert pred.bottleneck == "cpu"


def test_more_micro_batches_cost_gpu_reads_and_padding_costs_prefill():
    few = predict(SPEC, HW, WORKLOAD, replace(POLICY, micro_batch_size=4))
    many = predict(SPEC, HW, WORKLOAD, replace(POLICY, micro_batch_size=1))
    assert many.t_gpu > few.t_gpu
    padded = predict(SPEC, HW, replace(WORKLOAD, padding=True), POLICY)
    plain = predict(SPEC, HW, WORKLOAD, POLICY)
    assert padded.t_cpu > plain.t_cpu  # context 5 + 2 instead of 4 + 2


def test_two_expert_ranks_halve_each_host_link_unless_one_switch_carries_both():
    """E = 2 over two GPUs: each rank streams 1 of its 2 experts (r_w = 0.5) instead of 2 of 4, and sends up
    the attention outputs of its 2 sequences instead of 4: half the bytes on its own link. Behind one PCIe
    switch the two streams share the link: the same time as one GPU."""
    own = replace(HW, gpu=replace(HW.gpu, count=2),
                  interconnect=InterconnectSpec(kind="pcie", bandwidth_gbps=8, latency_us=10))
    shared = replace(own, interconnect=replace(own.interconnect, shared_host_link=True))
    ep = ParallelConfig(tensor=1, expert=2)
    single = predict(SPEC, HW, WORKLOAD, POLICY).t_link
    assert single == pytest.approx((2 * 3 * 8 * 16 * 2 + 4 * 2 * 4 * 2) / 1e9)   # 2 experts + 4 x 8 outputs
    assert predict(SPEC, own, WORKLOAD, POLICY, parallel=ep).t_link == pytest.approx(single / 2)
    assert predict(SPEC, shared, WORKLOAD, POLICY, parallel=ep).t_link == pytest.approx(single)


def test_mixtral_t4_per_layer_numbers():
    spec, hw = load_preset("model", "mixtral-8x7b"), load_preset("hardware", "t4")
    wl = load_preset("workload", "mtbench")
    policy = Policy(batch_size=256, micro_batch_size=16, attn_on_gpu=False, ffn_on_gpu=True)
    pred = predict(spec, hw, wl, policy)
    expert_b = 3 * 4096 * 14336 * 2                     # 352 MB
    assert expert_b == 352_321_536
    link = (8 * expert_b + 256 * 32 * 128 * 2) / 16e9   # all experts streamed + attention outputs
    assert pred.t_link == pytest.approx(link)
    gpu = (256 * (4096 + 14336) * 2 + 16 * 8 * expert_b) / 300e9
    assert pred.t_gpu == pytest.approx(max(gpu, 2 * 256 * 4096 * 14336 * 6 / 65e12))
    # its synthetic prompts, as generated, and 127 decode steps: + (127 + 1) / 2
    ctx = statistics.mean(synthetic_lengths(wl)) + 128 / 2
    attn_bytes = (2 * 256 * 32 * 128 + 2 * 256 * ctx * 8 * 128) * 2
    assert pred.t_cpu == pytest.approx(attn_bytes / 100e9)
    assert pred.bottleneck == "link"
    assert pred.decode_tok_s == pytest.approx(256 / (32 * link))
    assert math.isfinite(pred.e2e_tok_s) and pred.e2e_tok_s < pred.decode_tok_s


def test_roofline_points_and_plot(tmp_path):
    from moe_lightning.tuner.roofline_plot import plot_roofline, roofline_points

    spec, hw = load_preset("model", "mixtral-8x7b"), load_preset("hardware", "t4")
    wl = load_preset("workload", "mtbench")
    policy = Policy(batch_size=256, micro_batch_size=32, attn_on_gpu=False, ffn_on_gpu=True)
    pts = roofline_points(spec, hw, wl, policy)
    # FFN w.r.t. the link: 2*256*4096*14336*6 FLOPs over 8 streamed experts' bytes = 256 * 2 / 8 = 64.
    assert pts.ffn_intensity_link == pytest.approx(64.0)
    # P1 = min(P^c, B^c * I^c) / B^{c,g} = min(0.8e12, 100e9 * 64) / 16e9 = 50
    assert pts.p1 == pytest.approx(50.0)
    # FFN on the GPU reads all experts once per micro-batch (8 of them): I^g ~ 64 / 8 (plus activations)
    i_g = pts.ffn_intensity_level
    assert 7.9 < i_g < 8.0
    assert pts.p2 == pytest.approx(min(65e12, 300e9 * i_g) / 16e9)
    assert pts.ffn_flops_s == pytest.approx(min(65e12, 300e9 * i_g, 16e9 * 64.0))
    pytest.importorskip("matplotlib")
    out = plot_roofline(spec, hw, wl, policy, tmp_path / "hrm.png")
    assert out.exists() and out.stat().st_size > 10_000


def test_calibrated_rates_replace_the_peaks_where_the_profile_has_them():
    """The MoE FFN at the measured expert-kernel rate for its tokens per expert, CPU attention at the
    measured GB/s; by default (the paper's HRM) the peaks."""
    hw = replace(HW, gpu=replace(HW.gpu, expert_loads=[1, 4], expert_tflops=[0.01, 0.04]),
                 cpu=replace(HW.cpu, attn_gbps=5.0))
    peak = predict(SPEC, hw, WORKLOAD, POLICY, lengths=LENGTHS)
    cal = predict(SPEC, hw, WORKLOAD, POLICY, lengths=LENGTHS, calibrated=True)
    assert peak.t_gpu == pytest.approx(6336 / 100e9) and peak.t_cpu == pytest.approx(544 / 10e9)
    # 4 sequences in 2 micro-batches, top-2 of 4 experts: 1 token per expert -> 0.01 TFLOP/s;
    # 6144 FLOPs / 1e10 = 6.144e-7 s (above the 6.336e-8 s of bytes).
    assert cal.t_gpu == pytest.approx(6144 / 1e10)
    # attention: 544 B at the measured 5 GB/s.
    assert cal.t_cpu == pytest.approx(544 / 5e9)
    assert predict(SPEC, HW, WORKLOAD, POLICY, lengths=LENGTHS, calibrated=True).t_gpu == peak.t_gpu  # no curve


def test_a_dense_layer_streams_nothing_and_runs_its_mlp_by_hand():
    """SPEC with layer 0 dense (an MLP of FFN dim 16): each kind of layer at its own bound, then summed."""
    spec = replace(SPEC, dense_layers=[0], dense_intermediate_size=16)
    pred = predict(spec, HW, WORKLOAD, POLICY, lengths=LENGTHS)
    # The MoE layer as in test_layer_time_and_throughput_by_hand: link-bound, 1.6e-6 s.
    # The dense layer: MLP 2*4*384 = 3072 FLOPs, (4*8 + 4*16)*2 + 2 micro-batches * 384*2 = 1728 B
    # -> 1.728e-8 s on the GPU; CPU attention 5.44e-8 s; link: H2D the attention outputs (64 B), D2H
    # q/k/v (128 B) -> 1.28e-7 s, its bound. Mean over the two layers: 8.64e-7 s.
    assert pred.t_link == pytest.approx((1.6e-6 + 1.28e-7) / 2)
    assert pred.t_gpu == pytest.approx((6336 / 100e9 + 1.728e-8) / 2)
    assert pred.decode_s == pytest.approx(4 * (1.6e-6 + 1.28e-7))
    # Prefill: the MoE layer 1.536e-6 s (its streamed experts); the dense layer: FLOPs 2*16*(192 + 16 +
    # 384) + 1056 = 20000 -> 2e-8 s; GPU bytes 2*592*2 + 256 -> 2.6e-8 s; its KV offload, 16 tokens *
    # 16 B = 256 B over D2H -> 2.56e-7 s, its bound.
    assert pred.prefill_s == pytest.approx(1.536e-6 + 2.56e-7)


def test_mla_attention_reads_the_latent_cache_by_hand():
    """Multi-head latent attention, absorbed: 2 heads, latent r = 4, RoPE dim 2 (q.k over 6 dims, p.v over
    4), one cached (latent | RoPE key) of 6 values a token, read once for both heads."""
    spec = replace(SPEC, kv_lora_rank=4, head_dim=2, qk_nope_head_dim=4, v_head_dim=4)
    cost = attention_cost(spec, 4, 10)
    # FLOPs: 4*10*2*(6 + 4) + 2*4*10*2 = 960; bytes (fp16): (4*2*6 + 4*10*6 + 4*2*4) * 2 = 640.
    assert cost.flops == 960 and cost.bytes == 640
    dense = attention_cost(replace(SPEC, num_kv_heads=2, head_dim=6), 4, 10)   # the same heads, K and V kept
    assert dense.bytes - (4 * 2 * 6 * 2) * 2 == 4 * 10 * 2 * 2 * 6 * 2   # its cache: 2 heads of K and V


def test_mxfp4_experts_cross_the_link_at_4_bits_by_hand():
    """gpt-oss's MXFP4 experts stream as stored: an expert of SPEC at H = F = 32 (3 * 32 * 32 = 3072 weights)
    is 1536 B of 4-bit values and 96 B of scales, 1632 B against 6144 B in fp16. The GPU then reads those
    pages and writes the fp16 scratch once a layer."""
    spec = replace(SPEC, hidden_size=32, intermediate_size=32)
    plain = predict(spec, HW, WORKLOAD, POLICY, lengths=LENGTHS)
    quantized = predict(replace(spec, expert_format="mxfp4"), HW, WORKLOAD, POLICY, lengths=LENGTHS)
    # 2 streamed experts a layer, plus the attention outputs' 4 * 8 * 2 = 64 B, over the 1 GB/s link
    assert plain.t_link == pytest.approx((2 * 6144 + 64) / 1e9)
    assert quantized.t_link == pytest.approx((2 * 1632 + 64) / 1e9)
    assert quantized.t_gpu - plain.t_gpu == pytest.approx(2 * (1632 + 6144) / 100e9)


def test_a_sliding_window_layer_reads_its_window_by_hand():
    """gpt-oss's sliding layers, unpadded: each sequence reads its last `window` tokens. LENGTHS 3, 5, 4, 4
    and 4 decode steps read contexts p + 1 .. p + 4; with a window of 6: (4+5+6+6)/4 = 5.25, 6, and
    (5+6+6+6)/4 = 5.75 twice, so 22.75 / 4 on average; with a window of 3, always 3."""
    assert attended_context(WORKLOAD, LENGTHS, 6) == pytest.approx(5.6875)
    assert attended_context(WORKLOAD, LENGTHS, 3) == pytest.approx(3)
    assert attended_context(WORKLOAD, LENGTHS, None) == pytest.approx(4 + 2.5)
    # Layer 0 sliding (window 3), layer 1 full: CPU attention of 4 sequences, 2 heads of dim 4 over 1 KV
    # head, fp16: (4*2*4 + 4*ctx*8 + 4*2*4) * 2 bytes at 10 GB/s (its bound): ctx 3 -> 3.2e-8 s, ctx 6.5 ->
    # 5.44e-8 s; the mean over the two layers.
    spec = replace(SPEC, sliding_window=3, sliding_layers=[0])
    pred = predict(spec, HW, WORKLOAD, POLICY, lengths=LENGTHS)
    assert pred.t_cpu == pytest.approx((3.2e-8 + 5.44e-8) / 2)
    # The link still moves what the layer holds: the same as without the window.
    assert pred.t_link == pytest.approx(predict(SPEC, HW, WORKLOAD, POLICY, lengths=LENGTHS).t_link)
    # Padded, the engine attends over the dense cache with a mask: every layer reads 5 + 2.5 tokens.
    padded = replace(WORKLOAD, padding=True)
    assert predict(spec, HW, padded, POLICY).t_cpu == pytest.approx(predict(SPEC, HW, padded, POLICY).t_cpu)


def test_a_scratch_of_fewer_mxfp4_experts_costs_a_pass_per_micro_batch_by_hand():
    """policy.dequant_experts=1 with 2 streamed experts a layer (POLICY: r_w 0.5 of 4) and 2 micro-batches:
    the scratch holds one expert (6144 B in fp16) instead of two, and the GPU reads the pages and writes
    the scratch once per micro-batch, 2 * 2 * (1632 + 6144) B at 100 GB/s a layer, instead of once.
    The link is unchanged: the pages cross once a step either way."""
    spec = replace(SPEC, hidden_size=32, intermediate_size=32, expert_format="mxfp4")
    whole = predict(spec, HW, WORKLOAD, POLICY, lengths=LENGTHS)
    grouped = predict(spec, HW, WORKLOAD, replace(POLICY, dequant_experts=1), lengths=LENGTHS)
    assert grouped.t_gpu - whole.t_gpu == pytest.approx(2 * (1632 + 6144) / 100e9)
    assert grouped.t_link == pytest.approx(whole.t_link)
    assert whole.memory.gpu["streamed_experts"] - grouped.memory.gpu["streamed_experts"] == 6144


def test_decode_tok_s_is_the_engine_s_figure_over_the_whole_workload():
    """Decode tok/s as the engine measures it: tokens after each sequence's first over the decode time of
    the whole workload. 6 requests in batches of 4 run 2 batches of gen_len - 1 = 4 link-bound steps
    (2 layers of 1.6 us) making one token per request each: 6 x 4 tokens in 2 x 4 steps, not a full
    batch's 4 per step. gen_len 1 has no decode step."""
    six = replace(WORKLOAD, num_requests=6)
    pred = predict(SPEC, HW, six, POLICY)
    assert pred.bottleneck == "link" and pred.t_link == pytest.approx(1.6e-6)
    assert pred.decode_tok_s == pytest.approx(6 * 4 / (2 * 4 * 2 * 1.6e-6))
    prorated = predict(SPEC, HW, six, POLICY, last_batch="prorated")   # the last batch charged by its size
    assert prorated.decode_tok_s == pytest.approx(4 / (2 * 1.6e-6))
    assert predict(SPEC, HW, replace(six, gen_len=1), POLICY).decode_tok_s is None   # as the engine: null
