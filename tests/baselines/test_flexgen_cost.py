"""FlexGen's cost model, term by term, against hand-worked numbers.

Every expected value below is worked by hand from the formulas in the sources, not from this
project's code: FlexGen `FMInference/FlexGen@19753bc:experimental/cost_model.py` (`solve_lp`) with
MoE-Lightning's Mixtral adaptation `caoshiyi/artifacts@0e2dd65:benchmarks/flexgen/cost_models/
cost_model_8x7b_moe_t4.py` (`wi` with all experts, `h_kv = h1 // (nh // nkvh)` in the KV terms, linear
FLOPs `4 h1^2 + 4 h1 h_kv + 6 h1 h2`, the gbs correction on mm_flops).

The worked example: s=4, n=2, l=2, h1=8, h2=16, nh=4, nkvh=2 (so g=2, h_kv=4), ne=2, gbs=2, bls=4, fp16;
  wi = 4*8^2 + (4*8^2)//2 + 6*8*16*2 = 256 + 128 + 1536 = 1920 bytes;
placement wg=.5 wc=.25 (wn=.25), cg=.5 cc=.25 (cn=.25), hg=.5 hc=.25 (hn=.25), so every disk term is on;
constants (bytes/s, FLOP/s): ctog 100, gtoc_cache 50, gtoc_hidden 40, dtoc 20, ctod_cache_p 25,
ctod_hidden_p 10, ctod_g 16, mm_p 1000, mm_g 500, bmm_p 200, bmm_g 100, cpu 10, c1 = c2 = c3 = 0.
"""

from __future__ import annotations

import dataclasses

import pytest

from moe_lightning.baselines import flexgen_cost as fc
from moe_lightning.baselines.flexgen_constants import (
    FLEXGEN_T4_OPT,
    MOE_LIGHTNING_L4,
    MOE_LIGHTNING_T4,
    MOE_LIGHTNING_T4_8X22B,
    constants_for,
    derive_constants,
)
from moe_lightning.config import CpuSpec, GpuSpec, HardwareSpec, LinkSpec, ModelSpec, Workload

X = fc.Shape(s=4, n=2, l=2, h1=8, h2=16, nh=4, nkvh=2, ne=2, gbs=2, bls=4, dtype_bytes=2)
K = fc.Constants(name="hand", ctog_bdw=100, gtoc_bdw_cache=50, gtoc_bdw_hidden=40, dtoc_bdw=20,
                 ctod_bdw_cache_p=25, ctod_bdw_hidden_p=10, ctod_bdw_g=16, mm_flops_p=1000, mm_flops_g=500,
                 bmm_flops_p=200, bmm_flops_g=100, cpu_flops=10)
P = fc.Percents(wg=0.5, wc=0.25, cg=0.5, cc=0.25, hg=0.5, hc=0.25)
MIXTRAL = ModelSpec(name="mixtral-8x7b", num_layers=32, hidden_size=4096, intermediate_size=14336, num_heads=32,
                    num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, vocab_size=32000, dtype="bfloat16")


def test_worked_example_sizes():
    assert (X.g, X.h_kv, X.wi) == (2, 4, 1920)
    assert (P.wn, P.cn, P.hn) == (0.25, 0.25, 0.25)


# ---- prefill ----

def test_ctog_prefill():
    # [wi(wc+wn) + 2 s h1 bls (hc+hn)] / ctog = [1920*.5 + 2*4*8*4*.5] / 100 = (960 + 128) / 100
    assert fc.ctog_p(X, K, P) == pytest.approx(10.88)


def test_gtoc_prefill():
    # 4(s+1) h_kv bls (cc+cn) / gtoc_cache + 2 s h1 bls (hc+hn) / gtoc_hidden
    # = 4*5*4*4*.5 / 50 + 2*4*8*4*.5 / 40 = 160/50 + 128/40 = 3.2 + 3.2
    assert fc.gtoc_p(X, K, P) == pytest.approx(6.4)


