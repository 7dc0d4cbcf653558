"""The results schema: one JSON document per run (DESIGN §5). Tables and plots are derived from these
documents only."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
KINDS = ("measured", "simulated", "predicted")   # every figure is one: this machine, the simulator, HRM


@dataclass
class Spread:
    """A measured quantity over repeats: median first (what tables show), then the spread. With one value
    there is no spread: stdev and cv are None (null in JSON; `n` says why), never 0, which would read as a
    perfectly steady run. With no values every statistic is None."""

    n: int = 0
    median: float | None = None
    mean: float | None = None
    stdev: float | None = None
    min: float | None = None
    max: float | None = None
    p90: float | None = None

    @property
    def cv(self) -> float | None:
        """Coefficient of variation (stdev / mean); None without a stdev (fewer than two values) or a mean
        of 0."""
        return self.stdev / self.mean if self.stdev is not None and self.mean else None

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        import statistics

        v = [float(x) for x in values]
        if not v:
            return cls()
        p90 = statistics.quantiles(v, n=10, method="inclusive")[8] if len(v) > 1 else v[0]
        return cls(n=len(v), median=statistics.median(v), mean=statistics.fmean(v),
                   stdev=statistics.stdev(v) if len(v) > 1 else None, min=min(v), max=max(v), p90=p90)

    def to_dict(self) -> dict[str, float | None]:
        return {**dataclasses.asdict(self), "cv": self.cv}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Spread:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def show(self, fmt: str = ".1f", scale: float = 1.0) -> str:
        """`median ± stdev (cv x%, n k)`; `median (n 1)` without a spread."""
        if self.median is None:
            return "-"
        if self.stdev is None or self.n < 2:   # (documents before null stdevs wrote 0 for one value)
            return f"{self.median * scale:{fmt}} (n {self.n})"
        cv = "cv -" if self.cv is None else f"cv {self.cv:.1%}"
        return f"{self.median * scale:{fmt}} ± {self.stdev * scale:{fmt}} ({cv}, n {self.n})"


@dataclass
class Metrics:
    """What a run achieved. `kind` says where the numbers come from (KINDS); a measured run's headline
    figures are medians over `repeats` timed repeats, with `spread` beside them."""

    # generated tokens / (prefill + decode time); None: nothing was timed (no request ran in this process,
    # as a resumed generate whose part file held every output): no figure, not 0 tokens/s
    throughput_tok_s: float | None = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    generated_tokens: int = 0
    decode_step_median_s: float | None = 0.0   # None: no decode step (one token per request)
    decode_tok_s: float | None = 0.0    # generated tokens after the first / decode time; None: no decode step
    peak_gpu_bytes: int = 0
    peak_cpu_bytes: int = 0
    link_bytes: dict[str, int] = field(default_factory=lambda: {"h2d": 0, "d2h": 0})   # one pass's, as the tokens
    utilisation: dict[str, float] = field(default_factory=dict)
    kind: str = "measured"
    repeats: int = 1
    # throughput_tok_s, prefill_s (per repeat) and decode_step_s (every step of every repeat)
    spread: dict[str, Spread] = field(default_factory=dict)
    noisy: bool = False                 # the spread or the host's load says: do not trust this run
    noise: list[str] = field(default_factory=list)   # why it is noisy

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Metrics:
        d = dict(d)
        d["spread"] = {k: Spread.from_dict(v) for k, v in (d.get("spread") or {}).items()}
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class RunReport:
    system: str
    task: str
    model: dict[str, Any]
    hardware: dict[str, Any]
    workload: dict[str, Any]
    policy: dict[str, Any]
    metrics: Metrics = field(default_factory=Metrics)
    prediction: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    created_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    git_commit: str | None = field(default_factory=lambda: git_commit())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["metrics"]["spread"] = {k: v.to_dict() for k, v in self.metrics.spread.items()}
        return d

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        from moe_lightning.files import atomic_write, json_text

        text = json_text(self.to_dict(), indent=2, sort_keys=False, default=str)
        if path is not None:
            atomic_write(path, text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunReport:
        d = dict(d)
        d["metrics"] = Metrics.from_dict(d.get("metrics", {}))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> RunReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cpu": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "gpu": None}
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):   # not imported: 0.8 s on every run
        env["transformers"] = importlib.metadata.version("transformers")
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    env["cpuidle"] = cpu_idle()
    return env


def cpu_idle() -> dict[str, Any] | None:
    """How this host's idle CPUs wait (Linux cpuidle): the driver and, under a VM's haltpoll driver, how long
    an idle vCPU polls before it halts. At 0 it halts at once, and every wake-up of a thread on another core
    goes through the hypervisor (62-88 us a round trip on the 2-vCPU VM `moe_lightning.threads` describes,
    7 us with 200 us of polling): a setting of the host that moves every number measured on it. None where
    it cannot be read."""
    try:
        info: dict[str, Any] = {"driver": Path("/sys/devices/system/cpu/cpuidle/current_driver").read_text().strip()}
    except OSError:
        return None
    with contextlib.suppress(OSError, ValueError):
        info["guest_halt_poll_ns"] = int(Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns").read_text())
    return info


def peak_cpu_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def as_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)


def flatten_numbers(value: Any, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested document (dataclasses, dicts) under dotted keys, e.g. a logger's summary:
    {"metrics.throughput_tok_s": 812.5, "metrics.spread.throughput_tok_s.stdev": 3.1, ...}."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for k, v in value.items():
            out |= flatten_numbers(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {prefix: value}
    return {}


def where_of(r: RunReport, kind: str | None = None) -> str:
    """Where a figure comes from, one wording for every table: the detected GPU or "this host (cpu)"
    (measured), else the hardware profile (simulated, predicted)."""
    if (kind or r.metrics.kind) == "measured":
        detected = r.hardware.get("detected") or {}
        gpu = detected.get("gpu") or (r.environment or {}).get("gpu")
        return gpu or f"this host ({detected.get('device') or 'cpu'})"
    return f"profile {(r.hardware.get('profile') or {}).get('name')}"
