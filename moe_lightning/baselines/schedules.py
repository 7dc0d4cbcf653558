"""The baselines' schedules as task graphs over the CGOPipe runtime's ops (same kernels, same executor,
same simulator; only the order and the dependencies differ).

Index convention, as in `moe_lightning.schedule.cgopipe`: `i` layer, `j` micro-batch (FlexGen's "GPU
batch"), `k = i*m + j` the zig-zag position, `p` a page of a layer's streamed expert weights. None of
these schedules pages its weights: a layer's streamed experts are issued as one block (`num_pages = 1`
in the policies they choose; with more pages, every page of the layer is issued back to back at the
same point, which is the same transfer cut into pieces).

FlexGen (S4, attention on the GPU, KV cache streamed), one decode step, zig-zag over (i, j), as
`flex_opt.py`'s `generation_loop_overlap_multi_batch` runs it:
    prologue: W(0); LoadKV(0); sync
    for i in layers:
      for j in GPU batches:                     # step k = (i, j)
        W(i+1)          if j == 0               # next layer's weights, whole layer (own stream)
        LoadKV(k+1)                             # next batch's KV cache -> GPU
        GPULayer(i, j)                          # attention + MoE FFN on the GPU
        StoreKV(k-1)                            # previous batch's new K/V -> CPU
        sync                                    # host barrier: waits for everything issued in step k
FlexGen(c) (S3, attention on the CPU): the same loop with GPULayer replaced by the CPU-attention chain
    PreAttn -> OffloadQKV -> CPUAttn -> LoadHidden -> PostAttn, every one of these tasks depending on the
    one issued before it (no look-ahead: CPU attention of batch j+1 starts after PostAttn of batch j);
    only the weight load of the step (a separate stream in FlexGen too) overlaps them, and only within
    its step.
FlexGen prefill: the zig-zag with PrefillLayer(k) and OffloadKV(k-1) per step, synchronised the same way.

Synchronisation, per system (what each real runtime waits on, and how the graph says it):
- FlexGen and FlexGen(c): `sync()` after every step is `copy_queue.join()` (its copy threads) followed by
  a device-wide `torch.cuda.synchronize()`. It waits for everything issued in the step, the next layer's
  weight load issued at j == 0 included, so step k+1 starts only once that load has landed: the weights
  of layer i+1 must arrive within step (i, 0) (FlexGen's cost model charges ctog + max(...) for this
  reason). In the graph each step ends with `TaskGraph.sync()`: a host barrier that the executor
  performs (the issuing thread waits for every task of the step, on CUDA with a device-wide synchronise)
  and the simulator charges (the profile's sync cost per barrier, the next step issued only after it);
  every task of step k+1 also depends on every task of step k, weights included.
- DeepSpeed-ZeRO-Inference: no barrier. ZeRO-3's parameter coordinator (`fetch_sub_module`) makes the
  compute stream wait on the prefetch stream (`current_stream().wait_stream(...)`, an event wait on the
  device) for the parameters of the module about to run, and throttles prefetches by synchronising on the
  oldest outstanding fetch event (back-pressure, not a device-wide sync): the dependencies W(i) ->
  GPULayer(i) and the double buffer (W(i) after GPULayer(i-2)) say both. The host syncs once per decode
  step (HF `generate` reads the finished flags), which is the per-graph step cost.
- FastDecode-like: no barrier. The GPU side waits per layer and micro-batch for the CPU workers'
  attention output (LoadHidden -> PostAttn), a data dependency; nothing else is synchronised.
- CGOPipe: no barrier; dependencies only (CUDA events between streams).

DeepSpeed-ZeRO-Inference: per layer W(i+1) (one layer of prefetch), then per micro-batch (one, under
    its policy) LoadKV, GPULayer, StoreKV; prefill PrefillLayer + OffloadKV per layer.
FastDecode-like (S2): CGOPipe's decode order (CPU attention two micro-batches ahead, LoadHidden before
    PostAttn), but W(i+1) issued whole at (i, 0) instead of one page per micro-batch.

Micro-batches whose KV cache lives on the GPU (`PipeShape.gpu_kv`, from r_c) skip LoadKV/StoreKV and
OffloadKV; with attention on the CPU they run one GPUAttn task instead of PreAttn..LoadHidden.
"""

from __future__ import annotations

from collections.abc import Callable

from moe_lightning.engine.cgopipe import Schedule
from moe_lightning.schedule.cgopipe import (
    PipeShape,
    _WeightStream,
    decode_graph,
    decode_graph_gpu_attention,
    prefill_graph,
)
from moe_lightning.schedule.graph import Resource, TaskGraph

GPU, CPU, H2D, D2H = Resource.GPU, Resource.CPU, Resource.H2D, Resource.D2H


def _load_layer(w: _WeightStream, i: int) -> list[int | None]:
    """Issue every page of layer i's streamed experts as one block (CPU -> pinned -> GPU); returns the
    W_PinToGPU task ids. The copy worker is kept `prefetch` pages ahead of the H2D copies."""
    s = w.s
    if not s.streams(i):
        return []
    w.to_gpu(i, range(s.num_pages))
    w.copy_ahead(w.start(i) + s.num_pages + s.prefetch)
    return w.layer_ready(i)


def _prologue(w: _WeightStream) -> None:
    w.copy_ahead(w.s.prefetch)
    _load_layer(w, 0)


# ---- FlexGen (S4 / S3) ------------------------------------------------------------------------------