def test_dtoc_prefill():
    # [wi wn + 2 s h1 bls hn] / dtoc = [1920*.25 + 256*.25] / 20 = (480 + 64) / 20
    assert fc.dtoc_p(X, K, P) == pytest.approx(27.2)


def test_ctod_prefill():
    # 4 bls (s+1) h_kv cn / ctod_cache_p + 2 s h1 bls hn / ctod_hidden_p = 320*.25/25 + 256*.25/10 = 3.2 + 6.4
    assert fc.ctod_p(X, K, P) == pytest.approx(9.6)


def test_comp_prefill():
    # bls (4 s h1^2 + 4 s h1 h_kv + 6 s h1 h2) / mm_p + 4 bls s^2 h1 / bmm_p
    # = 4 * (1024 + 512 + 3072) / 1000 + 4*4*16*8 / 200 = 18.432 + 10.24
    assert fc.comp_p(X, K, P) == pytest.approx(28.672)


# ---- decode ----

def test_ctog_decode():
    # [wi(wc+wn) + 2 h1 bls (hc+hn)] / ctog = [960 + 2*8*4*.5] / 100 = 992 / 100
    assert fc.ctog_g(X, K, P) == pytest.approx(9.92)


def test_gtoc_decode():
    # 2 h1 bls (hc+hn) / gtoc_hidden = 64*.5 / 40
    assert fc.gtoc_g(X, K, P) == pytest.approx(0.8)


def test_dtoc_decode():
    # [4 bls (s+n/2) h_kv cn + 2 h1 bls hn] / dtoc + wi wn / (0.95 dtoc)
    # = [4*4*5*4*.25 + 2*8*4*.25] / 20 + 480 / 19 = 96/20 + 25.263157894736842
    assert fc.dtoc_g(X, K, P) == pytest.approx(4.8 + 480 / 19)


def test_ctod_decode():
    # [4 bls h_kv cn + 2 h1 bls hn] / ctod_g = [4*4*4*.25 + 2*8*4*.25] / 16 = (16 + 16) / 16
    assert fc.ctod_g(X, K, P) == pytest.approx(2.0)


def test_comp_decode():
    # bls (4 h1^2 + 4 h1 h_kv + 6 h1 h2) / mm_g + 4 bls (s+n/2) h1 cg / bmm_g + 4 bls (s+n/2) h1 (cc+cn) / cpu
    # = 4*(256 + 128 + 768)/500 + 4*4*5*8*.5/100 + 640*.5/10 = 9.216 + 3.2 + 32
    assert fc.comp_g(X, K, P) == pytest.approx(44.416)


def test_cpu_flops_real_correction():
    # FlexGen's OPT fit (c1=.0168, c2=.0328, c3=.0621) at gbs=16, h1=1024: A = log2(64/16) = 2,
    # B = log2(4096/1024) = 2: 1 + .0168*2*2 - .0328*2 - .0621*2 = 1 + .0672 - .0656 - .1242 = .8774
    x = dataclasses.replace(X, gbs=16, h1=1024)
    assert fc.cpu_flops_real(x, FLEXGEN_T4_OPT) == pytest.approx(0.0123e12 * 0.8774)
    # gbs >= 64 and h1 >= 4096: both logs clamp at 0, factor 1
    assert fc.cpu_flops_real(dataclasses.replace(X, gbs=128, h1=8192), FLEXGEN_T4_OPT) == pytest.approx(0.0123e12)
    # the factor never goes below 0.1: c2=.5 at gbs=1 gives 1 - .5*6 = -2 -> .1
    assert fc.gbs_factor(dataclasses.replace(K, c2=0.5), 1, 8192) == pytest.approx(0.1)


