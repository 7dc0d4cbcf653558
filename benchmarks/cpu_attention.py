"""CPU paged decode attention against this machine's memcpy, side by side and interleaved in one run.

Decode attention reads each sequence's K and V once, so at best it runs at memory bandwidth. For each
point (storage dtype x context x batch, Mixtral-8x7B heads: 32 query heads, 8 kv heads, head_dim 128)
it times, round-robin in one process with the same thread count:
- attention, the C++ kernel (`moe_lightning.kernels.cpu_attention`) over a block pool with a shuffled
  block table (what a pool looks like after requests come and go);
- attention, the pure-PyTorch fallback (fewer rounds: it is slow);
- memcpy: a torch copy of a buffer of the same bytes;
- read: a torch sum over a buffer of the same bytes (a read-only pass; attention only reads).

Units (decimal GB/s, capacities in GiB):
- attention_gbps = bytes of K and V read (sum of context lengths x kv heads x head_dim x 2 x dtype
  size) / time. q, the output and the block table are not counted (under 0.1% here).
- memcpy_gbps = 2 x buffer bytes / time (read + write, the issue's convention; the write-allocate
  read of the destination is real traffic that this does not count, so the copy moves 1.5x this).
- read_gbps = buffer bytes / time.
- ratio = median attention_gbps / median memcpy_gbps (the issue's goal: >= 0.8); paired ratios of
  the same round are reported too, as their spread says how much the host's load moved.

Working sets under 4x the last-level cache are rotated over several copies (pools and buffers), so
each call starts from DRAM, not from cache. Two extra sections say what bounds the ratio: the same
kernel on a pool of one block per kv head (cache-resident: its arithmetic ceiling) and everything on
one thread. Each point holds the host-wide measurement lock and records the host's load.

    python benchmarks/cpu_attention.py                       # all points, writes results/cpu_attention_<ts>.json
    python benchmarks/cpu_attention.py --dtypes bfloat16 --contexts 4096 --batches 64 --repeats 21
    # gpt-oss-20b's heads (64 / 8, head_dim 64) with its attention sinks, a sliding layer (window 128):
    python benchmarks/cpu_attention.py --heads 64 --kv-heads 8 --head-dim 64 --sinks --window 128

With `--window W` each sequence reads only its last W tokens (a sliding layer), and the bytes counted
are those: min(context, W) tokens per sequence. `speedup` is the kernel against the PyTorch fallback in
the same rounds (the fallback is what ran gpt-oss's layers before the kernel took sinks and windows).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent.parent / "results"
GiB = 1 << 30
UNSTABLE_SPREAD = 0.10     # interquartile range / median above this: the point is flagged unstable


def host_info(threads: int) -> dict:
    from moe_lightning.threads import detect_cores

    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    model, cpuid, flags = None, {}, set()
    for line in (read("/proc/cpuinfo") or "").splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model name" and model is None:
            model = value
        elif key in ("cpu family", "model", "stepping") and key not in cpuid:
            cpuid[key] = value
        elif key == "flags" and not flags:
            flags = set(value.split())
    mem_kib = next((int(line.split()[1]) for line in (read("/proc/meminfo") or "").splitlines()
                    if line.startswith("MemTotal:")), None)
    llc = read("/sys/devices/system/cpu/cpu0/cache/index3/size")
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16")
           if f in flags]
    return {"cpu_model": model or platform.processor() or platform.machine(), "cpuid": cpuid, "isa": isa,
            "hypervisor": "hypervisor" in flags, "logical_cpus": os.cpu_count(),
            "cores": dataclasses.asdict(detect_cores()), "threads_used": threads,
            "memory_total_gib": round(mem_kib / (1 << 20), 2) if mem_kib else None,
            "llc": llc, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "transparent_hugepages": read("/sys/kernel/mm/transparent_hugepage/enabled")}


def llc_bytes() -> int:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip().upper()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text)
    except (OSError, ValueError, KeyError):
        return 32 << 20


def stats(values: list[float]) -> dict:
    v = sorted(values)
    q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0]] * 3
    med = statistics.median(v)
    return {"median": round(med, 3), "min": round(v[0], 3), "max": round(v[-1], 3), "p25": round(q[0], 3),
            "p75": round(q[2], 3), "spread": round((q[2] - q[0]) / med, 4) if med else None, "n": len(v)}


@dataclasses.dataclass
class Point:
    dtype: str
    batch: int
    context: int
    block_size: int
    heads: int
    kv_heads: int
    head_dim: int
    window: int = 0       # 0: full attention
    sinks: bool = False   # an attention-sink logit per query head (gpt-oss)

    @property
    def kv_bytes(self) -> int:
        """K and V bytes read: each sequence's last `window` tokens (all of them without a window)."""
        size = torch.empty((), dtype=self.torch_dtype).element_size()
        read = min(self.context, self.window) if self.window else self.context
        return 2 * self.batch * read * self.kv_heads * self.head_dim * size

    def extra(self, gen: torch.Generator) -> dict:
        """The keyword arguments of `paged_decode_attention` beyond the pools: window and sinks."""
        return {"window": self.window or None,
                "sinks": torch.randn(self.heads, generator=gen) if self.sinks else None}

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def make_inputs(p: Point, gen: torch.Generator, same_block: bool = False):
    """Pools of exactly the blocks the batch needs, a shuffled table; `same_block`: every table entry
    is block 0 (the pool stays in cache: the kernel's arithmetic ceiling)."""
    per_seq = math.ceil(p.context / p.block_size)
    num_blocks = 1 if same_block else p.batch * per_seq
    table = (torch.zeros(p.batch * per_seq, dtype=torch.int32) if same_block
             else torch.randperm(num_blocks, generator=gen).int()).view(p.batch, per_seq)
    shape = (num_blocks, p.kv_heads, p.block_size, p.head_dim)
    k_pool = torch.empty(shape, dtype=p.torch_dtype).normal_(generator=gen)
    v_pool = torch.empty(shape, dtype=p.torch_dtype).normal_(generator=gen)
    q = torch.randn(p.batch, p.heads, p.head_dim, generator=gen).to(p.torch_dtype)
    lens = torch.full((p.batch,), p.context, dtype=torch.int32)
    return q, k_pool, v_pool, table, lens


