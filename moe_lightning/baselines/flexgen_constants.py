"""FlexGen's hardware constants: the fitted sets its authors and MoE-Lightning's published, and a set
derived from a hardware profile for machines nobody fitted.

The fitted sets are copied from the sources (units as there: `GB = 2**30` bytes, `T = 1e12` FLOP/s).
FlexGen fitted them by gradient descent on measured runs, and its README warns that profiled or
datasheet numbers are not accurate substitutes; a derived set is therefore a roofline stand-in, and
every plan records which set it used (`Constants.name`).
"""

from __future__ import annotations

import numpy as np

from moe_lightning.baselines.flexgen_cost import FLEXGEN_GB, FLEXGEN_T, Constants
from moe_lightning.config import GB, HardwareSpec, ModelSpec


def _moe_lightning(name: str, ctog: float, mm_p: float, mm_g: float, bmm_p: float, bmm_g: float,
                   cpu: float) -> Constants:
    """MoE-Lightning's refits share every other bandwidth (2.0151 GB/s) and `c2 = 0.007`."""
    other = 2.0151 * FLEXGEN_GB
    return Constants(name=name, ctog_bdw=ctog * FLEXGEN_GB, gtoc_bdw_cache=other, gtoc_bdw_hidden=other,
                     dtoc_bdw=other, ctod_bdw_cache_p=other, ctod_bdw_hidden_p=other, ctod_bdw_g=other,
                     mm_flops_p=mm_p * FLEXGEN_T, mm_flops_g=mm_g * FLEXGEN_T, bmm_flops_p=bmm_p * FLEXGEN_T,
                     bmm_flops_g=bmm_g * FLEXGEN_T, cpu_flops=cpu * FLEXGEN_T, c1=0.0, c2=0.007, c3=0.0,
                     correct_mm=True)


# FlexGen's defaults, "aligned on google cloud T4", fitted on OPT (FMInference/FlexGen@19753bc,
# experimental/cost_model.py, CostModelConfig).
FLEXGEN_T4_OPT = Constants(
    name="flexgen-t4-opt (FlexGen@19753bc)", ctog_bdw=12.89 * FLEXGEN_GB, gtoc_bdw_cache=0.97 * FLEXGEN_GB,
    gtoc_bdw_hidden=4.82 * FLEXGEN_GB, dtoc_bdw=0.473 * FLEXGEN_GB, ctod_bdw_cache_p=0.746 * FLEXGEN_GB,
    ctod_bdw_hidden_p=2.015 * FLEXGEN_GB, ctod_bdw_g=2.015 * FLEXGEN_GB, mm_flops_p=21.24 * FLEXGEN_T,
    mm_flops_g=4.3 * FLEXGEN_T, bmm_flops_p=9.97 * FLEXGEN_T, bmm_flops_g=0.079 * FLEXGEN_T,
    cpu_flops=0.0123 * FLEXGEN_T, c1=0.0168, c2=0.0328, c3=0.0621, correct_mm=False)

# MoE-Lightning's refits for its FlexGen baseline (caoshiyi/artifacts@0e2dd65,
# benchmarks/flexgen/cost_models/cost_model_8x7b_moe_t4.py, _l4.py, cost_model_moe_t4_22b.py).
MOE_LIGHTNING_T4 = _moe_lightning("moe-lightning-t4-8x7b (artifacts@0e2dd65)",
                                  5.4299, 3.5068, 1.4755, 1.3360, 0.9318, 4.4999)
MOE_LIGHTNING_L4 = _moe_lightning("moe-lightning-l4-8x7b (artifacts@0e2dd65)",
                                  5.4443, 0.6510, 0.6031, 0.6331, 0.5626, 3.7917)
MOE_LIGHTNING_T4_8X22B = _moe_lightning("moe-lightning-t4-8x22b (artifacts@0e2dd65)",
                                        4.7789, 3.5124, 1.3982, 1.3017, 0.9736, 4.4980)

# (hardware profile, model preset or None for any) -> the set fitted there.
FITTED: dict[tuple[str, str | None], Constants] = {
    ("t4", None): MOE_LIGHTNING_T4,
    ("t4", "mixtral-8x22b"): MOE_LIGHTNING_T4_8X22B,
    ("l4", None): MOE_LIGHTNING_L4,
}

# A set fitted for one model applies to that model: the preset's shapes (conf/model/<preset>.yaml), not
# its name. model=hf names a checkpoint after its folder, so a folder called like a preset says nothing
# of what it holds, and a checkpoint of the fitted model itself is planned as its preset is. The layer
# count is left out: a preset run truncated (model.num_layers) is still that model's layers.
MODEL_FIELDS = ("architecture", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                "num_experts", "top_k", "vocab_size", "shared_expert_size", "dense_layers")


