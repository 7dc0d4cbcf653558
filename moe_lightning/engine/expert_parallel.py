"""Expert parallelism over torch.distributed, with EPS-MoE's pipelined all-to-all.

Each of R ranks holds the experts [r E/R, (r+1) E/R) of a layer and its own tokens. A MoE layer:
1. dispatch: every (token, chosen expert) pair's hidden row goes to the rank owning the expert
   (`all_to_all_single` with per-rank counts, exchanged first), with the expert's local index;
2. compute: each rank runs its experts on the rows it received (one of the shared MoE kernels, picked
   per chunk from its load: `kernel_for_load`, or the engine's `KernelChooser` from the measured profile);
3. combine: the outputs go back the way they came, and each rank sums them into its tokens, weighted
   by the router.
EPS-MoE splits the tokens into C chunks and pipelines them: the dispatch of chunk c+1 and the combine of
chunk c-1 are in flight (gloo / NCCL run them off the calling thread) while chunk c's expert GEMMs run,
so communication hides behind compute. C comes from a model of the two (`pipeline_chunks`).
Every rank must call `ep_moe` with the same chunk count (the collectives pair up in order).

Placement-free like the kernels: the tensors' device is the process group's (gloo: CPU; NCCL: CUDA).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moe_lightning.comm import pipeline_chunks  # noqa: F401 - EPS-MoE's chunk count, re-exported
from moe_lightning.engine.experts import KERNELS
from moe_lightning.models.layers import ExpertStack, MoEKernel

# Rows per local expert from which the default rule sorts them for grouped_mm instead of one GEMM pair
# per expert (loop); a `KernelChooser` passed as `kernel` decides from the measured profile instead.
GROUPED_FROM_LOAD = 4.0


@dataclass
class Trace:
    """When each stage of each chunk ran on this rank (seconds from `t0`): `spans` ('dispatch', c) and
    ('combine', c) from issue until the caller's wait returned, ('gemm', c) from start to end; `done`
    the moment each all-to-all itself completed (its future's callback, on the backend's thread)."""

    t0: float = field(default_factory=time.perf_counter)
    spans: dict[tuple[str, int], tuple[float, float]] = field(default_factory=dict)
    done: dict[tuple[str, int], float] = field(default_factory=dict)
    kernels: list[str] = field(default_factory=list)

    def watch(self, work, stage: str, c: int) -> None:
        work.get_future().then(lambda _: self.done.__setitem__((stage, c), self.now()))

    def now(self) -> float:
        return time.perf_counter() - self.t0


def kernel_for_load(rows: int, local_experts: int) -> str:
    """The expert kernel for a chunk of `rows` dispatched rows over `local_experts` experts."""
    grouped = "grouped" in KERNELS and rows / max(1, local_experts) >= GROUPED_FROM_LOAD
    return "grouped" if grouped else "loop"


def _a2a(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=True)


def ep_moe(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertStack, num_experts: int,
           *, chunks: int = 1, group=None, kernel: str | MoEKernel | None = None,
           trace: Trace | None = None) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(h[t]) for this rank's tokens h [T, H], with the experts
    spread over the group's ranks (`experts`: this rank's, local indices 0..E/R-1). `chunks` > 1 pipelines
    the all-to-alls against the expert GEMMs. `kernel`: a kernel's name, a `MoEKernel` called per chunk
    (a `KernelChooser` picks by the chunk's load from the profile), or None for `kernel_for_load`.
    Each token's outputs are summed in increasing expert order, as `moe_loop` sums them."""
    R = dist.get_world_size(group)
    per_rank = num_experts // R
    if per_rank * R != num_experts or len(experts.slot_of) != per_rank:
        raise ValueError(f"{num_experts} experts over {R} ranks: each rank holds {num_experts / R}, "
                         f"this one {len(experts.slot_of)}")
    if experts.b13 is not None and experts.b13.shape[0] == num_experts:   # biases of every expert (by global
        mine = slice(dist.get_rank(group) * per_rank, (dist.get_rank(group) + 1) * per_rank)   # id): this rank's
        experts = dataclasses.replace(experts, b13=experts.b13[mine],
                                      b2=None if experts.b2 is None else experts.b2[mine])
    T, k = ids.shape
    bounds = [round(c * T / chunks) for c in range(chunks + 1)]
    # Each chunk's (token, k) pairs sorted by expert (so by owning rank), and its counts per rank.
    plans = []
    for c in range(chunks):
        flat = ids[bounds[c]:bounds[c + 1]].reshape(-1)
        order = torch.argsort(flat, stable=True)
        expert = flat[order]
        plans.append((order, expert, torch.bincount(expert // per_rank, minlength=R)))
    counts = torch.stack([p[2] for p in plans])                              # [chunks, R]: to rank q in chunk c
    recv_counts = torch.empty(R * chunks, dtype=counts.dtype, device=counts.device)
    # One exchange for every chunk: rank q's block holds what this rank sends it in each chunk.
    dist.all_to_all_single(recv_counts, counts.t().contiguous().view(-1), group=group)
    send = counts.tolist()
    recv = recv_counts.view(R, chunks).t().tolist()                          # [c][q]: from rank q in chunk c

    out = torch.zeros_like(h)
    pending: dict[int, tuple] = {}

    def issue_dispatch(c: int) -> None:
        order, expert, _ = plans[c]
        tok = bounds[c] + order // k
        rows = h[tok]
        got_rows = h.new_empty(sum(recv[c]), h.shape[1])
        got_ids = torch.empty(sum(recv[c]), dtype=torch.int64, device=h.device)
        t = trace.now() if trace else 0.0
        works = (_a2a(got_ids, (expert % per_rank).contiguous(), recv[c], send[c], group),
                 _a2a(got_rows, rows, recv[c], send[c], group))
        if trace:
            trace.watch(works[1], "dispatch", c)
        pending[c] = (works, got_rows, got_ids, tok, order, t)

    def issue_combine(c: int, done: torch.Tensor, tok: torch.Tensor, order: torch.Tensor) -> tuple:
        back = h.new_empty(len(tok), h.shape[1])
        t = trace.now() if trace else 0.0
        work = _a2a(back, done, send[c], recv[c], group)
        if trace:
            trace.watch(work, "combine", c)
        return work, back, tok, order, t

    combines = []
    issue_dispatch(0)
    for c in range(chunks):
        if c + 1 < chunks:
            issue_dispatch(c + 1)                       # in flight while chunk c computes
        works, got_rows, got_ids, tok, order, t_issue = pending.pop(c)   # the rows sent are freed here
        for w in works:
            w.wait()
        del works
        if trace:
            trace.spans["dispatch", c] = (t_issue, trace.now())
        run = kernel if callable(kernel) else KERNELS[kernel or kernel_for_load(len(got_ids), per_rank)]
        t_gemm = trace.now() if trace else 0.0
        ones = torch.ones(len(got_ids), 1, dtype=torch.float32, device=h.device)
        done = run(got_rows, ones, got_ids[:, None], experts) if len(got_ids) else got_rows
        del got_rows   # the rows received: the kernel's output alone goes back
        if trace:
            trace.spans["gemm", c] = (t_gemm, trace.now())
            trace.kernels.append(getattr(run, "__name__", type(run).__name__))
        combines.append((c, *issue_combine(c, done, tok, order)))
        del done
    while combines:   # each chunk's buffers are dropped once used (`memory.expert_parallel_workspace`)
        c, work, back, tok, order, t_issue = combines.pop(0)
        work.wait()
        del work   # and with it the output sent back
        if trace:
            trace.spans["combine", c] = (t_issue, trace.now())
        pos = order % k
        w = weights[tok, pos, None]
        out.index_add_(0, tok, (back * w).to(out.dtype))
        del back
    return out


class ExpertParallelKernel:
    """An `MoEKernel` for ranks that all hold the same tokens (attention replicated; the engines' expert
    groups hold their own, `engine.data_parallel`): each rank routes its contiguous share of the tokens through
    `ep_moe`, and the shares are all-gathered, so every rank ends with every token's output. Its
    `experts` argument is this rank's (`local_experts`). `chunks`: per layer, or a function of the
    layer's token count (the same on every rank, so every rank pipelines alike)."""

    def __init__(self, num_experts: int, group=None, chunks: int | Callable[[int], int] = 1,
                 kernel: str | MoEKernel | None = None):
        self.num_experts, self.group, self.chunks, self.kernel = num_experts, group, chunks, kernel
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def __call__(self, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 experts: ExpertStack) -> torch.Tensor:
        T, share = h.shape[0], -(-h.shape[0] // self.world)
        a, b = min(self.rank * share, T), min((self.rank + 1) * share, T)
        chunks = self.chunks(T) if callable(self.chunks) else self.chunks
        mine = ep_moe(h[a:b], weights[a:b], ids[a:b], experts, self.num_experts, chunks=chunks,
                      group=self.group, kernel=self.kernel)
        padded = h.new_zeros(share, h.shape[1])
        padded[:b - a] = mine
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)[:T]

    def local_experts(self, w13: torch.Tensor, w2: torch.Tensor) -> ExpertStack:
        return expert_slice(w13, w2, self.rank, self.world)


def expert_slice(w13: torch.Tensor, w2: torch.Tensor, rank: int, world: int) -> ExpertStack:
    """This rank's experts of a layer's stacked (w13 [E, 2F, H], w2 [E, H, F]), as an ExpertStack."""
    per_rank = w13.shape[0] // world
    if per_rank * world != w13.shape[0]:
        raise ValueError(f"{w13.shape[0]} experts do not split over {world} ranks")
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    return ExpertStack.single(w13[rows], w2[rows])

