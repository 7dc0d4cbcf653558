"""Several GPUs as T x E ranks, never one pooled GPU: what one rank holds, runs and sends.

Layout (`ParallelConfig`): T tensor ranks split the attention heads (and KV heads) and each expert's
intermediate dimension (column-parallel in, row-parallel out), with one all-reduce of the [tokens,
hidden] activations after the attention output projection and one after the MoE down projection (or a
dense layer's MLP) per layer. E expert ranks split the experts: each of the E expert groups holds its
own 1/E of the batch (N and mu are the whole machine's, N / E and mu / E a group's), and dispatches and
combines the routed tokens with an all-to-all over the ranks of the same tensor index, pipelined in
chunks as EPS-MoE does (`comm.eps_moe_s`). Each rank streams only its own shard of the expert pages over
its own host link (`interconnect.shared_host_link`: the ranks' streams divide one link).

The plan and the simulation are one rank's (`RankView`): a sharded `ModelSpec` (heads, KV heads,
intermediate sizes / T, experts / E), the rank's hardware share (one GPU; the host's CPU cores, memory
and bandwidth divided by the T x E ranks that share them), and its share of the batch; the
communication (`RankComm`) is charged on the GPU's critical path of each micro-batch, EPS-pipelined
against the expert GEMMs, so it overlaps other micro-batches' link and CPU work as CGOPipe allows. The
machine's throughput is E groups' together.

The shard is the engine's (`engine.parallel.rank_spec`: the router and expert biases whole, embedding
and LM head replicated, DeepSeek MLA's latent cache whole on each of a group's T ranks), but for top_k,
kept whole here: a rank's FLOPs are its group's tokens x top_k over its 1/E of the experts.

The groups' requests differ (prompt lengths, how many each gets): the simulator times every group and
paces them in lockstep, as the engine runs them (`simulator.lockstep`); the HRM takes every group to be
group 0.

Not modelled: expert load imbalance across ranks (every rank gets tokens x top_k / E routings), and what
`moe_lightning.comm` leaves out.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moe_lightning.comm import CHUNK_LAUNCH_S, all_reduce_s, all_to_all_s, best_eps_moe_s
from moe_lightning.config import HardwareSpec, ModelSpec, ParallelConfig, Policy, Workload
from moe_lightning.errors import ConfigError

SINGLE = ParallelConfig()


def parallel_problems(spec: ModelSpec, hw: HardwareSpec, tensor: int, expert: int) -> list[str]:
    """Why T x E cannot run `spec` on `hw` (empty: it can)."""
    T, E = tensor, expert
    out = []
    if hw.gpu.count != T * E:
        out.append(f"parallel.tensor={T} x parallel.expert={E} = {T * E} ranks, but hardware={hw.name} has "
                   f"{hw.gpu.count} GPU{'s' if hw.gpu.count != 1 else ''} (one rank per GPU: T x E must equal it)")
    out += ParallelConfig(tensor=T, expert=E).model_problems(spec)   # the engine's own check
    if T * E > 1 and hw.interconnect.bandwidth_gbps <= 0:
        out.append(f"hardware={hw.name} has no inter-GPU link (hardware.interconnect.bandwidth_gbps=0): give its "
                   "bandwidth and latency to plan several ranks")
    return out


def check_parallel(spec: ModelSpec, hw: HardwareSpec, parallel: ParallelConfig) -> None:
    """Raise a one-line ConfigError if `parallel` cannot run `spec` on `hw`."""
    problems = parallel_problems(spec, hw, parallel.tensor, parallel.expert)
    if problems:
        raise ConfigError("; ".join(problems))


def layouts(spec: ModelSpec, hw: HardwareSpec) -> list[ParallelConfig]:
    """Every valid T x E = gpu.count for `spec` on `hw`, T increasing."""
    g = hw.gpu.count
    return [ParallelConfig(tensor=t, expert=g // t) for t in range(1, g + 1)
            if g % t == 0 and not parallel_problems(spec, hw, t, g // t)]


def _shard(spec: ModelSpec, T: int, E: int) -> ModelSpec:
    """One rank's shapes. Built by copying, not through ModelSpec's checks: a rank may hold fewer experts
    than top_k (each token's k experts spread over ranks), which a whole model may not."""
    s = copy.copy(spec)
    s.dense_layers, s.sliding_layers = list(spec.dense_layers), list(spec.sliding_layers)
    s.num_heads = spec.num_heads // T
    if not spec.mla:
        s.num_kv_heads = spec.num_kv_heads // T
    s.intermediate_size = spec.intermediate_size // T
    s.shared_expert_size = spec.shared_expert_size // T
    s.dense_intermediate_size = spec.dense_intermediate_size // T
    s.num_experts = spec.num_experts // E
    s.router_experts = getattr(spec, "router_experts", 0) or spec.num_experts   # the router stays whole
    s.n_group, s.topk_group = 1, 1   # routing is the whole model's; a rank's costs do not see groups
    return s


def _rank_hardware(hw: HardwareSpec, ranks: int) -> HardwareSpec:
    """One GPU; the host (cores, memory, bandwidth, FLOP/s) shared by `ranks` ranks; the host link divided
    by them where they share one switch."""
    if hw.gpu.count == 1 and ranks == 1:
        return hw
    c = hw.cpu
    cpu = dataclasses.replace(c, cores=max(1, c.cores // ranks), memory_gib=c.memory_gib / ranks,
                              bandwidth_gbps=c.bandwidth_gbps / ranks, peak_tflops=c.peak_tflops / ranks,
                              attn_gbps=c.attn_gbps / ranks)
    share = ranks if hw.interconnect.shared_host_link else 1
    link = dataclasses.replace(hw.link, h2d_gbps=hw.link.h2d_gbps / share, d2h_gbps=hw.link.d2h_gbps / share)
    return dataclasses.replace(hw, gpu=dataclasses.replace(hw.gpu, count=1), cpu=cpu, link=link)


@dataclass(frozen=True)
class RankComm:
    """One rank's collectives per micro-batch of `tokens` tokens (its expert group's), in seconds."""

    tensor: int
    expert: int
    hidden_size: int
    top_k: int
    dtype_bytes: int
    latency_s: float
    bytes_per_s: float
    chunks: int = 0                   # EPS-MoE chunks; 0: the best for each point
    launch_s: float = CHUNK_LAUNCH_S

    def all_reduce_s(self, tokens: Any) -> Any:
        """One all-reduce of the [tokens, hidden] activations over the tensor group."""
        return all_reduce_s(tokens * self.hidden_size * self.dtype_bytes, self.tensor, latency_s=self.latency_s,
                            bytes_per_s=self.bytes_per_s)

    def dispatch_bytes(self, tokens: Any) -> Any:
        """A rank's all-to-all send buffer: each token's hidden row once per chosen expert."""
        return tokens * self.top_k * self.hidden_size * self.dtype_bytes

    def moe_s(self, tokens: Any, gemm_s: Any) -> tuple[Any, Any]:
        """(seconds, chunks) of the expert part of a MoE layer: dispatch, `gemm_s` of expert GEMMs, combine,
        EPS-pipelined (without expert parallelism: the GEMMs alone). `gemm_s` already holds one launch of the
        expert kernel; each further chunk pays one more."""
        if self.expert <= 1:
            return gemm_s, 1
        comm = all_to_all_s(self.dispatch_bytes(tokens), self.expert, latency_s=0.0, bytes_per_s=self.bytes_per_s)
        t, chunks = best_eps_moe_s(comm, gemm_s, latency_s=self.latency_s, launch_s=self.launch_s,
                                   chunks=self.chunks)
        return t - self.launch_s, chunks

    def layer_extra_s(self, tokens: Any, gemm_s: Any, moe: bool) -> Any:
        """What communication adds to one micro-batch's GPU work of a layer: two all-reduces over the tensor
        group, and (a MoE layer) the EPS-pipelined expert layer's time beyond its GEMMs alone."""
        extra = 2 * self.all_reduce_s(tokens)
        if moe and self.expert > 1:
            extra = extra + self.moe_s(tokens, gemm_s)[0] - gemm_s
        return extra


@dataclass(frozen=True)
class RankView:
    """One rank of a T x E layout: its shapes, hardware share and collectives."""

    parallel: ParallelConfig
    spec: ModelSpec        # the rank's shard
    hw: HardwareSpec       # the rank's share
    comm: RankComm | None  # None: one rank

    @property
    def groups(self) -> int:
        return self.parallel.expert

    def policy(self, policy: Policy) -> Policy:
        """A group's share of the machine's policy: N / E sequences, micro-batches of mu / E."""
        return self.parallel.group_policy(policy)

    def machine_policy(self, policy: Policy) -> Policy:
        """The machine's policy from a group's."""
        E = self.groups
        return policy if E == 1 else dataclasses.replace(policy, batch_size=policy.batch_size * E,
                                                         micro_batch_size=policy.micro_batch_size * E)

    def workload(self, workload: Workload) -> Workload:
        """A group's share of the requests (every E-th: `lengths`)."""
        E = self.groups
        return workload if E == 1 else dataclasses.replace(workload, num_requests=math.ceil(workload.num_requests / E))

    def lengths(self, workload: Workload, lengths: Sequence[int] | None) -> list[int] | None:
        """Group 0's prompt lengths: every E-th request (the machine's, by default the workload's own)."""
        if self.groups == 1:
            return None if lengths is None else list(lengths)
        from moe_lightning.memory import prompt_lengths

        full = list(lengths) if lengths is not None else prompt_lengths(workload)
        return None if full is None else list(full)[::self.groups]


def rank_view(spec: ModelSpec, hw: HardwareSpec, parallel: ParallelConfig | None = None) -> RankView:
    """The rank view of `parallel` (checked; default 1 x 1: one GPU of `hw`)."""
    parallel = parallel or SINGLE
    T, E = parallel.tensor, parallel.expert
    if T * E == 1:
        return RankView(parallel, spec, hw if hw.gpu.count == 1 else _rank_hardware(hw, 1), None)
    check_parallel(spec, hw, parallel)
    ic = hw.interconnect
    comm = RankComm(tensor=T, expert=E, hidden_size=spec.hidden_size, top_k=spec.top_k,
                    dtype_bytes=spec.dtype_bytes, latency_s=ic.latency_us * 1e-6,
                    bytes_per_s=ic.bandwidth_gbps * 1e9, chunks=parallel.chunks)
    return RankView(parallel, _shard(spec, T, E), _rank_hardware(hw, T * E), comm)


def moe_layer_prefill_s(spec: ModelSpec, hw: HardwareSpec, parallel: ParallelConfig, tokens: int) -> dict[str, Any]:
    """One MoE layer's expert part in prefill on one rank of `parallel` whose expert group holds `tokens`
    tokens: its expert GEMMs alone (roofline at the GPU's peak and bandwidth), unpipelined (dispatch, GEMMs,
    combine in a row), and EPS-pipelined at `parallel.chunks` (0: the best count). Seconds."""
    view = rank_view(spec, hw, dataclasses.replace(parallel, chunks=0))
    s, g = view.spec, view.hw.gpu
    flops = 2 * tokens * s.top_k * s.expert_params
    gemm = max(flops / (g.peak_tflops * 1e12), s.num_experts * s.expert_bytes / (g.bandwidth_gbps * 1e9))
    if view.comm is None:
        return {"gemm_s": gemm, "unpipelined_s": gemm, "pipelined_s": gemm, "chunks": 1}
    one = dataclasses.replace(view.comm, chunks=1)
    best = dataclasses.replace(view.comm, chunks=parallel.chunks)
    t, chunks = best.moe_s(tokens, gemm)
    return {"gemm_s": gemm, "unpipelined_s": float(one.moe_s(tokens, gemm)[0]), "pipelined_s": float(t),
            "chunks": int(chunks), "dispatch_bytes": float(view.comm.dispatch_bytes(tokens))}
