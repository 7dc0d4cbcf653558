"""Memory plan of a policy: the bytes each pool needs on the GPU and on the CPU.

The engine allocates exactly these pools, so the tuner and the engine agree on what fits.

Modelled (dtype bytes `d = spec.dtype_bytes`, `E` experts, `L` layers, `N` batch, `mu` micro-batch,
`ctx = prompt_len_max + gen_len`, `kv_total = N * ctx * spec.kv_bytes_per_token`):

- resident experts per layer `n_res = floor(r_w * E + 1e-6)`, streamed per layer `n_str = E - n_res`;
- GPU: non-expert weights; resident experts of every layer; a double buffer holding the streamed
  experts of one layer (even layers use buffer 0, odd layers buffer 1); the GPU share of the KV cache
  (`ceil(r_c * kv_total)`) plus, with attention on the GPU, a double buffer for one layer's streamed KV
  of one micro-batch; the larger of the decode and the prefill activation workspaces (router/expert
  intermediates and logits in float32; prefill also holds the hidden states of the whole batch);
- CPU: the streamed experts of every layer, the CPU share of the KV cache, the pinned staging ring
  (`prefetch_depth + 1` pages of one layer's streamed experts) and the hidden states (q, k, v and the
  attention output) of the whole batch.

Not modelled: allocator fragmentation and caching slack, the CUDA context, the tokenizer and Python
objects, kernel workspaces of the attention/GEMM libraries, the checkpoint read buffers. The usable
fraction of each device in the hardware profile is the headroom for all of these.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moe_lightning.config import GB, HardwareSpec, ModelSpec, Policy, Workload
from moe_lightning.errors import MemoryBudgetError

GPU_POOLS = ("non_expert_weights", "resident_experts", "streamed_experts", "kv_cache", "activations")
CPU_POOLS = ("streamed_experts", "kv_cache", "pinned_ring", "hidden_states")


def resident_experts_per_layer(spec: ModelSpec, expert_gpu_fraction: float) -> int:
    """`n_res = floor(r_w * E + 1e-6)`: experts of each layer kept on the GPU."""
    return min(spec.num_experts, int(math.floor(expert_gpu_fraction * spec.num_experts + 1e-6)))


def _ceil(x: Any) -> Any:
    """Ceiling that works on Python numbers and numpy arrays alike."""
    if isinstance(x, (int, float)):
        return math.ceil(x)
    import numpy as np

    return np.ceil(x)


PLAN_BLOCK_SIZE = 16   # the engine's default `system.kv_block_size`, for plans made without a system


def kv_tokens_for(batch_size: Any, micro_batch_size: Any, workload: Workload, paged: bool,
                  block_size: int = PLAN_BLOCK_SIZE, at_longest: bool = False) -> Any:
    """The KV cache's size in tokens (array-safe over N and mu), see `kv_cache_tokens`; `at_longest`:
    the paged pool with room for N longest requests."""
    longest = workload.prompt_len_max + workload.gen_len
    if not paged or workload.padding:
        return batch_size * longest
    m = -(-batch_size // micro_batch_size)
    prompt = workload.prompt_len_max if at_longest else workload.prompt_len_avg
    share = -(-(batch_size * (prompt + workload.gen_len)) // m)
    blocks, floor = -(-share // block_size), -(-longest // block_size)
    return m * (blocks + (floor - blocks) * (floor > blocks)) * block_size   # max, array-safe


def kv_cache_tokens(policy: Policy, workload: Workload, paged: bool, block_size: int = PLAN_BLOCK_SIZE) -> int:
    """The KV cache's size in tokens that a run plans for.

    Dense (one tensor per micro-batch, as the baselines keep it) or padded: N x (longest prompt +
    gen_len). Paged and unpadded (the engine's block pool; Algorithm 2 admits against it): N x
    (average prompt + gen_len), the paper's `cache_size`, in an equal share per micro-batch rounded up
    to whole blocks and never less than one longest request, so that every request can be admitted;
    requests beyond it wait for room."""
    return int(kv_tokens_for(policy.batch_size, policy.micro_batch_size, workload, paged, block_size))


def engine_kv_tokens(spec: ModelSpec, policy: Policy, workload: Workload, hw: HardwareSpec,
                     block_size: int = PLAN_BLOCK_SIZE) -> int:
    """The engine's paged KV cache when no size is given: room for N requests at the longest prompt when
    the memory budget holds it (a batch of N is then never split), else the paper's cache_size, N x
    (average prompt + gen_len), which the plans reserve and Algorithm 2 admits against."""
    roomy = int(kv_tokens_for(policy.batch_size, policy.micro_batch_size, workload, True, block_size, True))
    if memory_plan(spec, policy, workload, kv_tokens=roomy).fits(hw):
        return roomy
    return kv_cache_tokens(policy, workload, True, block_size)


def memory_pools(spec: ModelSpec, workload: Workload, *, batch_size: Any, micro_batch_size: Any,
                 num_pages: Any, n_res: int, kv_gpu_fraction: Any, attn_on_gpu: bool,
                 prefetch_depth: int, kv_tokens: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bytes per pool (GPU, CPU). Works elementwise on numpy arrays for the optimizer's search.

    `batch_size`, `micro_batch_size`, `num_pages` and `kv_gpu_fraction` may be arrays of one shape.
    `kv_tokens`: the KV cache's size in tokens (`kv_cache_tokens`); by default N x (longest prompt +
    gen_len).
    """
    d = spec.dtype_bytes
    E, L, H = spec.num_experts, spec.num_layers, spec.hidden_size
    F, V, k = spec.intermediate_size, spec.vocab_size, spec.top_k
    nq, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    N, mu = batch_size, micro_batch_size
    n_str = E - n_res
    ctx = workload.prompt_len_max + workload.gen_len
    kv_total = (N * ctx if kv_tokens is None else kv_tokens) * spec.kv_bytes_per_token
    kv_gpu = _ceil(kv_gpu_fraction * kv_total)
    kv_stream_buffer = 2 * mu * ctx * 2 * nkv * hd * d if attn_on_gpu else 0 * mu
    decode_ws = N * H * d + mu * (nq * hd + 2 * nkv * hd + H) * d + mu * k * (3 * F + H) * 4 + mu * V * 4
    tokens = mu * workload.prompt_len_max
    # Prefill walks the whole batch through one layer at a time, so every micro-batch's hidden states
    # (N * prompt_len_max * H) live on the GPU beside one micro-batch's intermediates.
    prefill_ws = (N * workload.prompt_len_max * H * d + tokens * (nq * hd + 2 * nkv * hd + 3 * H) * d
                  + tokens * k * (3 * F + H) * 4 + mu * V * 4)
    activations = decode_ws + (prefill_ws - decode_ws) * (prefill_ws > decode_ws)  # max, array-safe
    gpu = {
        "non_expert_weights": spec.non_expert_params * d,
        "resident_experts": L * n_res * spec.expert_bytes,
        "streamed_experts": 2 * n_str * spec.expert_bytes if n_str > 0 else 0,
        "kv_cache": kv_gpu + kv_stream_buffer,
        "activations": activations,
    }
    page_bytes = -(-(n_str * spec.expert_bytes) // num_pages)  # ceil division
    cpu = {
        "streamed_experts": L * n_str * spec.expert_bytes,
        "kv_cache": kv_total - kv_gpu,
        "pinned_ring": (prefetch_depth + 1) * page_bytes,
        "hidden_states": N * (nq * hd + 2 * nkv * hd + H) * d,
    }
    return gpu, cpu


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per pool on the GPU (summed over tensor-parallel GPUs) and on the CPU."""

    gpu: dict[str, int]
    cpu: dict[str, int]

    @property
    def gpu_total_bytes(self) -> int:
        return sum(self.gpu.values())

    @property
    def cpu_total_bytes(self) -> int:
        return sum(self.cpu.values())

    def fits(self, hw: HardwareSpec) -> bool:
        return self.gpu_total_bytes <= hw.gpu_budget_bytes and self.cpu_total_bytes <= hw.cpu_budget_bytes

    def check(self, hw: HardwareSpec) -> None:
        """Raise MemoryBudgetError (one line: bytes needed per pool vs bytes available) if it does not fit."""
        if self.fits(hw):
            return
        raise MemoryBudgetError(self.describe(hw))

    def describe(self, hw: HardwareSpec) -> str:
        """One line: needed bytes per pool and in total vs the budget of each device."""

        def side(name: str, pools: dict[str, int], total: int, budget: int) -> str:
            mark = "OVER" if total > budget else "ok"
            parts = ", ".join(f"{k}={v}" for k, v in pools.items())
            return (f"{name} needs {total} B ({total / GB:.2f} GB: {parts}) of {budget} B "
                    f"({budget / GB:.2f} GB) available [{mark}]")

        return ("policy does not fit the memory budget: "
                + side("GPU", self.gpu, self.gpu_total_bytes, hw.gpu_budget_bytes) + "; "
                + side("CPU", self.cpu, self.cpu_total_bytes, hw.cpu_budget_bytes))


def memory_plan(spec: ModelSpec, policy: Policy, workload: Workload, kv_tokens: int | None = None,
                paged: bool = False) -> MemoryPlan:
    """Bytes per pool that the engine allocates for `policy` on `workload`. The KV cache holds
    `kv_tokens` tokens; by default `kv_cache_tokens(policy, workload, paged)`: with `paged` (CGOPipe's
    unpadded block pool) N x (average prompt + gen_len), else N x (longest prompt + gen_len)."""
    if kv_tokens is None:
        kv_tokens = kv_cache_tokens(policy, workload, paged)
    gpu, cpu = memory_pools(
        spec, workload, batch_size=policy.batch_size, micro_batch_size=policy.micro_batch_size,
        num_pages=policy.num_pages, n_res=resident_experts_per_layer(spec, policy.expert_gpu_fraction),
        kv_gpu_fraction=policy.kv_gpu_fraction, attn_on_gpu=policy.attn_on_gpu,
        prefetch_depth=policy.prefetch_depth, kv_tokens=kv_tokens)
    return MemoryPlan(gpu={k: int(v) for k, v in gpu.items()}, cpu={k: int(v) for k, v in cpu.items()})
