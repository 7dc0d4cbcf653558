"""The task-graph format shared by every schedule, the engine's executor and the simulator.

A task is `(resource, op, layer, micro_batch, deps)`. Tasks are listed in issue order (the order one
host thread launches them); each resource runs its tasks in that order, one at a time, and a task
starts only when its dependencies have finished. `layer` is the model layer (prefill and decode alike;
-1 for tasks before the first layer); `micro_batch` is the micro-batch, or the page index for weight
transfers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum


class Resource(str, Enum):
    GPU = "gpu"      # GPU compute stream (the CPU plays it on a CPU-only machine)
    CPU = "cpu"      # CPU compute (attention beside the KV cache)
    H2D = "h2d"      # CPU -> GPU copies (pinned -> device)
    D2H = "d2h"      # GPU -> CPU copies
    COPY = "copy"    # CPU copy worker: pageable -> pinned staging


@dataclass(frozen=True)
class Task:
    id: int
    resource: Resource
    op: str
    layer: int
    micro_batch: int
    deps: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.op}({self.layer},{self.micro_batch})"


@dataclass
class TaskGraph:
    """An ordered list of tasks with a lookup by (op, layer, micro_batch)."""

    name: str
    tasks: list[Task] = field(default_factory=list)
    index: dict[tuple[str, int, int], int] = field(default_factory=dict)

    def add(self, resource: Resource, op: str, layer: int, micro_batch: int,
            deps: Iterable[int | None] = ()) -> int:
        key = (op, layer, micro_batch)
        if key in self.index:
            raise ValueError(f"duplicate task {op}({layer},{micro_batch}) in {self.name}")
        task = Task(len(self.tasks), resource, op, layer, micro_batch,
                    tuple(sorted({d for d in deps if d is not None})))
        self.tasks.append(task)
        self.index[key] = task.id
        return task.id

    def get(self, op: str, layer: int, micro_batch: int) -> int | None:
        return self.index.get((op, layer, micro_batch))

    def __len__(self) -> int:
        return len(self.tasks)

    def validate(self) -> None:
        """Every dependency points backwards in issue order (so one host thread can launch the graph)."""
        for t in self.tasks:
            for d in t.deps:
                if d >= t.id:
                    raise ValueError(f"{t.label} depends on a later task {self.tasks[d].label}")

    def is_chain(self) -> bool:
        """Every task depends on the one issued before it: nothing in the graph can overlap. (Asked once
        per graph run; memoised for the task count it was computed at.)"""
        memo = self.__dict__.get("_chain")
        if memo is None or memo[0] != len(self.tasks):
            memo = (len(self.tasks), all(t.id - 1 in t.deps for t in self.tasks[1:]))
            self.__dict__["_chain"] = memo
        return memo[1]

    def ops(self) -> list[str]:
        return [t.label for t in self.tasks]
