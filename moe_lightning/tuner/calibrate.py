"""Hardware calibration: measure this machine's roofline numbers and write a hardware profile YAML.

Measured (median of a few repetitions, after a warm-up; bandwidths count bytes read + bytes written, so
a copy of X bytes moves 2X, as STREAM does):
- GPU (CUDA): bf16 matmul peak, device-to-device copy bandwidth, pinned H2D and D2H bandwidth
  (CUDA events around each timed region);
- CPU: fp32 matmul peak, large-copy memory bandwidth, and decode attention throughput
  (`moe_lightning.engine.model.decode_attention`, GB/s of K/V read: `cpu.attn_gbps`);
- on the device that plays the GPU, two kernel-efficiency curves (`gpu.gemm_*`, `gpu.expert_*`):
  achieved TFLOP/s of an `[M, H] x [H, N]` GEMM for M from 1 to 4096 rows (N: a 256 MB weight at up to
  64 rows, beyond the caches as a layer's weights are, narrower above), and of the engine's
  fastest expert kernel (`engine.kernel_table.time_kernels`, every kernel, the best one kept) at 1 to
  256 tokens per expert, on a reference expert shape (Mixtral-8x7B's with CUDA, mid-mixtral's on the
  CPU). A decode step's GEMMs have a few rows and run far below the square-GEMM peak;
- on a CPU-only host, both curves at the GPU role's two thread counts (`moe_lightning.threads`): its
  share when CPU attention overlaps it, and every core (`gpu.*_all_cores`), its layout otherwise;
- the engine executor's overheads while its compute resource is busy: per task (small torch tasks
  hopping between the other resources), `task_overhead_us`, and per graph (threads started and
  joined), `step_overhead_us`;
- its issuing thread's host costs (`measure_host`): per task issued, `issue_overhead_us`, and per host
  barrier (FlexGen's `sync()`: on CUDA the device-wide `torch.cuda.synchronize` round trip plus the
  thread wake-ups, on the CPU the executor's barrier), beyond a dependency hand-off,
  `sync_overhead_us` (in the report's measurements as `issue_overhead_s` / `sync_overhead_s`).
The simulator (`tuner.costs.TaskCosts`) uses all of them; the HRM keeps the paper's peaks.
Without CUDA the CPU plays the GPU's role (the `cpu` profile convention): the "GPU" numbers are the
CPU's, its memory is a third of RAM (the rest is the CPU's, so they do not count the same bytes
twice), and the "link" is a thread's memcpy (bytes copied per second).

Not measured: usable fractions (kept at the shipped profiles' 0.86 GPU / 0.8 CPU), multi-GPU
scaling (one GPU is measured; `count` is the number visible), and sustained vs burst clocks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from moe_lightning.config import CpuSpec, GpuSpec, HardwareSpec, LinkSpec, ThreadsConfig, missing_hardware_fields
from moe_lightning.errors import ConfigError
from moe_lightning.threads import configured, plan_threads

log = logging.getLogger("moe_lightning.calibrate")
GB = 1e9


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of the measurements (quick mode: small ones)."""

    gpu_matmul: int = 8192
    gpu_copy_bytes: int = 1 << 30
    link_bytes: int = 256 << 20
    cpu_matmul: int = 2048
    cpu_copy_bytes: int = 512 << 20
    attn_batch: int = 16
    attn_context: int = 2048
    repeats: int = 5
    gemm_rows: tuple[int, ...] = (1, 4, 16, 64, 256, 1024, 4096)
    expert_loads: tuple[int, ...] = (1, 2, 4, 8, 16, 64, 256)


# Quick: still larger than the CPU caches (a 2-core VM reads a 33 MB K/V at twice its memory bandwidth).
QUICK = Sizes(gpu_matmul=4096, gpu_copy_bytes=256 << 20, link_bytes=64 << 20, cpu_matmul=1536,
              cpu_copy_bytes=128 << 20, attn_batch=16, attn_context=1024, repeats=5,
              gemm_rows=(1, 4, 16, 64, 256, 1024))
