"""The root of a run: the specs of `moe_lightning.config` plus the task, the system and the logger.

It sits above the registries it draws its defaults from (tasks, systems, loggers), so the ground floor
(`moe_lightning.config`) imports none of them; Hydra registers this class as the schema
(`moe_lightning.conf.store`), and plain Python code builds it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe_lightning.config import (
    HardwareSpec,
    ModelSpec,
    ParallelConfig,
    Policy,
    Sampling,
    ThreadsConfig,
    TunerConfig,
    Workload,
    _choice,
    check_finite,
)
from moe_lightning.loggers import LOGGER_CONFIGS
from moe_lightning.systems import SYSTEM_CONFIGS
from moe_lightning.tasks import TASK_CONFIGS


@dataclass
class RunConfig:
    """The root of a run: one option per group. `task` and `system` hold their own dataclasses
    (`moe_lightning.tasks.TASK_CONFIGS`, `moe_lightning.systems.SYSTEM_CONFIGS`); they are typed `Any`
    because Hydra cannot pick a subclass of a typed field. Hydra registers this class as the schema."""

    task: Any = None                # None: generate
    system: Any = None              # None: reference
    model: ModelSpec = field(default_factory=ModelSpec)
    hardware: HardwareSpec = field(default_factory=HardwareSpec)
    workload: Workload = field(default_factory=Workload)
    policy: Policy = field(default_factory=Policy)
    sampling: Sampling = field(default_factory=Sampling)
    threads: ThreadsConfig = field(default_factory=ThreadsConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logger: Any = None              # None: no logger; see moe_lightning.loggers.LOGGER_CONFIGS
    out: str | None = None          # run document (JSON) path
    outputs: str | None = None   # generate: outputs JSONL path
    overwrite: bool = False         # replace an existing out= / outputs= file (else the run refuses to start)
    resume: bool = False            # generate: go on from outputs=PATH's part file, left by an interrupted run
    trace: bool = False             # write a Chrome trace and a Gantt plot of the run
    device: str = "auto"            # auto: cuda when available, else the CPU plays the GPU's role
    run_dir: str | None = None   # where unnamed artefacts go (the CLI sets Hydra's output dir)

    def __post_init__(self) -> None:
        self.task = self.task if self.task is not None else TASK_CONFIGS["generate"]()
        self.system = self.system if self.system is not None else SYSTEM_CONFIGS["reference"]()
        self.logger = self.logger if self.logger is not None else LOGGER_CONFIGS["none"]()
        _choice(self.device, "device", ("auto", "cpu", "cuda"))
        check_finite(self)   # every float of every group, the task's, system's and logger's included