def test_gbs_correction_also_scales_mm_flops_in_moe_lightning():
    # MoE-Lightning: c2=.007, gbs=2: A = log2(32) = 5, factor 1 - .035 = .965, on mm_flops_g and cpu_flops;
    # comp_g = 4608/(500*.965) + 3.2 + 320/(10*.965) = 9.550259067357513 + 3.2 + 33.160621761658035
    k = dataclasses.replace(K, c2=0.007, correct_mm=True)
    assert fc.comp_g(X, k, P) == pytest.approx(45.91088082901555)
    # comp_p: 18432/(1000*.965) + 10.24 (bmm is not corrected)
    assert fc.comp_p(X, k, P) == pytest.approx(18432 / 965 + 10.24)
    # FlexGen's own model leaves mm_flops alone
    assert fc.comp_g(X, dataclasses.replace(K, c2=0.007), P) == pytest.approx(9.216 + 3.2 + 320 / 9.65)


# ---- the combination ----

def test_prefill_combination_is_the_codes_not_the_papers():
    # Tpre = max(ctog+dtoc, gtoc+ctod, comp) = max(10.88+27.2, 6.4+9.6, 28.672) = 38.08
    # (the paper's max of all five would be 28.672)
    assert fc.t_pre(X, K, P) == pytest.approx(38.08)


def test_decode_combination_adds_the_weight_load():
    # Tgen = ctog + max(gtoc, dtoc, ctod, comp) = 9.92 + max(.8, 30.06, 2, 44.416) = 54.336
    # (the paper's max of all five would be 44.416)
    assert fc.t_gen(X, K, P) == pytest.approx(54.336)


def test_total_latency_and_throughput():
    # T = Tpre l + Tgen (n-1) l = 38.08*2 + 54.336*1*2 = 184.832; throughput = bls n / T = 8 / 184.832
    assert fc.latency_s(X, K, P) == pytest.approx(184.832)
    assert fc.throughput_tok_s(X, K, P) == pytest.approx(8 / 184.832)


# ---- memory ----

def test_gpu_peak_prefill():
    # home = wi l wg + 2 s h1 bls hg + 4 (s+n) h_kv bls l cg = 1920 + 128 + 4*6*4*4*2*.5 = 1920 + 128 + 384
    # inter = 8 gbs s h1 + gbs(2 s h1 + 2 nh s^2) + gbs 2 s h1 + 4 gbs s h1 + 2 gbs s h2 + 2 gbs s h1
    #       = 512 + 2*(64 + 128) + 128 + 256 + 256 + 128 = 1664
    # working = 2 wi (1-wg) + 2 s h1 gbs (1-hg) + inter = 1920 + 64 + 1664;  2432 + 3648
    assert fc.gpu_peak_p(X, P) == pytest.approx(6080)


def test_gpu_peak_decode():
    # home = 1920 + 2 h1 bls hg + 384 = 1920 + 32 + 384 = 2336
    # inter = 8 gbs h1 + gbs(2 h1 + 2(s+n) h1 + 2 nh (s+n)) cg + gbs(2(s+n) h1 + 2 h1) cg + 4 gbs h1
    #         + 2 gbs h2 + 2 gbs h1 = 128 + 2*(16+96+48)*.5 + 2*(96+16)*.5 + 64 + 64 + 32 = 560
    # working = 2 wi (1-wg) + 2 h1 gbs (1-hg) + 2*2 gbs (s+n) h1 cg + inter = 1920 + 16 + 192 + 560 = 2688
    assert fc.gpu_peak_g(X, P) == pytest.approx(5024)


def test_cpu_peaks():
    # prefill: wi l wc + 2 s h1 bls hc + 4 s h_kv bls l cc + wi (1-wg) + 2 s h1 gbs (1-hg)
    #        = 960 + 64 + 4*4*4*4*2*.25 + 960 + 64 = 960 + 64 + 128 + 960 + 64
    assert fc.cpu_peak_p(X, P) == pytest.approx(2176)
    # decode: wi l wc + 2 h1 bls hc + 4(s+n) h_kv bls l cc + wi wn + 4 h1 gbs hn + 8 (s+n) h_kv gbs cn
    #         + 2 nh (s+n) gbs + 2 h1 gbs = 960 + 16 + 192 + 480 + 16 + 96 + 96 + 32
    assert fc.cpu_peak_g(X, P) == pytest.approx(1888)
    # disk: wi l wn + 2 s h1 bls hn + 4 (s+n) h_kv bls l cn = 960 + 64 + 192
    assert fc.disk_peak(X, P) == pytest.approx(1216)