# Reference expert shapes of the kernel curves: (hidden, intermediate) of Mixtral-8x7B on a GPU, of
# mid-mixtral on the CPU (a Mixtral expert is 352 MB in fp32; the CPU role runs smaller models).
GPU_EXPERT_SHAPE = (4096, 14336)
CPU_EXPERT_SHAPE = (1024, 3584)
GEMM_WEIGHT_BYTES = 256 << 20  # the GEMM curve's weight at <= 64 rows: far beyond any L2 / L3


@dataclass
class Measurements:
    """What calibration measured; rates are the medians of `repeats`."""

    device: str                      # "cuda" or "cpu" (the CPU played the GPU)
    gpu_name: str
    gpu_count: int
    gpu_memory_gib: float
    gpu_peak_tflops: float
    gpu_bandwidth_gbps: float
    h2d_gbps: float
    d2h_gbps: float
    cpu_name: str
    cpu_cores: int
    cpu_memory_gib: float
    cpu_peak_tflops: float
    cpu_bandwidth_gbps: float
    cpu_attn_gbps: float
    task_overhead_s: float           # executor seconds per task (dependency hand-off)
    step_overhead_s: float           # executor seconds per graph (threads started and joined)
    quick: bool
    issue_overhead_s: float = 0.0    # issuing thread's seconds per task issued
    sync_overhead_s: float = 0.0     # seconds per host barrier (wake-ups; CUDA: device-wide synchronize)
    gemm_rows: list[int] = field(default_factory=list)        # GPU role: GEMM rows measured ...
    gemm_tflops: list[float] = field(default_factory=list)    # ... and their achieved TFLOP/s
    expert_loads: list[int] = field(default_factory=list)     # tokens per expert measured ...
    expert_tflops: list[float] = field(default_factory=list)  # ... and the fastest kernel's TFLOP/s
    # A CPU-only host whose GPU role gets more cores alone than beside CPU attention: the curves on
    # every core (empty otherwise, and with CUDA).
    gemm_tflops_all_cores: list[float] = field(default_factory=list)
    expert_tflops_all_cores: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _median(fn: Callable[[], float], repeats: int) -> float:
    """Median of `repeats` timings of `fn` (which returns seconds), after one warm-up call. The median,
    not the minimum: on a shared machine the fastest run is an outlier (a quiet moment of the memory
    bus) more often than the rate a long run sustains, which is what the simulator needs."""
    fn()
    return statistics.median(fn() for _ in range(repeats))


