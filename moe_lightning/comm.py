"""Communication cost models of several-GPU runs, torch-free (the planner, the simulator and the engine
share them): collectives on the inter-GPU link and EPS-MoE's pipelined all-to-all.

Modelled (`latency_s` per message step, `bytes_per_s` per GPU and per direction, `n` ranks):
- ring all-reduce of `nbytes` per rank: `2 (n - 1) latency + 2 (n - 1) / n * nbytes / bandwidth`
  (reduce-scatter then all-gather, each `n - 1` steps moving `nbytes / n`);
- all-to-all of a rank's `nbytes` send buffer: `latency + (n - 1) / n * nbytes / bandwidth` (every
  peer's share at once; its own share stays), the same again for the combine;
- EPS-MoE's pipelined expert layer (`eps_moe_s`): the dispatch, the expert GEMMs and the combine split
  into `C` chunks, the dispatch of chunk c+1 and the combine of chunk c-1 overlapping the GEMMs of
  chunk c, each chunk paying the message latency and a kernel launch.
Functions are elementwise over numpy arrays as well as floats.

Not modelled: link contention between concurrent collectives of different groups (a tensor group's
all-reduce beside the expert group's all-to-all), peer traffic that crosses the host bridge competing
with the H2D expert stream on a PCIe machine, NCCL's choice of tree against ring, the SMs a collective
takes from the GEMMs (EPS-MoE caps them), and expert load imbalance (all-to-all sends are even).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# A chunk's fixed cost beside its message latency: one more expert-kernel launch (the launch cost the
# simulator charges a GPU task, `tuner.costs.GPU_LAUNCH_S`).
CHUNK_LAUNCH_S = 20e-6
MAX_CHUNKS = 16


def all_reduce_s(nbytes: Any, ranks: int, *, latency_s: float, bytes_per_s: float) -> Any:
    """Ring all-reduce of `nbytes` (each rank's buffer) over `ranks` ranks; 0 for one rank."""
    if ranks <= 1:
        return 0.0 * nbytes
    return 2 * (ranks - 1) * latency_s + 2 * (ranks - 1) / ranks * nbytes / bytes_per_s


def all_to_all_s(nbytes: Any, ranks: int, *, latency_s: float, bytes_per_s: float) -> Any:
    """One all-to-all (a dispatch or a combine) of a rank's `nbytes` send buffer; 0 for one rank."""
    if ranks <= 1:
        return 0.0 * nbytes
    return latency_s + (ranks - 1) / ranks * nbytes / bytes_per_s


def eps_moe_s(comm_s: Any, gemm_s: Any, chunks: int, *, latency_s: float, launch_s: float = CHUNK_LAUNCH_S) -> Any:
    """Expected time of an expert-parallel MoE layer in `chunks` pipelined chunks:

        T(C) = 2 d + g + (C - 1) max(2 d, g),   d = latency + comm_s / C,   g = launch + gemm_s / C

    `comm_s`: the transfer time (no latency) of the whole dispatch, the combine being as long; `gemm_s`:
    the expert GEMMs of all the chunks together. A chunk's dispatch and combine share the link; the
    first chunk's dispatch and the last one's combine are not hidden. C = 1 is the unpipelined layer:
    dispatch, GEMMs, combine in a row."""
    d = latency_s + comm_s / chunks
    g = launch_s + gemm_s / chunks
    return 2 * d + g + (chunks - 1) * np.maximum(2 * d, g)


def best_eps_moe_s(comm_s: Any, gemm_s: Any, *, latency_s: float, launch_s: float = CHUNK_LAUNCH_S,
                   chunks: int = 0, max_chunks: int = MAX_CHUNKS) -> tuple[Any, Any]:
    """(time, chunk count) of `eps_moe_s` at `chunks`, or with 0 at the best count in 1..max_chunks
    (elementwise: each point its own best; ties to the fewer chunks)."""
    if chunks:
        t = eps_moe_s(comm_s, gemm_s, chunks, latency_s=latency_s, launch_s=launch_s)
        return t, 0 * np.asarray(t, dtype=np.int64) + chunks
    best = eps_moe_s(comm_s, gemm_s, 1, latency_s=latency_s, launch_s=launch_s)
    count = 0 * np.asarray(best, dtype=np.int64) + 1
    for c in range(2, max_chunks + 1):
        t = eps_moe_s(comm_s, gemm_s, c, latency_s=latency_s, launch_s=launch_s)
        count = np.where(t < best, c, count)
        best = np.minimum(t, best)
    return best, count


def pipeline_chunks(comm_bytes: float, gemm_flops: float, *, latency_s: float, bytes_per_s: float,
                    launch_s: float, flops_per_s: float, max_chunks: int = MAX_CHUNKS) -> int:
    """EPS-MoE's chunk count: the C minimising the pipelined layer time `eps_moe_s` with
    `comm_s = comm_bytes / bandwidth` and `gemm_s = gemm_flops / rate`. C = 1 is the unpipelined layer;
    more chunks hide more communication until each chunk's fixed costs (latency, kernel launch)
    outweigh it."""
    comm_s, gemm_s = comm_bytes / bytes_per_s, gemm_flops / flops_per_s
    return min(range(1, max_chunks + 1),
               key=lambda c: float(eps_moe_s(comm_s, gemm_s, c, latency_s=latency_s, launch_s=launch_s)))
