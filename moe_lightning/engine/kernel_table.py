"""Expert-kernel selection by load (EPS-MoE): a table, profiled on this machine for the model's shapes,
holds every kernel's time at a ladder of loads (tokens per expert); a call runs the kernel whose time,
estimated on the call's own routing (interpolated between rungs), is lowest. Which kernel wins changes
within a factor of two of load (a CPU's skinny GEMMs change code path between 1 and 2 rows), and with
the routing's imbalance (the padded kernel pays every expert at the busiest one's load), so the ladder
is dense and the choice looks at the actual expert counts. The padded and dense kernels also compute
every expert of a weight region that has any token (a `bmm` over the region's stack), hit or not: with
a streamed layer's eight experts in one region and five of them hit, they read all eight; the estimate
charges that. Profiles are cached per device, thread count and shape under the cache folder, so the
profiling step runs once per machine; on a CPU they are measured with the thread count of the worker
that will run the kernels (the GPU role's, `moe_lightning.threads`), not the calling thread's.
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
from moe_lightning.memory import expert_row_elements
from moe_lightning.models.layers import ExpertStack, route

log = logging.getLogger("moe_lightning.kernels")
LOADS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # tokens per expert profiled
KernelTimes = dict[int, dict[str, float]]    # load -> kernel -> seconds
PROFILED_EXPERTS = 4                         # experts in each profiled call


PROFILE_REPS = 5                             # timed calls per kernel and load (the median is kept)
PROFILE_VERSION = 2                          # in the cache key: tables of an older profiling are not read


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


def cached_profile(spec: ModelSpec, dtype: torch.dtype, device: torch.device, threads: int | None = None
                   ) -> KernelTimes:
    """The kernel table for this device and shape, profiled once and cached. `threads` (CPU): the
    intra-op threads of the worker that runs the kernels; default: the calling thread's."""
    if device.type != "cuda" and threads and threads != torch.get_num_threads():
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return cached_profile(spec, dtype, device)
        finally:
            torch.set_num_threads(previous)
    from moe_lightning.engine.tiny import cache_dir

    key = (f"{_device_name(device)}-H{spec.hidden_size}-F{spec.intermediate_size}-k{spec.top_k}-{dtype}-times"
           f"-v{PROFILE_VERSION}")
    path = cache_dir() / "kernel-tables" / (key.replace(" ", "_").replace("/", "_") + ".json")
    if path.exists():
        try:
            cached = {int(k): {str(n): float(t) for n, t in v.items()} for k, v in json.loads(path.read_text()).items()}
            if cached:
                return cached
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("expert-kernel cache %s is unreadable (%s): profiling again", path, exc)
    times = time_kernels(spec, dtype, device, reps=PROFILE_REPS)
    from moe_lightning.files import atomic_write, json_text

    atomic_write(path, json_text(times))
    log.info("expert-kernel table for %s: %s", key, fastest(times))
    return times


def workspace_bytes(kernel: str, counts: list[int], spec: ModelSpec, dtype_bytes: int) -> int:
    """Bytes of `kernel`'s intermediates for `counts[e]` tokens routed to expert e (`engine.experts`;
    the per-row widths of `memory.expert_row_elements`): padded pads every expert to the busiest one,
    dense runs every expert on all T = sum / top_k tokens."""
    rows = {"grouped": sum(counts), "padded": len(counts) * max(counts, default=0),
            "dense": len(counts) * sum(counts) // spec.top_k, "loop": max(counts, default=0)}[kernel]
    return rows * expert_row_elements(spec, kernel, dtype_bytes) * dtype_bytes


class KernelChooser:
    """The expert kernel for the policy: a fixed one, or with `auto` the one whose estimated time on the
    call's actual routing is lowest. A call is itself an `MoEKernel`: it sees the expert ids, so routing
    imbalance counts (the padded kernel pads every expert to the busiest one's tokens; the loop and
    grouped kernels pay each expert at its own load; dense runs every expert on every token). With
    `max_bytes`, `auto` only picks kernels whose intermediates take at most that (`workspace_bytes`;
    the memory plan's bound, `memory.expert_workspace`), so padded and dense run only where their
    workspace is within the plan."""

    def __init__(self, choice: str, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                 times: KernelTimes | None = None, max_bytes: int | None = None, threads: int | None = None):
        if choice != "auto" and choice not in KERNELS:
            raise ConfigError(f"policy.expert_kernel={choice} is not available with torch {torch.__version__} "
                              "(grouped needs torch.nn.functional.grouped_mm); "
                              f"accepted here: auto, {', '.join(KERNELS)}")
        self.spec, self.choice = spec, choice
        self.times = (times or cached_profile(spec, dtype, device, threads)) if choice == "auto" else {}
        self.used: dict[str, int] = {}
        self.max_bytes = max_bytes
        self.dtype_bytes = torch.empty((), dtype=dtype).element_size()

    def estimated_s(self, kernel: str, counts: list[int], regions: list[list[int]] | None = None) -> float:
        """Seconds `kernel` takes for `counts[e]` tokens routed to expert e, from the profile (measured
        on `PROFILED_EXPERTS` experts at uniform loads). `regions`: the expert ids of each weight region
        (`ExpertStack`; default one region of every expert). Padded and dense compute every expert of a
        region with any token: padded at the region's busiest load, dense on all T tokens (a profiled
        load of T k / P has T tokens); loop and grouped each hit expert at its own load."""
        def per_expert(load: float) -> float:
            return interpolated_time(self.times, kernel, load) / PROFILED_EXPERTS

        hit = [c for c in counts if c > 0]
        if not hit:
            return 0.0
        if kernel in ("padded", "dense"):
            regions = regions if regions is not None else [list(range(len(counts)))]
            total = 0.0
            for members in regions:
                busiest = max((counts[e] for e in members), default=0)
                if busiest:
                    load = busiest if kernel == "padded" else sum(hit) / PROFILED_EXPERTS
                    total += len(members) * per_expert(load)
            return total
        return sum(per_expert(c) for c in hit)

    def name_for(self, counts: list[int], regions: list[list[int]] | None = None) -> str:
        if self.choice != "auto":
            return self.choice
        kernels = sorted({k for by_kernel in self.times.values() for k in by_kernel})
        if self.max_bytes is not None:
            fits = [k for k in kernels if workspace_bytes(k, counts, self.spec, self.dtype_bytes) <= self.max_bytes]
            kernels = fits or [k for k in ("grouped", "loop") if k in kernels][:1] or kernels
        return min(kernels, key=lambda k: self.estimated_s(k, counts, regions))

    def __call__(self, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                 experts: ExpertStack) -> torch.Tensor:
        counts = torch.bincount(ids.flatten(), minlength=self.spec.num_experts).tolist() \
            if self.choice == "auto" else []
        regions: list[list[int]] = [[] for _ in experts.w13]
        for e, (r, _) in enumerate(experts.slot_of):
            regions[r].append(e)
        name = self.name_for(counts, regions)
        self.used[name] = self.used.get(name, 0) + 1
        return KERNELS[name](h, weights, ids, experts)