def same_rounds_ratio(a: list[float], b: list[float]) -> float:
    """median(a) / median(b) over the rounds both ran: `b` (the fallback) ran in the first len(b) rounds
    only, and the kernel's median over every round is not the same moment's (the host drifts)."""
    return statistics.median(a[:len(b)]) / statistics.median(b)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_point(p: Point, repeats: int, fallback_repeats: int, ext, rng: random.Random, gen: torch.Generator,
                  with_fallback: bool = True) -> dict:
    from moe_lightning.hostload import HostLoad, measurement_lock
    from moe_lightning.kernels.cpu_attention import paged_decode_attention_torch

    nbytes = p.kv_bytes
    sets = max(1, min(8, math.ceil(4 * llc_bytes() / nbytes)))
    inputs = [make_inputs(p, gen) for _ in range(sets)]
    bufs = [(torch.empty(nbytes, dtype=torch.uint8).fill_(1), torch.zeros(nbytes, dtype=torch.uint8))
            for _ in range(sets)]
    scale = p.head_dim ** -0.5
    kw = p.extra(gen)
    window, sinks = kw["window"] or 0, kw["sinks"]
    calls = {"kernel": lambda i: ext.paged_decode_attention(*inputs[i], scale, False, window, sinks),
             "memcpy": lambda i: bufs[i][1].copy_(bufs[i][0]),
             "read": lambda i: bufs[i][0].view(torch.float32).sum()}
    if p.dtype == "bfloat16" and ext.has_dpbf16():   # the opt-in bf16 softmax weights for P @ V
        calls["kernel_p_bf16"] = lambda i: ext.paged_decode_attention(*inputs[i], scale, True, window, sinks)
    if with_fallback:
        calls["fallback"] = lambda i: paged_decode_attention_torch(*inputs[i], scale, **kw)
    times: dict[str, list[float]] = {k: [] for k in calls}
    paired = []
    with measurement_lock() as waited, HostLoad() as load:
        for fn in calls.values():   # warm-up: first touch, the extension's and torch's caches
            fn(0)
        call = 0
        for r in range(repeats):
            order = [k for k in calls if k != "fallback" or r < fallback_repeats]
            rng.shuffle(order)
            round_t = {}
            for name in order:
                round_t[name] = timed(lambda fn=calls[name], i=call % sets: fn(i))
                call += 1
            for name, t in round_t.items():
                times[name].append(t)
            paired.append((nbytes / round_t["kernel"]) / (2 * nbytes / round_t["memcpy"]))
    gbps = {"kernel": [nbytes / t / 1e9 for t in times["kernel"]],
            "memcpy": [2 * nbytes / t / 1e9 for t in times["memcpy"]],
            "read": [nbytes / t / 1e9 for t in times["read"]]}
    for name in ("fallback", "kernel_p_bf16"):
        if name in times:
            gbps[name] = [nbytes / t / 1e9 for t in times[name]]
    s = {k: stats(v) for k, v in gbps.items()}
    rec = {**dataclasses.asdict(p), "threads": torch.get_num_threads(), "kv_gib": round(nbytes / GiB, 4),
           "kv_bytes": nbytes, "rotated_copies": sets, "attention_gbps": s["kernel"],
           "fallback_gbps": s.get("fallback"), "attention_p_bf16_gbps": s.get("kernel_p_bf16"),
           "memcpy_gbps": s["memcpy"], "read_gbps": s["read"],
           "ratio": round(s["kernel"]["median"] / s["memcpy"]["median"], 3),
           "ratio_paired": stats(paired), "ratio_to_read": round(s["kernel"]["median"] / s["read"]["median"], 3),
           "fallback_ratio": round(1 / same_rounds_ratio(gbps["memcpy"], gbps["fallback"]), 3)
           if with_fallback else None,
           "speedup": round(same_rounds_ratio(gbps["kernel"], gbps["fallback"]), 2) if with_fallback else None,
           "p_bf16_ratio": (round(s["kernel_p_bf16"]["median"] / s["memcpy"]["median"], 3)
                            if "kernel_p_bf16" in s else None),
           "host_load": {**load.report.to_dict(), "lock_wait_s": round(waited, 3)}}
    rec["unstable"] = bool(s["kernel"]["spread"] > UNSTABLE_SPREAD or s["memcpy"]["spread"] > UNSTABLE_SPREAD
                           or load.report.busy)
    return rec


