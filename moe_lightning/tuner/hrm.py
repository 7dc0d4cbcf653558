"""HRM: the Hierarchical Roofline Model of MoE decode (and prefill) on a GPU + CPU + link machine.

Levels `i` (GPU, CPU) have a compute peak `P^i` and a memory bandwidth `B^i`; the link `B^{j,i}` moves
data from level `j` (CPU) to level `i` (GPU). `I^i_x` is FLOPs of task `x` per byte it reads from level
`i` memory. The attainable performance of `x` on `i` with data fetched from `j` is
`P^i_x = min(P^i, B^i * I^i_x, B^{j,i} * I^j_x)`; turning point P1 is `min(P^j, B^j I^j_x) / B^{j,i}`
(below it, compute where the data lives) and P2 is `min(P^i, B^i I^i_x) / B^{j,i}` (below it, `x` is
bound by the link); the balance point is where `B^i I^i_x = B^{j,i} I^j_x`.

Modelled, per decoder layer and decode step: a batch runs `gen_len - 1` decode steps, as the engine and
the simulator do (the prefill makes each sequence's first token; `decode_steps`), step t = 1 .. gen_len - 1
attending its prompt and t tokens, so all N sequences at `ctx = prompt + gen_len / 2` on average
(`decode_context`; prompts at their real lengths, `prompt_moments`):
- attention: `2 b kv nq hd + 2 b kv nq` FLOPs; `(2 b nq hd + 2 b kv nkv hd) * d` bytes (q, output, KV);
  under multi-head latent attention (DeepSeek) `hd` is the absorbed q.k dim `r + dr` for QK^T and `r`
  for PV, and the KV read is the cached latent and RoPE key, `b kv (r + dr) d`: nq / 2 times fewer bytes
  than the same heads' expanded K and V (`ModelSpec.kv_token_layer_elements`);
- MoE FFN: `2 b h1 h2 3 k` FLOPs; `b (h1 + h2) d + n_mb * E * expert_bytes` bytes: every expert's weights
  are read from the memory of the device running the FFN once per micro-batch (`n_mb = ceil(N / mu)`);
- each task on the device the policy puts it on, `T_x = max(bytes / bandwidth, flops / peak)`;
  `T_gpu = T_attn^g + T_ffn^g`, `T_cpu = T_attn^c + T_ffn^c` (tasks on one device are serial);
- the link: streamed experts (`E - n_res` per layer) cross CPU->GPU once per step when the FFN is on the
  GPU, at `expert_stream_bytes` each (MXFP4 experts: 4.25 bits a weight, and the GPU reads those pages
  and writes their dtype scratch once a layer); with attention on the CPU and FFN on the GPU, q/k/v go
  down and attention outputs come up; with attention on the GPU the CPU share of the KV cache comes up
  and the new token's K/V go down; with the FFN on the CPU and attention on the GPU, hidden states go
  down and FFN outputs come up. Opposite directions overlap, so
  `T_link = max(H2D bytes / h2d bandwidth, D2H bytes / d2h bandwidth)` (the H2D term in every sensible
  policy; D2H is reported separately);
- per-layer time `T = max(T_link, T_cpu, T_gpu)`: CGOPipe overlaps the three resources perfectly;
- dense layers (`ModelSpec.dense_layers`): their MLP, `2 b P_mlp` FLOPs and `n_mb P_mlp d` bytes of
  resident weights, in place of the router and experts, and nothing streamed; `T` is the mean over the
  layers of each kind's own max (so `L T` sums them);
- sliding-window layers (gpt-oss): in the unpadded mode attention reads each sequence's last `window`
  tokens only (`attended_context`), so those layers are a kind of their own too; they still hold, and
  move over the link, their whole cache (the engine keeps every layer's KV for the whole context);
- prefill on the GPU, layer by layer: the streamed experts of each layer cross the link once per batch,
  weights are read from GPU memory once per micro-batch, compute at GPU peak (linear layers for the
  top-k experts plus causal attention, `sum p^2 = N E[p^2]`), the non-GPU share of the KV cache goes down
  (D2H); link, D2H and GPU overlap layer by layer;
- end-to-end throughput `R gen_len / (ceil(R / N) (prefill + (gen_len - 1) L T))` over R = num_requests
  requests (`last_batch="prorated"`: R / N batches); with `padding` every prompt is `prompt_len_max`
  long (prefill and decode attention); gen_len 1 has no decode step (its per-layer times are reported,
  as a first step's, and charged nothing);
- several GPUs (`parallel`: T tensor x E expert ranks, `moe_lightning.tuner.parallel`): one rank is
  modelled, never a pooled GPU: its shard of the shapes, one GPU, its share of the host, its share of the
  batch (N / E per expert group), plus its collectives per micro-batch on the GPU's critical path (two
  all-reduces a layer over the tensor group, the expert all-to-alls EPS-pipelined against the expert
  GEMMs, `moe_lightning.comm`); the machine's tokens/s are the E groups' together, each group taken to
  be group 0 (every E-th request): the groups' lockstep (the slowest group's forward sets each forward's
  pace, a finished group's ghost forwards, the all-reduce that starts each forward) is the simulator's
  to charge (`simulator.lockstep`).

Deliberately not modelled: the QKV/O projections, router and norms in decode (about 3% of a layer's
bytes for Mixtral), embedding and LM head, kernel launch and synchronisation overheads (but for EPS-MoE's
per-chunk launch), what `moe_lightning.comm` leaves out of communication, expert load imbalance (all
experts are counted as read even when a micro-batch routes to fewer), CPU-side copies into the pinned
ring (assumed hidden behind the link), the growth of the context during decode beyond its average, and
Algorithm 2's admission (a batch of N is assumed to run whole; the memory plan bounds what a round can
hold, `memory.prefill_tokens`), and requests' own generation budgets (every request generates gen_len;
a prompts file's are planned at the longest, `tasks.plan.planning_inputs`, which its memory plan must
hold; the simulator runs them, `tuner.sim_batches`). A last partial batch is
charged as `throughput`'s `last_batch` says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_lightning.config import GB, HardwareSpec, ModelSpec, ParallelConfig, Policy, Workload
from moe_lightning.interp import curve_rate
from moe_lightning.memory import (
    MemoryPlan,
    dequant_passes,
    memory_plan,
    prompt_lengths,
    resident_experts_per_layer,
)
from moe_lightning.tuner.parallel import RankComm, rank_view

TFLOPS = 1e12


@dataclass(frozen=True)
class Level:
    """One level of the hierarchy: compute peak and memory bandwidth (of one rank's device)."""

    name: str
    peak_flops: float
    bandwidth_bytes_s: float
    memory_bytes: int


@dataclass(frozen=True)
class Levels:
    gpu: Level
    cpu: Level
    link_h2d_bytes_s: float
    link_d2h_bytes_s: float


def levels(hw: HardwareSpec) -> Levels:
    """The HRM levels of one GPU of a machine with its host (a rank's share: `parallel.rank_view`)."""
    return Levels(
        gpu=Level("gpu", hw.gpu.peak_tflops * TFLOPS, hw.gpu.bandwidth_gbps * GB, hw.gpu_budget_bytes),
        cpu=Level("cpu", hw.cpu.peak_tflops * TFLOPS, hw.cpu.bandwidth_gbps * GB, hw.cpu_budget_bytes),
        link_h2d_bytes_s=hw.link.h2d_gbps * GB,
        link_d2h_bytes_s=hw.link.d2h_gbps * GB,
    )


# ---- roofline primitives -------------------------------------------------------------------------

def attainable(peak_i: float, bandwidth_i: float, intensity_i: float, link_ji: float,
               intensity_j: float) -> float:
    """`P^i_x = min(P^i, B^i * I^i_x, B^{j,i} * I^j_x)` in FLOP/s."""
    return min(peak_i, bandwidth_i * intensity_i, link_ji * intensity_j)


def turning_point_p1(peak_j: float, bandwidth_j: float, intensity_j: float, link_ji: float) -> float:
    """P1 (an intensity `I^j`): below it, computing at level j (where the data lives) is faster."""
    return min(peak_j, bandwidth_j * intensity_j) / link_ji


def turning_point_p2(peak_i: float, bandwidth_i: float, intensity_i: float, link_ji: float) -> float:
    """P2 (an intensity `I^j`): below it, task x on level i is bound by the link."""
    return min(peak_i, bandwidth_i * intensity_i) / link_ji


def balance_point(bandwidth_i: float, intensity_i: float, link_ji: float) -> float:
    """The `I^j` where `B^i I^i_x = B^{j,i} I^j_x`: link and level-i memory take equal time."""
    return bandwidth_i * intensity_i / link_ji


# ---- per-layer decode costs ----------------------------------------------------------------------

@dataclass(frozen=True)
class TaskCost:
    """FLOPs and bytes read from the memory of the device that runs the task."""

    flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes


def attention_cost(spec: ModelSpec, batch: Any, context: Any) -> TaskCost:
    """Decode attention of one layer for `batch` sequences over `context` cached tokens (DESIGN 2.2)."""
    b, kv, nq, kd, vd = batch, context, spec.num_heads, spec.attn_k_dim, spec.attn_v_dim
    flops = b * kv * nq * (kd + vd) + 2 * b * kv * nq
    nbytes = (b * nq * kd + b * kv * spec.kv_token_layer_elements + b * nq * vd) * spec.dtype_bytes
    return TaskCost(flops, nbytes)


def ffn_cost(spec: ModelSpec, batch: Any, num_micro_batches: Any = 1, dense: bool = False) -> TaskCost:
    """Decode MoE FFN of one layer: top-k experts' FLOPs; all experts' weights read once per micro-batch.
    A shared expert (Qwen2-MoE) runs on every token and is read once per micro-batch too. `dense`: a
    dense layer's MLP instead (`dense_layers`)."""
    b, h1, h2 = batch, spec.hidden_size, spec.intermediate_size
    if dense:
        p = spec.dense_mlp_params
        return TaskCost(2 * b * p, (b * h1 + b * spec.dense_intermediate_size) * spec.dtype_bytes
                        + num_micro_batches * p * spec.dtype_bytes)
    flops = 2 * b * h1 * h2 * 3 * spec.top_k + 2 * b * spec.shared_expert_params
    nbytes = ((b * h1 + b * h2) * spec.dtype_bytes + num_micro_batches * spec.num_experts * spec.expert_bytes
              + num_micro_batches * spec.shared_expert_params * spec.dtype_bytes)
    return TaskCost(flops, nbytes)


def _roof_time(cost: TaskCost, level: Level) -> Any:
    return np.maximum(cost.bytes / level.bandwidth_bytes_s, cost.flops / level.peak_flops)


def prompt_moments(workload: Workload, lengths: Sequence[int] | None = None) -> tuple[float, float]:
    """(Mean prompt, mean squared prompt) as the engine processes them: padded, every prompt at the
    longest; else the real lengths (`lengths`, a prompts file's; by default a synthetic workload's own,
    `memory.prompt_lengths`), or the average when they are unknown."""
    if workload.padding:
        return float(workload.prompt_len_max), float(workload.prompt_len_max) ** 2
    lengths = prompt_lengths(workload) if lengths is None else lengths
    if not lengths:
        return float(workload.prompt_len_avg), float(workload.prompt_len_avg) ** 2
    a = np.asarray(lengths, dtype=np.float64)
    return float(a.mean()), float((a * a).mean())


def effective_prompt_len(workload: Workload, lengths: Sequence[int] | None = None) -> float:
    return prompt_moments(workload, lengths)[0]


def decode_steps(workload: Workload) -> int:
    """Decode steps per batch: gen_len - 1, the prefill making each sequence's first token (as the engine's
    `generate` and the simulator run them); none for gen_len 1."""
    return workload.gen_len - 1


def _averaged_steps(workload: Workload) -> int:
    """The steps a decode step's context is averaged over; with none (gen_len 1) the first step's, whose
    per-layer times are reported but charged nothing."""
    return max(decode_steps(workload), 1)


def decode_context(workload: Workload, lengths: Sequence[int] | None = None) -> float:
    """Tokens attended per sequence per decode step, averaged over the generation: step t = 1..n (n =
    gen_len - 1, `decode_steps`) attends its prompt and t tokens, the token it feeds (whose K/V it writes)
    the last (the engine reads each sequence's own blocks; padded, every prompt at the longest), so
    prompt + (n + 1) / 2, as the simulator's contexts prompt + 1 .. prompt + n."""
    return effective_prompt_len(workload, lengths) + (_averaged_steps(workload) + 1) / 2


def attended_context(workload: Workload, lengths: Sequence[int] | None = None, window: int | None = None) -> float:
    """Tokens a decode step's attention reads per sequence on a layer with a sliding `window` (None: full
    attention, `decode_context`), averaged over the generation: in the unpadded (paged) mode each sequence
    reads only its last `window` tokens, `mean_t min(p + t, window)` over steps t = 1..n (`decode_context`)
    and its prompt p;
    padded, the engine attends over the dense cache with a mask, so the whole context is read."""
    if window is None or workload.padding:
        return decode_context(workload, lengths)
    lengths = prompt_lengths(workload) if lengths is None else lengths
    p = np.asarray(lengths if lengths else [workload.prompt_len_avg], dtype=np.float64)
    n = _averaged_steps(workload)
    k = np.clip(window - p, 0, n)                  # steps whose context still fits the window
    return float(((k * p + k * (k + 1) / 2 + (n - k) * window) / n).mean())


def layer_kinds(spec: ModelSpec) -> dict[tuple[bool, int | None], float]:
    """{(dense, sliding window or None): fraction of the layers}: the kinds whose per-layer times differ."""
    kinds: dict[tuple[bool, int | None], float] = {}
    for i in range(spec.num_layers):
        key = (not spec.is_moe_layer(i), spec.window(i))
        kinds[key] = kinds.get(key, 0.0) + 1 / spec.num_layers
    return kinds


def _curve(points: Sequence[float], tflops: Sequence[float], x: Any) -> Any:
    """FLOP/s at `x` (array-safe) on a calibrated curve (`interp.curve_rate`)."""
    return np.vectorize(lambda v: curve_rate(points, tflops, float(v)))(x) * TFLOPS


def decode_layer_times(spec: ModelSpec, hw: HardwareSpec, workload: Workload, *, batch_size: Any,
                       num_micro_batches: Any, attn_on_gpu: bool, ffn_on_gpu: bool, n_res: int,
                       kv_gpu_fraction: Any, lengths: Sequence[int] | None = None,
                       calibrated: bool = False, comm: RankComm | None = None,
                       dequant_experts: int = 0) -> dict[str, Any]:
    """Seconds per layer per decode step, by resource, averaged over the layers (each kind, MoE and
    dense, at its own max: `L * t_layer` is the step). Elementwise over numpy arrays. `calibrated`: the
    MoE FFN on the GPU at the profile's measured expert-kernel rate for its tokens per expert, and CPU
    attention at its measured GB/s (`task=calibrate`), where the profile has them; else at the peaks.
    `comm`: one rank of several (`spec`, `hw`, the batch: the rank's), its collectives on the GPU's path
    (`t_comm`: what they add to `t_gpu`). `dequant_experts`: `Policy.dequant_experts` (MXFP4 experts)."""
    args = dict(batch_size=batch_size, num_micro_batches=num_micro_batches, attn_on_gpu=attn_on_gpu,
                ffn_on_gpu=ffn_on_gpu, n_res=n_res, kv_gpu_fraction=kv_gpu_fraction, lengths=lengths,
                calibrated=calibrated, comm=comm, dequant_experts=dequant_experts)
    total: dict[str, Any] = {}
    for (dense, window), f in layer_kinds(spec).items():
        times = _layer_times(spec, hw, workload, dense=dense, window=window, **args)
        total = {key: total.get(key, 0.0) + f * value for key, value in times.items()}
    return total


def _layer_times(spec: ModelSpec, hw: HardwareSpec, workload: Workload, *, batch_size: Any,
                 num_micro_batches: Any, attn_on_gpu: bool, ffn_on_gpu: bool, n_res: int, kv_gpu_fraction: Any,
                 lengths: Sequence[int] | None, calibrated: bool, dense: bool, window: int | None = None,
                 comm: RankComm | None = None, dequant_experts: int = 0) -> dict[str, Any]:
    lv = levels(hw)
    N, d = batch_size, spec.dtype_bytes
    H = spec.hidden_size
    ctx = decode_context(workload, lengths)   # the cache held (and moved over the link: the whole of it)
    attn = attention_cost(spec, N, attended_context(workload, lengths, window))   # the part attention reads
    ffn = ffn_cost(spec, N, num_micro_batches, dense)
    zero = 0.0 * N
    t_attn_g = _roof_time(attn, lv.gpu) if attn_on_gpu else zero
    t_attn_c = zero if attn_on_gpu else _roof_time(attn, lv.cpu)
    t_ffn_g = _roof_time(ffn, lv.gpu) if ffn_on_gpu else zero
    t_ffn_c = zero if ffn_on_gpu else _roof_time(ffn, lv.cpu)
    if calibrated and ffn_on_gpu and hw.gpu.expert_loads and not dense:
        load = N / num_micro_batches * spec.top_k / spec.num_experts   # tokens per expert per micro-batch
        rate = _curve(hw.gpu.expert_loads, hw.gpu.expert_tflops, load)
        t_ffn_g = np.maximum(ffn.flops / rate, ffn.bytes / lv.gpu.bandwidth_bytes_s)
    if calibrated and not attn_on_gpu and hw.cpu.attn_gbps > 0:
        t_attn_c = np.maximum(attn.flops / lv.cpu.peak_flops, attn.bytes / (hw.cpu.attn_gbps * GB))

    kv_token = spec.kv_token_layer_elements
    kv_layer_bytes = N * ctx * kv_token * d  # the whole batch's K and V of one layer
    # the streamed experts as they cross the link: MXFP4 experts at 4.25 bits a weight (3.76x fewer bytes
    # than bf16), dequantized on the GPU (its pass below)
    h2d = zero + (spec.num_experts - n_res) * spec.expert_stream_bytes if ffn_on_gpu and not dense else zero
    if ffn_on_gpu and not dense and spec.expert_stream_bytes != spec.expert_bytes:
        # read the pages, write the dtype scratch: once a layer, or once per micro-batch with a scratch of
        # fewer experts than stream (`memory.dequant_passes`)
        n_str = spec.num_experts - n_res
        passes = dequant_passes(n_str, dequant_experts, num_micro_batches)
        t_ffn_g = t_ffn_g + passes * n_str * (spec.expert_stream_bytes + spec.expert_bytes) / lv.gpu.bandwidth_bytes_s
    d2h = zero
    if attn_on_gpu:
        h2d = h2d + (1 - kv_gpu_fraction) * kv_layer_bytes
        d2h = d2h + (1 - kv_gpu_fraction) * N * kv_token * d
        if not ffn_on_gpu:
            d2h = d2h + N * H * d
            h2d = h2d + N * H * d
    else:
        d2h = d2h + kv_gpu_fraction * kv_layer_bytes  # a GPU share of KV must come down to the CPU
        if ffn_on_gpu:
            d2h = d2h + N * spec.qkv_elements * d
            h2d = h2d + N * spec.attn_out_elements * d
    t_h2d = h2d / lv.link_h2d_bytes_s
    t_d2h = d2h / lv.link_d2h_bytes_s
    t_link = np.maximum(t_h2d, t_d2h)
    t_comm = zero
    if comm is not None:   # each micro-batch's collectives, its expert GEMMs EPS-pipelined with the all-to-alls
        t_comm = num_micro_batches * comm.layer_extra_s(N / num_micro_batches, t_ffn_g / num_micro_batches,
                                                        moe=not dense and ffn_on_gpu)
    t_gpu = t_attn_g + t_ffn_g + t_comm
    t_cpu = t_attn_c + t_ffn_c
    return {
        "t_attn_gpu": t_attn_g, "t_attn_cpu": t_attn_c, "t_ffn_gpu": t_ffn_g, "t_ffn_cpu": t_ffn_c,
        "t_link_h2d": t_h2d, "t_link_d2h": t_d2h, "h2d_bytes": h2d, "d2h_bytes": d2h,
        "t_link": t_link, "t_gpu": t_gpu, "t_cpu": t_cpu, "t_comm": t_comm,
        "t_layer": np.maximum(t_link, np.maximum(t_gpu, t_cpu)),
    }


def prefill_time(spec: ModelSpec, hw: HardwareSpec, workload: Workload, *, batch_size: Any,
                 num_micro_batches: Any, n_res: int, kv_gpu_fraction: Any,
                 lengths: Sequence[int] | None = None, calibrated: bool = False,
                 comm: RankComm | None = None, dequant_experts: int = 0) -> Any:
    """Seconds to prefill a batch of `batch_size` prompts, layer by layer on the GPU; `calibrated`: its
    GEMMs at the profile's measured rate for a micro-batch's rows, where the profile has the curve;
    `comm`: one rank of several (as `decode_layer_times`); `dequant_experts` as there."""
    lv = levels(hw)
    p, p_sq = prompt_moments(workload, lengths)
    N, d = batch_size, spec.dtype_bytes
    nq = spec.num_heads
    tokens = N * p
    kv_bytes = tokens * spec.kv_token_layer_elements * d
    peak = lv.gpu.peak_flops
    if calibrated and hw.gpu.gemm_rows:
        peak = _curve(hw.gpu.gemm_rows, hw.gpu.gemm_tflops, tokens / num_micro_batches)
    t_d2h = (1 - kv_gpu_fraction) * kv_bytes / lv.link_d2h_bytes_s

    def layer_s(dense: bool) -> Any:
        if dense:   # attention, norms and the MLP, all resident; nothing streams
            every_token, weight_bytes, streamed = spec.dense_layer_params, spec.dense_layer_params * d, 0
        else:
            every_token = spec.attention_params + spec.router_params + spec.shared_expert_params
            weight_bytes = every_token * d + spec.num_experts * spec.expert_bytes
            every_token += spec.top_k * spec.expert_params
            streamed = (spec.num_experts - n_res) * spec.expert_stream_bytes
            if spec.expert_stream_bytes != spec.expert_bytes:   # MXFP4: dequantized on the GPU, once a layer
                n_str = spec.num_experts - n_res                  # (or once per micro-batch, in groups)
                passes = dequant_passes(n_str, dequant_experts, num_micro_batches)
                weight_bytes = weight_bytes + passes * (streamed + n_str * spec.expert_bytes) / num_micro_batches
        # causal attention: QK^T and PV over half the square
        flops = 2 * tokens * every_token + N * p_sq * nq * (spec.attn_k_dim + spec.attn_v_dim)
        t_gpu = np.maximum(flops / peak, (num_micro_batches * weight_bytes + kv_bytes) / lv.gpu.bandwidth_bytes_s)
        if comm is not None:   # per micro-batch: two all-reduces, the expert all-to-alls EPS-pipelined
            gemm = 0.0 if dense else 2 * tokens * spec.top_k * spec.expert_params / peak / num_micro_batches
            t_gpu = t_gpu + num_micro_batches * comm.layer_extra_s(tokens / num_micro_batches, gemm, moe=not dense)
        return np.maximum(np.maximum(t_gpu, streamed / lv.link_h2d_bytes_s), t_d2h)

    total = spec.num_moe_layers * layer_s(False)
    return total + len(spec.dense_layers) * layer_s(True) if spec.dense_layers else total


LAST_BATCH = ("full", "prorated")


def throughput(spec: ModelSpec, workload: Workload, batch_size: Any, t_layer: Any,
               t_prefill: Any, last_batch: str = "full") -> tuple[Any, Any]:
    """(decode tokens/s, end-to-end tokens/s), both over all `num_requests`: each batch a prefill and
    gen_len - 1 decode steps of `L t_layer` (`decode_steps`), gen_len tokens per request.

    The requests run in num_requests / N batches. `last_batch` says how a last partial batch is
    charged, an explicit part of the objective: `full` (the default, the paper's static batches) as a
    full one, since its decode streams the same expert weights and a link-bound step costs the same;
    so the objective prefers N that divide num_requests (1024 requests: N = 342 over N = 320).
    `prorated`: in proportion to its size, as when refill keeps the batch full until the queue drains.
    Decode tokens/s is the engine's measured figure (`GenerationResult.decode_tok_s`, the simulator's
    likewise): the tokens after each sequence's first over the decode steps' time, the first coming from
    the prefill, so gen_len - 1 steps of `step_s` per batch, which make one token per request each. With
    gen_len 1 there is none: 0 here, which `predict` reports as None (no decode step), as the engine does."""
    step_s = spec.num_layers * t_layer
    steps = decode_steps(workload)
    batches = workload.num_requests / batch_size
    if last_batch == "full":
        batches = np.ceil(batches)
    decode = workload.num_requests / (batches * step_s) * (steps > 0)   # gen_len 1: no decode step
    e2e = workload.num_requests * workload.gen_len / (batches * (t_prefill + steps * step_s))
    return decode, e2e


@dataclass(frozen=True)
class Prediction:
    """HRM prediction for one policy; layer times are seconds per layer per decode step."""

    decode_tok_s: float | None   # None: no decode step (gen_len 1), as the engine and the simulator report it
    e2e_tok_s: float
    prefill_s: float
    decode_s: float        # one batch's gen_len - 1 decode steps (0 with gen_len 1)
    t_link: float
    t_cpu: float
    t_gpu: float
    t_link_d2h: float
    bottleneck: str
    memory: MemoryPlan     # one rank's (of several GPUs: each rank's, all alike)
    t_comm: float = 0.0    # several GPUs: what a rank's collectives add to t_gpu, per layer per step
    parallel: ParallelConfig | None = None   # several GPUs: the T x E layout (chunks: EPS-MoE's, decode)
    decode_step_s: float | None = None       # one decode step (L layers); None: no decode step (gen_len 1)

    def as_dict(self) -> dict[str, Any]:
        out = {
            "decode_tok_s": self.decode_tok_s, "e2e_tok_s": self.e2e_tok_s, "prefill_s": self.prefill_s,
            "decode_s": self.decode_s, "t_link_s": self.t_link, "t_cpu_s": self.t_cpu,
            "t_gpu_s": self.t_gpu, "t_link_d2h_s": self.t_link_d2h, "bottleneck": self.bottleneck,
        }
        if self.parallel is not None and self.parallel.world_size > 1:
            out |= {"t_comm_s": self.t_comm, "tensor": self.parallel.tensor, "expert": self.parallel.expert,
                    "chunks": self.parallel.chunks}
        return out


def bottleneck_of(t_link: float, t_cpu: float, t_gpu: float) -> str:
    """The resource that sets the per-layer time (ties resolve link, then cpu, then gpu)."""
    return max((("link", t_link), ("cpu", t_cpu), ("gpu", t_gpu)), key=lambda kv: kv[1])[0]


def predict(spec: ModelSpec, hw: HardwareSpec, workload: Workload, policy: Policy,
            paged_kv: bool = True, lengths: Sequence[int] | None = None, last_batch: str = "full",
            calibrated: bool = False, parallel: ParallelConfig | None = None) -> Prediction:
    """HRM prediction (decode and end-to-end tokens/s, per-layer times, bottleneck, memory) of a policy;
    its memory plan with CGOPipe's paged KV cache (`paged_kv`), planned at the average prompt.
    `parallel`: T x E ranks over `hw`'s GPUs (the policy's N and mu the machine's; the memory plan one
    rank's); default one GPU."""
    view = rank_view(spec, hw, parallel)
    spec_r, hw_r, comm = view.spec, view.hw, view.comm
    policy_r, workload_r, lengths_r = view.policy(policy), view.workload(workload), view.lengths(workload, lengths)
    n_res = resident_experts_per_layer(spec_r, policy_r.expert_gpu_fraction)
    n_mb = policy_r.num_micro_batches
    t = decode_layer_times(spec_r, hw_r, workload_r, batch_size=policy_r.batch_size, num_micro_batches=n_mb,
                           attn_on_gpu=policy_r.attn_on_gpu, ffn_on_gpu=policy_r.ffn_on_gpu, n_res=n_res,
                           kv_gpu_fraction=policy_r.kv_gpu_fraction, lengths=lengths_r, calibrated=calibrated,
                           comm=comm, dequant_experts=policy_r.dequant_experts)
    t_pre = float(prefill_time(spec_r, hw_r, workload_r, batch_size=policy_r.batch_size, num_micro_batches=n_mb,
                               n_res=n_res, kv_gpu_fraction=policy_r.kv_gpu_fraction, lengths=lengths_r,
                               calibrated=calibrated, comm=comm, dequant_experts=policy_r.dequant_experts))
    t_layer = float(t["t_layer"])
    decode, e2e = throughput(spec_r, workload_r, policy_r.batch_size, t_layer, t_pre, last_batch)
    t_link, t_cpu, t_gpu = float(t["t_link"]), float(t["t_cpu"]), float(t["t_gpu"])
    layout = None
    if comm is not None:   # the layout with the decode's EPS-MoE chunk count (one micro-batch's tokens)
        ffn = ffn_cost(spec_r, policy_r.batch_size, n_mb)
        gemm = max(ffn.flops / (hw_r.gpu.peak_tflops * TFLOPS), ffn.bytes / (hw_r.gpu.bandwidth_gbps * GB)) / n_mb
        chunks = int(comm.moe_s(policy_r.batch_size / n_mb, gemm)[1])
        layout = view.parallel if view.parallel.chunks else ParallelConfig(
            tensor=view.parallel.tensor, expert=view.parallel.expert, chunks=chunks if comm.expert > 1 else 0,
            backend=view.parallel.backend)
    return Prediction(
        decode_tok_s=None if decode_steps(workload_r) <= 0 else float(decode) * view.groups,   # None: no decode step
        e2e_tok_s=float(e2e) * view.groups, prefill_s=t_pre,
        decode_s=decode_steps(workload_r) * spec_r.num_layers * t_layer,
        decode_step_s=spec_r.num_layers * t_layer if decode_steps(workload_r) > 0 else None,
        t_link=t_link, t_cpu=t_cpu, t_gpu=t_gpu, t_link_d2h=float(t["t_link_d2h"]),
        bottleneck=bottleneck_of(t_link, t_cpu, t_gpu),
        memory=memory_plan(spec_r, policy_r, workload_r, paged=paged_kv, lengths=lengths_r),
        t_comm=float(t["t_comm"]), parallel=layout)
