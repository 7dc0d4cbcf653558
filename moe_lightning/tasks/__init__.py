"""Tasks: what a run does (generate, plan, bench, ...). Each task is a config dataclass with a `run`
method taking the whole `RunConfig` and returning a `RunReport`."""

from __future__ import annotations

from moe_lightning.tasks.bench import BenchTask
from moe_lightning.tasks.calibrate import CalibrateTask
from moe_lightning.tasks.compare import CompareTask
from moe_lightning.tasks.generate import GenerateTask
from moe_lightning.tasks.plan import PlanTask
from moe_lightning.tasks.report import ReportTask
from moe_lightning.tasks.simulate import SimulateTask
from moe_lightning.tasks.tune import TuneTask

TASK_CONFIGS: dict[str, type] = {"generate": GenerateTask, "bench": BenchTask,
                               "plan": PlanTask, "simulate": SimulateTask, "calibrate": CalibrateTask,
                               "tune": TuneTask, "report": ReportTask, "compare": CompareTask}
