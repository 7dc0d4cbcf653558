"""The task cost model with a calibrated profile: measured kernel curves, CPU attention throughput and
executor overheads, each checked against values worked out by hand."""

from __future__ import annotations

import dataclasses
import math

import pytest

from moe_lightning.config import CpuSpec, GpuSpec, HardwareSpec, ModelSpec, Policy, Workload
from moe_lightning.errors import ConfigError
from moe_lightning.tuner.costs import TaskCosts, curve_rate, experts_hit
from moe_lightning.tuner.simulator import simulate_run

SPEC = ModelSpec(num_layers=2, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2,
                 head_dim=64, num_experts=8, top_k=2, vocab_size=1000, dtype="float32")


def flat(rate_tflops: float, points: tuple[int, int] = (1, 100_000)) -> dict:
    """A curve at one rate everywhere in [points]: two points, the same value."""
    return {"points": list(points), "rates": [rate_tflops, rate_tflops]}


def calibrated(gemm_tflops: float, expert_tflops: float, **hw) -> HardwareSpec:
    g, e = flat(gemm_tflops), flat(expert_tflops)
    gpu = GpuSpec(bandwidth_gbps=1e6, peak_tflops=100.0, gemm_rows=g["points"], gemm_tflops=g["rates"],
                  expert_loads=e["points"], expert_tflops=e["rates"])
    return HardwareSpec(gpu=gpu, **hw)


def test_curve_rate_interpolates_log_log_and_keeps_time_below_the_first_point():
    points, rates = [1, 4, 16], [0.1, 0.4, 0.8]
    assert curve_rate(points, rates, 1) == pytest.approx(0.1)
    assert curve_rate(points, rates, 2) == pytest.approx(math.sqrt(0.1 * 0.4))  # halfway in log x
    assert curve_rate(points, rates, 8) == pytest.approx(math.sqrt(0.4 * 0.8))
    assert curve_rate(points, rates, 64) == pytest.approx(0.8)                   # flat above the last
    # Half a row's work takes as long as one row's: the rate halves.
    assert curve_rate(points, rates, 0.5) == pytest.approx(0.05)


def test_post_attention_runs_its_gemms_and_experts_at_the_measured_rates():
    """With flat curves far below the peak and a huge bandwidth every kernel is bound by its measured
    rate: O-projection and router at the GEMM rate, the expert FFN at the expert rate (layer 0, no LM head)."""
    t, H, F, E, k, q = 16, 256, 512, 8, 2, 4 * 64
    costs = TaskCosts(SPEC, calibrated(gemm_tflops=0.5, expert_tflops=0.25))
    by_hand = (2 * t * q * H + 2 * t * H * E) / 0.5e12 + 2 * t * k * 3 * H * F / 0.25e12
    assert costs.post_attn_s(t, 0, t) == pytest.approx(by_hand, rel=1e-9)
    # Without curves the same kernels run at the peak: far faster.
    plain = TaskCosts(SPEC, dataclasses.replace(costs.hw, gpu=GpuSpec(bandwidth_gbps=1e6, peak_tflops=100.0)))
    assert plain.post_attn_s(t, 0, t) == pytest.approx(
        (2 * t * q * H + 2 * t * H * E + 2 * t * k * 3 * H * F) / 100e12, rel=1e-9)


def test_expert_rate_is_read_at_the_tokens_per_expert_hit():
    """A rate rising with load: 16 tokens top-2 over 8 experts hit ~7.4 experts, ~4.3 tokens each."""
    gpu = GpuSpec(bandwidth_gbps=1e6, peak_tflops=100.0, expert_loads=[1, 64], expert_tflops=[0.01, 0.64])
    costs, t = TaskCosts(SPEC, HardwareSpec(gpu=gpu)), 16
    load = t * 2 / experts_hit(8, t * 2)
    rate = curve_rate([1, 64], [0.01, 0.64], load) * 1e12
    moe = 2 * t * 2 * 3 * 256 * 512 / rate
    rest = (2 * t * 256 * 256 + 2 * t * 256 * 8) / 100e12
    assert costs.post_attn_s(t, 0, t) == pytest.approx(moe + rest, rel=1e-9)


def test_a_calibrated_profile_sets_attention_throughput_and_overheads():
    hw = HardwareSpec(cpu=CpuSpec(attn_gbps=12.5), task_overhead_us=40.0, step_overhead_us=900.0)
    costs = TaskCosts.for_policy(SPEC, hw, Policy())
    got = (costs.cpu_attn_gbps, costs.launch_s, costs.thread_s, costs.step_s)
    assert got == pytest.approx((12.5, 40e-6, 40e-6, 900e-6))
    assert costs.decode_attn_s(4, 100, on_gpu=False) == pytest.approx(2 * 4 * 100 * 2 * 64 * 4 / 12.5e9)
    explicit = TaskCosts.for_policy(SPEC, hw, Policy(), cpu_attn_gbps=3.0, launch_s=1e-6)
    assert (explicit.cpu_attn_gbps, explicit.launch_s) == (3.0, 1e-6)


