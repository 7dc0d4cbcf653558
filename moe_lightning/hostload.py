"""What else the host was doing while we measured, the measurement lock, and the host-fit check.

- `HostLoad`: the load average and the CPU time other processes took during a measured window
  (`/proc/stat` busy time of the whole host, steal included, minus this process's own CPU time). A
  measurement beside another busy process is not a measurement of the engine; the run document says so.
- `measurement_lock`: a host-wide file lock held while a run is timed, so parallel tuner workers, trial
  processes and Hydra multirun jobs never time at the same moment (they are serialized, not partitioned).
- `HostSpeed`: the host's own speed around each timed repeat, by a fixed CPU probe: a shared VM's core
  can run at half speed for seconds while no process, load figure or steal counter inside it shows
  why. A measured run waits such a stretch out, times a repeat it slowed again, and says so.
- `check_fits_host`: before a measured run allocates, the model's bytes against this host's available
  memory and the profile's GPU budget against the detected device: one line and a refusal, instead of
  a machine swapping for minutes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from moe_lightning.config import HOST_WAIT_S
from moe_lightning.errors import ConfigError, MemoryBudgetError

OTHERS_BUSY_CORES = 0.25   # other processes using more than this many cores makes a measurement noisy
GiB = 1 << 30
log = logging.getLogger(__name__)


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


# ---- the host's own speed ----------------------------------------------------------------------------
# On the 2-core VM this was built on, a fixed CPU workload and the tiny model's decode both ran at
# 0.5-0.7x for 2-17 s stretches, a few times in four minutes, with this process alone busy and no steal
# counted (results/host_slowdown_20261204-201300.json): another tenant of the physical core. A repeat
# timed in such a stretch moves a run's median by up to 2x; across fresh processes that was the CV
# above 5%.
SLOWED = 0.8            # a probe at under 0.8x the host's usual speed: the host is slowed
PROBE_POLL_S = 0.25     # while slowed: sleep this long between probes
PROBE_FRESH_S = 0.05    # a repeat's closing probe is the next one's opening probe if this recent
PROBE_HISTORY = 64      # probes kept per host (the cache): ~10 bench runs, so a lasting change is learnt soon
PROBE_VERSION = 2       # part of the history's key: a changed probe starts a new history


def probe_s() -> float:
    """Seconds a fixed CPU workload takes on this thread now (~12 ms on a 2.6 GHz EPYC vCPU): an
    interpreter loop and small torch ops, the mix of a small model's decode step, on tensors of 64
    elements (one thread, whatever the thread count). Timed whole, not the best of several short runs:
    a core shared by time slices of a few ms would let a short run fit between them."""
    import torch

    t = time.perf_counter()
    x, s = torch.ones(64), 0
    for _ in range(7):
        for i in range(30_000):
            s += i * i
        for _ in range(200):
            x = x * 0.5 + 0.5
    return time.perf_counter() - t


def probe_history_path() -> Path:
    from moe_lightning.engine.tiny import cache_dir

    return cache_dir() / "host-speed.json"


def _probe_key() -> str:
    import torch

    return (f"probe v{PROBE_VERSION} on {platform.node()} ({platform.machine()}), python "
            f"{sys.version_info.major}.{sys.version_info.minor}, torch {torch.__version__}")


@dataclass
class HostSpeedReport:
    usual_probe_s: float | None        # the host's usual probe time: the fast end (10%) of the history
    history_probes: int                # probes of earlier runs on this host it was taken from
    speeds: list[float]                # each kept repeat's speed: the lower of its two probes / usual
    retimed_repeats: int               # repeats timed on a slowed host and timed again
    slowed_kept_repeats: int           # repeats kept though slowed (the budget was spent)
    waited_s: float                    # time spent waiting for the host to recover
    budget_s: float
    slowed_below: float = SLOWED

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def noise(self) -> str | None:
        if not self.slowed_kept_repeats:
            return None
        slowest = min(self.speeds)
        return (f"the host ran slowed during {self.slowed_kept_repeats} of {len(self.speeds)} repeats (a fixed "
                f"CPU probe at {slowest:.2f}x its usual speed, with no busy process here: another tenant of "
                f"the physical core?), still so after {self.budget_s:.0f} s of waiting and re-timing "
                "(host_wait_s)")


class HostSpeed:
    """Waits out, and re-times around, a host that runs slower than usual (see SLOWED).

    Only a slowdown no process explains counts: while other processes keep more than OTHERS_BUSY_CORES
    busy, a slow probe is `HostLoad`'s to report (the run is noisy for it), not one to wait out.
    Before each timed repeat the host is probed (`probe_s`; the previous repeat's closing probe, when
    this one follows at once); while it runs under SLOWED of its usual speed the run sleeps and probes
    again. After the repeat it is probed again, and a repeat either probe found slowed is timed again.
    Waiting and re-timing share `budget_s`; once spent, repeats are kept as timed and the report says
    how many ran slowed. The usual speed is the fast end (10th percentile of the time) of the last
    PROBE_HISTORY probes on this host (`probe_history_path`) and this run's: a run that starts inside a
    slow stretch is judged against the host's earlier runs, not itself. With `retime=False` (outputs
    streamed as they finish) a repeat is never timed again."""

    def __init__(self, budget_s: float = HOST_WAIT_S, retime: bool = True, probe: Callable[[], float] | None = None,
                 history: Path | None = None) -> None:
        self.budget_s, self.retime, self._probe = budget_s, retime, probe or probe_s
        self._path = history if history is not None else probe_history_path()
        self._key = _probe_key()
        self._past = self._load()
        self._mine: list[float] = []   # this run's probes around its repeats (not those while waiting)
        self.spent_s = self.waited_s = 0.0
        self.speeds: list[float] = []
        self.retimed = self.slowed_kept = 0
        self._last: tuple[float, float] | None = None   # (when, speed) of the last probe around a repeat
        self._mark = (_host_busy_s(), _own_cpu_s(), time.perf_counter())
        self._seen = False   # other processes were busy in the interval the last probe closed

    def _load(self) -> list[float]:
        try:
            past = json.loads(self._path.read_text()).get(self._key, [])
            return [float(x) for x in past if isinstance(x, (int, float)) and x > 0]
        except (OSError, ValueError, AttributeError):
            return []

    def _usual(self) -> float:
        times = sorted(self._past + self._mine)
        return times[len(times) // 10]

    def speed(self, record: bool = True) -> float:
        """Probe now: the host's speed against its usual (1.0 usual, 0.5 half). `record`: add the probe to
        the host's history (not the probes taken while waiting: a long wait would crowd out the rest)."""
        t = max(self._probe(), 1e-12)
        if record:
            self._mine.append(t)
        s = (self._usual() if self._past or self._mine else t) / t
        self._last = (time.perf_counter(), s)
        self._seen = self._others_busy()
        return s

    def _others_busy(self) -> bool:
        """Whether other processes kept more than OTHERS_BUSY_CORES busy since the last probe: a slowdown
        they explain is `HostLoad`'s to report, and waiting for them could take as long as they run (a
        test suite's other workers)."""
        busy, own, now = _host_busy_s(), _own_cpu_s(), time.perf_counter()
        (busy0, own0, then), self._mark = self._mark, (busy, own, now)
        if busy is None or busy0 is None or now <= then:
            return False
        return (busy - busy0 - (own - own0)) / (now - then) > OTHERS_BUSY_CORES

    def _slowed(self, s: float) -> bool:
        return s < SLOWED and not self._seen

    def _left(self) -> float:
        return self.budget_s - self.spent_s

    def ready(self) -> float:
        """Before a repeat: the host's speed, after waiting (budget allowing) until it is not slowed."""
        last = self._last
        s = last[1] if last is not None and time.perf_counter() - last[0] < PROBE_FRESH_S else self.speed()
        while self._slowed(s) and self._left() > 0:
            nap = min(PROBE_POLL_S, self._left())
            time.sleep(nap)
            self.spent_s += nap
            self.waited_s += nap
            s = self.speed(record=False)
        return s

    def keep(self, before: float, repeat_s: float) -> bool:
        """After a repeat of `repeat_s` that `ready` cleared at speed `before`: whether to keep it (False:
        the host was slowed at either end, and there is budget to time it again)."""
        after = self.speed()
        s = min(before, after)
        if self._slowed(s) and self.retime and self._left() >= repeat_s:
            self.spent_s += repeat_s
            self.retimed += 1
            return False
        self.speeds.append(round(s, 3))
        self.slowed_kept += self._slowed(s)
        return True

    @property
    def report(self) -> HostSpeedReport:
        usual = self._usual() if self._past or self._mine else None
        return HostSpeedReport(usual_probe_s=usual, history_probes=len(self._past), speeds=self.speeds,
                               retimed_repeats=self.retimed, slowed_kept_repeats=self.slowed_kept,
                               waited_s=round(self.waited_s, 3), budget_s=self.budget_s)

    def save(self) -> None:
        """Add this run's probes to the host's history (atomically; a cache that cannot be written is
        skipped: the next run judges by its own probes)."""
        from moe_lightning.files import atomic_write

        if not self._mine:
            return
        try:
            try:
                doc = json.loads(self._path.read_text())
                doc = doc if isinstance(doc, dict) else {}
            except (OSError, ValueError):
                doc = {}
            past = [x for x in doc.get(self._key, []) if isinstance(x, (int, float))]
            doc[self._key] = [round(x, 7) for x in (past + self._mine)[-PROBE_HISTORY:]]
            self._path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self._path, json.dumps(doc, indent=1) + "\n")
        except OSError as exc:
            log.debug("host speed history not saved: %s", exc)


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
