"""The one place that decides how many threads every worker gets (the thread and core budget).

Every resource of the executor is an OS thread: the GPU role (on a CPU-only host the CPU plays the GPU
and its kernels run on the host's cores), CPU attention, the pageable -> pinned copy worker and the two
link directions. Each OS thread that runs a torch op owns its own OpenMP team, sized by that thread's
`torch.set_num_threads` (OpenMP's nthreads ICV is per thread). Left alone, every worker takes a team of
all cores, so four workers on two cores run eight spinning threads: runs then differ by 10-40x from one
try to the next. Here the layout is planned once, from the detected cores and from which workers can be
busy at the same moment, and each worker applies its share when it starts.

Rules (C usable cores):
- Small models (an expert matrix under 2^20 elements, e.g. the tiny test model): one thread for every
  worker and for the main thread; a team costs more than such an op (measured: 2-4x slower with two).
  And on a CPU-only host the workers and the issuing thread are bound to one core (`pin`): each op lasts
  microseconds and the Python around it holds the GIL, so the workers barely run at once, and every
  hand-off between them is a wake-up. Across cores that is an inter-processor interrupt, and on a VM
  whose idle vCPU halts, a trip through the hypervisor: a two-thread round trip measured 62-88 us
  across this 2-vCPU VM's cores against 14 us on one, and the tiny model's decode ran 1.2-1.7x
  faster bound to one core (`benchmarks/measurement_stability.py`). Bound, every team is one thread:
  a team of two on one core takes turns through OpenMP's spin-waits (5 tok/s against ~700). Ranks of
  one host (LOCAL_RANK) take different cores.
- Workers that never run at the same time may each use every core. With one micro-batch the decode
  step is a chain (attention, then FFN, then the next layer's attention): the GPU role and CPU attention
  both get C.
- On a CPU-only host, when CPU attention overlaps the GPU role's kernels (two or more micro-batches
  with attention on the CPU), they split the cores: attention gets a quarter (at least one), the GPU
  role the rest.
- On a CPU-only host the copy worker and the two link directions move bytes (memory-bound): one thread each.
- On a CUDA host the GPU role and the link directions only launch asynchronous work: one thread each
  (two cores kept for them). Where experts stream, the copy worker (pageable -> pinned expert pages, what
  feeds the link) and CPU attention split the rest, or the copy worker takes it when attention is not on
  the CPU: with one thread it copied 3.25 GB/s on the H200's 16-core host, whose link moves 51 GB/s, and
  it bounded the decode step (busy 96% of it, Mixtral-8x7B shapes, `results/gpu/mixtral/`). Where
  nothing streams, CPU attention takes the rest.
- The main thread (sampling, the reference engine, accelerate) runs between graphs: C.
- Drawing a random model's weights (untimed, before any worker starts): C threads of one thread each.
- Measured runs take a host-wide lock (`moe_lightning.hostload.measurement_lock`), so parallel tuner
  workers and trial processes never time at the same moment: they are serialized, not partitioned.

Cores: the CPUs this process may run on (`sched_getaffinity`), capped by a cgroup CPU quota, then by
`OMP_NUM_THREADS` if the user set it, then by `threads.cores`. The run document records the layout.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from moe_lightning.config import ThreadsConfig

ATTENTION_SHARE = 0.25   # of the cores, for CPU attention beside the CPU-played GPU (at least one)
# Below this many elements in an expert's weight matrix (hidden x FFN), one op lasts microseconds and an
# OpenMP team's fork, join and spin-wait cost more than the op: one thread per worker, main included.
SMALL_OP_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Cores:
    count: int
    source: str          # what bounded it: affinity, cgroup quota, OMP_NUM_THREADS, threads.cores


def detect_cores(config_cores: int = 0) -> Cores:
    count, source = _affinity(), "sched_getaffinity"
    quota = _cgroup_quota()
    if quota is not None and quota < count:
        count, source = quota, "cgroup cpu quota"
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and 0 < int(omp) < count:
        count, source = int(omp), "OMP_NUM_THREADS"
    if config_cores > 0:
        count, source = config_cores, "threads.cores"
    return Cores(max(1, count), source)


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cgroup_quota() -> int | None:
    """CPUs allowed by a cgroup CPU quota (v2 cpu.max, v1 cfs quota), rounded up; None if unlimited."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return max(1, math.ceil(quota / period)) if quota > 0 else None
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ThreadLayout:
    """Intra-op threads per worker (a `moe_lightning.schedule.graph.Resource` value, plus `main`)."""

    cores: int
    cores_source: str
    gpu: int
    cpu: int
    copy: int
    h2d: int
    d2h: int
    main: int
    rule: str            # which rule chose the split (or "explicit" / "explicit, partly")
    pin: tuple[int, ...] = ()   # the cores the workers and the issuing thread are bound to; () none

    def for_resource(self, resource: str) -> int:
        return getattr(self, resource)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        bound = f", bound to core {', '.join(map(str, self.pin))}" if self.pin else ""
        return (f"{self.cores} cores ({self.cores_source}): gpu {self.gpu}, cpu attention {self.cpu}, copy "
                f"{self.copy}, h2d {self.h2d}, d2h {self.d2h}, main {self.main}{bound} [{self.rule}]")