@dataclasses.dataclass
class HostHardware(HardwareSpec):
    """A profile with the measured host costs (the fields `task=calibrate` writes where the config has them)."""

    issue_overhead_us: float = 0.0
    sync_overhead_us: float = 0.0


def test_host_costs_come_from_the_profile_or_documented_defaults():
    from moe_lightning.tuner.costs import BARRIER_S, CUDA_SYNC_S, ISSUE_S

    gpu_box, cpu_box = HardwareSpec(), HardwareSpec(gpu=GpuSpec(shares_host=True))
    assert TaskCosts(SPEC, gpu_box).issue_s == ISSUE_S
    assert TaskCosts(SPEC, gpu_box).sync_s == pytest.approx(BARRIER_S + CUDA_SYNC_S)   # + device-wide sync
    assert TaskCosts.for_policy(SPEC, cpu_box, Policy()).sync_s == pytest.approx(BARRIER_S)
    measured = TaskCosts.for_policy(SPEC, HostHardware(issue_overhead_us=3.0, sync_overhead_us=70.0), Policy())
    assert (measured.issue_s, measured.sync_s) == pytest.approx((3e-6, 70e-6))
    assert TaskCosts.for_policy(SPEC, HostHardware(sync_overhead_us=70.0), Policy(), sync_s=0.0).sync_s == 0.0


def test_step_overhead_is_charged_once_per_graph():
    wl = Workload(prompt_len_avg=8, prompt_len_max=8, gen_len=5, num_requests=6)
    policy = Policy(batch_size=3, micro_batch_size=3)
    base = simulate_run(SPEC, HardwareSpec(), wl, policy)
    slow = simulate_run(SPEC, HardwareSpec(step_overhead_us=1e4), wl, policy)
    assert slow.prefill_s - base.prefill_s == pytest.approx(2 * 0.01)        # 2 batches
    assert slow.decode_s - base.decode_s == pytest.approx(2 * 4 * 0.01)      # 4 decode steps each


def test_slower_measured_kernels_never_speed_the_simulation_up():
    wl = Workload(prompt_len_avg=8, prompt_len_max=8, gen_len=4, num_requests=4)
    policy = Policy(batch_size=4, micro_batch_size=2)
    fast = simulate_run(SPEC, calibrated(1.0, 1.0), wl, policy)
    slow = simulate_run(SPEC, calibrated(0.1, 0.1), wl, policy)
    assert slow.total_s > fast.total_s


@pytest.mark.parametrize("gpu, message", [
    (GpuSpec(gemm_rows=[1, 4], gemm_tflops=[0.1]), "2 points but 1 values"),
    (GpuSpec(gemm_rows=[4, 1], gemm_tflops=[0.1, 0.2]), "positive and increasing"),
    (GpuSpec(expert_loads=[1, 4], expert_tflops=[0.1, 0.0]), "values must be > 0"),
])
def test_malformed_curves_are_refused(gpu, message):
    with pytest.raises(ConfigError, match=message):
        HardwareSpec(gpu=gpu)


