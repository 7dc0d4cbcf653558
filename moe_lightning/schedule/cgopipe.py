"""CGOPipe (MoE-Lightning) as task graphs: the decode step, the prefill, and the A_g=1 variant.

Index convention, written once: `i` layer, `j` micro-batch, `k = i*m + j` the position of (i, j) in
the pipeline, `p` a page of a layer's streamed expert weights, `q = i*P + p` the page's position in the
stream. A layer's streamed weights are split into P pages (P = m by default), loaded while the previous
layer computes; GPU expert buffer `i % 2` holds layer i's pages (double buffer); the pinned ring has
`prefetch + 1` slots and the copy worker fills it `prefetch` pages ahead of the H2D copies.

Decode, per the paper (A_g=0):
    prologue: W_CtoPin for the first pages; W_PinToGPU(0, *); PreAttn, OffloadQKV, CPUAttn for k < 2
    for i in layers:
      for j in micro-batches:
        LoadHidden(i, j)                           # CPU-attention output -> GPU
        W_PinToGPU(i+1, pages of j)                # pinned -> GPU, into buffer (i+1) % 2
        PostAttn(i, j)                             # O-proj, router, MoE FFN (paged experts) on GPU
        PreAttn(k+2); OffloadQKV(k+2); CPUAttn(k+2)  # CPU attention runs two micro-batches ahead
        W_CtoPin(pages 2 ahead)                    # pageable -> pinned, copy worker
Micro-batches whose KV cache is on the GPU (r_c) replace PreAttn..LoadHidden by one GPUAttn task.

Dense layers (no routed experts) stream nothing: the stream holds the MoE layers' pages only, at
positions `q = o*P + p` by the layer's ordinal `o` among the MoE layers, buffer `o % 2`; a layer
before a dense one loads nothing beside its micro-batches, and the dense layer loads the MoE layer
after it.

Known simplification: each graph loads its own first layer in a prologue (no prefetch across decode
steps), so 1/L of each step's weight traffic is not overlapped with GPU compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_lightning.schedule.graph import Resource, TaskGraph

GPU, CPU, H2D, D2H, COPY = Resource.GPU, Resource.CPU, Resource.H2D, Resource.D2H, Resource.COPY


@dataclass(frozen=True)
class PipeShape:
    """What a schedule needs to know about a run."""

    num_layers: int
    num_micro_batches: int
    num_pages: int                    # pages per layer of streamed experts (0: nothing streams)
    prefetch: int = 2                 # pages the copy worker runs ahead
    gpu_kv: frozenset[int] = frozenset()  # micro-batches whose KV cache lives on the GPU
    lookahead: int = 2                # CPU attention runs this many micro-batches ahead
    dense_layers: frozenset[int] = frozenset()   # layers without routed experts: nothing streams

    def streams(self, layer: int) -> bool:
        return self.num_pages > 0 and 0 <= layer < self.num_layers and layer not in self.dense_layers


class _WeightStream:
    """Issues W_CtoPin / W_PinToGPU tasks for the pages of every MoE layer, in stream order."""

    def __init__(self, g: TaskGraph, s: PipeShape, compute_op: str):
        self.g, self.s, self.compute_op = g, s, compute_op
        self.streamed = [i for i in range(s.num_layers) if s.streams(i)]
        self.ordinal = {i: o for o, i in enumerate(self.streamed)}
        self.pages = [(i, p) for i in self.streamed for p in range(s.num_pages)]
        self.ring = s.prefetch + 1
        self.next_ctop = 0

    def copy_ahead(self, upto: int) -> None:
        """Issue W_CtoPin for stream positions below `upto`."""
        while self.next_ctop < min(upto, len(self.pages)):
            q = self.next_ctop
            i, p = self.pages[q]
            freed = self.g.get("W_PinToGPU", *self.pages[q - self.ring]) if q >= self.ring else None
            if q >= self.ring and freed is None:
                raise AssertionError(f"W_CtoPin({i},{p}) would overwrite a ring slot not yet copied out")
            self.g.add(COPY, "W_CtoPin", i, p, [freed])
            self.next_ctop += 1

    def start(self, i: int) -> int:
        """Stream position of layer i's first page (of the next MoE layer's, for a dense layer)."""
        return sum(1 for layer in self.streamed if layer < i) * self.s.num_pages

    def to_gpu(self, i: int, pages: range) -> None:
        if i not in self.ordinal:
            return
        m, o = self.s.num_micro_batches, self.ordinal[i]
        # Buffer o % 2 was last read by the MoE layer two before: its last micro-batch must be done.
        freed = self.g.get(self.compute_op, self.streamed[o - 2], m - 1) if o >= 2 else None
        for p in pages:
            self.copy_ahead(self.start(i) + p + 1)  # its W_CtoPin must be issued first
            self.g.add(H2D, "W_PinToGPU", i, p, [self.g.get("W_CtoPin", i, p), freed])

    def layer_ready(self, i: int) -> list[int | None]:
        return [self.g.get("W_PinToGPU", i, p) for p in range(self.s.num_pages)] if i in self.ordinal else []

    def pages_for(self, j: int) -> range:
        P, m = self.s.num_pages, self.s.num_micro_batches
        return range(j * P // m, (j + 1) * P // m)

    def position_after(self, i: int, pages: range) -> int:
        if i not in self.ordinal:
            return self.start(i)
        return self.start(i) + (pages.stop if len(pages) else pages.start)


def _prologue_weights(w: _WeightStream) -> None:
    w.copy_ahead(w.s.prefetch)
    if not w.s.streams(0):   # a dense first layer: the next MoE layer streams beside it
        return
    for p in range(w.s.num_pages):
        w.to_gpu(0, range(p, p + 1))
        w.copy_ahead(p + 1 + w.s.prefetch)


def decode_graph(s: PipeShape, paged: bool = True) -> TaskGraph:
    """One decode step, attention on the CPU (A_g=0).

    `paged=False` is the FastDecode-like (S2) ablation: the same order, but layer i+1's streamed
    experts are issued whole at (i, 0) instead of one page beside each micro-batch."""
    g = TaskGraph("cgopipe-decode" if paged else "fastdecode-decode")
    L, m = s.num_layers, s.num_micro_batches
    d = max(1, min(s.lookahead, m))  # PreAttn(k+d) needs PostAttn(k+d-m): d <= m keeps it issued first
    w = _WeightStream(g, s, "PostAttn")

    def attention(k: int) -> None:
        i, j = divmod(k, m)
        prev = g.get("PostAttn", i - 1, j)
        if j in s.gpu_kv:
            g.add(GPU, "GPUAttn", i, j, [prev])
            return
        pre = g.add(GPU, "PreAttn", i, j, [prev])
        qkv = g.add(D2H, "OffloadQKV", i, j, [pre])
        g.add(CPU, "CPUAttn", i, j, [qkv])

    _prologue_weights(w)
    for k in range(min(d, L * m)):
        attention(k)
    for i in range(L):
        for j in range(m):
            k = i * m + j
            if j in s.gpu_kv:
                ready = g.get("GPUAttn", i, j)
            else:
                ready = g.add(H2D, "LoadHidden", i, j, [g.get("CPUAttn", i, j)])
            pages = _pages(w, i, j, paged)
            w.to_gpu(i + 1, pages)
            g.add(GPU, "PostAttn", i, j, [ready, *w.layer_ready(i)])
            if k + d < L * m:
                attention(k + d)
            if i + 1 < L:
                w.copy_ahead(w.position_after(i + 1, pages) + s.prefetch)
    g.validate()
    return g


def _pages(w: _WeightStream, i: int, j: int, paged: bool) -> range:
    """Pages of layer i+1 issued beside micro-batch j: one page each (paged), or all at j = 0."""
    if i + 1 >= w.s.num_layers:
        return range(0)
    return w.pages_for(j) if paged else range(w.s.num_pages if j == 0 else 0)


def decode_graph_gpu_attention(s: PipeShape, paged: bool = True) -> TaskGraph:
    """One decode step with attention on the GPU (A_g=1): KV of CPU-resident micro-batches streams in
    one micro-batch ahead and the new token's K/V goes back (the FlexGen-like order). `paged=False`
    prefetches the next layer whole at its start (DeepSpeed-ZeRO-Inference)."""
    g = TaskGraph("cgopipe-decode-gpu-attn" if paged else "unpaged-decode-gpu-attn")
    L, m = s.num_layers, s.num_micro_batches
    w = _WeightStream(g, s, "GPULayer")

    def load_kv(k: int) -> None:
        i, j = divmod(k, m)
        if k < L * m and j not in s.gpu_kv:
            # Two KV buffers on the GPU: the one k-2 used must be free.
            g.add(H2D, "LoadKV", i, j, [g.get("GPULayer", *divmod(k - 2, m)) if k >= 2 else None])

    _prologue_weights(w)
    load_kv(0)
    stores: list[int] = []
    for i in range(L):
        for j in range(m):
            k = i * m + j
            pages = _pages(w, i, j, paged)
            w.to_gpu(i + 1, pages)
            load_kv(k + 1)
            waiting = stores[-2] if len(stores) >= 2 else None   # one new K/V waits for its store, as in prefill
            layer = g.add(GPU, "GPULayer", i, j, [g.get("LoadKV", i, j), *w.layer_ready(i), waiting])
            if j not in s.gpu_kv:
                stores.append(g.add(D2H, "StoreKV", i, j, [layer]))
            if i + 1 < L:
                w.copy_ahead(w.position_after(i + 1, pages) + s.prefetch)
    g.validate()
    return g


def prefill_graph(s: PipeShape, paged: bool = True) -> TaskGraph:
    """Prefill on the GPU layer by layer over micro-batches; KV of CPU-resident micro-batches is
    offloaded as it is produced; the next layer's pages stream in meanwhile (`paged=False`: the next
    layer whole at the layer's start)."""
    g = TaskGraph("cgopipe-prefill" if paged else "unpaged-prefill")
    L, m = s.num_layers, s.num_micro_batches
    w = _WeightStream(g, s, "PrefillLayer")
    _prologue_weights(w)
    offloads: list[int] = []
    for i in range(L):
        for j in range(m):
            pages = _pages(w, i, j, paged)
            w.to_gpu(i + 1, pages)
            # One K/V waits for its offload while a micro-batch computes (the memory plan holds one): the
            # offload before the last must be done, or a slow copy engine would pile them up on the GPU.
            waiting = offloads[-2] if len(offloads) >= 2 else None
            layer = g.add(GPU, "PrefillLayer", i, j, [*w.layer_ready(i), waiting])
            if j not in s.gpu_kv:
                offloads.append(g.add(D2H, "OffloadKV", i, j, [layer]))
            if i + 1 < L:
                w.copy_ahead(w.position_after(i + 1, pages) + s.prefetch)
    g.validate()
    return g
