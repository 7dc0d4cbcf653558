"""The task-graph format shared by every schedule, the engine's executor and the simulator.

A task is `(resource, op, layer, micro_batch, deps)`. Tasks are listed in issue order (the order one
host thread launches them); each resource runs its tasks in that order, one at a time, and a task
starts only when its dependencies have finished. `layer` is the model layer (prefill and decode alike;
-1 for tasks before the first layer); `micro_batch` is the micro-batch, or the page index for weight
transfers.

A graph may also hold host barriers (`TaskGraph.sync`, FlexGen's `sync()` after each step): at a
barrier the issuing thread waits until every task issued so far has finished (on CUDA with a
device-wide synchronise) before it issues the next. The tasks issued after a barrier also depend on
every task issued since the barrier before it, so the dependencies alone say the same order; the
barrier adds what dependencies cannot: the host stall (its round trip, and the issue of the next
tasks only after it), which the executor performs and the simulator charges. A barrier after the last
task is the graph's own end (the executor waits for every task then anyway): it costs nothing more.
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
    # Host barriers: `n` in `syncs` means the issuing thread waits for tasks[:n] to finish before it
    # issues tasks[n] (increasing; see `sync`).
    syncs: list[int] = field(default_factory=list)
    fence: tuple[int, ...] = ()   # the tasks every later task depends on: those of the last synced step

    def add(self, resource: Resource, op: str, layer: int, micro_batch: int,
            deps: Iterable[int | None] = ()) -> int:
        key = (op, layer, micro_batch)
        if key in self.index:
            raise ValueError(f"duplicate task {op}({layer},{micro_batch}) in {self.name}")
        task = Task(len(self.tasks), resource, op, layer, micro_batch,
                    tuple(sorted({d for d in (*deps, *self.fence) if d is not None})))
        self.tasks.append(task)
        self.index[key] = task.id
        return task.id

    def sync(self) -> None:
        """A host barrier after the tasks issued so far: the issuing thread waits until all of them
        have finished before it issues the next one. Every task issued later depends on each task
        issued since the previous barrier (the step just closed; earlier steps are covered through
        it). A barrier with nothing issued since the last one is a no-op."""
        start = self.syncs[-1] if self.syncs else 0
        n = len(self.tasks)
        if n == start:
            return
        self.syncs.append(n)
        self.fence = tuple(range(start, n))

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
        if any(not 0 < n <= len(self.tasks) for n in self.syncs) or self.syncs != sorted(set(self.syncs)):
            raise ValueError(f"{self.name}: barriers {self.syncs} are not increasing positions in the graph")

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
