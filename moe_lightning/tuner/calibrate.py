"""Hardware calibration: measure this machine's roofline numbers and write a hardware profile YAML.

Measured (best of a few repetitions, after a warm-up; bandwidths count bytes read + bytes written, so
a copy of X bytes moves 2X, as STREAM does):
- GPU (CUDA): bf16 matmul peak, device-to-device copy bandwidth, pinned H2D and D2H bandwidth
  (CUDA events around each timed region);
- CPU: fp32 matmul peak, large-copy memory bandwidth, and decode attention throughput
  (`moe_lightning.engine.model.decode_attention`, GB/s of K/V read) which the simulator can use for
  CPU attention instead of the roofline (`TaskCosts.cpu_attn_gbps`);
- the engine executor's per-task overhead (a chain of empty tasks hopping between resources), the
  simulator's `TaskCosts.launch_s` / `thread_s`.
The last two have no field in the hardware profile schema: they are written as YAML comments and in
the calibration report's `extra.measurements`.
Without CUDA the CPU plays the GPU's role (the `cpu` profile convention): the "GPU" numbers are the
CPU's, its memory is a third of RAM (the rest is the CPU's, so they do not count the same bytes
twice), and the "link" is a thread's memcpy (bytes copied per second).

Not measured: usable fractions (kept at the shipped profiles' 0.86 GPU / 0.8 CPU), multi-GPU
scaling (one GPU is measured; `count` is the number visible), and sustained vs burst clocks.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from moe_lightning.config import CpuSpec, GpuSpec, HardwareSpec, LinkSpec
from moe_lightning.errors import ConfigError

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


# Quick: still larger than the CPU caches (a 2-core VM reads a 33 MB K/V at twice its memory bandwidth).
QUICK = Sizes(gpu_matmul=4096, gpu_copy_bytes=256 << 20, link_bytes=64 << 20, cpu_matmul=1536,
              cpu_copy_bytes=128 << 20, attn_batch=16, attn_context=1024, repeats=5)


@dataclass
class Measurements:
    """What calibration measured; rates are the best of `repeats`."""

    device: str                      # "cuda" or "cpu" (the CPU played the GPU)
    gpu_name: str
    gpu_count: int
    gpu_memory_gb: float
    gpu_peak_tflops: float
    gpu_bandwidth_gbps: float
    h2d_gbps: float
    d2h_gbps: float
    cpu_name: str
    cpu_cores: int
    cpu_memory_gb: float
    cpu_peak_tflops: float
    cpu_bandwidth_gbps: float
    cpu_attn_gbps: float
    task_overhead_s: float           # executor seconds per task (dependency hand-off)
    quick: bool
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def _best(fn: Callable[[], float], repeats: int) -> float:
    """Shortest of `repeats` timings of `fn` (which returns seconds), after one warm-up call."""
    fn()
    return min(fn() for _ in range(repeats))


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


def ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):
        return 8.0


def measure_cpu(sizes: Sizes) -> dict[str, float]:
    """fp32 matmul TFLOP/s, copy bandwidth (GB/s, read + write), decode attention (GB/s of K/V)."""
    import torch

    from moe_lightning.engine.model import decode_attention

    n = sizes.cpu_matmul
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = _best(lambda: _wall(lambda: torch.matmul(a, b)), sizes.repeats)
    peak = 2 * n**3 / t / 1e12
    src = torch.ones(sizes.cpu_copy_bytes // 4)
    dst = torch.empty_like(src)
    t = _best(lambda: _wall(lambda: dst.copy_(src)), sizes.repeats)
    bandwidth = 2 * sizes.cpu_copy_bytes / t / GB
    B, S, nkv, g, hd = sizes.attn_batch, sizes.attn_context, 8, 4, 128
    q = torch.randn(B, nkv * g, hd)
    k, v = torch.randn(B, nkv, S, hd), torch.randn(B, nkv, S, hd)
    lengths = torch.full((B,), S)
    t = _best(lambda: _wall(lambda: decode_attention(q, k, v, lengths)), sizes.repeats)
    attn = 2 * k.numel() * 4 / t / GB
    return {"peak_tflops": peak, "bandwidth_gbps": bandwidth, "attn_gbps": attn}


def measure_dispatch(device: str, tasks: int = 400) -> float:
    """Seconds per task of the engine's executor on a dependency chain of empty tasks that hops
    between resources (queue hand-off, event wait, record): the simulator's per-task overhead."""
    import torch

    from moe_lightning.engine.executor import Executor
    from moe_lightning.schedule.graph import Resource, TaskGraph

    hops = (Resource.GPU, Resource.D2H, Resource.CPU, Resource.H2D)
    g, prev = TaskGraph("dispatch"), None
    for n in range(tasks):
        prev = g.add(hops[n % len(hops)], "noop", n, 0, [prev])
    executor = Executor(torch.device(device))
    handlers = {"noop": lambda task: None}
    return _best(lambda: _wall(lambda: executor.run(g, handlers)), 3) / tasks


