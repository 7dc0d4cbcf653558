"""Expert-kernel selection by load (EPS-MoE): a table, profiled on this machine for the model's shapes,
holds every kernel's time at a ladder of loads (tokens per expert); a call runs the kernel whose time,
estimated on the call's own routing (interpolated between rungs), is lowest. Which kernel wins changes
within a factor of two of load (a CPU's skinny GEMMs change code path between 1 and 2 rows), and with
the routing's imbalance (the padded kernel pays every expert at the busiest one's load), so the ladder
is dense and the choice looks at the actual expert counts. Profiles are cached per device and shape under
the cache folder, so the profiling step runs once per machine.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time

import torch

from moe_lightning.config import ModelSpec
from moe_lightning.engine.experts import KERNELS
from moe_lightning.errors import ConfigError
from moe_lightning.interp import loglog
from moe_lightning.models.layers import ExpertStack, route

log = logging.getLogger("moe_lightning.kernels")
LOADS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # tokens per expert profiled
KernelTimes = dict[int, dict[str, float]]    # load -> kernel -> seconds
PROFILED_EXPERTS = 4                         # experts in each profiled call


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{torch.get_num_threads()}"


def fastest(times: KernelTimes) -> dict[int, str]:
    """{load: the fastest kernel at that load} of a profile."""
    return {load: min(by_kernel, key=by_kernel.get) for load, by_kernel in times.items()}


def interpolated_time(times: KernelTimes, kernel: str, load: float) -> float:
    """`kernel`'s seconds at `load`, log-log between the profiled loads around it (clamped at the ends);
    inf where it was not profiled on both sides."""
    loads = sorted(times)
    lo = max((x for x in loads if x <= load), default=loads[0])
    hi = min((x for x in loads if x >= load), default=loads[-1])
    if kernel not in times[lo] or kernel not in times[hi]:
        return math.inf
    return loglog((lo, hi), (times[lo][kernel], times[hi][kernel]), load)


def time_kernels(spec: ModelSpec, dtype: torch.dtype, device: torch.device, reps: int = 3,
                 experts: int = PROFILED_EXPERTS, loads: tuple[int, ...] = LOADS) -> KernelTimes:
    """Median seconds of every kernel available here at each load (tokens per expert) on `experts`
    random experts of the model's shape: `load * experts / top_k` tokens routed top-k among them."""
    H, F = spec.hidden_size, spec.intermediate_size
    g = torch.Generator(device="cpu").manual_seed(0)
    w13 = (torch.randn(experts, 2 * F, H, generator=g) * 0.02).to(device, dtype)
    w2 = (torch.randn(experts, H, F, generator=g) * 0.02).to(device, dtype)
    stack = ExpertStack.single(w13, w2)
    router = torch.randn(experts, H, generator=g).to(device, dtype)
    table = {}
    for load in loads:
        tokens = max(1, load * experts // spec.top_k)
        h = torch.randn(tokens, H, generator=g).to(device, dtype)
        weights, ids = route(h, router, min(spec.top_k, experts))
        times = {}
        for name, kernel in KERNELS.items():
            if name == "dense" and tokens * experts > 65536:
                continue  # dense computes every expert on every token: hopeless at this size
            try:
                samples = []
                for _ in range(reps + 1):
                    _sync(device)
                    t0 = time.perf_counter()
                    kernel(h, weights, ids, stack)
                    _sync(device)
                    samples.append(time.perf_counter() - t0)
                times[name] = statistics.median(samples[1:])
            except (RuntimeError, NotImplementedError) as exc:  # e.g. grouped_mm unsupported here
                log.debug("kernel %s unavailable: %s", name, exc)
        table[load] = times
    return table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cached_profile(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> KernelTimes:
    from moe_lightning.engine.tiny import cache_dir

    key = f"{_device_name(device)}-H{spec.hidden_size}-F{spec.intermediate_size}-k{spec.top_k}-{dtype}-times"
    path = cache_dir() / "kernel-tables" / (key.replace(" ", "_").replace("/", "_") + ".json")
    if path.exists():
        try:
            cached = {int(k): {str(n): float(t) for n, t in v.items()} for k, v in json.loads(path.read_text()).items()}
            if cached:
                return cached
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("expert-kernel cache %s is unreadable (%s): profiling again", path, exc)
    times = time_kernels(spec, dtype, device)
    from moe_lightning.files import atomic_write

    atomic_write(path, json.dumps(times))
    log.info("expert-kernel table for %s: %s", key, fastest(times))
    return times


def workspace_bytes(kernel: str, counts: list[int], spec: ModelSpec, dtype_bytes: int) -> int:
    """Bytes of `kernel`'s intermediates for `counts[e]` tokens routed to expert e (`engine.experts`;
    the per-row widths of `memory.expert_workspace`): padded pads every expert to the busiest one,
    dense runs every expert on all T = sum / top_k tokens."""
    H, F = spec.hidden_size, spec.intermediate_size
    if kernel == "grouped":
        return sum(counts) * 4 * F * dtype_bytes
    rows = {"padded": len(counts) * max(counts, default=0), "dense": len(counts) * sum(counts) // spec.top_k,
            "loop": max(counts, default=0)}[kernel]
    return rows * (H + 4 * F) * dtype_bytes


class KernelChooser:
    """The expert kernel for the policy: a fixed one, or with `auto` the one whose estimated time on the
    call's actual routing is lowest. A call is itself an `MoEKernel`: it sees the expert ids, so routing
    imbalance counts (the padded kernel pads every expert to the busiest one's tokens; the loop and
    grouped kernels pay each expert at its own load; dense runs every expert on every token). With
    `max_bytes`, `auto` only picks kernels whose intermediates take at most that (`workspace_bytes`;
    the memory plan's bound, `memory.expert_workspace`), so padded and dense run only where their
    workspace is within the plan."""

    def __init__(self, choice: str, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                 times: KernelTimes | None = None, max_bytes: int | None = None):
        if choice != "auto" and choice not in KERNELS:
            raise ConfigError(f"policy.expert_kernel={choice} is not available with torch {torch.__version__} "
                              "(grouped needs torch.nn.functional.grouped_mm); "
                              f"accepted here: auto, {', '.join(KERNELS)}")
        self.spec, self.choice = spec, choice
        self.times = (times or cached_profile(spec, dtype, device)) if choice == "auto" else {}
        self.used: dict[str, int] = {}
        self.max_bytes = max_bytes
        self.dtype_bytes = torch.empty((), dtype=dtype).element_size()

    def estimated_s(self, kernel: str, counts: list[int]) -> float:
        """Seconds `kernel` takes for `counts[e]` tokens routed to expert e, from the profile (measured
        on `PROFILED_EXPERTS` experts at uniform loads)."""
        def per_expert(load: float) -> float:
            return interpolated_time(self.times, kernel, load) / PROFILED_EXPERTS

        hit = [c for c in counts if c > 0]
        if not hit:
            return 0.0
        if kernel == "padded":
            return len(hit) * per_expert(max(hit))
        if kernel == "dense":  # every expert on every token: a profiled load of T k / P has T tokens
            return len(counts) * per_expert(sum(hit) / PROFILED_EXPERTS)
        return sum(per_expert(c) for c in hit)

    def name_for(self, counts: list[int]) -> str:
        if self.choice != "auto":
            return self.choice
        kernels = sorted({k for by_kernel in self.times.values() for k in by_kernel})
        if self.max_bytes is not None:
            fits = [k for k in kernels if workspace_bytes(k, counts, self.spec, self.dtype_bytes) <= self.max_bytes]
            kernels = fits or [k for k in ("grouped", "loop") if k in kernels][:1] or kernels
        return min(kernels, key=lambda k: self.estimated_s(k, counts))

    def __call__(self, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 experts: ExpertStack) -> torch.Tensor:
        counts = torch.bincount(ids.flatten(), minlength=self.spec.num_experts).tolist() \
            if self.choice == "auto" else []
        name = self.name_for(counts)
        self.used[name] = self.used.get(name, 0) + 1
        return KERNELS[name](h, weights, ids, experts)
