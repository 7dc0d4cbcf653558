"""Expert FFN kernels for one micro-batch (EPS-MoE): which is fastest depends on tokens per expert.

Every kernel computes sum_k w[t, k] * expert_{ids[t, k]}(h[t]) with expert weights read through the
page table of an `ExpertStack`, so resident and streamed experts are handled alike.
- loop:    one pair of GEMMs per active expert (best at a few tokens per expert; matches transformers'
           own loop in accumulation order, so it is the reference engine's kernel).
- grouped: tokens sorted by expert, one `torch.nn.functional.grouped_mm` per projection.
- padded:  tokens scattered into an [experts, capacity, H] batch and one `bmm` per projection.
- dense:   every active expert on every token, masked (wins only for tiny hidden sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_lightning.engine.model import ExpertStack, MoEKernel, expert_ffn


def _assignments(ids: torch.Tensor, num_experts: int):
    """Flatten (token, k) pairs sorted by expert: -> token index, k index, active experts, counts."""
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    active = torch.nonzero(counts).flatten().tolist()
    k = ids.shape[1]
    return order // k, order % k, active, counts


def moe_loop(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
    out = torch.zeros_like(h)
    for e in torch.unique(ids).tolist():
        tok, pos = torch.where(ids == e)
        s = experts.slot_of[e]
        y = expert_ffn(h[tok], experts.w13[s], experts.w2[s]) * weights[tok, pos, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def _slots(experts: ExpertStack, active: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([experts.slot_of[e] for e in active], device=device)


def moe_grouped(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
    tok, pos, active, counts = _assignments(ids, len(experts.slot_of))
    slots = _slots(experts, active, h.device)
    offs = torch.cumsum(counts[active], 0).to(torch.int32)
    x = h[tok]                                                              # [A, H] sorted by expert
    gate, up = F.grouped_mm(x, experts.w13[slots].transpose(1, 2), offs=offs).chunk(2, dim=-1)
    y = F.grouped_mm(F.silu(gate) * up, experts.w2[slots].transpose(1, 2), offs=offs)  # [A, H]
    y = y * weights[tok, pos, None]
    return torch.zeros_like(h).index_add_(0, tok, y.to(h.dtype))


def moe_padded(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
    tok, pos, active, counts = _assignments(ids, len(experts.slot_of))
    slots = _slots(experts, active, h.device)
    c = counts[active]
    capacity = int(c.max())
    # Row of each assignment inside its expert's padded block.
    starts = torch.cumsum(c, 0) - c
    group = torch.repeat_interleave(torch.arange(len(active), device=h.device), c)
    row = torch.arange(tok.numel(), device=h.device) - starts[group]
    x = h.new_zeros(len(active), capacity, h.shape[1])
    x[group, row] = h[tok]
    gate, up = torch.bmm(x, experts.w13[slots].transpose(1, 2)).chunk(2, dim=-1)
    y = torch.bmm(F.silu(gate) * up, experts.w2[slots].transpose(1, 2))[group, row]
    y = y * weights[tok, pos, None]
    return torch.zeros_like(h).index_add_(0, tok, y.to(h.dtype))


def moe_dense(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
    active = torch.unique(ids).tolist()
    slots = _slots(experts, active, h.device)
    gate, up = torch.matmul(h[None], experts.w13[slots].transpose(1, 2)).chunk(2, dim=-1)
    y = torch.matmul(F.silu(gate) * up, experts.w2[slots].transpose(1, 2))   # [A, T, H]
    # Combine weight of each active expert for each token (0 where not routed).
    combine = torch.zeros(len(active), h.shape[0], dtype=weights.dtype, device=h.device)
    index = {e: i for i, e in enumerate(active)}
    lookup = torch.tensor([index.get(e, -1) for e in range(len(experts.slot_of))], device=h.device)
    t = torch.arange(h.shape[0], device=h.device)[:, None].expand_as(ids)
    combine[lookup[ids], t] = weights
    return (y * combine[..., None]).sum(0).to(h.dtype)


KERNELS: dict[str, MoEKernel] = {
    "loop": moe_loop,
    "grouped": moe_grouped,
    "padded": moe_padded,
    "dense": moe_dense,
}