def plan_threads(config: ThreadsConfig | None, *, cuda: bool, micro_batches: int, attn_on_cpu: bool,
                 op_elements: int = SMALL_OP_ELEMENTS, streamed: bool = True) -> ThreadLayout:
    """The layout for one engine run: which workers can be busy at once decides how cores are split.
    `op_elements`: elements of the largest weight matrix an op reads (hidden x expert FFN); `streamed`:
    whether expert pages cross the link (the copy worker has work)."""
    config = config or _configured
    cores = detect_cores(config.cores)
    c = cores.count
    main, pin = c, False
    if op_elements < SMALL_OP_ELEMENTS and not cuda:
        gpu, cpu, copy, main, rule = 1, 1, 1, 1, "small ops: one thread each, on one core"
        pin = True
    elif cuda and not streamed:
        gpu, cpu, copy, rule = 1, max(1, c - 2), 1, "cuda, nothing streamed: launch threads 1, attention the rest"
    elif cuda:   # the copy worker feeds the link: one thread copied 3.25 GB/s on the H200's host (its link 51)
        spare = max(1, c - 2)
        copy = max(1, spare // 2) if attn_on_cpu else spare
        gpu, cpu = 1, max(1, spare - copy) if attn_on_cpu else 1
        rule = "cuda: launch threads 1, the rest split between the copy worker and attention" if attn_on_cpu \
            else "cuda: launch threads 1, the rest to the copy worker"
    elif micro_batches >= 2 and attn_on_cpu:
        cpu = max(1, round(c * ATTENTION_SHARE))
        gpu, copy, rule = max(1, c - cpu), 1, "cpu host, attention overlaps the GPU role: split"
    else:
        gpu, cpu, copy, rule = c, c, 1, "cpu host, no overlapping compute: every core each"
    chosen = {"gpu": gpu, "cpu": cpu, "copy": copy, "h2d": 1, "d2h": 1, "main": main}
    given = {k: getattr(config, k) for k in chosen if getattr(config, k) > 0}
    named = sorted(given) + (["pin"] if config.pin != "auto" else [])
    if named:
        chosen.update(given)
        rule = "explicit" if len(given) == len(chosen) else f"explicit {', '.join(named)}; " + rule
    # Bound to one core, a team of more would take turns with itself: pin=one runs teams of one (and
    # ThreadsConfig refuses a larger one given beside it); auto binds only a layout of teams of one.
    if config.pin == "one":
        pin, chosen = True, dict.fromkeys(chosen, 1)
    elif config.pin == "none" or any(n > 1 for n in chosen.values()):
        pin = False
    return ThreadLayout(cores=c, cores_source=cores.source, rule=rule, pin=one_core() if pin else (), **chosen)


def one_core() -> tuple[int, ...]:
    """The core a bound run uses, of the cores this process may run on: the one at its local rank for the
    ranks of one host (so they take different cores), else the one the planning thread runs on now (the
    scheduler has spread busy processes, e.g. test workers, over the cores). () where there is no choice
    to make or no affinity to set."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return ()
    if len(allowed) < 2:
        return ()
    rank = os.environ.get("LOCAL_RANK", "")
    if rank.isdigit():
        return (allowed[int(rank) % len(allowed)],)
    now = _current_cpu()
    return (now if now in allowed else allowed[0],)


def _current_cpu() -> int | None:
    """The CPU the calling thread runs on (Linux: field 39 of /proc/thread-self/stat)."""
    try:
        stat = Path("/proc/thread-self/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def bind(cores: tuple[int, ...]) -> set[int] | None:
    """Bind the calling OS thread to `cores` (Linux: pid 0 is the calling thread); returns what it was
    allowed before, to restore, or None when nothing was changed."""
    if not cores:
        return None
    try:
        before = os.sched_getaffinity(0)
        if before != set(cores):
            os.sched_setaffinity(0, cores)
        return before
    except (AttributeError, OSError):
        return None


def unbind(before: set[int] | None) -> None:
    if before is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, before)


def gpu_role_threads(config: ThreadsConfig | None, op_elements: int) -> tuple[int, int]:
    """A CPU-played GPU role's threads: (its split share beside CPU attention, alone), as `plan_threads`
    lays them out. Calibration measures at both; the simulator prices a policy at the one it gets."""
    split = plan_threads(config, cuda=False, micro_batches=2, attn_on_cpu=True, op_elements=op_elements).gpu
    alone = plan_threads(config, cuda=False, micro_batches=1, attn_on_cpu=True, op_elements=op_elements).gpu
    return split, alone


_configured = ThreadsConfig()


def configure(config: ThreadsConfig) -> None:
    """Set this process's thread settings (run_generation does, from `RunConfig.threads`)."""
    global _configured
    _configured = config


def configured() -> ThreadsConfig:
    return _configured


def set_thread_count(n: int) -> None:
    """Size the calling OS thread's intra-op team (OpenMP's nthreads is per thread)."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def main_threads(op_elements: int, cuda: bool, config: ThreadsConfig | None = None) -> int:
    """Threads for the main thread of a run (it never overlaps the workers)."""
    return plan_threads(config, cuda=cuda, micro_batches=1, attn_on_cpu=True, op_elements=op_elements).main


def op_elements(spec) -> int:
    """The largest weight matrix a decode op reads, in elements (a `ModelSpec`)."""
    return spec.hidden_size * spec.intermediate_size


def loader_threads(config: ThreadsConfig | None = None) -> int:
    """Threads that draw a random model's weights: loading is untimed and runs before any worker starts,
    so it takes every core, one thread each."""
    return detect_cores((config or _configured).cores).count


def worker_process_threads(workers: int, config: ThreadsConfig | None = None) -> int:
    """Threads per tuner worker process when `workers` share the host (simulated objectives: they run at
    the same moment; measured trials are serialized by the measurement lock and use the full layout)."""
    return max(1, detect_cores((config or _configured).cores).count // max(1, workers))
