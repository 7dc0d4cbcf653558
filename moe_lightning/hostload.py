"""What else the host was doing while we measured, the measurement lock, and the host-fit check.

- `HostLoad`: the load average and the CPU time other processes took during a measured window
  (`/proc/stat` busy time of the whole host, steal included, minus this process's own CPU time). A
  measurement beside another busy process is not a measurement of the engine; the run document says so.
- `measurement_lock`: a host-wide file lock held while a run is timed, so parallel tuner workers, trial
  processes and Hydra multirun jobs never time at the same moment (they are serialized, not partitioned).
- `check_fits_host`: before a measured run allocates, the model's bytes against this host's available
  memory and the profile's GPU budget against the detected device: one line and a refusal, instead of
  a machine swapping for minutes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from moe_lightning.errors import ConfigError, MemoryBudgetError

OTHERS_BUSY_CORES = 0.25   # other processes using more than this many cores makes a measurement noisy
GiB = 1 << 30


def _host_busy_s() -> float | None:
    """Busy CPU seconds of the whole host since boot (user+nice+system+irq+softirq+steal)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@dataclass
class HostLoadReport:
    wall_s: float
    loadavg_1m_start: float | None
    loadavg_1m_end: float | None
    others_cpu_s: float | None          # CPU seconds taken by other processes during the window
    others_busy_cores: float | None     # others_cpu_s / wall_s
    lock_wait_s: float = 0.0            # time spent waiting for another measurement to finish

    @property
    def busy(self) -> bool:
        return self.others_busy_cores is not None and self.others_busy_cores > OTHERS_BUSY_CORES

    def to_dict(self) -> dict:
        return {**asdict(self), "busy": self.busy}


class HostLoad:
    """Context manager: the host's load over the measured window. Entered again, it adds that window to
    the earlier ones (an interleaved comparison times a system only in its turns: the other systems'
    turns between them are not this run's noise)."""

    def __init__(self) -> None:
        self.report: HostLoadReport | None = None
        self.own_s = 0.0
        self._others: float | None = 0.0

    def __enter__(self) -> HostLoad:
        self.t0, self.load0 = time.perf_counter(), _loadavg()
        self.busy0, self.own0 = _host_busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        busy1, own = _host_busy_s(), _own_cpu_s() - self.own0
        self.own_s += own
        others = None if busy1 is None or self.busy0 is None or self._others is None \
            else self._others + max(0.0, busy1 - self.busy0 - own)
        self._others = others
        first = self.report
        wall += first.wall_s if first is not None else 0.0
        self.report = HostLoadReport(
            wall_s=wall, loadavg_1m_start=first.loadavg_1m_start if first is not None else self.load0,
            loadavg_1m_end=_loadavg(), others_cpu_s=others,
            others_busy_cores=None if others is None or wall <= 0 else others / wall)

    def exclude(self, sibling_cpu_s: float) -> None:
        """Count `sibling_cpu_s` (this run's other ranks on this host) as this run's, not others'."""
        r = self.report
        if r is None or r.others_cpu_s is None:
            return
        r.others_cpu_s = self._others = max(0.0, r.others_cpu_s - sibling_cpu_s)
        r.others_busy_cores = r.others_cpu_s / r.wall_s if r.wall_s > 0 else None


def lock_path() -> Path:
    return Path(os.environ.get("MOE_LIGHTNING_LOCK_DIR") or tempfile.gettempdir()) / "moe-lightning-measure.lock"


@contextlib.contextmanager
def measurement_lock(enabled: bool = True) -> Iterator[float]:
    """Hold the host-wide measurement lock; yields the seconds spent waiting for it. The ranks of one
    several-rank run measure together: only its first rank on this host takes it (`enabled`)."""
    if not enabled:
        yield 0.0
        return
    path = lock_path()
    t0 = time.perf_counter()
    try:
        f = open(path, "a+")  # noqa: SIM115 - held for the whole block
    except OSError:  # an unwritable lock folder must not stop a run: it is measured unserialized
        yield 0.0
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.perf_counter() - t0
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---- will it fit on this host? ---------------------------------------------------------------------

def available_host_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits_host(spec, hardware, device, weight_bytes: int | None = None, ranks: int = 1) -> None:
    """Refuse (one line) a measured run on a profile of several GPUs but not one rank each, or whose model
    cannot be held by this host, or whose GPU budget is larger than the detected GPU. `spec` is a
    ModelSpec, `hardware` a HardwareSpec, `device` a torch device. On a CPU-only host every pool, the
    GPU role's included, lives in host memory."""
    if hardware.gpu.count > 1 and hardware.gpu.count != ranks:
        raise ConfigError(
            f"hardware={hardware.name} has {hardware.gpu.count} GPUs, but this run has {ranks} rank(s), one device "
            f"each: run parallel.tensor x parallel.expert = {hardware.gpu.count} ranks (system=reference), measure "
            f"with a one-GPU profile (e.g. hardware=t4), or plan or simulate {hardware.name} (task=plan / "
            "task=simulate)")
    # By default the weights as a streaming engine holds them: MXFP4 experts as stored (4.25 bits a weight);
    # the reference engine dequantizes every expert as it loads and passes its own `weight_bytes`.
    need = weight_bytes if weight_bytes is not None else spec.streamed_weight_bytes
    avail = available_host_bytes()
    if avail is not None and need > avail:
        raise MemoryBudgetError(
            f"model {spec.name} needs {need / GiB:.1f} GiB of host memory for its weights but this host has "
            f"{avail / GiB:.1f} GiB available: measure a smaller model (e.g. model.num_layers=2), or time it "
            f"for this hardware with task=simulate / tuner.objective=simulate")
    if device.type == "cuda":
        import torch

        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(hardware.gpu.memory_gib * GiB * hardware.gpu.usable_fraction)   # one GPU's (each rank's)
        if budget > total:
            raise MemoryBudgetError(
                f"hardware={hardware.name} budgets {budget / GiB:.1f} GiB of GPU memory per GPU but "
                f"{torch.cuda.get_device_name(device)} has {total / GiB:.1f} GiB: pick a profile for this GPU "
                f"(task=calibrate writes one) or lower hardware.gpu.memory_gib")
