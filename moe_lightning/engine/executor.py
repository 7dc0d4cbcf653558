"""Runs a `TaskGraph` on real resources: one worker per resource, tasks in issue order per resource,
each starting when its dependencies have finished.

On CUDA the GPU and the two copy directions are CUDA streams: a task on a stream that depends on
another stream's task waits on its CUDA event (no host stall); a CPU task that depends on a stream
task synchronises on that event. Without CUDA every resource is a thread, with the CPU playing the
GPU's role, so the same graph and handlers run (and are tested) on any machine.

Workers are OS threads started once per executor and kept across graphs (a fresh thread per graph
paid thread start-up and a fresh OpenMP team every decode step). Each sizes its intra-op team from the
`ThreadLayout` when it starts (`moe_lightning.threads`), so workers never oversubscribe the cores, and
binds itself to the layout's cores where it names some (the issuing thread too, while a graph runs).

A graph's host barriers (`TaskGraph.syncs`, FlexGen's `sync()`) stop the issuing thread until every
task issued so far has finished (their workers done with them and, on CUDA, a device-wide
`torch.cuda.synchronize`, as FlexGen's runtime does) before it issues the next task.

`serial=True` is a debug mode: every task runs on the issuing thread, one at a time in issue order
(CUDA: synchronised after each), so each stage is timed alone and nothing overlaps. A CPU-only graph that
is a chain (each task waits for the one before it) runs that way too: it has nothing to overlap.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_lightning.schedule.graph import Resource, Task, TaskGraph
from moe_lightning.threads import ThreadLayout, bind, set_thread_count, unbind

STREAM_RESOURCES = (Resource.GPU, Resource.H2D, Resource.D2H)


@dataclass
class TaskRecord:
    """When a task ran, in seconds since the graph started (GPU tasks timed by CUDA events)."""

    task: Task
    start_s: float
    end_s: float
    issued_s: float = 0.0   # when the host thread issued it (host clock)


class _Done:
    __slots__ = ("flag", "cuda_end", "cuda_start")

    def __init__(self, threaded: bool) -> None:
        # set when launched (stream) or finished (thread); a graph run on the issuing thread waits on none
        self.flag = threading.Event() if threaded else None
        self.cuda_end: torch.cuda.Event | None = None
        self.cuda_start: torch.cuda.Event | None = None


class _Run:
    """The state of one graph run, shared by the workers (`threaded`: run by them, not the issuing thread)."""

    def __init__(self, graph: TaskGraph, handlers: dict[str, Callable[[Task], None]], threaded: bool = True):
        self.graph, self.handlers = graph, handlers
        self.done = [_Done(threaded) for _ in graph.tasks]
        self.records: list[TaskRecord | None] = [None] * len(graph.tasks)
        self.issued = [0.0] * len(graph.tasks)
        self.errors: list[BaseException] = []
        self.remaining = len(graph.tasks)
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.t0 = time.perf_counter()

    def task_done(self, task: Task) -> None:
        self.done[task.id].flag.set()
        with self.lock:
            self.remaining -= 1
            if self.remaining == 0:
                self.finished.set()


def _stop(queues: list[queue.SimpleQueue]) -> None:
    for q in queues:
        q.put(None)


def _worker(q: queue.SimpleQueue, resource: Resource, threads: ThreadLayout | None, device: torch.device,
            stream) -> None:
    if threads is not None:
        set_thread_count(threads.for_resource(resource.value))
        bind(threads.pin)   # for the thread's life (it runs only this executor's tasks)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    while True:
        item = q.get()
        if item is None:
            return
        run, task = item
        try:
            if not run.errors:
                _wait_for(run, task, stream)
                _execute(run, task, stream)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the host thread
            run.errors.append(exc)
        finally:
            run.task_done(task)
        del item, run, task  # a finished graph's handlers (and the runner behind them) are not kept alive


def _wait_for(run: _Run, task: Task, mine) -> None:
    for d in task.deps:
        dep = run.done[d]
        while not dep.flag.wait(0.5):
            if run.errors:
                raise RuntimeError("aborted")
        if run.errors:
            raise RuntimeError("aborted")
        if dep.cuda_end is not None:
            if mine is not None:
                mine.wait_event(dep.cuda_end)
            else:
                dep.cuda_end.synchronize()


def _execute(run: _Run, task: Task, stream) -> None:
    start = time.perf_counter() - run.t0
    if stream is not None:
        d = run.done[task.id]
        d.cuda_start = torch.cuda.Event(enable_timing=True)
        d.cuda_end = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream), torch.inference_mode():
            d.cuda_start.record(stream)
            run.handlers[task.op](task)
            d.cuda_end.record(stream)
    elif torch.is_inference_mode_enabled():   # a graph run on the issuing thread entered it once
        run.handlers[task.op](task)
    else:
        with torch.inference_mode():
            run.handlers[task.op](task)
    run.records[task.id] = TaskRecord(task, start, time.perf_counter() - run.t0, run.issued[task.id])


def indexed(device: torch.device) -> torch.device:
    """`cuda` as `cuda:<current device>`: `torch.cuda.set_device` and `set_per_process_memory_fraction`
    refuse a CUDA device without an index (the CLI's `device=cuda` and `torch.device("cuda")` have none)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class Executor:
    def __init__(self, device: torch.device, threads: ThreadLayout | None = None, serial: bool = False):
        self.device = device = indexed(device)
        self.cuda = device.type == "cuda"
        self.threads = threads
        self.serial = serial
        self.streams: dict[Resource, torch.cuda.Stream] = {}
        if self.cuda:
            self.streams = {Resource.GPU: torch.cuda.current_stream(device),
                            Resource.H2D: torch.cuda.Stream(device), Resource.D2H: torch.cuda.Stream(device)}
        self._queues: dict[Resource, queue.SimpleQueue] = {}
        self._workers: list[threading.Thread] = []

    def stream(self, resource: Resource) -> torch.cuda.Stream | None:
        return self.streams.get(resource)

    # ----------------------------------------------------------------------------------------------

    def _start_workers(self) -> None:
        if self._workers:
            return
        for r in Resource:
            self._queues[r] = queue.SimpleQueue()
            # The thread holds the queue and settings, not the executor, so an executor that is no longer
            # referenced is collected and its finalizer stops the workers.
            th = threading.Thread(target=_worker, name=f"exec-{r.value}", daemon=True,
                                  args=(self._queues[r], r, self.threads, self.device, self.streams.get(r)))
            th.start()
            self._workers.append(th)
        self._finalizer = weakref.finalize(self, _stop, list(self._queues.values()))

    def close(self) -> None:
        """Stop the workers and wait for them (they are daemons: a process may also just exit)."""
        if self._workers:
            self._finalizer()
            for th in self._workers:
                th.join()
        self._workers, self._queues = [], {}

    # ----------------------------------------------------------------------------------------------

    def run(self, graph: TaskGraph, handlers: dict[str, Callable[[Task], None]]) -> list[TaskRecord]:
        serial = self.serial or (not self.cuda and graph.is_chain())
        # The issuing thread is bound with the workers while the graph runs (`ThreadLayout.pin`), and given
        # its cores back after: it is the caller's thread.
        before = bind(self.threads.pin) if self.threads is not None else None
        try:
            return self._run(graph, handlers, serial)
        finally:
            unbind(before)

    def _run(self, graph: TaskGraph, handlers: dict[str, Callable[[Task], None]], serial: bool) -> list[TaskRecord]:
        run = _Run(graph, handlers, threaded=not serial)
        origin = None
        if self.cuda:
            origin = torch.cuda.Event(enable_timing=True)
            origin.record(self.streams[Resource.GPU])
        if serial:
            # Nothing can overlap (or the debug mode asks for none): hand-offs between threads would
            # only add their latency, so the issuing thread runs the tasks itself.
            self._run_serial(run)
        elif graph.tasks:
            self._start_workers()
            barriers, issued, waited = set(graph.syncs), 0, 0
            try:
                for task in graph.tasks:  # one host thread issues in order
                    run.issued[task.id] = time.perf_counter() - run.t0
                    self._queues[task.resource].put((run, task))
                    issued = task.id + 1
                    if issued in barriers and issued < len(graph.tasks):
                        self._barrier(run, waited, issued)
                        waited = issued
                run.finished.wait()
            except BaseException as exc:
                # Interrupted (SIGINT/SIGTERM): the workers skip what they have not started, and the
                # issuing thread waits for the ops under way (of the tasks it issued), so that no torch
                # op is still running on a worker while the process exits (that aborts it).
                run.errors.append(exc)
                deadline = time.monotonic() + 30
                for d in run.done[:issued]:
                    if not d.flag.wait(max(0.0, deadline - time.monotonic())):
                        break
                raise
        if run.errors:
            raise run.errors[0]
        if self.cuda:
            torch.cuda.synchronize(self.device)
            for rec, d in zip(run.records, run.done):
                if rec is not None and d.cuda_start is not None:
                    rec.start_s = origin.elapsed_time(d.cuda_start) / 1e3
                    rec.end_s = origin.elapsed_time(d.cuda_end) / 1e3
        return [r for r in run.records if r is not None]

    def _barrier(self, run: _Run, start: int, stop: int) -> None:
        """Wait until tasks [start, stop) are done (earlier ones were waited for at the last barrier):
        their workers finished with them (stream tasks: launched), then on CUDA the device-wide
        synchronise. A failed run skips its remaining tasks, so the wait always ends."""
        for d in run.done[start:stop]:
            d.flag.wait()
        if self.cuda and not run.errors:
            torch.cuda.synchronize(self.device)

    def _run_serial(self, run: _Run) -> None:
        """Debug mode: issue order, one task at a time, on this thread (deps always point backwards)."""
        gpu_stream = self.streams.get(Resource.GPU)
        before = torch.get_num_threads()   # the caller's, given back after (it had been left at threads.main)
        if self.threads is not None:
            set_thread_count(self.threads.gpu)
        try:
            with torch.inference_mode():   # once for the graph, not per task
                for task in run.graph.tasks:
                    run.issued[task.id] = time.perf_counter() - run.t0
                    _execute(run, task, gpu_stream)
                    if self.cuda:
                        torch.cuda.synchronize(self.device)
        finally:
            set_thread_count(before)