def compute_ceiling(p: Point, repeats: int, ext, gen: torch.Generator) -> dict:
    """The kernel on a one-block pool (cache-resident): the same arithmetic, no DRAM traffic. Timed under
    the host-wide measurement lock with the host's load recorded, as the points are: a team of threads
    beside another busy process runs many times slower (measured: 2.8 against 108.6 GB/s), and the
    ceiling it reports would then bound nothing."""
    from moe_lightning.hostload import HostLoad, measurement_lock

    inputs = make_inputs(p, gen, same_block=True)
    kw = p.extra(gen)
    fn = lambda: ext.paged_decode_attention(*inputs, p.head_dim ** -0.5, False, kw["window"] or 0, kw["sinks"])
    with measurement_lock() as waited, HostLoad() as load:
        fn()
        v = [p.kv_bytes / timed(fn) / 1e9 for _ in range(repeats)]
    s = stats(v)
    return {**dataclasses.asdict(p), "threads": torch.get_num_threads(), "cache_resident_gbps": s,
            "host_load": {**load.report.to_dict(), "lock_wait_s": round(waited, 3)},
            "unstable": bool(s["spread"] is None or s["spread"] > UNSTABLE_SPREAD or load.report.busy)}


def fits(p: Point, sets_max: int = 8) -> str | None:
    from moe_lightning.hostload import available_host_bytes

    sets = max(1, min(sets_max, math.ceil(4 * llc_bytes() / p.kv_bytes)))
    need = 3 * p.kv_bytes * sets + 64 * p.context * p.kv_heads * p.head_dim   # pools + copy buffers + fallback
    avail = available_host_bytes()
    if avail is not None and need > 0.8 * avail:
        return (f"needs {need / GiB:.1f} GiB (pools, copy buffers) but {avail / GiB:.1f} GiB is available "
                f"(80% cap)")
    return None


