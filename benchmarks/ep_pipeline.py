"""Expert-parallel MoE layer, EPS-MoE's pipelined all-to-all against the unpipelined layer, side by side.

For 2 and 4 ranks (CPU processes over gloo, this host's cores split between them), one MoE layer's
prefill (every rank: `--tokens` tokens routed top-k over `--experts` experts split across the ranks):
- unpipelined: dispatch all rows, compute, combine (`ep_moe(chunks=1)`);
- pipelined: the same in C chunks, chunk c+1's dispatch and c-1's combine in flight during c's GEMMs,
  C from `pipeline_chunks` on rates measured in this run (an all-to-all of the dispatch's bytes, and
  the local experts on all the rows a rank receives and on an eighth of them, which gives a chunk's
  fixed cost), and at a fixed `--chunks` for comparison.
Rounds interleave the variants; a round's time is the slowest rank's (an all-reduce of each rank's
wall time after a barrier). Throughput = ranks x tokens / time (tokens/s, measured on this host);
speed-up = unpipelined median / pipelined median, with the paired rounds' range.

    python benchmarks/ep_pipeline.py                 # writes results/ep_pipeline_<time>.json
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
RESULTS = Path(__file__).resolve().parents[1] / "results"


def _rank(rank: int, world: int, port: int, args: dict, out: str) -> None:
    from moe_lightning.engine.expert_parallel import ep_moe, expert_slice, pipeline_chunks
    from moe_lightning.threads import detect_cores

    torch.set_num_threads(max(1, detect_cores().count // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    E, H, F, T, K = args["experts"], args["hidden"], args["ffn"], args["tokens"], args["top_k"]
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(E, 2 * F, H, generator=g) * 0.02, torch.randn(E, H, F, generator=g) * 0.02
    g = torch.Generator().manual_seed(1 + rank)
    h = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    mine = expert_slice(w13, w2, rank, world)

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed)

    # Rates for the chunk model, measured here: the dispatch's all-to-all, and the local experts.
    rows = h.repeat_interleave(K, dim=0)
    landing = torch.empty_like(rows)
    a2a_s = statistics.median(timed(lambda: dist.all_to_all_single(landing, rows)) for _ in range(5))
    small = torch.empty(world, dtype=torch.float32)
    latency_s = statistics.median(timed(lambda: dist.all_to_all_single(small.clone(), small)) for _ in range(5))
    from moe_lightning.engine.experts import KERNELS

    kernel = KERNELS["grouped" if "grouped" in KERNELS else "loop"]

    def gemm_s(n: int) -> float:   # the local experts on n received rows
        ids_n, ones = torch.randint(0, E // world, (n, 1)), torch.ones(n, 1)
        return statistics.median(timed(lambda: kernel(rows[:n], ones, ids_n, mine)) for _ in range(3))

    # A chunk's GEMM time is fixed + per row: fitted from all the rows and an eighth of them.
    n_full, n_part = T * K, max(1, T * K // 8)
    full, part = gemm_s(n_full), gemm_s(n_part)
    per_row = max((full - part) / (n_full - n_part), 1e-12)
    launch = max(full - per_row * n_full, 0.0)
    flops = 2 * T * K * 3 * H * F
    model = pipeline_chunks(rows.numel() * 4, flops, latency_s=latency_s,
                            bytes_per_s=rows.numel() * 4 / max(a2a_s - latency_s, 1e-9), launch_s=launch,
                            flops_per_s=flops / (per_row * n_full), max_chunks=args["max_chunks"])
    variants = {"unpipelined": 1, f"pipelined C={model} (model)": model,
                f"pipelined C={args['chunks']}": args["chunks"]}
    for c in set(variants.values()):   # warm-up
        ep_moe(h, weights, ids, mine, E, chunks=c)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args["rounds"]):
        for name, c in variants.items():
            times[name].append(timed(lambda c=c: ep_moe(h, weights, ids, mine, E, chunks=c)))
    if rank == 0:
        from moe_lightning.files import write_json

        write_json(out, {
            "ranks": world, "threads_per_rank": torch.get_num_threads(), "model_chunks": model,
            "measured_rates": {"a2a_s_full_dispatch": a2a_s, "a2a_latency_s": latency_s, "expert_gemm_s": full,
                               "expert_gemm_s_eighth": part, "gemm_fixed_s": launch,
                               "dispatch_bytes_per_rank": rows.numel() * 4},
            "seconds": times})
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main() -> int:
    from moe_lightning.bench_args import Parser, check_out_file, positive_int, positive_ints

    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=positive_ints, default="2,4", help="world sizes to run, comma-separated")
    ap.add_argument("--experts", type=positive_int, default=8)
    ap.add_argument("--hidden", type=positive_int, default=1024)
    ap.add_argument("--ffn", type=positive_int, default=512)
    ap.add_argument("--tokens", type=positive_int, default=512, help="per rank")
    ap.add_argument("--top-k", type=positive_int, default=2)
    ap.add_argument("--chunks", type=positive_int, default=4, help="the fixed pipelined variant")
    ap.add_argument("--max-chunks", type=positive_int, default=8)
    ap.add_argument("--rounds", type=positive_int, default=11)
    ap.add_argument("--out", default="", help=f"JSON path (default {RESULTS}/ep_pipeline_<time>.json)")
    parsed = ap.parse_args()
    uneven = [w for w in parsed.ranks if parsed.experts % w]
    if uneven:
        ap.error(f"argument --ranks: {parsed.experts} experts do not split evenly over {uneven[0]} ranks")
    if parsed.top_k > parsed.experts:
        ap.error(f"argument --top-k: {parsed.top_k} is more than the {parsed.experts} experts")
    # The record is written after every world size has run: a path that cannot be written is refused first.
    out = check_out_file(ap, parsed.out, "--out") if parsed.out else \
        RESULTS / f"ep_pipeline_{time.strftime('%Y%m%d-%H%M%S')}.json"
    args = {**vars(parsed), "ranks": ",".join(map(str, parsed.ranks))}   # the record's config, as typed
    from moe_lightning.bench_args import busy_warning
    from moe_lightning.files import write_json
    from moe_lightning.hostload import HostLoad
    from moe_lightning.report import environment

    record = {"schema_version": 1, "kind": "measured", "benchmark": "ep_pipeline",
              "where": "this host: CPU processes over gloo (loopback TCP)",
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "environment": environment(),
              "config": args, "units": "seconds per MoE layer (slowest rank); tokens/s over all ranks", "runs": []}
    print(f"MoE layer prefill, {args['experts']} experts H={args['hidden']} F={args['ffn']} top-{args['top_k']}, "
          f"{args['tokens']} tokens per rank, fp32, measured on this host (gloo CPU ranks), {args['rounds']} rounds")
    for world in parsed.ranks:
        # rank 0 hands its times over in a scratch file (not under results/, where a failed run left it)
        with tempfile.TemporaryDirectory(prefix="ep_pipeline_") as scratch:
            tmp = Path(scratch) / f"rank0_{os.getpid()}.json"
            with HostLoad() as load:   # the ranks are this process's children: their CPU is not "others"
                mp.spawn(_rank, args=(world, _port(), args, str(tmp)), nprocs=world, join=True)
            run = json.loads(tmp.read_text())
            run["host_load"] = load.report.to_dict()
        base = run["seconds"]["unpipelined"]
        run["summary"] = {}
        for name, xs in run["seconds"].items():
            paired = [b / x for b, x in zip(base, xs)]
            run["summary"][name] = {"seconds": _spread(xs),
                                    "tokens_per_s": world * args["tokens"] / statistics.median(xs),
                                    "speedup_vs_unpipelined": statistics.median(base) / statistics.median(xs),
                                    "paired_speedup": _spread(paired)}
            s = run["summary"][name]
            print(f"  {world} ranks  {name:<26} {s['seconds']['median'] * 1e3:8.2f} ms "
                  f"[{s['seconds']['min'] * 1e3:.2f}-{s['seconds']['max'] * 1e3:.2f}]  "
                  f"{s['tokens_per_s']:9.0f} tok/s  x{s['speedup_vs_unpipelined']:.2f} "
                  f"(paired {s['paired_speedup']['min']:.2f}-{s['paired_speedup']['max']:.2f})")
        r = run["measured_rates"]
        print(f"  {world} ranks  measured: dispatch all-to-all {r['a2a_s_full_dispatch'] * 1e3:.2f} ms, "
              f"latency {r['a2a_latency_s'] * 1e3:.3f} ms, expert GEMMs {r['expert_gemm_s'] * 1e3:.2f} ms "
              f"(an eighth of the rows {r['expert_gemm_s_eighth'] * 1e3:.2f} ms: fixed "
              f"{r['gemm_fixed_s'] * 1e3:.2f} ms a chunk) -> model C = {run['model_chunks']}")
        record["runs"].append(run)
        if warning := busy_warning([run["host_load"]]):
            print(f"  {world} ranks  {warning}")
    write_json(out, record, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    from moe_lightning.bench_args import guard

    sys.exit(guard(main))