def measure_gpu(sizes: Sizes) -> dict[str, float]:
    """bf16 matmul TFLOP/s, device copy GB/s (read + write), pinned H2D and D2H GB/s."""
    import torch

    dev = torch.device("cuda")
    n = sizes.gpu_matmul
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = _best(lambda: _cuda(lambda: torch.matmul(a, b)), sizes.repeats)
    peak = 2 * n**3 / t / 1e12
    src = torch.empty(sizes.gpu_copy_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    t = _best(lambda: _cuda(lambda: dst.copy_(src)), sizes.repeats)
    bandwidth = 2 * sizes.gpu_copy_bytes / t / GB
    host = torch.empty(sizes.link_bytes, dtype=torch.uint8, pin_memory=True)
    device_buf = torch.empty(sizes.link_bytes, dtype=torch.uint8, device=dev)
    t = _best(lambda: _cuda(lambda: device_buf.copy_(host, non_blocking=True)), sizes.repeats)
    h2d = sizes.link_bytes / t / GB
    t = _best(lambda: _cuda(lambda: host.copy_(device_buf, non_blocking=True)), sizes.repeats)
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
            gpu_name, gpu_count, gpu_mem = props.name, torch.cuda.device_count(), props.total_memory / GB
            h2d, d2h = gpu["h2d_gbps"], gpu["d2h_gbps"]
            log.info("gpu: %.1f TFLOP/s bf16, %.1f GB/s copy; link %.1f / %.1f GB/s", gpu["peak_tflops"],
                     gpu["bandwidth_gbps"], h2d, d2h)
            cpu_mem = ram_gb()
        else:
            gpu = {"peak_tflops": cpu["peak_tflops"], "bandwidth_gbps": cpu["bandwidth_gbps"]}
            gpu_name, gpu_count = "cpu-as-gpu", 1
            gpu_mem, cpu_mem = ram_gb() / 3, ram_gb() * 2 / 3
            h2d = d2h = cpu["bandwidth_gbps"] / 2  # a thread's memcpy: bytes copied per second
        overhead = measure_dispatch("cuda" if use_cuda else "cpu")
        log.info("executor: %.0f us per task", overhead * 1e6)
    return Measurements(
        device="cuda" if use_cuda else "cpu", gpu_name=gpu_name, gpu_count=gpu_count,
        gpu_memory_gb=gpu_mem, gpu_peak_tflops=gpu["peak_tflops"], gpu_bandwidth_gbps=gpu["bandwidth_gbps"],
        h2d_gbps=h2d, d2h_gbps=d2h, cpu_name=cpu_name(), cpu_cores=cpu_cores(), cpu_memory_gb=cpu_mem,
        cpu_peak_tflops=cpu["peak_tflops"], cpu_bandwidth_gbps=cpu["bandwidth_gbps"],
        cpu_attn_gbps=cpu["attn_gbps"], task_overhead_s=overhead, quick=quick, seconds=time.perf_counter() - start)


def _r(x: float, digits: int = 4) -> float:
    """Round to `digits` significant digits (profiles are measurements, not exact values)."""
    return float(f"{x:.{digits}g}")


def hardware_spec(m: Measurements, name: str = "calibrated", gpu_usable_fraction: float = 0.86,
                  cpu_usable_fraction: float = 0.8) -> HardwareSpec:
    return HardwareSpec(
        name=name,
        gpu=GpuSpec(name=m.gpu_name, count=m.gpu_count, memory_gb=_r(m.gpu_memory_gb, 3),
                    bandwidth_gbps=_r(m.gpu_bandwidth_gbps), peak_tflops=_r(m.gpu_peak_tflops),
                    usable_fraction=gpu_usable_fraction, shares_host=m.device != "cuda"),
        cpu=CpuSpec(name=m.cpu_name, cores=m.cpu_cores, memory_gb=_r(m.cpu_memory_gb, 3),
                    bandwidth_gbps=_r(m.cpu_bandwidth_gbps), peak_tflops=_r(m.cpu_peak_tflops),
                    usable_fraction=cpu_usable_fraction),
        link=LinkSpec(h2d_gbps=_r(m.h2d_gbps), d2h_gbps=_r(m.d2h_gbps)))


def hardware_yaml(hw: HardwareSpec, m: Measurements) -> str:
    """The profile in conf/hardware/*.yaml's schema, with the measurements it came from as comments."""
    d = asdict(hw)
    head = [f"# Measured by task=calibrate{' (quick)' if m.quick else ''} on {platform.node()} "
            f"({'CUDA' if m.device == 'cuda' else 'CPU only: the CPU plays the GPU'}) in {m.seconds:.1f} s.",
            f"# CPU decode attention: {m.cpu_attn_gbps:.4g} GB/s of K/V read "
            "(the simulator's TaskCosts.cpu_attn_gbps).",
            f"# Executor overhead: {m.task_overhead_s * 1e6:.3g} us per task (TaskCosts.launch_s / thread_s).",
            "# Bandwidths count bytes read + written (a copy of X bytes moves 2X); link: bytes moved."]
    body = [f"name: {d['name']}"]
    for group in ("gpu", "cpu", "link"):
        fields = ", ".join(f"{k}: {_yaml_scalar(v)}" for k, v in d[group].items())
        body.append(f"{group}: {{{fields}}}")
    return "\n".join(head + body) + "\n"


def _yaml_scalar(v: object) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def load_hardware_yaml(path: str | os.PathLike) -> HardwareSpec:
    """A hardware profile YAML (conf/hardware schema) -> HardwareSpec, as `presets.load_preset` does."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such hardware profile")
    d = yaml.safe_load(path.read_text())
    try:
        return HardwareSpec(gpu=GpuSpec(**d["gpu"]), cpu=CpuSpec(**d["cpu"]), link=LinkSpec(**d["link"]),
                            name=d["name"])
    except (KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a hardware profile ({exc})") from None


def override_args(hw: HardwareSpec) -> list[str]:
    """The same profile as command-line overrides on top of hardware=cpu (works with no file at all)."""
    items = [("hardware.name", hw.name)]
    for group in ("gpu", "cpu", "link"):
        items += [(f"hardware.{group}.{k}", v) for k, v in asdict(getattr(hw, group)).items()]
    return ["hardware=cpu"] + [_override(k, v) for k, v in items]


def _override(key: str, v: object) -> str:
    """`key=value` for a shell command line: strings in Hydra's quotes, inside the shell's."""
    if isinstance(v, str):
        return '"' + key + "='" + v.replace("'", "\\'") + "'" + '"'
    return f"{key}={v}"