def test_a_cpu_host_prices_the_gpu_role_at_its_thread_count():
    """On a CPU-only host the thread budget gives the GPU role every core when no CPU attention overlaps
    it (one micro-batch, or attention on the "GPU"), its split share otherwise: the costs read the curves
    measured at that thread count. Compute-bound here (huge bandwidth), so the time follows the rate."""
    big = dataclasses.replace(SPEC, hidden_size=1024, intermediate_size=1024, num_heads=16)  # not "small ops"
    split = calibrated(0.1, 0.1)
    gpu = dataclasses.replace(split.gpu, shares_host=True, gemm_tflops_all_cores=[0.2, 0.2],
                              expert_tflops_all_cores=[0.4, 0.4])
    hw = dataclasses.replace(split, gpu=gpu, cpu=CpuSpec(cores=2))
    one_mb, two_mb = Policy(batch_size=8, micro_batch_size=8), Policy(batch_size=8, micro_batch_size=4)
    on_gpu = Policy(batch_size=8, micro_batch_size=4, attn_on_gpu=True)
    got = {name: TaskCosts.for_policy(big, hw, p) for name, p in (("one", one_mb), ("two", two_mb), ("gpu", on_gpu))}
    assert {n: c.gpu_all_cores for n, c in got.items()} == {"one": True, "two": False, "gpu": True}
    t = 16
    gemms = 2 * t * 1024 * 1024 + 2 * t * 1024 * 8          # O-projection and router
    experts = 2 * t * 2 * 3 * 1024 * 1024
    assert got["one"].post_attn_s(t, 0, t) == pytest.approx(gemms / 0.2e12 + experts / 0.4e12, rel=1e-9)
    assert got["two"].post_attn_s(t, 0, t) == pytest.approx((gemms + experts) / 0.1e12, rel=1e-9)
    # A profile without the every-core curves, a one-core host, or small ops: the split curves throughout.
    bare = dataclasses.replace(hw, gpu=dataclasses.replace(gpu, gemm_tflops_all_cores=[], expert_tflops_all_cores=[]))
    one_core = dataclasses.replace(hw, cpu=CpuSpec(cores=1))
    for costs in (TaskCosts.for_policy(big, bare, one_mb), TaskCosts.for_policy(big, one_core, one_mb),
                  TaskCosts.for_policy(SPEC, hw, one_mb)):
        spec = costs.spec
        assert costs.post_attn_s(t, 0, t) == pytest.approx(
            TaskCosts.for_policy(spec, split, one_mb).post_attn_s(t, 0, t), rel=1e-9)


def test_every_core_curves_must_match_their_points():
    gpu = calibrated(0.1, 0.1).gpu
    with pytest.raises(ConfigError, match="gemm"):
        HardwareSpec(gpu=dataclasses.replace(gpu, gemm_tflops_all_cores=[0.2]))
    with pytest.raises(ConfigError, match="expert"):
        HardwareSpec(gpu=dataclasses.replace(gpu, expert_tflops_all_cores=[0.2, -1.0]))


def test_a_paged_micro_batch_reads_each_sequences_window_by_hand():
    """Two sequences with prompts of 10 and 100 tokens, 5 tokens decoded (the new one included): a layer
    with a window of 32 reads 15 and 32 tokens, 23.5 on average, against 60 for a full layer; a dense
    micro-batch reads every slot either way. At 12.5 GB/s of K/V read (2 KV heads of 64, fp32)."""
    from moe_lightning.tuner.costs import MicroBatchShape

    paged = MicroBatchShape(seqs=2, tokens=110, sum_sq=10_100, slots=55 + 5, lens=(10, 100))
    dense = dataclasses.replace(paged, lens=())
    assert paged.attended(32) == pytest.approx(23.5) and paged.attended(None) == pytest.approx(60)
    assert dense.attended(32) == pytest.approx(60)
    spec = dataclasses.replace(SPEC, sliding_window=32, sliding_layers=[0])
    costs = TaskCosts.for_policy(spec, HardwareSpec(cpu=CpuSpec(attn_gbps=12.5)), Policy())
    from moe_lightning.schedule.graph import Resource, Task

    def attn_s(layer: int, mb: MicroBatchShape) -> float:
        return costs.cost(Task(0, Resource.CPU, "CPUAttn", layer, 0), [mb])[0]

    kv_token = 2 * 2 * 64 * 4   # K and V of 2 heads of 64, fp32
    assert attn_s(0, paged) == pytest.approx(2 * 23.5 * kv_token / 12.5e9)
    assert attn_s(1, paged) == pytest.approx(2 * 60 * kv_token / 12.5e9)
    assert attn_s(0, dense) == pytest.approx(attn_s(1, dense))


def test_a_scratch_of_fewer_mxfp4_experts_is_expanded_by_every_micro_batch():
    """The simulator's dequantization pass (pages read, scratch written, at GPU bandwidth): the first
    micro-batch of a layer only while the scratch holds the layer's streamed experts; every micro-batch
    with a scratch of fewer (`Policy.dequant_experts`)."""
    from moe_lightning.schedule.graph import Resource, Task

    spec = dataclasses.replace(SPEC, expert_format="mxfp4")
    hw = HardwareSpec(gpu=GpuSpec(bandwidth_gbps=100.0))
    one_pass = 8 * (spec.expert_stream_bytes + spec.expert_bytes) / 100e9   # 8 streamed experts
    whole = TaskCosts.for_policy(spec, hw, Policy())
    grouped = TaskCosts.for_policy(spec, hw, Policy(dequant_experts=3))
    post = [Task(0, Resource.GPU, "PostAttn", 1, j) for j in range(2)]
    assert [whole.dequant_s(t) for t in post] == pytest.approx([one_pass, 0.0])
    assert [grouped.dequant_s(t) for t in post] == pytest.approx([one_pass, one_pass])
