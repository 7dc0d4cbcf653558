"""Expert-kernel selection by load (EPS-MoE): a table, profiled on this machine for the model's shapes,
maps tokens per expert to the fastest kernel. Profiles are cached per device and shape under the cache
folder, so the profiling step runs once per machine.
"""

from __future__ import annotations

import json
import logging
import statistics
import time

import torch

from moe_lightning.config import ModelSpec
from moe_lightning.engine.experts import KERNELS
from moe_lightning.engine.model import ExpertStack, MoEKernel, route
from moe_lightning.errors import ConfigError

log = logging.getLogger("moe_lightning.kernels")
LOADS = (1, 4, 16, 64, 256)  # tokens per expert profiled


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{torch.get_num_threads()}"


def profile_kernels(spec: ModelSpec, dtype: torch.dtype, device: torch.device, reps: int = 3,
                    experts: int = 4) -> dict[int, str]:
    """Time every kernel at each load on `experts` random experts; -> {load: fastest kernel}."""
    times = time_kernels(spec, dtype, device, reps, experts)
    return {load: min(by_kernel, key=by_kernel.get) for load, by_kernel in times.items()}


def time_kernels(spec: ModelSpec, dtype: torch.dtype, device: torch.device, reps: int = 3, experts: int = 4,
                 loads: tuple[int, ...] = LOADS) -> dict[int, dict[str, float]]:
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


def cached_profile(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> dict[int, str]:
    from moe_lightning.engine.tiny import cache_dir

    key = f"{_device_name(device)}-H{spec.hidden_size}-F{spec.intermediate_size}-k{spec.top_k}-{dtype}"
    path = cache_dir() / "kernel-tables" / (key.replace(" ", "_").replace("/", "_") + ".json")
    if path.exists():
        return {int(k): v for k, v in json.loads(path.read_text()).items()}
    table = profile_kernels(spec, dtype, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table))
    log.info("expert-kernel table for %s: %s", key, table)
    return table


class KernelChooser:
    """Picks the expert kernel per call: fixed by the policy, or by load from the profiled table."""

    def __init__(self, choice: str, spec: ModelSpec, dtype: torch.dtype, device: torch.device):
        if choice != "auto" and choice not in KERNELS:
            raise ConfigError(f"policy.expert_kernel={choice} is not available with torch {torch.__version__} "
                              "(grouped needs torch.nn.functional.grouped_mm); "
                              f"accepted here: auto, {', '.join(KERNELS)}")
        self.spec, self.choice = spec, choice
        self.table = cached_profile(spec, dtype, device) if choice == "auto" else {}
        self.used: dict[str, int] = {}

    def name_for(self, tokens: int) -> str:
        if self.choice != "auto":
            return self.choice
        load = tokens * self.spec.top_k / self.spec.num_experts
        nearest = min(self.table, key=lambda b: abs(torch.log2(torch.tensor(b / max(load, 1e-3)))))
        return self.table[nearest]

    def kernel(self, x: torch.Tensor) -> MoEKernel:
        name = self.name_for(x.shape[0])
        self.used[name] = self.used.get(name, 0) + 1
        return KERNELS[name]
