"""Roofline cost of each task of a schedule: how long one `Task` takes on the resource that runs it.

Every op of the task graphs (`moe_lightning.schedule`) is broken into the kernels the engine runs
(`moe_lightning.engine.cgopipe`'s handlers) and each kernel is timed on its device with the HRM
roofline, `max(FLOPs / rate, bytes / bandwidth)`, the kernel times of one task summed:

- GPU tasks at `hw.gpu` bandwidth and, for the compute rate, the peak unless the profile carries
  measured curves (`task=calibrate`): a GEMM of `t` rows runs at `gpu.gemm_tflops` interpolated at `t`,
  and the MoE FFN at `gpu.expert_tflops` interpolated at its tokens per expert (the engine's fastest
  kernel at that load, as EPS-MoE picks it). Small GEMMs reach a fraction of the peak, which the peak
  alone cannot show. Rates are one GPU's (several GPUs: one rank's costs, `comm` below). On a CPU-only host the
  curves are those of the GPU role's thread count for the policy (`gpu_role_on_every_core`: every core
  when no CPU attention overlaps it, the `*_all_cores` curves; its split share otherwise).
- CPU tasks (decode attention) at `hw.cpu`, or at the measured attention throughput
  (`hw.cpu.attn_gbps`, GB/s of K/V read) when the profile has one;
- H2D / D2H copies at `hw.link`; the COPY worker's pageable -> pinned memcpy at `hw.cpu.bandwidth_gbps
  / 2` (it reads and writes every byte), or at the link's rate where the link is a memcpy thread too
  (`gpu.shares_host`);
- PostAttn reads the weights of the experts actually hit: `E (1 - (1 - 1/E)^(t k))` distinct experts
  expected for `t` tokens routed uniformly top-`k`; O-projection, router and, at the last layer, the
  LM head (last rows only in prefill); PreAttn is RMSNorm + QKV projection (+ the embedding gather at
  layer 0); decode attention reads the micro-batch's cache up to its longest sequence (the engine
  attends over `[B, nkv, max_len, hd]` with a mask), or in the paged (unpadded) mode each sequence's own
  blocks, and on a sliding-window layer (gpt-oss) only each sequence's last `window` tokens of them
  (`MicroBatchShape.attended`); KV crossing the link (LoadKV) is the whole cache either way; prefill
  attention is causal per sequence;
- a fixed overhead per task on its resource: the profile's measured `task_overhead_us` when it has
  one, else `launch_s` for GPU and copy-stream tasks (kernel launch, events), `thread_s` for CPU and
  COPY tasks (worker dispatch);
- host costs, the same for every schedule (the engine and the baselines run on one executor, issued
  by one Python thread), charged by the simulator: `issue_s` per task on the issuing thread (a task
  starts no earlier than it is issued), `sync_s` per host barrier of the schedules that have them
  (FlexGen's `sync()` after each step: the issuing thread woken when the step is done, and on CUDA a
  device-wide synchronise), and per graph `step_s` (the profile's `step_overhead_us`: the executor's
  worker threads started and joined around each prefill or decode step). Measured by `task=calibrate`
  (`issue_overhead_us`, `sync_overhead_us`); otherwise the defaults below, with their sources;
- optional per-op multipliers (`op_scale`), fitted from measured records by `fit_op_scales`;
- one rank of several GPUs (`comm`, `moe_lightning.tuner.parallel.RankComm`; `spec` and `hw` the rank's
  shard and share): each GPU task that runs a layer's O-projection and FFN (PostAttn, GPULayer,
  PrefillLayer) also waits for its collectives, an all-reduce after the O-projection and one after the
  down projection over the tensor group, and the expert all-to-alls EPS-pipelined against its expert
  GEMMs (`comm.eps_moe_s`); they sit on the GPU's path of that micro-batch, so the schedule overlaps them
  with other micro-batches' link and CPU tasks, not with its own GPU work.

Not modelled: RoPE, softmax, SiLU and residual adds beyond their bytes (folded into the activations),
contention between resources that share a GPU (on a CPU-only machine, `gpu.shares_host`, the
simulator makes concurrent tasks share the host instead), caches (every byte read once from memory),
expert load imbalance beyond the uniform-routing expectation, the host-side work of the generation
driver (sampling, logits gathering), which happens between graphs, and the latency of a dependency
hand-off between two workers (a thread woken; about 30 us on the 2-core CI runner), charged to no
schedule. A stream task's launch (`launch_s`, on its worker) is added to its device time, though on
CUDA a worker running ahead launches while the device still runs the previous task: pessimistic by
`launch_s` per task for a pipeline that runs ahead, exact for the first task after a barrier.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

from moe_lightning.config import HardwareSpec, ModelSpec, Policy
from moe_lightning.interp import curve_rate
from moe_lightning.memory import resident_experts_per_layer, scratch_experts
from moe_lightning.schedule.graph import Resource, Task
from moe_lightning.tuner.hrm import Levels, levels
from moe_lightning.tuner.parallel import RankComm

GPU_LAUNCH_S = 20e-6
THREAD_DISPATCH_S = 5e-6
# Host costs of the issuing thread, for profiles without measured ones (`task=calibrate` measures both
# with `calibrate.measure_host` on the engine executor). Defaults, and where they come from:
# - ISSUE_S: one task issued by the executor's loop (a clock read and a queue put): 0.5-1.5 us measured
#   on the 2-core CI runner (CPython 3, torch CPU), under load; rounded up to 1 us.
# - BARRIER_S: one host barrier beyond a dependency hand-off (the issuing thread woken when the step
#   is done, then the next step's worker woken from its queue): 100-130 us measured on the same runner
#   (a VM: its thread wake-ups are slow; a bare-metal GPU host is likely faster; calibrate to know).
# - CUDA_SYNC_S: a device-wide `torch.cuda.synchronize` round trip on an idle GPU, added on CUDA
#   profiles: 10 us, the usual order of magnitude of a cudaDeviceSynchronize call; not measured here
#   (no GPU at hand when this was written), so an estimate until the profile is calibrated.
ISSUE_S = 1e-6
BARRIER_S = 120e-6
CUDA_SYNC_S = 10e-6
# Ops whose cost grows with the decode context (recomputed every decode step).
CONTEXT_OPS = frozenset({"CPUAttn", "GPUAttn", "LoadKV", "GPULayer"})


@dataclass(frozen=True)
class MicroBatchShape:
    """What the cost of a task needs to know about its micro-batch."""

    seqs: int            # sequences in the micro-batch
    tokens: int          # prompt tokens in its cache, padding included (prefill rows)
    sum_sq: int          # sum over sequences of (unpadded prompt length)^2 (causal prefill attention)
    slots: float = 0     # decode: cache slots attended per sequence this step, new token included (dense:
                         # the longest sequence's; paged: the mean, as each sequence reads its own)
    lens: tuple[int, ...] = ()   # paged: each sequence's prompt (its own blocks, so a sliding window cuts
                                 # each one's read; dense micro-batches read every slot, window or not)

    def attended(self, window: int | None) -> float:
        """Cache slots a layer with this sliding window (None: full attention) reads per sequence this
        step: a paged micro-batch's sequences read only their last `window` tokens each; a dense one
        attends over all its slots with a mask."""
        if window is None or not self.lens:
            return self.slots
        grown = self.slots - sum(self.lens) / len(self.lens)   # tokens decoded so far, new one included
        return sum(min(n + grown, window) for n in self.lens) / len(self.lens)


def experts_hit(num_experts: int, routings: float) -> float:
    """Expected distinct experts among `routings` uniform draws: `E (1 - (1 - 1/E)^routings)`."""
    return num_experts * (1.0 - (1.0 - 1.0 / num_experts) ** routings)


@dataclass(frozen=True)
class TaskCosts:
    """Per-task durations (seconds) of the CGOPipe ops for one model on one machine."""

    spec: ModelSpec
    hw: HardwareSpec
    n_res: int = 0                       # resident experts per layer (the rest stream)
    num_pages: int = 0                   # pages per layer of streamed experts
    launch_s: float = GPU_LAUNCH_S       # per GPU / H2D / D2H task
    thread_s: float = THREAD_DISPATCH_S  # per CPU / COPY task
    cpu_attn_gbps: float | None = None   # measured CPU decode attention, GB/s of K/V read
    step_s: float = 0.0                  # per graph (one prefill or decode step): executor start/join
    op_scale: Mapping[str, float] = field(default_factory=dict)
    issue_s: float = ISSUE_S             # issuing thread, per task: a task starts no earlier than issued
    sync_s: float | None = None          # issuing thread, per host barrier; None: default_sync_s(hw)
    gpu_all_cores: bool = False          # a CPU-played GPU role on every core (no CPU attention beside it)
    comm: RankComm | None = None         # one rank of several GPUs: its collectives (see the module docstring)
    dequant_experts: int = 0             # `Policy.dequant_experts`: MXFP4 experts dequantized a group at a time

    def __post_init__(self) -> None:
        if self.sync_s is None:
            object.__setattr__(self, "sync_s", default_sync_s(self.hw))

    @classmethod
    def for_policy(cls, spec: ModelSpec, hw: HardwareSpec, policy: Policy, **kwargs) -> TaskCosts:
        n_res = resident_experts_per_layer(spec, policy.expert_gpu_fraction)
        pages = policy.num_pages if n_res < spec.num_experts else 0
        # A calibrated profile's measurements; explicit arguments win over them.
        measured = {"step_s": hw.step_overhead_us * 1e-6}
        if hw.task_overhead_us > 0:
            measured |= {"launch_s": hw.task_overhead_us * 1e-6, "thread_s": hw.task_overhead_us * 1e-6}
        if hw.issue_overhead_us > 0:
            measured["issue_s"] = hw.issue_overhead_us * 1e-6
        if hw.sync_overhead_us > 0:
            measured["sync_s"] = hw.sync_overhead_us * 1e-6
        if hw.cpu.attn_gbps > 0:
            measured["cpu_attn_gbps"] = hw.cpu.attn_gbps
        if hw.gpu.shares_host:
            measured["gpu_all_cores"] = gpu_role_on_every_core(spec, hw, policy)
        return cls(spec, hw, n_res=n_res, num_pages=pages, dequant_experts=policy.dequant_experts,
                   **{**measured, **kwargs})

    def with_scales(self, op_scale: Mapping[str, float]) -> TaskCosts:
        return replace(self, op_scale=dict(op_scale))

    # ---- devices ---------------------------------------------------------------------------------

    @cached_property
    def _lv(self) -> Levels:
        return levels(self.hw)

    def _gpu(self, flops: float, nbytes: float) -> float:
        g = self._lv.gpu
        return max(flops / g.peak_flops, nbytes / g.bandwidth_bytes_s)

    def _gemm(self, rows: float, flops: float, nbytes: float) -> float:
        """A GEMM of `rows` rows (tokens) on the GPU: at the measured rate for that many rows, if any."""
        g = self.hw.gpu
        rates = g.gemm_tflops_all_cores if self.gpu_all_cores and g.gemm_tflops_all_cores else g.gemm_tflops
        return self._measured(g.gemm_rows, rates, rows, flops, nbytes)

    def _experts(self, load: float, flops: float, nbytes: float) -> float:
        """The MoE FFN at `load` tokens per expert hit: at the measured rate of the engine's kernel, if any."""
        g = self.hw.gpu
        rates = g.expert_tflops_all_cores if self.gpu_all_cores and g.expert_tflops_all_cores else g.expert_tflops
        return self._measured(g.expert_loads, rates, load, flops, nbytes)

    def _measured(self, points: Sequence[float], rates: Sequence[float], x: float, flops: float,
                  nbytes: float) -> float:
        if not points:
            return self._gpu(flops, nbytes)
        rate = curve_rate(points, rates, x) * 1e12
        return max(flops / rate, nbytes / self._lv.gpu.bandwidth_bytes_s)

    def _cpu(self, flops: float, nbytes: float) -> float:
        c = self._lv.cpu
        return max(flops / c.peak_flops, nbytes / c.bandwidth_bytes_s)

    def _h2d(self, nbytes: float) -> float:
        return nbytes / self._lv.link_h2d_bytes_s

    def _d2h(self, nbytes: float) -> float:
        return nbytes / self._lv.link_d2h_bytes_s

    def _memcpy(self, nbytes: float) -> float:
        if self.hw.gpu.shares_host:  # the link is a thread's memcpy already: the COPY worker is one too
            return self._h2d(nbytes)
        return nbytes / (self._lv.cpu.bandwidth_bytes_s / 2)

    # ---- kernels ---------------------------------------------------------------------------------

    @property
    def page_bytes(self) -> int:
        """`ExpertCache.page_bytes`: ceil(streamed bytes of a layer / pages)."""
        if not self.num_pages:
            return 0
        return -(-self.layer_stream_bytes // self.num_pages)

    @property
    def layer_stream_bytes(self) -> int:
        return (self.spec.num_experts - self.n_res) * self.spec.expert_stream_bytes

    def dequant_s(self, task: Task) -> float:
        """Streamed MXFP4 experts (`ExpertCache`): the layer's first micro-batch on the GPU first expands its
        4-bit pages into the dtype scratch, a pass over both (0 for other formats and dense layers); with a
        scratch of fewer experts (`dequant_experts`), every micro-batch expands them, group by group."""
        s = self.spec
        n_str = s.num_experts - self.n_res
        grouped = scratch_experts(n_str, self.dequant_experts) < n_str
        if (task.micro_batch and not grouped) or s.expert_stream_bytes == s.expert_bytes \
                or not s.is_moe_layer(task.layer):
            return 0.0
        return self._gpu(0.0, n_str * (s.expert_stream_bytes + s.expert_bytes))

    def page_size(self, page: int) -> int:
        start = page * self.page_bytes
        return max(0, min(start + self.page_bytes, self.layer_stream_bytes) - start)

    def pre_attn_s(self, t: float, layer: int) -> float:
        """RMSNorm + QKV projection (+ embedding gather at layer 0) of `t` tokens."""
        s, d = self.spec, self.spec.dtype_bytes
        w, qkv = s.attention_in_params, s.qkv_elements
        time = self._gemm(t, 2 * t * w, (w + t * s.hidden_size + t * qkv) * d)
        time += self._gpu(4 * t * s.hidden_size, 2 * t * s.hidden_size * d)  # norm
        if layer == 0:
            time += self._gpu(0, 2 * t * s.hidden_size * d)
        return time

    def post_attn_s(self, t: float, layer: int, out_rows: float) -> float:
        """O-projection, router, MoE FFN over the experts hit (+ LM head of `out_rows` at the last layer)."""
        s, d = self.spec, self.spec.dtype_bytes
        H, F, E, k, q = s.hidden_size, s.intermediate_size, s.num_experts, s.top_k, s.attn_out_elements
        w = s.attention_out_params
        time = self._gemm(t, 2 * t * w, (w + t * q + 2 * t * H) * d)                       # O-proj (MLA: W_uv too)
        c = self.comm
        if c is not None:   # all-reduce after the O-projection and after the down projection (tensor group)
            time += 2 * c.all_reduce_s(t)
        if not s.is_moe_layer(layer):   # a dense layer: its MLP on every token, no router, no experts
            Fd = s.dense_intermediate_size
            time += self._gemm(t, 2 * t * s.dense_mlp_params, (s.dense_mlp_params + t * (2 * H + 3 * Fd)) * d)
            return time + self._lm_head_s(out_rows, layer)
        time += self._gemm(t, 2 * t * H * E, (E * H + t * H) * d + t * E * 4)               # router
        hit = experts_hit(E, t * k)
        experts = self._experts(t * k / hit, 2 * t * k * 3 * H * F, hit * s.expert_bytes + t * k * (2 * H + 3 * F) * d)
        time += experts if c is None else float(c.moe_s(t, experts)[0])   # dispatch, GEMMs, combine (EPS)
        if s.shared_expert_size:   # Qwen2-MoE's shared expert and its gate, on every token
            time += self._gemm(t, 2 * t * s.shared_expert_params,
                               (s.shared_expert_params + t * (2 * H + 3 * s.shared_expert_size)) * d)
        return time + self._lm_head_s(out_rows, layer)

    def _lm_head_s(self, out_rows: float, layer: int) -> float:
        s, d, H = self.spec, self.spec.dtype_bytes, self.spec.hidden_size
        if layer != s.num_layers - 1:
            return 0.0
        return self._gemm(out_rows, 2 * out_rows * H * s.vocab_size,
                          (s.vocab_size * H + out_rows * H) * d + out_rows * s.vocab_size * 4)

    def attention_kv_bytes(self, seqs: float, slots: float) -> float:
        s = self.spec
        return seqs * slots * s.kv_token_layer_elements * s.dtype_bytes

    def decode_attn_s(self, seqs: float, slots: float, on_gpu: bool) -> float:
        """One new token per sequence over `slots` cached tokens (the micro-batch's longest)."""
        s, d = self.spec, self.spec.dtype_bytes
        flops = 2 * seqs * slots * s.num_heads * (s.attn_k_dim + s.attn_v_dim) + 4 * seqs * slots * s.num_heads
        kv = self.attention_kv_bytes(seqs, slots)
        nbytes = kv + seqs * (s.qkv_elements + s.attn_out_elements) * d
        if on_gpu:
            return self._gpu(flops, nbytes)
        if self.cpu_attn_gbps:
            return kv / (self.cpu_attn_gbps * 1e9)
        return self._cpu(flops, nbytes)

    def prefill_attn_s(self, mb: MicroBatchShape) -> float:
        s, d = self.spec, self.spec.dtype_bytes
        flops = mb.sum_sq * s.num_heads * (s.attn_k_dim + s.attn_v_dim)  # causal: QK^T and PV, half the square
        nbytes = mb.tokens * (s.qkv_elements + s.attn_out_elements) * d
        return self._gemm(mb.tokens / max(mb.seqs, 1), flops, nbytes)  # one attention per sequence

    # ---- tasks -----------------------------------------------------------------------------------

    def cost(self, task: Task, mbs: Sequence[MicroBatchShape]) -> tuple[float, float]:
        """(seconds, bytes over the link) of `task`; `mbs` describes the batch's micro-batches."""
        s, d, op = self.spec, self.spec.dtype_bytes, task.op
        i = task.layer
        if op == "W_CtoPin":
            return self._memcpy(self.page_size(task.micro_batch)), 0.0
        if op == "W_PinToGPU":
            n = self.page_size(task.micro_batch)
            return self._h2d(n), float(n)
        mb = mbs[task.micro_batch]
        b, kvd = mb.seqs, s.kv_token_layer_elements
        if op == "PreAttn":
            return self.pre_attn_s(b, i), 0.0
        if op == "OffloadQKV":
            n = b * s.qkv_elements * d
            return self._d2h(n), float(n)
        if op == "CPUAttn":
            return self.decode_attn_s(b, mb.attended(s.window(i)), on_gpu=False), 0.0
        if op == "LoadHidden":
            n = b * s.attn_out_elements * d
            return self._h2d(n), float(n)
        if op == "PostAttn":
            return self.post_attn_s(b, i, b) + self.dequant_s(task), 0.0
        if op == "GPUAttn":
            return self.pre_attn_s(b, i) + self.decode_attn_s(b, mb.attended(s.window(i)), on_gpu=True), 0.0
        if op == "LoadKV":
            n = self.attention_kv_bytes(b, mb.slots - 1)  # the cache before the new token
            return self._h2d(n), float(n)
        if op == "GPULayer":
            return (self.pre_attn_s(b, i) + self.decode_attn_s(b, mb.attended(s.window(i)), on_gpu=True)
                    + self.post_attn_s(b, i, b) + self.dequant_s(task)), 0.0
        if op == "StoreKV":
            n = b * kvd * d
            return self._d2h(n), float(n)
        if op == "PrefillLayer":
            return (self.pre_attn_s(mb.tokens, i) + self.prefill_attn_s(mb)
                    + self.post_attn_s(mb.tokens, i, b) + self.dequant_s(task)), 0.0
        if op == "OffloadKV":
            n = mb.tokens * kvd * d
            return self._d2h(n), float(n)
        raise ValueError(f"no cost model for op {op!r}")

    def duration(self, task: Task, mbs: Sequence[MicroBatchShape]) -> float:
        """Seconds `task` occupies its resource: roofline time, times its op's scale, plus overhead."""
        seconds, _ = self.cost(task, mbs)
        overhead = self.thread_s if task.resource in (Resource.CPU, Resource.COPY) else self.launch_s
        return seconds * self.op_scale.get(task.op, 1.0) + overhead


def gpu_role_on_every_core(spec: ModelSpec, hw: HardwareSpec, policy: Policy) -> bool:
    """Whether the thread budget (`moe_lightning.threads.plan_threads`, at the profile's cores) gives a
    CPU-played GPU role more threads for `policy` than its split share beside CPU attention, i.e. the
    profile's `*_all_cores` measurements apply."""
    from moe_lightning.config import ThreadsConfig
    from moe_lightning.threads import gpu_role_threads, plan_threads

    config, elements = ThreadsConfig(cores=hw.cpu.cores), spec.hidden_size * spec.intermediate_size
    layout = plan_threads(config, cuda=False, micro_batches=policy.num_micro_batches,
                          attn_on_cpu=not policy.attn_on_gpu, op_elements=elements)
    return layout.gpu > gpu_role_threads(config, elements)[0]


def default_sync_s(hw: HardwareSpec) -> float:
    """A host barrier's cost on a profile that did not measure one: the executor's barrier, plus on a
    GPU profile the device-wide synchronise (see ISSUE_S / BARRIER_S / CUDA_SYNC_S)."""
    return BARRIER_S + (0.0 if hw.gpu.shares_host else CUDA_SYNC_S)


def fit_op_scales(records: Sequence, model_seconds: Sequence[float]) -> dict[str, float]:
    """Per-op multipliers that make the model's total time of each op match measured records.

    `records` are `TaskRecord`s of a measured run (anything with `.task`, `.start_s`, `.end_s`);
    `model_seconds[n]` is the unscaled model's time of `records[n]` (overhead excluded: the scale
    absorbs it). The result feeds `TaskCosts.with_scales` (with `launch_s = thread_s = 0`).
    """
    if len(records) != len(model_seconds):
        raise ValueError(f"{len(records)} records but {len(model_seconds)} modelled times")
    measured: dict[str, float] = {}
    modelled: dict[str, float] = {}
    for r, m in zip(records, model_seconds):
        measured[r.task.op] = measured.get(r.task.op, 0.0) + (r.end_s - r.start_s)
        modelled[r.task.op] = modelled.get(r.task.op, 0.0) + m
    return {op: measured[op] / modelled[op] for op in measured if modelled[op] > 0}