def fmt(s: dict | None) -> str:
    return "-" if s is None else f"{s['median']:6.1f} [{s['min']:.1f}-{s['max']:.1f}]"


DTYPES = ("bfloat16", "float16", "float32")


def dtype_list(text: str) -> list[str]:
    import argparse

    names = text.split(",")
    unknown = [n for n in names if n not in DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtype {', '.join(unknown)}; accepted: {', '.join(DTYPES)}")
    return names


def main() -> int:
    from moe_lightning.bench_args import Parser, check_out_file, nonnegative_int, positive_int, positive_ints

    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", type=dtype_list, default="bfloat16,float16,float32")
    ap.add_argument("--contexts", type=positive_ints, default="512,4096")
    ap.add_argument("--batches", type=positive_ints, default="8,64")
    ap.add_argument("--block-size", type=positive_int, default=16)
    ap.add_argument("--heads", type=positive_int, default=32)
    ap.add_argument("--kv-heads", type=positive_int, default=8)
    ap.add_argument("--head-dim", type=positive_int, default=128)
    ap.add_argument("--window", type=nonnegative_int, default=0,
                    help="a sliding layer: attend the last W tokens (0: all)")
    ap.add_argument("--sinks", action="store_true", help="an attention-sink logit per query head (gpt-oss)")
    ap.add_argument("--repeats", type=positive_int, default=15, help="interleaved rounds per point")
    ap.add_argument("--fallback-repeats", type=positive_int, default=3, help="rounds that also time the fallback")
    ap.add_argument("--threads", type=nonnegative_int, default=0,
                    help="0: the detected cores (moe_lightning.threads)")
    ap.add_argument("--no-bounds", action="store_true", help="skip the cache-resident and one-thread sections")
    ap.add_argument("--out", default="", help=f"JSON path (default {RESULTS}/cpu_attention_<time>.json)")
    args = ap.parse_args()
    if args.heads % args.kv_heads:
        ap.error(f"argument --heads: {args.heads} query heads do not group over {args.kv_heads} kv heads "
                 "(--heads must be a multiple of --kv-heads)")
    # The record is written after minutes of measuring: a path that cannot be written is refused first.
    path = check_out_file(ap, args.out, "--out") if args.out else \
        RESULTS / f"cpu_attention_{time.strftime('%Y%m%d-%H%M%S')}.json"

    os.environ.setdefault("MOE_LIGHTNING_CACHE", str(Path.home() / ".cache" / "moe-lightning"))
    from moe_lightning.files import write_json
    from moe_lightning.kernels import cpu_attention as ca
    from moe_lightning.report import environment
    from moe_lightning.threads import detect_cores

    threads = args.threads or detect_cores().count
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    ext = ca.load_extension(required=True)
    build_s = time.perf_counter() - t0
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    points = [Point(dt, b, s, args.block_size, args.heads, args.kv_heads, args.head_dim, args.window, args.sinks)
              for dt in args.dtypes for s in args.contexts for b in args.batches]
    record: dict = {
        "schema_version": 1, "kind": "measured", "benchmark": "cpu_attention", "where": "this host",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "environment": environment(),
        "host": host_info(threads),
        "kernel": {"backend": "cpp", "load_or_build_s": round(build_s, 2), "capability": ext.capability(),
                   "vector_lanes": ext.vector_lanes(), "vdpbf16ps": ext.has_dpbf16()},
        "config": {**vars(args), **{k: ",".join(map(str, getattr(args, k))) for k in ("dtypes", "contexts", "batches")},
                   "out": str(path), "block_table": "shuffled (random permutation of the pool's blocks)",
                   "context_lens": "every sequence at the full context", "q_dtype": "the pool's dtype"},
        "conventions": {"attention_gbps": "bytes of K and V read / time", "memcpy_gbps":
                        "2 x buffer bytes / time (read + write; the destination's write-allocate read is not counted)",
                        "read_gbps": "buffer bytes / time (torch.sum over a float32 view)",
                        "ratio": "median attention_gbps / median memcpy_gbps",
                        "speedup": "median kernel GB/s / median fallback GB/s, over the rounds the fallback ran",
                        "fallback_ratio": "median fallback GB/s / median memcpy GB/s, over the rounds the fallback ran",
                        "units": "GB/s decimal, GiB binary"},
        "records": [], "skipped": []}
    print(f"torch {torch.__version__}, {threads} threads, {record['host']['cpu_model']}, "
          f"{record['host']['memory_total_gib']} GiB; kernel {ext.capability()} (load/build {build_s:.1f} s); "
          f"heads {args.heads}/{args.kv_heads}, head_dim {args.head_dim}, block {args.block_size}"
          + (f", window {args.window}" if args.window else "") + (", sinks" if args.sinks else ""), flush=True)
    head = (f"{'dtype':>8} {'B':>3} {'ctx':>5} {'KV GiB':>7} | {'kernel GB/s':>18} | {'fallback GB/s':>18} | "
            f"{'memcpy GB/s':>18} | {'read GB/s':>18} | ratio (paired range) | speedup | p_bf16 GB/s (ratio) | "
            "others busy")
    print("kernel, fallback, memcpy and read: decimal GB/s (10^9 bytes/s), median [min-max] of the rounds, "
          "measured on this host; KV: GiB (2^30 bytes)")
    print(head)
    for p in points:
        reason = fits(p)
        if reason:
            record["skipped"].append({**dataclasses.asdict(p), "reason": reason})
            print(f"{p.dtype:>8} {p.batch:>3} {p.context:>5} skipped: {reason}", flush=True)
            continue
        rec = measure_point(p, args.repeats, args.fallback_repeats, ext, rng, gen)
        gc.collect()   # the point's pools and buffers, before the next point allocates
        record["records"].append(rec)
        pr = rec["ratio_paired"]
        print(f"{p.dtype:>8} {p.batch:>3} {p.context:>5} {rec['kv_gib']:7.3f} | {fmt(rec['attention_gbps'])} | "
              f"{fmt(rec['fallback_gbps'])} | {fmt(rec['memcpy_gbps'])} | {fmt(rec['read_gbps'])} | "
              f"{rec['ratio']:.2f} ({pr['min']:.2f}-{pr['max']:.2f}){' UNSTABLE' if rec['unstable'] else ''} | "
              f"{rec['speedup']:.2f}x | "
              + (f"{rec['attention_p_bf16_gbps']['median']:6.1f} ({rec['p_bf16_ratio']:.2f})"
                 if rec["p_bf16_ratio"] is not None else "-") +
              f" | {rec['host_load']['others_busy_cores']:.2f}", flush=True)
    if not args.no_bounds:
        longest, smallest = max(q.context for q in points), min(q.batch for q in points)
        big = [p for p in points if p.context == longest and p.batch == smallest]
        record["cache_resident"], record["one_thread"] = [], []
        print("\nbounds: the kernel on a cache-resident pool (its arithmetic ceiling), and every measure on one thread")
        for n in sorted({threads, 1}, reverse=True):
            torch.set_num_threads(n)
            for p in big:
                c = compute_ceiling(p, args.repeats, ext, gen)
                record["cache_resident"].append(c)
                print(f"{p.dtype:>8} {p.batch:>3} {p.context:>5} threads {n}: cache-resident kernel "
                      f"{fmt(c['cache_resident_gbps'])} GB/s{' UNSTABLE' if c['unstable'] else ''} | others busy "
                      f"{c['host_load']['others_busy_cores'] or 0:.2f}", flush=True)
        torch.set_num_threads(1)
        for p in big:
            rec = measure_point(p, args.repeats, 0, ext, rng, gen, with_fallback=False)
            record["one_thread"].append(rec)
            print(f"{p.dtype:>8} {p.batch:>3} {p.context:>5} threads 1: kernel {fmt(rec['attention_gbps'])} | memcpy "
                  f"{fmt(rec['memcpy_gbps'])} | read {fmt(rec['read_gbps'])} | ratio {rec['ratio']:.2f}", flush=True)
        torch.set_num_threads(threads)
    unstable = [r for r in record["records"] if r["unstable"]]
    if unstable:
        print(f"warning: {len(unstable)} of {len(record['records'])} points unstable (spread > "
              f"{UNSTABLE_SPREAD:.0%} or other processes busy): read their spreads before trusting them")
    write_json(path, record, indent=2)
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    from moe_lightning.bench_args import guard

    sys.exit(guard(main))