def _wall(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cuda(fn: Callable[[], object]) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def ram_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30   # GiB
    except (ValueError, OSError, AttributeError):
        return 8.0


def measure_cpu(sizes: Sizes) -> dict[str, float]:
    """fp32 matmul TFLOP/s, copy bandwidth (GB/s, read + write), decode attention (GB/s of K/V), and one
    thread's memcpy (GB/s copied)."""
    import torch

    from moe_lightning.models.layers import decode_attention

    n = sizes.cpu_matmul
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = _median(lambda: _wall(lambda: torch.matmul(a, b)), sizes.repeats)
    peak = 2 * n**3 / t / 1e12

    src = torch.ones(sizes.cpu_copy_bytes, dtype=torch.uint8)  # bytes, as the engine copies pages
    dst = torch.empty_like(src)
    bandwidth = 2 * sizes.cpu_copy_bytes / _median(lambda: _wall(lambda: dst.copy_(src)), sizes.repeats) / GB
    # One thread's memcpy: what a copy worker gets while the other resources keep the cores busy. It
    # is steadier than the all-thread rate, which on a shared VM swings between one core's and twice
    # that from one minute to the next.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        thread_copy = sizes.cpu_copy_bytes / _median(lambda: _wall(lambda: dst.copy_(src)), sizes.repeats) / GB
    finally:
        torch.set_num_threads(threads)
    B, S, nkv, g, hd = sizes.attn_batch, sizes.attn_context, 8, 4, 128
    q = torch.randn(B, nkv * g, hd)
    k, v = torch.randn(B, nkv, S, hd), torch.randn(B, nkv, S, hd)
    lengths = torch.full((B,), S)
    t = _median(lambda: _wall(lambda: decode_attention(q, k, v, lengths)), sizes.repeats)
    attn = 2 * k.numel() * 4 / t / GB
    return {"peak_tflops": peak, "bandwidth_gbps": bandwidth, "attn_gbps": attn, "thread_copy_gbps": thread_copy}


def _unbound() -> ThreadsConfig:
    """The thread settings the host costs are measured under: the run's, but with the engine's threads
    left unbound unless the user binds every run (`threads.pin=one`). The probes' ops are tiny, so the
    small-ops rule would bind them to one core, and the profile prices the models that matter, whose
    threads are unbound (a hand-off across cores: 4-6x one on a core, on this VM)."""
    config = configured()
    return config if config.pin == "one" else dataclasses.replace(config, pin="none")


def measure_dispatch(device: str, side_tasks: int = 60) -> tuple[float, float]:
    """The engine executor's overheads, measured as the engine runs: while the compute resource works
    through a chain of GEMMs, a chain of small decode attentions (a few torch ops each, like the
    engine's small tasks) hops between the other resources. Seconds per task: their mean duration
    there minus the same op's time alone on this thread (worker hand-off, and on a host that every
    resource shares, waiting for a core). Seconds per graph: run wall minus the span of its tasks
    (worker threads started and joined). The simulator's `launch_s` / `thread_s` and `step_s`."""
    import statistics

    import torch

    from moe_lightning.engine.executor import Executor
    from moe_lightning.models.layers import decode_attention
    from moe_lightning.schedule.graph import Resource, TaskGraph

    a = torch.randn(1024, 1024, device=device)
    q, lengths = torch.randn(8, 16, 64), torch.full((8,), 80)
    k, v = torch.randn(8, 4, 80, 64), torch.randn(8, 4, 80, 64)
    g, prev = TaskGraph("dispatch"), None
    for n in range(24):
        prev = g.add(Resource.GPU, "matmul", n, 0, [prev])
    hops, prev = (Resource.CPU, Resource.D2H, Resource.H2D, Resource.COPY), None
    for n in range(side_tasks):
        prev = g.add(hops[n % len(hops)], "attend", n, 1, [prev])
    handlers = {"matmul": lambda task: a @ a, "attend": lambda task: decode_attention(q, k, v, lengths)}
    # The engine's own thread layout for a run whose CPU attention overlaps the GPU role.
    layout = plan_threads(_unbound(), cuda=device == "cuda", micro_batches=2, attn_on_cpu=True, op_elements=a.numel())
    executor = Executor(torch.device(device), threads=layout)
    alone = _median(lambda: _wall(lambda: decode_attention(q, k, v, lengths)), 9)
    per_task, per_graph = [], []
    try:
        for _ in range(3):
            start = time.perf_counter()
            records = executor.run(g, handlers)
            if device == "cuda":
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            per_graph.append(wall - (max(r.end_s for r in records) - min(r.start_s for r in records)))
            per_task.append(statistics.mean(r.end_s - r.start_s for r in records if r.task.op == "attend") - alone)
    finally:
        executor.close()
    return max(statistics.median(per_task), 1e-6), max(statistics.median(per_graph), 0.0)


FLOOR_S = 1e-7   # the host costs' least measured value (a 0 in a profile means "not calibrated")


def measure_host(device: str, tasks: int = 120, repeats: int = 5) -> tuple[float, float]:
    """The issuing thread's costs, measured on the engine executor: seconds per task issued, and
    seconds per host barrier (`TaskGraph.sync`) beyond a dependency hand-off.

    A chain of `tasks` tiny ops (a small add: the op itself is negligible) alternating between the
    compute resource and a copy resource, each waiting for the one before (a hand-off between workers
    every task), run twice: free, and with a barrier after every task. Per task issued: the spacing of
    the free run's issue times (the host's clock while the workers compete with it, as in a real run).
    Per barrier: the extra wall time per barrier of the synchronised run, less one issue: the issuing
    thread woken once the step is done (on CUDA after a device-wide `torch.cuda.synchronize`) instead
    of the next worker picking the hand-off up by itself. Medians of `repeats` runs after a warm-up, at
    least `FLOOR_S` each: a profile's 0 means "not calibrated" (a barrier measured at 0 on a loaded host
    was read back as the 120 us default). The simulator's `TaskCosts.issue_s` / `sync_s`; the hand-off
    itself is charged to no schedule."""
    import torch

    from moe_lightning.engine.executor import Executor
    from moe_lightning.schedule.graph import Resource, TaskGraph

    x = torch.ones(64, device=device)
    free, synced = TaskGraph("issue"), TaskGraph("barriers")
    for g in (free, synced):
        g.add(Resource.COPY, "tiny", -1, 0)  # independent: the graph is no chain (which runs on the host)
        prev = None
        for n in range(tasks):
            prev = g.add((Resource.GPU, Resource.H2D)[n % 2], "tiny", n, 0, [prev])
            if g is synced:
                g.sync()
    handlers = {"tiny": lambda task: x + 1.0}
    layout = plan_threads(_unbound(), cuda=device == "cuda", micro_batches=2, attn_on_cpu=True, op_elements=x.numel())
    executor = Executor(torch.device(device), threads=layout)

    def wall(graph: TaskGraph) -> tuple[float, list]:
        start = time.perf_counter()
        records = executor.run(graph, handlers)
        return time.perf_counter() - start, records

    try:
        wall(free), wall(synced)  # warm-up: workers started, first touch
        issue, barrier = [], []
        for _ in range(repeats):
            free_s, records = wall(free)
            synced_s, _ = wall(synced)
            issued = sorted(r.issued_s for r in records)
            issue.append((issued[-1] - issued[0]) / (len(issued) - 1))
            barrier.append((synced_s - free_s) / len(synced.syncs))
    finally:
        executor.close()
    issue_s = max(statistics.median(issue), FLOOR_S)
    return issue_s, max(statistics.median(barrier) - issue_s, FLOOR_S)


def measure_kernel_curves(sizes: Sizes, device: str) -> dict[str, list]:
    """Achieved TFLOP/s of `[M, H] x [H, N]` GEMMs at `sizes.gemm_rows` and of the engine's fastest expert
    kernel at `sizes.expert_loads` tokens per expert, on the reference shape of `device`."""
    import torch
    import torch.nn.functional as F

    from moe_lightning.config import ModelSpec
    from moe_lightning.engine.kernel_table import time_kernels

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    H, F_dim = GPU_EXPERT_SHAPE if cuda else CPU_EXPERT_SHAPE
    timer = _cuda if cuda else _wall
    # A few rows stream the weight from memory: it must be far larger than the last-level cache (a
    # decode step's weights are); at many rows the GEMM is compute-bound, so the weight narrows to keep
    # each measurement at about the same FLOPs.
    wide = GEMM_WEIGHT_BYTES // (H * torch.empty((), dtype=dtype).element_size())

    def gemm_tflops(rows: int) -> float:
        n = max(H, int(wide * min(1.0, 64 / rows)))
        x = torch.randn(rows, H, device=device, dtype=dtype)
        w = torch.full((n, H), 0.01, device=device, dtype=dtype)
        return 2 * rows * H * n / _median(lambda: timer(lambda: F.linear(x, w)), sizes.repeats) / 1e12

    # On a CPU host the thread that plays the GPU runs with the GPU role's share of the cores while CPU
    # attention overlaps it (the thread budget's split, `moe_lightning.threads`): measure at that share,
    # and again on every core (its layout when nothing overlaps it) if that is more threads.
    split, every = _gpu_role_threads(H * F_dim)
    counts = [split] if cuda or every == split else [split, every]
    threads = torch.get_num_threads()
    # Two experts, top-2: every token goes to both, so each expert sees exactly `load` tokens.
    spec = ModelSpec(hidden_size=H, intermediate_size=F_dim, num_experts=2, top_k=2)
    curves: dict[str, list] = {"gemm_rows": list(sizes.gemm_rows), "expert_loads": list(sizes.expert_loads)}
    try:
        for n, suffix in zip(counts, ("", "_all_cores")):
            if not cuda:
                torch.set_num_threads(n)
            curves["gemm_tflops" + suffix] = [gemm_tflops(rows) for rows in sizes.gemm_rows]
            times = time_kernels(spec, dtype, torch.device(device), reps=max(2, sizes.repeats // 2), experts=2,
                                 loads=sizes.expert_loads)
            curves["expert_tflops" + suffix] = [2 * load * 2 * 3 * H * F_dim / min(times[load].values()) / 1e12
                                                for load in sizes.expert_loads]
    finally:
        torch.set_num_threads(threads)
    return curves


def _gpu_role_threads(op_elements: int) -> tuple[int, int]:
    """This host's GPU-role threads (split, alone): `threads.gpu_role_threads` at the detected cores."""
    from moe_lightning.threads import gpu_role_threads

    return gpu_role_threads(None, op_elements)


ALL_CORES_FIELDS = ("gemm_tflops_all_cores", "expert_tflops_all_cores")


def measure_gpu(sizes: Sizes) -> dict[str, float]:
    """bf16 matmul TFLOP/s, device copy GB/s (read + write), pinned H2D and D2H GB/s."""
    import torch

    dev = torch.device("cuda")
    n = sizes.gpu_matmul
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = _median(lambda: _cuda(lambda: torch.matmul(a, b)), sizes.repeats)
    peak = 2 * n**3 / t / 1e12
    src = torch.empty(sizes.gpu_copy_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = _median(lambda: _cuda(lambda: dst.copy_(src)), sizes.repeats)
    bandwidth = 2 * sizes.gpu_copy_bytes / t / GB
    host = torch.empty(sizes.link_bytes, dtype=torch.uint8, pin_memory=True)
    device_buf = torch.empty(sizes.link_bytes, dtype=torch.uint8, device=dev)
    t = _median(lambda: _cuda(lambda: device_buf.copy_(host, non_blocking=True)), sizes.repeats)
    h2d = sizes.link_bytes / t / GB
    t = _median(lambda: _cuda(lambda: host.copy_(device_buf, non_blocking=True)), sizes.repeats)
    d2h = sizes.link_bytes / t / GB
    return {"peak_tflops": peak, "bandwidth_gbps": bandwidth, "h2d_gbps": h2d, "d2h_gbps": d2h}


def measure(quick: bool = False, device: str = "auto") -> Measurements:
    """Measure this machine (`device`: auto, cuda or cpu; cpu skips the GPU even when present)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda asked for but no CUDA device is visible")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    sizes = QUICK if quick else Sizes()
    start = time.perf_counter()
    with torch.inference_mode():
        cpu = measure_cpu(sizes)
        log.info("cpu: %.3f TFLOP/s fp32, %.1f GB/s copy, %.1f GB/s decode attention",
                 cpu["peak_tflops"], cpu["bandwidth_gbps"], cpu["attn_gbps"])
        if use_cuda:
            gpu = measure_gpu(sizes)
            torch.cuda.empty_cache()
            props = torch.cuda.get_device_properties(0)
            gpu_name, gpu_count, gpu_mem = props.name, torch.cuda.device_count(), props.total_memory / 2**30
            h2d, d2h = gpu["h2d_gbps"], gpu["d2h_gbps"]
            log.info("gpu: %.1f TFLOP/s bf16, %.1f GB/s copy; link %.1f / %.1f GB/s", gpu["peak_tflops"],
                     gpu["bandwidth_gbps"], h2d, d2h)
            cpu_mem = ram_gib()
        else:
            gpu = {"peak_tflops": cpu["peak_tflops"], "bandwidth_gbps": cpu["bandwidth_gbps"]}
            gpu_name, gpu_count = "cpu-as-gpu", 1
            gpu_mem, cpu_mem = ram_gib() / 3, ram_gib() * 2 / 3
            h2d = d2h = cpu["thread_copy_gbps"]  # a thread's memcpy: bytes copied per second
        curves = measure_kernel_curves(sizes, "cuda" if use_cuda else "cpu")
        # A peak is what the device reaches at best: no lower than a rate its own curves measured (one
        # probe on a shared host can come out low).
        best = max(curves["gemm_tflops"] + curves["expert_tflops"] + curves.get("gemm_tflops_all_cores", [])
                   + curves.get("expert_tflops_all_cores", []), default=0.0)
        gpu["peak_tflops"] = max(gpu["peak_tflops"], best)
        if not use_cuda:   # the CPU plays the GPU: one peak
            cpu["peak_tflops"] = gpu["peak_tflops"]
        log.info("GEMM by rows: %s; experts by tokens per expert: %s",
                 format_curve(curves["gemm_rows"], curves["gemm_tflops"]),
                 format_curve(curves["expert_loads"], curves["expert_tflops"]))
        overhead, step = measure_dispatch("cuda" if use_cuda else "cpu")
        issue, sync = measure_host("cuda" if use_cuda else "cpu")
        log.info("executor: %.0f us per task, %.0f us per graph; host: %.1f us per task issued, %.0f us per "
                 "barrier", overhead * 1e6, step * 1e6, issue * 1e6, sync * 1e6)
    return Measurements(
        device="cuda" if use_cuda else "cpu", gpu_name=gpu_name, gpu_count=gpu_count,
        gpu_memory_gib=gpu_mem, gpu_peak_tflops=gpu["peak_tflops"], gpu_bandwidth_gbps=gpu["bandwidth_gbps"],
        h2d_gbps=h2d, d2h_gbps=d2h, cpu_name=cpu_name(), cpu_cores=cpu_cores(), cpu_memory_gib=cpu_mem,
        cpu_peak_tflops=cpu["peak_tflops"], cpu_bandwidth_gbps=cpu["bandwidth_gbps"],
        cpu_attn_gbps=cpu["attn_gbps"], task_overhead_s=overhead, step_overhead_s=step, quick=quick,
        issue_overhead_s=issue, sync_overhead_s=sync, **curves,
        seconds=time.perf_counter() - start)


def format_curve(points: list, rates: list) -> str:
    return ", ".join(f"{p}: {r:.3g}" for p, r in zip(points, rates)) + " TFLOP/s"


def _r(x: float, digits: int = 4) -> float:
    """Round to `digits` significant digits (profiles are measurements, not exact values)."""
    return float(f"{x:.{digits}g}")


def _profile_fields() -> tuple[str, ...]:
    """The top-level scalar fields of a hardware profile, in the YAML's order."""
    return ("task_overhead_us", "step_overhead_us", "issue_overhead_us", "sync_overhead_us")


def hardware_spec(m: Measurements, name: str = "calibrated", gpu_usable_fraction: float = 0.86,
                  cpu_usable_fraction: float = 0.8) -> HardwareSpec:
    return HardwareSpec(
        name=name,
        gpu=GpuSpec(name=m.gpu_name, count=m.gpu_count, memory_gib=_r(m.gpu_memory_gib, 3),
                    bandwidth_gbps=_r(m.gpu_bandwidth_gbps), peak_tflops=_r(m.gpu_peak_tflops),
                    usable_fraction=gpu_usable_fraction, shares_host=m.device != "cuda",
                    gemm_rows=list(m.gemm_rows), gemm_tflops=[_r(x) for x in m.gemm_tflops],
                    expert_loads=list(m.expert_loads), expert_tflops=[_r(x) for x in m.expert_tflops],
                    **{k: [_r(x) for x in getattr(m, k)] for k in ALL_CORES_FIELDS}),
        cpu=CpuSpec(name=m.cpu_name, cores=m.cpu_cores, memory_gib=_r(m.cpu_memory_gib, 3),
                    bandwidth_gbps=_r(m.cpu_bandwidth_gbps), peak_tflops=_r(m.cpu_peak_tflops),
                    usable_fraction=cpu_usable_fraction, attn_gbps=_r(m.cpu_attn_gbps)),
        link=LinkSpec(h2d_gbps=_r(m.h2d_gbps), d2h_gbps=_r(m.d2h_gbps)),
        task_overhead_us=_r(m.task_overhead_s * 1e6, 3), step_overhead_us=_r(m.step_overhead_s * 1e6, 3),
        issue_overhead_us=_r(m.issue_overhead_s * 1e6, 3), sync_overhead_us=_r(m.sync_overhead_s * 1e6, 3))


def hardware_yaml(hw: HardwareSpec, m: Measurements) -> str:
    """The profile in conf/hardware/*.yaml's schema, with the measurements it came from as comments."""
    d = asdict(hw)
    head = [f"# Measured by task=calibrate{' (quick)' if m.quick else ''} on {platform.node()} "
            f"({'CUDA' if m.device == 'cuda' else 'CPU only: the CPU plays the GPU'}) in {m.seconds:.1f} s.",
            "# Bandwidths count bytes read + written (a copy of X bytes moves 2X); link: bytes moved.",
            "# gpu.gemm_*: achieved TFLOP/s of [rows, H] x [H, N]; gpu.expert_*: of the fastest expert kernel",
            "# at that many tokens per expert (*_all_cores: the GPU role on every core, not its split share);",
            "# cpu.attn_gbps: decode attention, GB/s of K/V read;",
            "# task_ / step_overhead_us: the engine executor's cost per task and per graph (one step);",
            "# issue_ / sync_overhead_us: its issuing thread's cost per task issued and per host barrier.",
            "# The simulator uses all of these; the HRM does not."]
    if m.device != "cuda":   # set, not measured: the profile would otherwise read as the host's memory
        head.append(f"# memory_gib: this host's {m.gpu_memory_gib + m.cpu_memory_gib:.1f} GiB of RAM split, a third "
                    "to the GPU role (gpu), two thirds to the CPU (cpu).")
    body = [f"name: {d['name']}"]
    for group in ("gpu", "cpu", "link"):
        fields = ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in d[group].items())
        body.append(f"{group}: {{{fields}}}")
    body += [f"{k}: {_yaml_scalar(d[k])}" for k in _profile_fields()]
    return "\n".join(head + body) + "\n"


def _yaml_scalar(v: object) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def load_hardware_yaml(path: str | os.PathLike) -> HardwareSpec:
    """A hardware profile YAML (conf/hardware schema) -> HardwareSpec, as `presets.load_preset` does."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such hardware profile")
    d = yaml.safe_load(path.read_text())
    missing = missing_hardware_fields(d) if isinstance(d, dict) else []
    if missing:   # the dataclasses' defaults would fill them with the cpu preset's numbers
        raise ConfigError(f"{path}: not a complete hardware profile (no {', '.join(missing)})")
    try:
        return HardwareSpec.from_dict(d)
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a hardware profile ({exc})") from None


def override_args(hw: HardwareSpec) -> list[str]:
    """The same profile as command-line overrides on top of hardware=cpu (works with no file at all)."""
    items = [("hardware.name", hw.name)] + [(f"hardware.{k}", getattr(hw, k)) for k in _profile_fields()]
    for group in ("gpu", "cpu", "link"):
        items += [(f"hardware.{group}.{k}", v) for k, v in asdict(getattr(hw, group)).items()]
    return ["hardware=cpu"] + [_override(k, v) for k, v in items]


def _override(key: str, v: object) -> str:
    """`key=value` for a shell command line: strings in Hydra's quotes, inside the shell's."""
    if isinstance(v, str):
        return '"' + key + "='" + v.replace("'", "\\'") + "'" + '"'
    if isinstance(v, list):
        return f"'{key}=[{','.join(str(x) for x in v)}]'"
    return f"{key}={v}"