def test_float32_doubles_every_byte_term_and_no_flop_term():
    # FlexGen's literals are fp16 (2 bytes per element); a float32 model carries twice the bytes
    x = dataclasses.replace(X, dtype_bytes=4)
    assert fc.ctog_p(x, K, P) == pytest.approx(2 * 10.88)
    assert fc.gpu_peak_g(x, P) == pytest.approx(2 * 5024)
    assert fc.comp_p(x, K, P) == pytest.approx(28.672)


# ---- inputs from this project's configs ----

def test_shape_of_mixtral_and_the_prompt_length_by_padding():
    wl = Workload(prompt_len_avg=77, prompt_len_max=418, gen_len=128, num_requests=1024)
    x = fc.shape_of(MIXTRAL, wl, 4, 32)
    # h_kv = 4096 // (32 // 8) = 1024; wi = 4*4096^2 + 4*4096^2//4 + 6*4096*14336*8
    #      = 67108864 + 16777216 + 2818572288
    assert (x.h_kv, x.wi, x.s, x.n, x.l, x.gbs, x.bls) == (1024, 2902458368, 77, 128, 32, 4, 32)
    assert fc.shape_of(MIXTRAL, dataclasses.replace(wl, padding=True), 4, 32).s == 418


def test_capacities_are_alpha_of_the_profile():
    hw = HardwareSpec(name="x", gpu=GpuSpec(memory_gib=15, count=2), cpu=CpuSpec(memory_gib=192))
    assert fc.capacities(hw) == pytest.approx((0.8 * 30 * 2**30, 0.8 * 192 * 2**30))   # GiB


def test_fitted_constants_are_in_gib_per_s():
    # MoE-Lightning's T4 fit: ctog 5.4299 GB/s with GB = 2**30; mm_flops_g 1.4755 T
    assert MOE_LIGHTNING_T4.ctog_bdw == pytest.approx(5.4299 * 1073741824)
    assert MOE_LIGHTNING_T4.mm_flops_g == pytest.approx(1.4755e12)
    assert MOE_LIGHTNING_T4.correct_mm and not FLEXGEN_T4_OPT.correct_mm
    assert FLEXGEN_T4_OPT.gtoc_bdw_cache == pytest.approx(0.97 * 1073741824)


def test_constants_by_profile():
    from moe_lightning.tuner.presets import load_preset

    t4 = HardwareSpec(name="t4")
    big = load_preset("model", "mixtral-8x22b")
    assert constants_for(t4, MIXTRAL) is MOE_LIGHTNING_T4
    assert constants_for(t4, big) is MOE_LIGHTNING_T4_8X22B
    # The fit is the model's: a checkpoint of it (named after its folder), a preset run truncated
    assert constants_for(t4, dataclasses.replace(big, name="Mixtral-8x22B-v0.1", weights="checkpoint",
                                                 path="/data/Mixtral-8x22B-v0.1")) is MOE_LIGHTNING_T4_8X22B
    assert constants_for(t4, dataclasses.replace(big, num_layers=4)) is MOE_LIGHTNING_T4_8X22B
    assert constants_for(HardwareSpec(name="l4"), MIXTRAL) is MOE_LIGHTNING_L4
    assert constants_for(HardwareSpec(name="h200"), MIXTRAL).name.startswith("derived from profile 'h200'")


def test_a_checkpoint_named_like_a_preset_is_not_that_preset(tmp_path, tiny_path):
    """model=hf names a checkpoint after its folder: a tiny one in a folder called mixtral-8x22b gets
    the profile's generic set, not the one fitted for Mixtral-8x22B."""
    import shutil

    from moe_lightning.engine.hf_config import spec_from_hf_config

    shutil.copytree(tiny_path, tmp_path / "mixtral-8x22b")
    spec = spec_from_hf_config(tmp_path / "mixtral-8x22b")
    assert spec.name == "mixtral-8x22b"   # the case: the name alone would pick the preset's fit
    assert constants_for(HardwareSpec(name="t4"), spec) is MOE_LIGHTNING_T4


