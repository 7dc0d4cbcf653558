"""HRM roofline figure (after the MoE-Lightning paper's HRM figure): attainable FLOP/s vs operational
intensity, log-log, with the GPU, CPU and CPU->GPU link roofs, turning points P1 and P2, and the
attention and MoE FFN operating points of a policy.

The x axis is the intensity w.r.t. the data's home level: for the FFN, FLOPs per byte that crosses the
link (streamed experts and activations; `I^c`), for attention, FLOPs per byte of CPU (or GPU) memory.
matplotlib is imported lazily, with the Agg backend; `roofline_points` gives the numbers without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_lightning.config import HardwareSpec, ModelSpec, Policy, Workload
from moe_lightning.memory import resident_experts_per_layer
from moe_lightning.tuner.hrm import (
    attainable,
    attention_cost,
    decode_context,
    ffn_cost,
    levels,
    turning_point_p1,
    turning_point_p2,
)


@dataclass(frozen=True)
class RooflinePoints:
    """Operating points (intensity FLOP/B, attainable FLOP/s) and turning points of one policy."""

    attn_intensity: float
    attn_flops_s: float
    attn_level: str
    ffn_intensity_link: float      # I^c: FLOPs per byte crossing the link (inf if nothing crosses)
    ffn_intensity_level: float     # I^i: FLOPs per byte read from the running device's memory
    ffn_flops_s: float
    ffn_level: str
    p1: float
    p2: float


def roofline_points(spec: ModelSpec, hw: HardwareSpec, workload: Workload, policy: Policy) -> RooflinePoints:
    lv = levels(hw)
    n, n_mb = policy.batch_size, policy.num_micro_batches
    attn = attention_cost(spec, n, decode_context(workload))
    attn_lv = lv.gpu if policy.attn_on_gpu else lv.cpu
    attn_perf = min(attn_lv.peak_flops, attn_lv.bandwidth_bytes_s * attn.intensity)

    ffn = ffn_cost(spec, n, n_mb)
    n_str = spec.num_experts - resident_experts_per_layer(spec, policy.expert_gpu_fraction)
    if policy.ffn_on_gpu:
        link_bytes = n_str * spec.expert_stream_bytes  # the streamed experts the FFN needs from the CPU
        i_link = ffn.flops / link_bytes if link_bytes else float("inf")
        ffn_perf = attainable(lv.gpu.peak_flops, lv.gpu.bandwidth_bytes_s, ffn.intensity,
                              lv.link_h2d_bytes_s, i_link)
        ffn_level = "gpu"
    else:
        i_link = ffn.intensity  # the data stays home: plot at its CPU intensity
        ffn_perf = min(lv.cpu.peak_flops, lv.cpu.bandwidth_bytes_s * ffn.intensity)
        ffn_level = "cpu"
    # The FFN's CPU-side intensity (weights read once per step) decides P1.
    ffn_cpu = ffn_cost(spec, n, 1)
    p1 = turning_point_p1(lv.cpu.peak_flops, lv.cpu.bandwidth_bytes_s, ffn_cpu.intensity, lv.link_h2d_bytes_s)
    p2 = turning_point_p2(lv.gpu.peak_flops, lv.gpu.bandwidth_bytes_s, ffn.intensity, lv.link_h2d_bytes_s)
    return RooflinePoints(attn.intensity, attn_perf, "gpu" if policy.attn_on_gpu else "cpu",
                          i_link, ffn.intensity, ffn_perf, ffn_level, p1, p2)


def plot_roofline(spec: ModelSpec, hw: HardwareSpec, workload: Workload, policy: Policy,
                  path: str | Path) -> Path:
    """Write the HRM roofline figure of `policy` to `path` (format from the suffix); returns the path."""
    from moe_lightning.plots import pyplot, save

    plt = pyplot()

    lv = levels(hw)
    pts = roofline_points(spec, hw, workload, policy)
    finite = [x for x in (pts.attn_intensity, pts.ffn_intensity_link, pts.ffn_intensity_level, pts.p1, pts.p2)
              if np.isfinite(x) and x > 0]
    x = np.logspace(np.log10(min(finite) / 20), np.log10(max(finite) * 20), 400)
    gpu_roof = np.minimum(lv.gpu.peak_flops, lv.gpu.bandwidth_bytes_s * x)
    cpu_roof = np.minimum(lv.cpu.peak_flops, lv.cpu.bandwidth_bytes_s * x)
    link_roof = lv.link_h2d_bytes_s * x

    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for roof, level, color in ((gpu_roof, lv.gpu, "tab:green"), (cpu_roof, lv.cpu, "tab:blue")):
        label = (f"{level.name.upper()} roof ({level.peak_flops / 1e12:.3g} TFLOP/s, "
                 f"{level.bandwidth_bytes_s / 1e9:.0f} GB/s)")
        ax.loglog(x, roof, color=color, lw=2, label=label)
    ax.loglog(x, link_roof, color="tab:red", lw=1.5, ls="--",
              label=f"CPU->GPU link ({lv.link_h2d_bytes_s / 1e9:.0f} GB/s)")
    for name, val, color in (("P1", pts.p1, "tab:blue"), ("P2", pts.p2, "tab:green")):
        ax.axvline(val, color=color, ls=":", lw=1)
        ax.annotate(name, (val, lv.link_h2d_bytes_s * val), textcoords="offset points", xytext=(5, -12),
                    color=color, fontsize=10, fontweight="bold")
    ax.plot([pts.attn_intensity], [pts.attn_flops_s], "o", ms=9, color="tab:purple",
            label=f"attention on {pts.attn_level.upper()} (I={pts.attn_intensity:.3g})")
    if np.isfinite(pts.ffn_intensity_link):
        ax.plot([pts.ffn_intensity_link], [pts.ffn_flops_s], "s", ms=9, color="tab:orange",
                label=f"MoE FFN on {pts.ffn_level.upper()} (I={pts.ffn_intensity_link:.3g})")
    ax.set_xlabel("operational intensity (FLOP / byte from the data's home level)")
    ax.set_ylabel("attainable performance (FLOP/s)")
    p = policy
    ax.set_title(f"HRM: {spec.name} on {hw.name}, {workload.name}\nN={p.batch_size} mu={p.micro_batch_size} "
                 f"A_g={int(p.attn_on_gpu)} F_g={int(p.ffn_on_gpu)} r_w={p.expert_gpu_fraction:.3g} "
                 f"r_c={p.kv_gpu_fraction:.3g}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save(fig, path, dpi=130)
