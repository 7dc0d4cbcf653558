"""The results schema: one JSON document per run (DESIGN §5). Tables and plots are derived from these
documents only."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class Metrics:
    throughput_tok_s: float = 0.0       # generated tokens / (prefill + decode time)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    generated_tokens: int = 0
    decode_step_median_s: float = 0.0
    decode_tok_s: float = 0.0           # generated tokens after the first / decode time
    peak_gpu_bytes: int = 0
    peak_cpu_bytes: int = 0
    link_bytes: dict[str, int] = field(default_factory=lambda: {"h2d": 0, "d2h": 0})
    utilisation: dict[str, float] = field(default_factory=dict)


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
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False, default=str)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunReport:
        d = dict(d)
        d["metrics"] = Metrics(**d.get("metrics", {}))
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
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def peak_cpu_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def as_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)