def test_derived_constants_by_hand():
    hw = HardwareSpec(name="box", gpu=GpuSpec(peak_tflops=100, bandwidth_gbps=1000),
                      cpu=CpuSpec(peak_tflops=1, bandwidth_gbps=50), link=LinkSpec(h2d_gbps=16, d2h_gbps=12))
    k = derive_constants(hw, MIXTRAL)
    assert (k.ctog_bdw, k.gtoc_bdw_cache, k.gtoc_bdw_hidden) == (16e9, 12e9, 12e9)
    assert (k.mm_flops_p, k.bmm_flops_p) == (100e12, 100e12)
    # decode GEMM roofline at 64 rows: each bf16 weight byte serves 2*64/2 = 64 FLOPs: 1000 GB/s * 64
    assert k.mm_flops_g == pytest.approx(64e12)
    # gbs = 64/2^A runs at 2^-A of that (A = 1..6, all under the peak); least squares of 1 - c2 A:
    # c2 = sum A (1 - 2^-A) / sum A^2 = (.5 + 1.5 + 2.625 + 3.75 + 4.84375 + 5.90625) / 91 = 19.125 / 91
    assert k.c2 == pytest.approx(19.125 / 91) and (k.c1, k.c3, k.correct_mm) == (0.0, 0.0, True)
    # decode attention: 4 h1 FLOPs per 4 h_kv bytes (bf16) = g = 4 FLOP/B: GPU 1000 GB/s * 4, CPU 50 GB/s * 4
    assert k.bmm_flops_g == pytest.approx(4e12)
    assert k.cpu_flops == pytest.approx(2e11)
    # a calibrated CPU attention bandwidth and GEMM curve replace the roofline's
    calibrated = dataclasses.replace(hw, cpu=CpuSpec(peak_tflops=1, bandwidth_gbps=50, attn_gbps=80),
                                     gpu=GpuSpec(peak_tflops=100, bandwidth_gbps=1000, gemm_rows=[16, 4096],
                                                 gemm_tflops=[5.0, 60.0]))
    k = derive_constants(calibrated, MIXTRAL)
    assert k.cpu_flops == pytest.approx(80e9 * 4) and k.mm_flops_p == pytest.approx(60e12)
    # the curve at 64 rows: 5 + (64 - 16) / (4096 - 16) * (60 - 5) TFLOP/s
    assert k.mm_flops_g == pytest.approx((5 + 48 / 4080 * 55) * 1e12)
    assert "cpu.attn_gbps" in k.name and "gpu.gemm_tflops" in k.name


def test_mxfp4_experts_count_at_their_stored_bytes():
    """gpt-oss's experts as stored: at H = F = 32 an expert is 3 * 32 * 32 = 3072 4-bit weights (1536 B)
    and 96 one-byte scales, 1632 B, against 6144 B in bf16. A layer of 2 experts with bf16 attention
    (4 h1^2 + 4 h1^2 / g = 4096 + 2048 at g = 2) weighs 6144 + 2 * 1632 = 9408 B, not 6144 + 12288."""
    spec = ModelSpec(name="hand", num_layers=2, hidden_size=32, intermediate_size=32, num_heads=4, num_kv_heads=2,
                     head_dim=8, num_experts=2, top_k=1, vocab_size=64, dtype="bfloat16")
    wl = Workload(prompt_len_avg=4, prompt_len_max=4, gen_len=2, num_requests=4)
    assert fc.shape_of(spec, wl, 2, 4).wi == 6144 + 12288
    assert fc.shape_of(dataclasses.replace(spec, expert_format="mxfp4"), wl, 2, 4).wi == pytest.approx(9408)