def constants_for(hw: HardwareSpec, spec: ModelSpec) -> Constants:
    """The fitted set for this profile (and model, where one was fitted for it), else one derived."""
    for (profile, preset), constants in FITTED.items():
        if profile == hw.name and preset is not None and is_preset_model(spec, preset):
            return constants
    return FITTED.get((hw.name, None)) or derive_constants(hw, spec)


def is_preset_model(spec: ModelSpec, preset: str) -> bool:
    """Whether `spec` is the model of `preset` (MODEL_FIELDS), whatever it is named."""
    from moe_lightning.tuner.presets import load_preset

    fitted = load_preset("model", preset)
    return all(getattr(spec, f) == getattr(fitted, f) for f in MODEL_FIELDS)


def derive_constants(hw: HardwareSpec, spec: ModelSpec) -> Constants:
    """A roofline stand-in from the profile (no fit exists for it):
    - links: `ctog` = H2D, `gtoc` = D2H (over all GPUs); the disk bandwidths are unused (no disk tier,
      every disk share is 0) and set to the link's so that the terms stay finite;
    - prefill GEMMs (`mm_flops_p`, `bmm_flops_p`): the calibrated large-GEMM rate (`gpu.gemm_tflops`'s
      best) where the profile has one, else the peak;
    - decode GEMMs: `gemm_tflops(rows)`, the calibrated curve or the weight-read roofline
      `min(peak, bandwidth * 2 rows / dtype_bytes)` (each weight byte serves `2 rows / d` FLOPs); FlexGen
      writes that dependence as `mm_flops_g * max(0.1, 1 - c2 log2(64 / gbs))` (c1, c3: the `h1`
      dependence, 0 here), so `mm_flops_g = gemm_tflops(64)` and `c2` is the least-squares fit of that
      line to `gemm_tflops(gbs) / gemm_tflops(64)` at gbs = 32, 16, ..., 1, applied as MoE-Lightning
      does (to mm and CPU FLOPs). Without it every GPU-resident batch size would model the same
      throughput and the search would keep the first, gbs = 1;
    - decode attention (`bmm_flops_g` on the GPU, `cpu_flops` on the CPU) is bandwidth-bound: FlexGen
      counts `4 h1` FLOPs per (token, context position) against `4 B h_kv` KV bytes, `g / B` FLOP/byte
      (`g` the GQA group, `B = dtype_bytes / 2`), so the rate is bandwidth x `g / B`, capped at the peak;
      the CPU's bandwidth is the calibrated `cpu.attn_gbps` where measured.
    The executor's `task_overhead_us` has no place in FlexGen's model (it has no per-task term)."""
    count, d = hw.gpu.count, spec.dtype_bytes
    flop_per_byte = (spec.num_heads // spec.cache_kv_heads) / (d / 2)
    peak, bw = hw.gpu.peak_tflops * 1e12 * count, hw.gpu.bandwidth_gbps * GB * count
    curve = bool(hw.gpu.gemm_tflops)

    def gemm(rows: float) -> float:
        if curve:
            return float(np.interp(rows, hw.gpu.gemm_rows, hw.gpu.gemm_tflops)) * 1e12 * count
        return min(peak, bw * 2 * rows / d)

    big = max(hw.gpu.gemm_tflops) * 1e12 * count if curve else peak
    a = np.arange(1, 7)                                  # log2(64 / gbs) for gbs = 32 ... 1
    ratio = np.array([gemm(64 / 2 ** i) for i in a]) / gemm(64)
    c2 = float(np.sum(a * (1 - ratio)) / np.sum(a * a))
    cpu_gbps = hw.cpu.attn_gbps or hw.cpu.bandwidth_gbps
    h2d, d2h = hw.link.h2d_gbps * GB * count, hw.link.d2h_gbps * GB * count
    used = ["link h2d/d2h", "gpu.gemm_tflops" if curve else "gpu.peak_tflops", "gpu.bandwidth_gbps",
            "cpu.attn_gbps" if hw.cpu.attn_gbps else "cpu.bandwidth_gbps"]
    return Constants(
        name=f"derived from profile {hw.name!r} ({', '.join(used)})", ctog_bdw=h2d, gtoc_bdw_cache=d2h,
        gtoc_bdw_hidden=d2h, dtoc_bdw=h2d, ctod_bdw_cache_p=d2h, ctod_bdw_hidden_p=d2h, ctod_bdw_g=d2h,
        mm_flops_p=big, mm_flops_g=gemm(64), bmm_flops_p=big, bmm_flops_g=min(peak, bw * flop_per_byte),
        cpu_flops=min(hw.cpu.peak_tflops * 1e12, cpu_gbps * GB * flop_per_byte), c2=c2, correct_mm=True)
