"""Expert FFN kernels for one micro-batch (EPS-MoE): which is fastest depends on tokens per expert.

Every kernel computes sum_k w[t, k] * expert_{ids[t, k]}(h[t]) with expert weights read in place
through the page table of an `ExpertStack` (resident and streamed experts alike):
- loop:    one pair of GEMMs per active expert (best at a few tokens per expert; it matches
           transformers' own loop in accumulation order, so it is the reference engine's kernel).
- grouped: tokens sorted by expert, one `torch.nn.functional.grouped_mm` per projection and region.
- padded:  tokens scattered into a [experts, capacity, H] batch, one `bmm` per projection and region.
- dense:   every expert of a region on every token, combined by the routing weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_lightning.models.layers import ExpertStack, MoEKernel, stack_expert_ffn


def moe_loop(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
    out = torch.zeros_like(h)
    for e in torch.unique(ids).tolist():
        tok, pos = torch.where(ids == e)
        # One statement: the expert's weighted rows are freed before the next expert runs (held in a loop
        # variable, they stayed beside its whole FFN; the plan holds one expert's rows at a time).
        out.index_add_(0, tok, (stack_expert_ffn(h[tok], experts, e) * weights[tok, pos, None]).to(out.dtype))
    return out


def _biased(x: torch.Tensor, b: torch.Tensor | None, ids: torch.Tensor, tok: torch.Tensor,
            pos: torch.Tensor) -> torch.Tensor:
    """x plus each row's expert's bias (row r: expert ids[tok[r], pos[r]]); x itself, with nothing allocated,
    when the experts have none."""
    return x if b is None else x + b[ids[tok, pos]]


def _by_region(ids: torch.Tensor, experts: ExpertStack):
    """Yield, per region: (token idx, k idx, index-in-region) of its assignments, sorted by index."""
    region = torch.tensor([r for r, _ in experts.slot_of], device=ids.device)[ids]      # [T, k]
    local = torch.tensor([i for _, i in experts.slot_of], device=ids.device)[ids]       # [T, k]
    k = ids.shape[1]
    for r in range(len(experts.w13)):
        flat = torch.nonzero((region == r).reshape(-1)).flatten()
        if flat.numel() == 0:
            continue
        order = flat[torch.argsort(local.reshape(-1)[flat], stable=True)]
        yield r, order // k, order % k, local.reshape(-1)[order]


def moe_grouped(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
    out = torch.zeros_like(h)
    for r, tok, pos, idx in _by_region(ids, experts):
        w13, w2 = experts.w13[r], experts.w2[r]
        offs = torch.cumsum(torch.bincount(idx, minlength=w13.shape[0]), 0).to(torch.int32)
        gate_up = _biased(F.grouped_mm(h[tok], w13.transpose(1, 2), offs=offs), experts.b13, ids, tok, pos)
        y = _biased(F.grouped_mm(experts.activate(gate_up), w2.transpose(1, 2), offs=offs), experts.b2, ids, tok, pos)
        y = y * weights[tok, pos, None]
        out.index_add_(0, tok, y.to(h.dtype))
    return out


def moe_padded(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
    out = torch.zeros_like(h)
    for r, tok, pos, idx in _by_region(ids, experts):
        w13, w2 = experts.w13[r], experts.w2[r]
        counts = torch.bincount(idx, minlength=w13.shape[0])
        row = torch.arange(idx.numel(), device=h.device) - (torch.cumsum(counts, 0) - counts)[idx]
        x = h.new_zeros(w13.shape[0], int(counts.max()), h.shape[1])                  # [n_r, C, H]
        x[idx, row] = h[tok]
        gate_up = torch.bmm(x, w13.transpose(1, 2))
        if experts.b13 is not None:
            gate_up = gate_up + experts.b13[experts.region_experts(r)][:, None]
        y = _biased(torch.bmm(experts.activate(gate_up), w2.transpose(1, 2))[idx, row], experts.b2, ids, tok, pos)
        y = y * weights[tok, pos, None]
        out.index_add_(0, tok, y.to(h.dtype))
    return out


def moe_dense(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
    out = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
    for r, tok, pos, idx in _by_region(ids, experts):
        w13, w2 = experts.w13[r], experts.w2[r]
        gate_up = torch.matmul(h[None], w13.transpose(1, 2))
        if experts.b13 is not None:
            gate_up = gate_up + experts.b13[experts.region_experts(r)][:, None]
        y = torch.matmul(experts.activate(gate_up), w2.transpose(1, 2))               # [n_r, T, H]
        if experts.b2 is not None:
            y = y + experts.b2[experts.region_experts(r)][:, None]
        combine = torch.zeros(w13.shape[0], h.shape[0], dtype=torch.float32, device=h.device)
        combine[idx, tok] = weights[tok, pos].float()   # DBRX's and gpt-oss's routers weight in the model dtype
        out += (y.float() * combine[..., None]).sum(0)
    return out.to(h.dtype)


KERNELS: dict[str, MoEKernel] = {
    "loop": moe_loop,
    "grouped": moe_grouped,
    "padded": moe_padded,
    "dense": moe_dense,
}
if not hasattr(F, "grouped_mm"):  # torch < 2.10: the profiler and `auto` never pick it
    del KERNELS["grouped"]