def flexgen_prefill(s: PipeShape) -> TaskGraph:
    g = TaskGraph("flexgen-prefill")
    L, m = s.num_layers, s.num_micro_batches
    w = _WeightStream(g, s, "PrefillLayer")
    _prologue(w)
    g.sync()
    for k in range(L * m):
        i, j = divmod(k, m)
        if j == 0:
            _load_layer(w, i + 1)
        g.add(GPU, "PrefillLayer", i, j, w.layer_ready(i))
        if k >= 1 and (k - 1) % m not in s.gpu_kv:
            g.add(D2H, "OffloadKV", *divmod(k - 1, m), [g.get("PrefillLayer", *divmod(k - 1, m))])
        g.sync()
    if (L * m - 1) % m not in s.gpu_kv:
        g.add(D2H, "OffloadKV", L - 1, m - 1, [g.get("PrefillLayer", L - 1, m - 1)])
    g.validate()
    return g


def flexgen_decode_gpu_attention(s: PipeShape) -> TaskGraph:
    """S4: one decode step, attention on the GPU, the KV cache of CPU-resident batches streamed in one
    batch ahead and the new token's K/V stored back one batch behind; a barrier after every step."""
    g = TaskGraph("flexgen-decode")
    L, m = s.num_layers, s.num_micro_batches
    w = _WeightStream(g, s, "GPULayer")

    def streamed(k: int) -> bool:
        return 0 <= k < L * m and k % m not in s.gpu_kv

    _prologue(w)
    if streamed(0):
        g.add(H2D, "LoadKV", 0, 0)
    g.sync()
    for k in range(L * m):
        i, j = divmod(k, m)
        if j == 0:
            _load_layer(w, i + 1)
        if streamed(k + 1):
            g.add(H2D, "LoadKV", *divmod(k + 1, m))
        g.add(GPU, "GPULayer", i, j, [g.get("LoadKV", i, j), *w.layer_ready(i)])
        if streamed(k - 1):
            g.add(D2H, "StoreKV", *divmod(k - 1, m), [g.get("GPULayer", *divmod(k - 1, m))])
        g.sync()
    if streamed(L * m - 1):
        g.add(D2H, "StoreKV", L - 1, m - 1, [g.get("GPULayer", L - 1, m - 1)])
    g.validate()
    return g


def flexgen_decode_cpu_attention(s: PipeShape) -> TaskGraph:
    """S3 (FlexGen(c)): attention on the CPU beside the KV cache, every compute/activation task after the
    one issued before it; only the step's whole-layer weight load overlaps, and the barrier after the
    step waits for it."""
    g = TaskGraph("flexgen-c-decode")
    L, m = s.num_layers, s.num_micro_batches
    w = _WeightStream(g, s, "PostAttn")
    last: list[int | None] = [None]

    def chain(resource: Resource, op: str, i: int, j: int, deps=()) -> int:
        last[0] = g.add(resource, op, i, j, [last[0], *deps])
        return last[0]

    _prologue(w)
    g.sync()
    for k in range(L * m):
        i, j = divmod(k, m)
        if j == 0:
            _load_layer(w, i + 1)
        if j in s.gpu_kv:
            chain(GPU, "GPUAttn", i, j)
        else:
            chain(GPU, "PreAttn", i, j)
            chain(D2H, "OffloadQKV", i, j)
            chain(CPU, "CPUAttn", i, j)
            chain(H2D, "LoadHidden", i, j)
        chain(GPU, "PostAttn", i, j, w.layer_ready(i))
        g.sync()
    g.validate()
    return g


# ---- unpaged layer-by-layer (DeepSpeed-ZeRO-Inference; FastDecode's prefill) -------------------------

def unpaged_prefill(s: PipeShape) -> TaskGraph:
    """Layer by layer over micro-batches, the next layer's weights prefetched whole at the layer's start,
    KV of CPU-resident micro-batches offloaded as produced: CGOPipe's prefill with unpaged weights."""
    return prefill_graph(s, paged=False)


def unpaged_decode_gpu_attention(s: PipeShape) -> TaskGraph:
    """ZeRO-Inference-style decode: layer i+1's weights prefetched whole while layer i computes; the KV of
    CPU-resident micro-batches streamed one micro-batch ahead (two GPU KV buffers): CGOPipe's A_g=1
    decode with unpaged weights."""
    return decode_graph_gpu_attention(s, paged=False)


def deepspeed_decode_cpu_attention(s: PipeShape) -> TaskGraph:
    from moe_lightning.errors import ConfigError

    raise ConfigError("system=deepspeed runs attention on the GPU (ZeRO-Inference has no CPU attention); "
                      "set policy.attn_on_gpu=true or use system.policy_source=auto")


# ---- FastDecode-like (S2) ---------------------------------------------------------------------------

def fastdecode_decode(s: PipeShape) -> TaskGraph:
    """CGOPipe's order (CPU attention `lookahead` micro-batches ahead) with unpaged weights: layer i+1's
    streamed experts issued whole at (i, 0). One definition with CGOPipe's, a flag apart."""
    return decode_graph(s, paged=False)


FLEXGEN = Schedule("flexgen", flexgen_prefill, flexgen_decode_cpu_attention, flexgen_decode_gpu_attention)
DEEPSPEED = Schedule("deepspeed", unpaged_prefill, deepspeed_decode_cpu_attention, unpaged_decode_gpu_attention)
FASTDECODE = Schedule("fastdecode", unpaged_prefill, fastdecode_decode, unpaged_decode_gpu_attention)

# System name -> the schedule its runner executes (and the simulator can time).
SCHEDULES: dict[str, Schedule] = {"flexgen": FLEXGEN, "flexgen_c": FLEXGEN, "deepspeed": DEEPSPEED,
                                  "fastdecode": FASTDECODE}
GraphFn = Callable[[PipeShape], TaskGraph]
