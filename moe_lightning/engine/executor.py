"""Runs a `TaskGraph` on real resources: one worker per resource, tasks in issue order per resource,
each starting when its dependencies have finished.

On CUDA the GPU and the two copy directions are CUDA streams: a task on a stream that depends on
another stream's task waits on its CUDA event (no host stall); a CPU task that depends on a stream
task synchronises on that event. Without CUDA every resource is a thread, with the CPU playing the
GPU's role, so the same graph and handlers run (and are tested) on any machine.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_lightning.schedule.graph import Resource, Task, TaskGraph

STREAM_RESOURCES = (Resource.GPU, Resource.H2D, Resource.D2H)


@dataclass
class TaskRecord:
    """When a task ran, in seconds since the graph started (GPU tasks timed by CUDA events)."""

    task: Task
    start_s: float
    end_s: float
    issued_s: float = 0.0   # when the host thread issued it (host clock)


class _Done:
    def __init__(self) -> None:
        self.flag = threading.Event()     # set when launched (stream) or finished (thread)
        self.cuda_end: torch.cuda.Event | None = None
        self.cuda_start: torch.cuda.Event | None = None


class Executor:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.streams: dict[Resource, torch.cuda.Stream] = {}
        if self.cuda:
            self.streams = {Resource.GPU: torch.cuda.current_stream(device),
                            Resource.H2D: torch.cuda.Stream(device), Resource.D2H: torch.cuda.Stream(device)}

    def stream(self, resource: Resource) -> torch.cuda.Stream | None:
        return self.streams.get(resource)

    def run(self, graph: TaskGraph, handlers: dict[str, Callable[[Task], None]]) -> list[TaskRecord]:
        done = [_Done() for _ in graph.tasks]
        records: list[TaskRecord | None] = [None] * len(graph.tasks)
        issued = [0.0] * len(graph.tasks)
        errors: list[BaseException] = []
        queues: dict[Resource, queue.Queue] = {r: queue.Queue() for r in Resource}
        t0 = time.perf_counter()
        origin = None
        if self.cuda:
            origin = torch.cuda.Event(enable_timing=True)
            origin.record(self.streams[Resource.GPU])

        def wait_for(task: Task) -> None:
            mine = self.streams.get(task.resource)
            for d in task.deps:
                dep = done[d]
                while not dep.flag.wait(0.5):
                    if errors:
                        raise RuntimeError("aborted")
                if dep.cuda_end is not None:
                    if mine is not None:
                        mine.wait_event(dep.cuda_end)
                    else:
                        dep.cuda_end.synchronize()

        def worker(resource: Resource) -> None:
            stream = self.streams.get(resource)
            if self.cuda:
                torch.cuda.set_device(self.device)
            while True:
                task = queues[resource].get()
                if task is None:
                    return
                try:
                    wait_for(task)
                    start = time.perf_counter() - t0
                    if stream is not None:
                        d = done[task.id]
                        d.cuda_start = torch.cuda.Event(enable_timing=True)
                        d.cuda_end = torch.cuda.Event(enable_timing=True)
                        with torch.cuda.stream(stream), torch.inference_mode():
                            d.cuda_start.record(stream)
                            handlers[task.op](task)
                            d.cuda_end.record(stream)
                    else:
                        with torch.inference_mode():
                            handlers[task.op](task)
                    records[task.id] = TaskRecord(task, start, time.perf_counter() - t0, issued[task.id])
                except BaseException as exc:  # noqa: BLE001 - re-raised on the host thread
                    errors.append(exc)
                finally:
                    done[task.id].flag.set()

        threads = [threading.Thread(target=worker, args=(r,), name=f"exec-{r.value}", daemon=True)
                   for r in Resource]
        for th in threads:
            th.start()
        for task in graph.tasks:  # one host thread issues in order
            issued[task.id] = time.perf_counter() - t0
            queues[task.resource].put(task)
        for r in Resource:
            queues[r].put(None)
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        if self.cuda:
            torch.cuda.synchronize(self.device)
            for rec, d in zip(records, done):
                if rec is not None and d.cuda_start is not None:
                    rec.start_s = origin.elapsed_time(d.cuda_start) / 1e3
                    rec.end_s = origin.elapsed_time(d.cuda_end) / 1e3
        return [r for r in records if r is not None]
