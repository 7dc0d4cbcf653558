"""Memory plan of a policy: the bytes each pool needs on the GPU and on the CPU.

The engine allocates exactly these pools, so the tuner and the engine agree on what fits.

Modelled (dtype bytes `d = spec.dtype_bytes`, `E` experts, `L` layers, `N` batch, `mu` micro-batch,
`ctx = prompt_len_max + gen_len`; the KV cache holds `kv_tokens` tokens, `kv_cache_tokens`: the paper's
cache_size N x (average prompt + gen_len) for CGOPipe's paged pool, N x ctx for dense caches):

- resident experts per layer `n_res = floor(r_w * E + 1e-6)`, streamed per layer `n_str = E - n_res`;
- GPU: non-expert weights; resident experts of every layer; a double buffer holding the streamed
  experts of one layer (even layers use buffer 0, odd layers buffer 1); the GPU share of the KV cache
  (`ceil(r_c * kv_total)`) plus, with attention on the GPU, a double buffer for one layer's streamed KV
  of one micro-batch; the activations, `activation_bytes`: the GPU role's tensors at their peak, from
  the engine's own buffers in their own dtypes (the experts' intermediates in `d`), for the prompts the
  run sees (a prefill round holds its prompts' hidden states: padded N x P, else at most the N longest
  prompts, and with admission what the KV budget can admit, `prefill_tokens`);
- CPU: the streamed experts of every layer, the CPU share of the KV cache, the pinned staging ring
  (`prefetch_depth + 1` pages of one layer's streamed experts) and the hidden states (q, k, v and the
  attention output) of the whole batch.

Checked against the engine (`tests/engine/test_memtrack.py`): the GPU role's live bytes, counted by
`engine.memtrack` on CPU (`torch.cuda.max_memory_allocated` on CUDA), plus the pools stay under the
plan, and the plan is within 15% of them when the prompts realise its worst case.

Not modelled: allocator fragmentation and caching slack, the CUDA context, the tokenizer and Python
objects, kernel workspaces of the attention/GEMM libraries, the checkpoint read buffers, and sampling's
temporaries over the [N, V] logits. The usable fraction of each device in the hardware profile is the
headroom for all of these.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moe_lightning.config import GiB, HardwareSpec, ModelSpec, Policy, Workload
from moe_lightning.errors import ConfigError, MemoryBudgetError

# Tensors are carved from the GPU pools at offsets aligned to this many bytes (`engine.paged`).
TENSOR_ALIGN = 256
# A pool of several tensors whose sizes are not multiples of TENSOR_ALIGN reserves this much for their
# offsets' padding (resident and streamed experts, the KV cache, the dequantizer's buffers): the engine
# allocates each pool at exactly its planned size, so the plan counts the padding.
POOL_ALIGN_ROOM = 4096
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
                  block_size: int = PLAN_BLOCK_SIZE, at_longest: bool = False,
                  lengths: Sequence[int] | None = None) -> Any:
    """The KV cache's size in tokens (array-safe over N and mu), see `kv_cache_tokens`; `at_longest`:
    the paged pool with room for N longest requests."""
    P, g = workload.prompt_len_max, workload.gen_len
    longest = P + g
    if not paged or workload.padding:
        return batch_size * longest
    m = -(-batch_size // micro_batch_size)
    longest_blocks = -(-longest // block_size)
    if at_longest:
        return m * longest_blocks * -(-batch_size // m) * block_size
    lengths = prompt_lengths(workload) if lengths is None else lengths
    if lengths:   # what the N longest requests reserve, each in whole blocks
        total = _longest_sum([-(-(p + g) // block_size) * block_size for p in lengths], batch_size)
    else:
        total = batch_size * (workload.prompt_len_avg + g)
    # Algorithm 2 puts each request in the least-loaded micro-batch: a share of total / m plus one longest
    # request admits all N at once.
    share_blocks = -(-total // (m * block_size)) + longest_blocks
    return m * share_blocks * block_size


def kv_cache_tokens(policy: Policy, workload: Workload, paged: bool, block_size: int = PLAN_BLOCK_SIZE,
                    lengths: Sequence[int] | None = None) -> int:
    """The KV cache's size in tokens that a run plans for.

    Dense (one tensor per micro-batch, as the baselines keep it) or padded: N x (longest prompt +
    gen_len). Paged and unpadded (the engine's block pool; Algorithm 2 admits against it): the paper's
    `cache_size`, N x (average prompt + gen_len), taken at the real lengths so that a round admits all
    N: what the N longest requests reserve in whole blocks (`lengths`, by default the workload's own;
    unknown: N x (average + gen_len)), in an equal share per micro-batch plus one longest request (the
    most Algorithm 2's least-loaded placement can leave unused in a share)."""
    return int(kv_tokens_for(policy.batch_size, policy.micro_batch_size, workload, paged, block_size,
                             lengths=lengths))


def engine_kv_tokens(spec: ModelSpec, policy: Policy, workload: Workload, hw: HardwareSpec,
                     block_size: int = PLAN_BLOCK_SIZE, lengths: Sequence[int] | None = None) -> int:
    """The engine's paged KV cache when no size is given: room for N requests at the longest prompt when
    the memory budget holds it (a batch of N is then never split), else the paper's cache_size, N x
    (average prompt + gen_len), which the plans reserve and Algorithm 2 admits against."""
    roomy = int(kv_tokens_for(policy.batch_size, policy.micro_batch_size, workload, True, block_size, True, lengths))
    if memory_plan(spec, policy, workload, kv_tokens=roomy, paged=True, block_size=block_size,
                   lengths=lengths).fits(hw):
        return roomy
    return kv_cache_tokens(policy, workload, True, block_size, lengths)


def _min(a: Any, b: Any) -> Any:
    return a + (b - a) * (b < a)   # array-safe


def _max(a: Any, b: Any) -> Any:
    return a + (b - a) * (b > a)


def padded_pool(pool_bytes: Any) -> Any:
    """A pool of several tensors with its alignment room (`POOL_ALIGN_ROOM`); an empty pool stays 0."""
    return pool_bytes + POOL_ALIGN_ROOM * (pool_bytes > 0)


# Per (token, expert) assignment: the router's ids (int64) and weights (fp32), the kernels' sort and
# gather indices (seven int64 more, `engine.experts._by_region`) and each row's gathered weight (fp32).
ROUTING_BYTES = 8 * 8 + 4 + 4

# Per (token, expert) row, `engine.paged.GroupedMoE`'s own indices beside the kernel's: the rows sorted by
# expert, their experts, tokens and slots, the local ids it routes them to (five int64) and a weight of one
# (fp32) for each.
GROUPED_MOE_ROW_BYTES = 5 * 8 + 4

# Families whose routers give their top-k weights in the activations' dtype (`models.dbrx.route`,
# `models.gpt_oss.route`, as transformers computes them); the others' routers give fp32 weights
# (`models.layers.route`). The experts' outputs are weighted in that dtype before they are summed.
ROUTER_WEIGHTS_IN_MODEL_DTYPE = frozenset({"dbrx", "gpt_oss"})


def router_weight_bytes(spec: ModelSpec) -> int:
    """Bytes of one router weight, and so of one element of the experts' weighted outputs."""
    return spec.dtype_bytes if spec.architecture in ROUTER_WEIGHTS_IN_MODEL_DTYPE else 4


def glu_elements(spec: ModelSpec) -> int:
    """Per row, what an expert's GLU allocates beyond its [gate | up] input at its peak: SiLU(gate) and the
    product (2F); gpt-oss's clamped SwiGLU: the clamped gate, the clamped up plus one, alpha g and its
    sigmoid (4F)."""
    return (4 if spec.expert_act == "clamped_swiglu" else 2) * spec.intermediate_size


def expert_row_elements(spec: ModelSpec, kernel: str, dtype_bytes: int | None = None) -> int:
    """Elements (of the model's dtype) an expert kernel holds per row at its peak, the largest of its
    stages as `engine.experts` runs them; a row is a (token, expert) assignment for grouped and loop, a
    row of the padded or dense grid for those. With H the hidden size, F the expert's FFN dim, G the GLU's
    own (`glu_elements`):
    - grouped, all assignments at once: the gathered input and gate|up (H + 2F); gate|up and the GLU
      (2F + G); gate|up, the GLU's output and the down projection (3F + H); gate|up, the output and its
      router-weighted copy, in the router weights' dtype (`router_weight_bytes` w, then cast back for the
      sum: 2F + H + wH / d); with expert biases (gpt-oss) gate|up, its gathered bias and their sum (6F) and the
      output, its gathered bias and their sum (2F + 3H);
    - loop (one expert's rows, its input held through the call), padded (every expert padded to the
      busiest) and dense: the input beside gate|up and the GLU (H + 2F + G), beside gate|up, the GLU's
      output and the down projection (2H + 3F), then the output beside its weighted copy (H + wH / d);
      biases add a copy of gate|up (H + 4F) and of the output (3H + 2F); dense also weights the outputs
      in fp32 (two [rows, H] fp32 tensors beside the output).
    The grid's rows and the assignments are counted by the caller (`expert_workspace`)."""
    H, F, b = spec.hidden_size, spec.intermediate_size, spec.expert_bias
    d = dtype_bytes or spec.dtype_bytes
    glu = glu_elements(spec)
    weighted = H + -(-router_weight_bytes(spec) * H // d)   # the output and its copy weighted by the router
    if kernel == "grouped":
        stages = [H + 2 * F, 2 * F + glu, 3 * F + H, 2 * F + weighted] + ([6 * F, 2 * F + 3 * H] if b else [])
    else:
        stages = [H + 2 * F + glu, 2 * H + 3 * F, weighted] + ([H + 4 * F, 3 * H + 2 * F] if b else [])
        if kernel == "dense":
            stages.append(2 * F + H + -(-2 * H * 4 // d))
    return max(stages)


def mlp_elements(spec: ModelSpec, ffn: int, gated: bool = False) -> int:
    """Elements per token a dense SwiGLU MLP (`models.layers.swiglu_mlp`: a dense layer's FFN, a shared
    expert) holds at its peak beyond its input: SiLU(gate), up and their product (3 ffn), then the product
    and the down projection (ffn + H); a shared expert's output beside the routed experts' (`gated`: its
    sigmoid-gated copy and the sum too)."""
    H = spec.hidden_size
    return max(3 * ffn, ffn + H, (3 if gated else 2) * H)


# Queries per step of prefill's eager attention (`models.layers.prefill_attention` with attention sinks or
# a sliding window): it materialises its scores, so a step holds [nq, chunk, n] of them and their copies,
# not [nq, n, n] (1 GiB per 1024-token prompt at gpt-oss-20b's 64 heads in fp32). Each query's row is
# still computed whole.
PREFILL_QUERY_CHUNK = 256


def prefill_attention_bytes(spec: ModelSpec, longest: int) -> int:
    """Transient bytes of prefill attention on a prompt of `longest` tokens where it runs eagerly
    (`models.layers.prefill_attention` with attention sinks or a sliding window; 0 on SDPA's path): K and V
    repeated over the query heads, `nq n (hd + dv) d`, and per step of C = PREFILL_QUERY_CHUNK queries the
    larger of its scores with their scaled or masked copy (2d a score) and the scores beside the
    sink-extended logits, their fp32 softmax and its cast back to the dtype (none in fp32), beside the
    step's masks, `2 C n` bytes, and its output with its copy into the token-major layout, `2 nq C dv d`."""
    if not (spec.attention_sinks or spec.sliding_window):
        return 0
    d, nq, n = spec.dtype_bytes, spec.num_heads, longest
    c = min(n, PREFILL_QUERY_CHUNK)
    scores = max(2 * d, (1 + int(spec.attention_sinks)) * d + 4 + (d if d != 4 else 0))
    return (nq * n * (spec.attn_k_dim + spec.attn_v_dim) * d + nq * c * (n + 1) * scores + 2 * c * n
            + 2 * nq * c * spec.attn_v_dim * d)


def expert_rank(spec: ModelSpec) -> bool:
    """`spec` is one expert rank's share (`engine.parallel.rank_spec`, `tuner.parallel.rank_view`): some of
    the experts the router chooses among, its top_k the router's."""
    return spec.router_experts > spec.num_experts


def expert_parallel_workspace(kernel: str, spec: ModelSpec, tokens: Any, bound: Any = None) -> Any:
    """An expert rank's MoE for a micro-batch of `tokens` of its own (`engine.expert_parallel.ep_moe`), at
    its peak. Its tokens' R = tokens x top_k (token, expert) rows go out to the experts' ranks, and about as
    many come in, routing being balanced over the groups (the plan assumes so; a skewed router sends one
    rank more). The kernel runs on the rows that came in, each one assignment (the loop, padded and dense
    kernels' worst case is then every row on one expert, k times a one-rank micro-batch's), beside them;
    the rows sent and received are held together while they cross, the kernel's output and the rows
    coming back likewise, and the rows that came back are then weighted by the router (`router_weight_bytes`;
    the weighted sum into the tokens' output is the caller's, as for any kernel)."""
    d, H, k = spec.dtype_bytes, spec.hidden_size, spec.top_k
    rows = tokens * k
    one = copy.copy(spec)   # the kernel's view: each received row is one token routed to one expert
    one.top_k = 1
    kernel_peak = expert_workspace(kernel, one, rows, bound) + rows * H * d
    return _max(_max(kernel_peak, 2 * rows * H * d), rows * H * (d + router_weight_bytes(spec)))


def expert_workspace(kernel: str, spec: ModelSpec, tokens: Any, bound: Any = None) -> Any:
    """Bytes of the expert kernel's intermediates for a micro-batch of `tokens` tokens, at their peak
    (`expert_row_elements` per row, in the model's dtype): grouped holds every (token, expert) assignment at
    once; loop runs one expert at a time (at most every token); padded pads every expert to the busiest one
    and dense runs every expert on every token, so those two are charged their worst case (every token on
    one expert). `auto` picks among the kernels whose workspace stays within `bound` (the plan's, enforced
    by `KernelChooser`) and is charged it; by default the grouped kernel's."""
    d = spec.dtype_bytes
    grouped = tokens * spec.top_k * expert_row_elements(spec, "grouped") * d
    if kernel == "loop":
        return tokens * expert_row_elements(spec, "loop") * d
    if kernel in ("padded", "dense"):
        return tokens * spec.num_experts * expert_row_elements(spec, kernel) * d
    if kernel == "auto":
        return grouped if bound is None else _max(grouped, bound)
    return grouped


def routed_experts_bytes(spec: ModelSpec, kernel: str, tokens: Any, bound: Any = None,
                         expert_groups: bool = False) -> Any:
    """Bytes the routed experts' MoE holds at its peak for a micro-batch of `tokens`, beyond its input and the
    [tokens, H] output it sums into: the kernel's intermediates (`expert_workspace`, or an expert rank's,
    `expert_parallel_workspace`). `expert_groups`: `engine.paged.GroupedMoE` runs the kernel group by
    group, all of the micro-batch's R = tokens x top_k rows in one group at worst: their gathered input and
    the kernel's own output over them (R rows, not tokens) held through the kernel's call, then that output
    beside its copy weighted by the router (`router_weight_bytes`) and cast back; its indices throughout
    (`GROUPED_MOE_ROW_BYTES` a row). Array-safe."""
    ffn = (expert_workspace(kernel, spec, tokens, bound) if not expert_rank(spec)
           else expert_parallel_workspace(kernel, spec, tokens, bound))
    if not expert_groups:
        return ffn
    d, H, rows = spec.dtype_bytes, spec.hidden_size, tokens * spec.top_k
    return (_max(ffn + 2 * rows * H * d, rows * H * (2 * d + router_weight_bytes(spec)))
            + rows * GROUPED_MOE_ROW_BYTES)


@functools.lru_cache(maxsize=32)
def _synthetic_lengths(num_requests: int, avg: int, longest: int, seed: int) -> tuple[int, ...]:
    from moe_lightning.workload_io import synthetic_lengths  # torch: imported when first needed

    w = Workload(prompt_len_avg=avg, prompt_len_max=longest, num_requests=num_requests, seed=seed)
    return tuple(synthetic_lengths(w))


def prompt_lengths(workload: Workload) -> tuple[int, ...] | None:
    """The prompt lengths a run of `workload` sees when they are known without reading a file: its
    synthetic prompts (seeded). None for a prompts file (its caller passes the file's lengths)."""
    if workload.path:
        return None
    return _synthetic_lengths(workload.num_requests, workload.prompt_len_avg, workload.prompt_len_max,
                              workload.seed)


def _longest_sum(lengths: Sequence[int], n: Any) -> Any:
    """Tokens of the n longest prompts (array-safe over n)."""
    import numpy as np

    prefix = np.concatenate(([0], np.cumsum(sorted(lengths, reverse=True))))
    out = prefix[np.minimum(n, len(lengths))]
    return int(out) if np.ndim(out) == 0 else out


def prefill_tokens(workload: Workload, batch_size: Any, micro_batch_size: Any, kv_tokens: Any, paged: bool,
                   lengths: Sequence[int] | None = None, block_size: int = PLAN_BLOCK_SIZE) -> tuple[Any, Any]:
    """(Prompt tokens of one prefill round, of its largest micro-batch): the hidden states and the
    micro-batch working set the prefill holds.

    Padded: N and mu prompts at the longest, P. Unpadded: at most the N (mu) longest prompts of the
    workload (`lengths`, by default `prompt_lengths(workload)`; unknown: every prompt at P). Paged
    (admission, Algorithm 2): a request of p tokens also reserves gen_len, in whole blocks, out of its
    micro-batch's share of the K tokens (`schedule.batching.kv_budget`), so a share holds at most
    share x max(p / reserved(p)) prompt tokens (the maximum is within one block of P)."""
    P, g = workload.prompt_len_max, workload.gen_len
    batch, micro = batch_size * P, micro_batch_size * P
    if workload.padding:
        return batch, micro
    lengths = prompt_lengths(workload) if lengths is None else lengths
    if lengths:
        batch = _min(batch, _longest_sum(lengths, batch_size))
        micro = _min(micro, _longest_sum(lengths, micro_batch_size))
    if not paged:
        return batch, micro
    m = -(-batch_size // micro_batch_size)
    share = kv_tokens // m // block_size * block_size

    def reserved(p: int) -> int:
        return -(-(p + g) // block_size) * block_size

    # Prompt tokens per reserved token are highest within one block of the longest prompt, or among the
    # workload's own lengths when known; a share holds at most share // (least reserved) requests.
    sizes = sorted(set(lengths)) if lengths else range(max(1, P - block_size + 1), P + 1)
    p, r = max(((p, reserved(p)) for p in sizes), key=lambda pr: pr[0] / pr[1])
    per_share = share * p // r
    if lengths:
        per_share = _min(per_share, _longest_sum(lengths, _min(micro_batch_size, share // reserved(sizes[0]))))
    return _min(batch, m * per_share), _min(micro, per_share)


PAGED_ATTENTION_CHUNK_BYTES = 256 * 2**20   # a GPU's paged decode attention gathers this much context at a time


def paged_attention_sequence_bytes(n_heads: int, n_kv_heads: int, k_dim: int, v_dim: int, v_in_k: bool,
                                   dtype_bytes: int, tokens: int) -> int:
    """Transient bytes of paged decode attention in PyTorch (`kernels.cpu_attention`) for one sequence
    whose gather is `tokens` long: its K and V rows gathered in the pool's dtype and then in fp32 (V not
    apart when a view of K), the fp32 scores, their softmax (and its copy with an attention sink's column),
    and the mask and positions."""
    return tokens * (n_kv_heads * (k_dim + (0 if v_in_k else v_dim)) * (dtype_bytes + 4) + n_heads * 12 + 9)


def paged_attention_chunk(n_heads: int, n_kv_heads: int, k_dim: int, v_dim: int, v_in_k: bool, dtype_bytes: int,
                          tokens: int) -> int:
    """Sequences a GPU gathers at once: as many as `PAGED_ATTENTION_CHUNK_BYTES` holds, at least one."""
    one = paged_attention_sequence_bytes(n_heads, n_kv_heads, k_dim, v_dim, v_in_k, dtype_bytes, tokens)
    return max(1, PAGED_ATTENTION_CHUNK_BYTES // max(1, one))


def paged_attention_bytes(spec: ModelSpec, dtype_bytes: int, micro_batch_size: Any, context: int,
                          block_size: int) -> Any:
    """The most a micro-batch's paged decode attention holds at once for contexts up to `context`: its
    sequences' gathers, or a chunk's. Shorter contexts fit more sequences in a chunk, so the bound is the
    chunk's bytes (or one sequence's, when one is larger), not a chunk of the longest."""
    one = paged_attention_sequence_bytes(spec.num_heads, spec.cache_kv_heads, spec.attn_k_dim, spec.attn_v_dim,
                                         spec.v_in_k, dtype_bytes, -(-context // block_size) * block_size)
    return _min(micro_batch_size * one, max(PAGED_ATTENTION_CHUNK_BYTES, one))


def activation_bytes(spec: ModelSpec, workload: Workload, *, batch_size: Any, micro_batch_size: Any,
                     kv_tokens: Any, paged: bool, attention_on_gpu: Any, expert_kernel: str = "auto",
                     lengths: Sequence[int] | None = None, block_size: int = PLAN_BLOCK_SIZE,
                     expert_groups: bool = False) -> Any:
    """The GPU role's transient memory at its peak: the larger of a prefill round and a decode step,
    from the engine's own tensors (`engine.cgopipe`, `engine.model`, `engine.experts`), in the model's
    dtype `d` except where the kernels use fp32. Array-safe over N and mu.

    Both phases hold the hidden states of every micro-batch (prefill: every prompt token of the round,
    `prefill_tokens`; decode: N rows) and, from the last layer on, each micro-batch's logits in `d`;
    the gathered [N, V] fp32 logits come after the layers. During a layer, one micro-batch of T tokens
    is in its task at the expert kernel's peak:
    - q, k, v and the attention output, `T (2 nq + 2 nkv) hd d` (`qkv_elements`, `attn_out_elements`);
    - then the larger of two stages: attention's transients (under MLA its unabsorbed q, kv_a's output
      and the heads' outputs before o_proj; prefill's eager attention, `prefill_attention_bytes`), gone
      before the O projection; and the residual after it, the experts' normed input and the kernel's
      output, `3 T H d`, routing, `T k ROUTING_BYTES`, and the expert kernel's intermediates,
      `expert_workspace` (or a shared expert's or a dense layer's MLP, `mlp_elements`);
    - prefill: the K/V of the micro-batch before it (or, with one micro-batch, of the layer before)
      waiting for its offload, `2 T nkv hd d` (`kv_token_layer_elements`): the schedule runs the next
      task before the copy ends, more so on a loaded host;
    - decode: two more micro-batches in flight (q, k, v issued ahead; attention outputs loaded back),
      and with attention on the GPU the scores, their fp32 softmax and weights over the longest
      context S, `mu nq S (3 d + 4)`; over a paged cache at least a chunk of sequences' gathered K and V
      (`paged_attention_sequence_bytes`, S in whole blocks).
    """
    d, H, V = spec.dtype_bytes, spec.hidden_size, spec.vocab_size
    k = spec.top_k
    qkv_out = spec.qkv_elements + spec.attn_out_elements   # q, k, v and attention's output, a token
    attn_only = 0   # a token's transients of the attention stage alone
    if spec.mla:    # the unabsorbed q, kv_a's output, and the heads' outputs before o_proj
        attn_only = (spec.num_heads * (spec.qk_nope_head_dim + spec.head_dim) + spec.kv_lora_rank + spec.head_dim
                     + spec.num_heads * spec.v_head_dim)
    kv_token = spec.kv_token_layer_elements
    N, mu = batch_size, micro_batch_size
    t_batch, t_micro = prefill_tokens(workload, N, mu, kv_tokens, paged, lengths, block_size)
    bound = expert_workspace("grouped", spec, t_micro)   # auto's workspace: the prefill's grouped kernel

    def layer_task(tokens: Any, attention: int = 0) -> Any:
        ffn = routed_experts_bytes(spec, expert_kernel, tokens, bound, expert_groups)
        if spec.shared_expert_size:   # after the routed experts, beside their output
            ffn = _max(ffn, tokens * mlp_elements(spec, spec.shared_expert_size, spec.shared_expert_gate) * d)
        if spec.dense_layers:   # a dense layer's MLP instead
            ffn = _max(ffn, tokens * mlp_elements(spec, spec.dense_intermediate_size) * d)
        # attention's transients are gone before the O projection
        return tokens * qkv_out * d + _max(tokens * (3 * H * d + k * ROUTING_BYTES) + ffn,
                                           tokens * attn_only * d + attention)

    gathered = N * V * 4 + mu * V * 4   # [N, V] fp32, and one micro-batch's logits cast to fp32
    attention = prefill_attention_bytes(spec, max(lengths) if lengths else workload.prompt_len_max)
    prefill = t_batch * H * d + N * V * d + _max(layer_task(t_micro, attention) + t_micro * kv_token * d,
                                                 gathered)
    context = workload.prompt_len_max + workload.gen_len
    attention = mu * spec.num_heads * context * (3 * d + 4)
    if paged:   # gathered a chunk of sequences at a time (a sequence at a time on the CPU: a chunk of one)
        attention = _max(attention, paged_attention_bytes(spec, d, mu, context, block_size))
    step = layer_task(mu) + 2 * mu * qkv_out * d + attention_on_gpu * attention
    decode = N * H * d + N * V * d + _max(step, gathered)
    return _max(prefill, decode)


MXFP4_BLOCK = 32                # values sharing one scale (`models.mxfp4`)
MXFP4_CHUNK_BYTES = 8 << 20     # block bytes (two values each) the GPU dequantizes at a time: 3 chunks
                                # (~27 kernels) an expert of gpt-oss, for a workspace of ~57 MB in bf16


def mxfp4_chunk(hidden: int, ffn: int) -> tuple[int, int]:
    """(block bytes, scales) one dequantization chunk holds: MXFP4_CHUNK_BYTES, or a whole matrix where
    smaller, and at least one row."""
    n = max(min(MXFP4_CHUNK_BYTES, ffn * hidden), max(hidden, ffn) // 2)
    return n, -(-n // (MXFP4_BLOCK // 2))


def scratch_experts(n_str: int, dequant_experts: int) -> int:
    """Streamed experts the MXFP4 scratch holds at a time (`Policy.dequant_experts`): a whole layer's
    (0, or a group at least that large), else the group."""
    return n_str if dequant_experts <= 0 else min(n_str, dequant_experts)


def dequant_passes(n_str: int, dequant_experts: int, num_micro_batches: Any) -> Any:
    """How many times a layer's streamed MXFP4 experts are dequantized per step: once while the scratch
    holds the whole layer; in groups, once per micro-batch (each micro-batch's groups in expert order, so
    the scratch never holds the same group twice in a row; every group counted as routed to, the bound
    for micro-batches of more than a few tokens)."""
    return num_micro_batches if scratch_experts(n_str, dequant_experts) < n_str else 1


def dequant_bytes(spec: ModelSpec, n_str: int, dequant_experts: int = 0) -> int:
    """GPU bytes to run `n_str` streamed experts a layer that cross the link quantized (MXFP4): a scratch of
    the streamed experts it holds at a time (`scratch_experts`) in the run's dtype, and the dequantizer's
    workspace (per chunk of n block bytes: their nibbles as int32 indices and as values in the dtype; n / 16
    scales in fp32 and the dtype). 0 when the experts stream as the kernels read them."""
    if spec.expert_format != "mxfp4" or n_str <= 0:
        return 0
    d = spec.dtype_bytes
    n, s = mxfp4_chunk(spec.hidden_size, spec.intermediate_size)
    return scratch_experts(n_str, dequant_experts) * spec.expert_bytes + n * (4 + d) + s * (4 + d)


def memory_pools(spec: ModelSpec, workload: Workload, *, batch_size: Any, micro_batch_size: Any,
                 num_pages: Any, n_res: int, kv_gpu_fraction: Any, attn_on_gpu: bool,
                 prefetch_depth: int, kv_tokens: Any = None, paged: bool = False,
                 expert_kernel: str = "auto", lengths: Sequence[int] | None = None,
                 block_size: int = PLAN_BLOCK_SIZE, dequant_experts: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bytes per pool (GPU, CPU). Works elementwise on numpy arrays for the optimizer's search.

    `batch_size`, `micro_batch_size`, `num_pages` and `kv_gpu_fraction` may be arrays of one shape.
    `kv_tokens`: the KV cache's size in tokens (`kv_cache_tokens`); by default N x (longest prompt +
    gen_len).
    """
    d = spec.dtype_bytes
    E, L = spec.num_experts, spec.num_moe_layers   # dense layers hold no experts
    N, mu = batch_size, micro_batch_size
    n_str = E - n_res
    ctx = workload.prompt_len_max + workload.gen_len
    kv_total = (N * ctx if kv_tokens is None else kv_tokens) * spec.kv_bytes_per_token
    kv_gpu = _ceil(kv_gpu_fraction * kv_total)
    # With attention on the GPU, two layers' KV of a micro-batch in flight (one read, one loading): copies
    # each task allocates, so the plan counts them with the activations, not in a pool the engine would
    # allocate up front and never use. Paged, a sequence's KV crosses in whole blocks.
    held = -(-ctx // block_size) * block_size if paged else ctx
    kv_stream_buffer = 2 * mu * held * spec.kv_token_layer_elements * d if attn_on_gpu else 0 * mu
    activations = activation_bytes(spec, workload, batch_size=N, micro_batch_size=mu,
                                   kv_tokens=N * ctx if kv_tokens is None else kv_tokens, paged=paged,
                                   attention_on_gpu=attn_on_gpu or (kv_gpu_fraction > 0), expert_kernel=expert_kernel,
                                   lengths=lengths, block_size=block_size,
                                   expert_groups=spec.expert_format == "mxfp4" and n_str > 0
                                   and scratch_experts(n_str, dequant_experts) < n_str)
    gpu = {
        # Each tensor at an aligned offset: small tensors (norms, biases) take a whole aligned slot.
        "non_expert_weights": sum(-(-n * d // TENSOR_ALIGN) * TENSOR_ALIGN for n in spec.non_expert_tensor_sizes),
        "resident_experts": padded_pool(L * n_res * spec.expert_bytes),
        # a double buffer of one layer's streamed experts as they cross the link, and where that is 4-bit,
        # the scratch they are dequantized into
        "streamed_experts": (padded_pool(2 * n_str * spec.expert_stream_bytes
                                         + dequant_bytes(spec, n_str, dequant_experts)) if n_str > 0 else 0),
        "kv_cache": padded_pool(kv_gpu),
        "activations": activations + kv_stream_buffer,
    }
    page_bytes = -(-(n_str * spec.expert_stream_bytes) // num_pages)  # ceil division
    cpu = {
        "streamed_experts": L * n_str * spec.expert_stream_bytes,
        "kv_cache": kv_total - kv_gpu,
        "pinned_ring": (prefetch_depth + 1) * page_bytes,
        "hidden_states": N * (spec.qkv_elements + spec.hidden_size) * d,
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
        """One line: what each device needs, per pool and in total, against its budget (GiB)."""

        def side(name: str, pools: dict[str, int], total: int, budget: int) -> str:
            mark = "OVER" if total > budget else "ok"
            parts = ", ".join(f"{k} {v / GiB:.3g}" for k, v in pools.items() if v)
            return (f"{name} needs {total / GiB:.4g} GiB ({total} B; GiB each: {parts}) of {budget / GiB:.4g} GiB "
                    f"({budget} B) available [{mark}]")

        return ("policy does not fit the memory budget: "
                + side("GPU", self.gpu, self.gpu_total_bytes, hw.gpu_budget_bytes) + "; "
                + side("CPU", self.cpu, self.cpu_total_bytes, hw.cpu_budget_bytes))


def memory_plan(spec: ModelSpec, policy: Policy, workload: Workload, kv_tokens: int | None = None,
                paged: bool = False, lengths: Sequence[int] | None = None,
                block_size: int = PLAN_BLOCK_SIZE) -> MemoryPlan:
    """Bytes per pool that the engine allocates for `policy` on `workload`. The KV cache holds
    `kv_tokens` tokens; by default `kv_cache_tokens(policy, workload, paged)`: with `paged` (CGOPipe's
    unpadded block pool) N x (average prompt + gen_len), else N x (longest prompt + gen_len)."""
    if policy.dequant_experts and spec.expert_format != "mxfp4":
        raise ConfigError(f"policy.dequant_experts={policy.dequant_experts}: model {spec.name} stores its experts as "
                          f"{spec.expert_format}, not MXFP4; nothing is dequantized (set it to 0)")
    if kv_tokens is None:
        kv_tokens = kv_cache_tokens(policy, workload, paged, block_size, lengths)
    gpu, cpu = memory_pools(
        spec, workload, batch_size=policy.batch_size, micro_batch_size=policy.micro_batch_size,
        num_pages=policy.num_pages, n_res=resident_experts_per_layer(spec, policy.expert_gpu_fraction),
        kv_gpu_fraction=policy.kv_gpu_fraction, attn_on_gpu=policy.attn_on_gpu,
        prefetch_depth=policy.prefetch_depth, kv_tokens=kv_tokens, paged=paged,
        expert_kernel=policy.expert_kernel, lengths=lengths, block_size=block_size,
        dequant_experts=policy.dequant_experts)
    return MemoryPlan(gpu={k: int(v) for k, v in gpu.items()}, cpu={k: int(v) for k, v in cpu.items()})
