"""Schedules as data: each schedule emits a `TaskGraph`; the engine's executor runs it on devices and
the simulator times it with a cost model. One definition, two executors."""

from moe_lightning.schedule.graph import Resource, Task, TaskGraph

__all__ = ["Resource", "Task", "TaskGraph"]
