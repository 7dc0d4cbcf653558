"""Paged expert weights under a hard device memory budget.

- `DevicePools`: every persistent device buffer is carved out of pools whose sizes come from the
  memory plan, allocated before any weight moves; a plan that does not fit is refused first.
- `ExpertCache`: the GPU expert cache (resident experts of every layer + a double buffer for one
  layer's streamed experts), the per-layer page table through which the MoE kernels read weights,
  the pageable CPU copy of the streamed experts, and the pinned staging ring between them.

A layer's streamed weights are one contiguous byte range, `[w13 of its streamed experts | w2 of its
streamed experts]`, both in CPU memory and in each GPU buffer, so a page is a plain byte slice. Experts a
checkpoint stores as MXFP4 (`ModelSpec.expert_format`) stream as stored instead, each expert's 4-bit page
back to back (`models.mxfp4`): the link moves 4.25 bits a weight, and the device dequantizes a layer's
pages into one scratch of its streamed experts before its first kernel; or, with a scratch of fewer
experts (`Policy.dequant_experts`), group by group inside each micro-batch's MoE (`GroupedMoE`), so a
layer whose experts would not fit the GPU dequantized at once still runs.
Dense layers (`ModelSpec.dense_layers`) have no experts: the cache holds, streams and double-buffers
the MoE layers only, counted by their ordinal `o` among them (buffer `o % 2`; stream position
`o * P + p`, as `schedule.cgopipe` counts it).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from moe_lightning.config import ModelSpec
from moe_lightning.engine.weights import WeightSource
from moe_lightning.errors import MemoryBudgetError
from moe_lightning.memory import TENSOR_ALIGN, scratch_experts
from moe_lightning.models.layers import ExpertStack, MoEKernel
from moe_lightning.models.mxfp4 import Dequantizer

ALIGN = TENSOR_ALIGN


class DevicePools:
    """Named byte pools on one device, allocated up front at the plan's sizes (alignment room included:
    `memory.POOL_ALIGN_ROOM`); tensors are views carved out of them."""

    def __init__(self, sizes: dict[str, int], device: torch.device):
        self.device = device
        self.size = {name: int(n) for name, n in sizes.items()}
        self.used = dict.fromkeys(sizes, 0)
        self.buffers = {name: torch.empty(n, dtype=torch.uint8, device=device)
                        for name, n in self.size.items() if n > 0}

    def take(self, pool: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        start = -(-self.used[pool] // ALIGN) * ALIGN
        if start + nbytes > self.size[pool]:
            raise MemoryBudgetError(f"pool {pool!r} on {self.device}: {start + nbytes} B needed, "
                                    f"{self.size[pool]} B planned (memory plan and engine disagree)")
        self.used[pool] = start + nbytes
        return self.buffers[pool][start:start + nbytes].view(dtype).view(shape)

    @property
    def allocated_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers.values())


class ExpertCache:
    """Resident + double-buffered streamed experts on the device, with pageable and pinned CPU copies."""

    def __init__(self, spec: ModelSpec, source: WeightSource, n_resident: int, num_pages: int,
                 prefetch: int, pools: DevicePools, device: torch.device, pin: bool, dequant_experts: int = 0):
        E, H, F = spec.num_experts, spec.hidden_size, spec.intermediate_size
        L = spec.num_moe_layers
        self.ordinal = {layer: o for o, layer in enumerate(spec.moe_layers)}   # MoE layer -> its ordinal
        dt = source.dtype
        self.n_res, self.n_str, self.num_pages = n_resident, E - n_resident, num_pages if n_resident < E else 0
        # Streamed experts cross the link as the checkpoint stores them where that is MXFP4 (4-bit pages,
        # dequantized on the device into a scratch the kernels read); resident ones are held dequantized.
        self.quantized = spec.expert_format == "mxfp4" and self.n_str > 0
        # The scratch holds this many of them at a time: a whole layer's, or groups (`GroupedMoE`).
        self.scratch_n = scratch_experts(self.n_str, dequant_experts) if self.quantized else self.n_str
        self.grouped = self.quantized and self.scratch_n < self.n_str
        # Device: resident experts of every layer.
        self.res_w13 = pools.take("resident_experts", (L * self.n_res, 2 * F, H), dt) if self.n_res else None
        self.res_w2 = pools.take("resident_experts", (L * self.n_res, H, F), dt) if self.n_res else None
        # Device: two buffers for one layer's streamed experts, each one contiguous byte range.
        self.expert_page = spec.expert_stream_bytes if self.quantized else 3 * H * F * _size(dt)
        self.layer_bytes = self.n_str * self.expert_page
        split = self.n_str * 2 * F * H  # elements of w13 in a streamed layer
        self.buffers = [pools.take("streamed_experts", (self.layer_bytes,), torch.uint8) for _ in range(2)] \
            if self.n_str else []
        if self.quantized:   # the kernels read the scratch; which MoE layer's experts it holds
            self.buf_w13 = [pools.take("streamed_experts", (self.scratch_n, 2 * F, H), dt)]
            self.buf_w2 = [pools.take("streamed_experts", (self.scratch_n, H, F), dt)]
            self.dequantizer = Dequantizer(H, F, dt, device, lambda shape, d: pools.take("streamed_experts", shape, d))
            self.scratch_holds: int | None = None
        else:
            self.buf_w13 = [b[: split * _size(dt)].view(dt).view(self.n_str, 2 * F, H) for b in self.buffers]
            self.buf_w2 = [b[split * _size(dt):].view(dt).view(self.n_str, H, F) for b in self.buffers]
        # CPU: the streamed experts of every layer (pageable) in the same layout, and the pinned ring.
        self.cpu_layers: list[torch.Tensor] = []   # by ordinal
        for i, o in self.ordinal.items():
            if self.n_res:
                for e in range(self.n_res):
                    w13, w2 = source.expert(i, e)
                    self.res_w13[o * self.n_res + e].copy_(w13)
                    self.res_w2[o * self.n_res + e].copy_(w2)
            if self.n_str:
                blob = torch.empty(self.layer_bytes, dtype=torch.uint8)
                if self.quantized:   # each expert's page: its arrays' bytes back to back
                    for s in range(self.n_str):
                        parts = source.expert_packed(i, self.n_res + s)
                        torch.cat([t.reshape(-1) for t in parts], out=blob[s * self.expert_page:
                                                                         (s + 1) * self.expert_page])
                else:
                    w13_view = blob[: split * _size(dt)].view(dt).view(self.n_str, 2 * F, H)
                    w2_view = blob[split * _size(dt):].view(dt).view(self.n_str, H, F)
                    for s in range(self.n_str):
                        w13, w2 = source.expert(i, self.n_res + s)
                        w13_view[s].copy_(w13)
                        w2_view[s].copy_(w2)
                self.cpu_layers.append(blob)
        self.page_bytes = -(-self.layer_bytes // self.num_pages) if self.n_str else 0
        self.ring = [torch.empty(self.page_bytes, dtype=torch.uint8, pin_memory=pin)
                     for _ in range(prefetch + 1)] if self.n_str else []

    def page_range(self, p: int) -> tuple[int, int]:
        start = p * self.page_bytes
        return start, min(start + self.page_bytes, self.layer_bytes)

    def copy_to_pinned(self, layer: int, page: int) -> int:
        """W_CtoPin: pageable CPU -> pinned ring slot. Returns bytes copied."""
        a, b = self.page_range(page)
        o = self.ordinal[layer]
        slot = self.ring[(o * self.num_pages + page) % len(self.ring)]
        slot[: b - a].copy_(self.cpu_layers[o][a:b])
        return b - a

    def copy_to_device(self, layer: int, page: int) -> int:
        """W_PinToGPU: pinned ring slot -> device buffer `ordinal % 2` (async on the current stream)."""
        a, b = self.page_range(page)
        o = self.ordinal[layer]
        slot = self.ring[(o * self.num_pages + page) % len(self.ring)]
        self.buffers[o % 2][a:b].copy_(slot[: b - a], non_blocking=True)
        return b - a

    def stack(self, layer: int) -> ExpertStack | None:
        """Layer `layer`'s page table: resident experts first (region 0), then the streamed buffer; None
        for a dense layer."""
        o = self.ordinal.get(layer)
        if o is None:
            return None
        if self.grouped:
            return self._grouped_stack(o)
        w13, w2, slot_of = [], [], []
        if self.n_res:
            rows = slice(o * self.n_res, (o + 1) * self.n_res)
            w13.append(self.res_w13[rows])
            w2.append(self.res_w2[rows])
            slot_of += [(0, e) for e in range(self.n_res)]
        if self.n_str:
            if self.quantized:
                self._dequantize(o)
            w13.append(self.buf_w13[0 if self.quantized else o % 2])
            w2.append(self.buf_w2[0 if self.quantized else o % 2])
            slot_of += [(len(w13) - 1, s) for s in range(self.n_str)]
        return ExpertStack(w13, w2, slot_of)

    def _dequantize(self, o: int) -> None:
        """MoE layer o's 4-bit pages (all arrived: its first kernel waits for them) into the scratch, once:
        on its first use after another layer's, on the calling (compute) stream. The scratch is free by
        then: layer o's pages reach buffer o % 2 only after layer o - 2's last kernel, and layer o - 1's
        kernels ran before. A layer's pages hold the same experts every step, so a scratch that holds o
        still holds its experts."""
        if self.scratch_holds == o:
            return
        buffer = self.buffers[o % 2]
        for s in range(self.n_str):
            self.dequantizer.expert(buffer[s * self.expert_page:(s + 1) * self.expert_page],
                                    self.buf_w13[0][s], self.buf_w2[0][s])
        self.scratch_holds = o

    def _grouped_stack(self, o: int) -> ExpertStack:
        """MoE layer o as groups of consecutive expert ids: its resident experts, then its streamed ones
        `scratch_n` at a time, each dequantized into the scratch when its group runs (`GroupedMoE`)."""
        groups: list = []
        if self.n_res:
            rows = slice(o * self.n_res, (o + 1) * self.n_res)
            resident = ExpertStack.single(self.res_w13[rows], self.res_w2[rows])
            groups.append((0, self.n_res, lambda: resident))
        for first in range(0, self.n_str, self.scratch_n):
            n = min(self.scratch_n, self.n_str - first)
            materialise = functools.partial(self._materialise, o, first, n)
            groups.append((self.n_res + first, self.n_res + first + n, materialise))
        return ExpertStack([], [], [], groups=groups)

    def _materialise(self, o: int, first: int, n: int) -> ExpertStack:
        """Streamed experts first..first+n-1 of MoE layer o, dequantized into the scratch (on the calling,
        compute, stream: the group before it on that stream has finished with the scratch) unless it holds
        them already."""
        if self.scratch_holds != (o, first):
            buffer = self.buffers[o % 2]
            for s in range(n):
                page = (first + s) * self.expert_page
                self.dequantizer.expert(buffer[page:page + self.expert_page], self.buf_w13[0][s], self.buf_w2[0][s])
            self.scratch_holds = (o, first)
        return ExpertStack.single(self.buf_w13[0][:n], self.buf_w2[0][:n])


class GroupedMoE:
    """A MoE kernel for layers the device holds a group of experts at a time (`ExpertStack.groups`): each
    group that the tokens route to is put on the device, its routed rows run through `inner` (a kernel,
    or the engine's per-call chooser, with the group's own load), and the outputs are summed into each
    token weighted by the router, group by group in increasing expert id, so each token's terms add in
    the order `moe_loop` adds them (as `ep_moe` does). Layers held whole go to `inner` unchanged."""

    def __init__(self, inner: MoEKernel):
        self.inner = inner

    def __call__(self, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 experts: ExpertStack) -> torch.Tensor:
        if experts.groups is None:
            return self.inner(h, weights, ids, experts)
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        by_expert = flat[order]
        starts = torch.tensor([g[0] for g in experts.groups] + [experts.groups[-1][1]], device=ids.device)
        bounds = torch.searchsorted(by_expert, starts).tolist()
        out = torch.zeros_like(h)
        for g, (first, end, materialise) in enumerate(experts.groups):
            a, b = bounds[g], bounds[g + 1]
            if a == b:   # nothing routed to this group: not even dequantized
                continue
            tok, pos = order[a:b] // k, order[a:b] % k
            stack = dataclasses.replace(materialise(), act=experts.act,
                                        b13=None if experts.b13 is None else experts.b13[first:end],
                                        b2=None if experts.b2 is None else experts.b2[first:end])
            ones = torch.ones(b - a, 1, dtype=torch.float32, device=h.device)
            y = self.inner(h[tok], ones, (by_expert[a:b] - first)[:, None], stack)
            out.index_add_(0, tok, (y * weights[tok, pos, None]).to(out.dtype))
        return out


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
