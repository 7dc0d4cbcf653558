"""The thread and core budget: layouts from the detected cores, applied by every executor worker, workers
kept across graphs and stopped with their executor, and the measurement lock serializing processes."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import threading
import time

import pytest
import torch

from moe_lightning.config import ThreadsConfig
from moe_lightning.engine.executor import Executor
from moe_lightning.errors import ConfigError
from moe_lightning.schedule.graph import Resource, TaskGraph
from moe_lightning.threads import SMALL_OP_ELEMENTS, detect_cores, plan_threads

BIG = SMALL_OP_ELEMENTS * 4
CPU = torch.device("cpu")


def test_overlapping_workers_never_oversubscribe_the_cores():
    for cores in (2, 4, 8, 16, 64):
        t = plan_threads(ThreadsConfig(cores=cores), cuda=False, micro_batches=4, attn_on_cpu=True, op_elements=BIG)
        assert t.gpu + t.cpu <= cores and t.gpu >= 1 and t.cpu >= 1, t
        assert t.main == cores and t.copy == t.h2d == t.d2h == 1


def test_workers_that_never_overlap_each_get_every_core():
    t = plan_threads(ThreadsConfig(cores=8), cuda=False, micro_batches=1, attn_on_cpu=True, op_elements=BIG)
    assert (t.gpu, t.cpu, t.main) == (8, 8, 8)
    t = plan_threads(ThreadsConfig(cores=8), cuda=False, micro_batches=4, attn_on_cpu=False, op_elements=BIG)
    assert t.gpu == 8  # attention on the GPU role: the CPU only copies


def test_small_ops_get_one_thread_everywhere():
    t = plan_threads(ThreadsConfig(cores=8), cuda=False, micro_batches=1, attn_on_cpu=True, op_elements=64 * 128)
    assert (t.gpu, t.cpu, t.copy, t.main) == (1, 1, 1, 1)


two_cores = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="binding to one core needs two to choose from")


@two_cores
def test_small_ops_bind_the_engine_to_one_core_unless_a_team_or_the_user_says_otherwise(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    allowed = sorted(os.sched_getaffinity(0))
    small = {"cuda": False, "micro_batches": 2, "attn_on_cpu": True, "op_elements": 64 * 128}
    pinned = plan_threads(ThreadsConfig(), **small).pin
    assert len(pinned) == 1 and pinned[0] in allowed
    assert plan_threads(ThreadsConfig(gpu=2), **small).pin == ()   # a team of two is not bound to one core
    assert plan_threads(ThreadsConfig(pin="none"), **small).pin == ()
    assert plan_threads(ThreadsConfig(), **{**small, "op_elements": BIG}).pin == ()
    assert len(plan_threads(ThreadsConfig(pin="one"), **{**small, "op_elements": BIG}).pin) == 1
    monkeypatch.setenv("LOCAL_RANK", "0")   # ranks of one host take different cores
    assert plan_threads(ThreadsConfig(), **small).pin == (allowed[0],)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert plan_threads(ThreadsConfig(), **small).pin == (allowed[1],)


@two_cores
def test_bound_workers_and_the_issuing_thread_run_on_the_layouts_core_and_the_caller_gets_its_cores_back():
    layout = plan_threads(ThreadsConfig(pin="one"), cuda=False, micro_batches=2, attn_on_cpu=True,
                          op_elements=64 * 128)
    before = os.sched_getaffinity(0)
    seen: dict[str, set] = {}

    def handler(task):
        seen.setdefault(task.resource.value, set()).update(os.sched_getaffinity(0))

    g = TaskGraph("fan")
    for n, r in enumerate((Resource.GPU, Resource.CPU, Resource.COPY)):  # independent tasks: run by workers
        g.add(r, "op", 0, n)
    chain = TaskGraph("chain")   # a chain runs on the issuing thread
    chain.add(Resource.GPU, "main", 0, 0)
    chain.add(Resource.CPU, "main", 0, 1, [0])
    ex = Executor(CPU, threads=layout)
    ex.run(g, {"op": handler})
    ex.run(chain, {"main": lambda t: seen.setdefault("issuing", set()).update(os.sched_getaffinity(0))})
    ex.close()
    assert seen == {r: set(layout.pin) for r in ("gpu", "cpu", "copy", "issuing")}
    assert os.sched_getaffinity(0) == before


def test_a_chain_run_on_the_callers_thread_gives_it_back_its_thread_count():
    """A chain runs on the issuing thread with the GPU role's team; the caller's own count comes back after.
    It had been left at the layout's main-thread count: after a padded FlexGen run through the Python API
    the caller's torch ran on one thread instead of two (and transformers' fp32 tokens beside it changed)."""
    layout = plan_threads(None, cuda=False, micro_batches=1, attn_on_cpu=True, op_elements=64 * 128)
    assert layout.main == 1   # small ops: a team of one everywhere
    chain = TaskGraph("chain")
    chain.add(Resource.GPU, "main", 0, 0)
    chain.add(Resource.CPU, "main", 0, 1, [0])
    ex = Executor(CPU, threads=layout)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ex.run(chain, {"main": lambda t: None})
        assert torch.get_num_threads() == 2
    finally:
        ex.close()
        torch.set_num_threads(before)


def test_an_unknown_pin_is_refused():
    with pytest.raises(ConfigError, match="threads.pin"):
        ThreadsConfig(pin="two")


def test_one_core_runs_teams_of_one_and_refuses_a_bigger_team():
    """A team of two bound to one core took turns through OpenMP's spin-waits: 5 tok/s against ~700."""
    t = plan_threads(ThreadsConfig(cores=8, pin="one"), cuda=False, micro_batches=1, attn_on_cpu=True,
                     op_elements=BIG)
    assert (t.gpu, t.cpu, t.copy, t.h2d, t.d2h, t.main) == (1,) * 6
    with pytest.raises(ConfigError, match="threads.pin: one with threads.gpu=2"):
        ThreadsConfig(gpu=2, pin="one")


def test_cuda_launch_threads_get_one_and_the_copy_worker_and_attention_split_the_rest():
    t = plan_threads(ThreadsConfig(cores=16), cuda=True, micro_batches=8, attn_on_cpu=True, op_elements=BIG)
    assert (t.gpu, t.h2d, t.d2h) == (1, 1, 1) and (t.copy, t.cpu) == (7, 7) and t.main == 16
    t = plan_threads(ThreadsConfig(cores=16), cuda=True, micro_batches=8, attn_on_cpu=False, op_elements=BIG)
    assert (t.gpu, t.h2d, t.d2h, t.copy) == (1, 1, 1, 14)
    t = plan_threads(ThreadsConfig(cores=2), cuda=True, micro_batches=8, attn_on_cpu=True, op_elements=BIG)
    assert (t.copy, t.cpu) == (1, 1)
    t = plan_threads(ThreadsConfig(cores=16), cuda=True, micro_batches=8, attn_on_cpu=True, op_elements=BIG,
                     streamed=False)   # every expert resident: the copy worker has nothing to copy
    assert (t.gpu, t.h2d, t.d2h, t.copy) == (1, 1, 1, 1) and t.cpu == 14


def test_explicit_threads_win_and_are_named():
    t = plan_threads(ThreadsConfig(cores=4, gpu=3), cuda=False, micro_batches=4, attn_on_cpu=True, op_elements=BIG)
    assert t.gpu == 3 and t.cpu == 1 and t.rule.startswith("explicit gpu")


def test_cores_come_from_affinity_then_omp_then_config(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    import os

    assert detect_cores().count <= len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert detect_cores().count == 1 and detect_cores().source == "OMP_NUM_THREADS"
    assert detect_cores(3).count == 3 and detect_cores(3).source == "threads.cores"


def test_bad_thread_settings_are_refused():
    with pytest.raises(ConfigError, match="threads.gpu"):
        ThreadsConfig(gpu=-1)


def test_each_worker_runs_with_its_planned_threads_and_persists_across_graphs():
    layout = plan_threads(ThreadsConfig(cores=2, gpu=2, cpu=1), cuda=False, micro_batches=2, attn_on_cpu=True,
                          op_elements=BIG)
    seen: dict[str, set] = {}

    def handler(task):
        seen.setdefault(task.resource.value, set()).add((torch.get_num_threads(), threading.get_ident()))

    g = TaskGraph("fan")
    for n, r in enumerate((Resource.GPU, Resource.CPU, Resource.COPY)):  # independent tasks: not a chain
        g.add(r, "op", 0, n)
        g.add(r, "op", 1, n)
    ex = Executor(CPU, threads=layout)
    ex.run(g, {"op": handler})
    ex.run(g, {"op": handler})
    threads = {r: {n for n, _ in seen[r]} for r in seen}
    assert threads == {"gpu": {2}, "cpu": {1}, "copy": {1}}
    assert all(len(v) == 1 for v in seen.values())  # one thread per resource, the same over both graphs
    ex.close()


def test_an_unreferenced_executor_stops_its_workers():
    # Judge this executor's own threads: other tests' executors collected meanwhile change the global count.
    before = set(threading.enumerate())
    g = TaskGraph("fan")
    g.add(Resource.GPU, "op", 0, 0)
    g.add(Resource.CPU, "op", 0, 1)
    ex = Executor(CPU)
    ex.run(g, {"op": lambda t: None})
    workers = [t for t in threading.enumerate() if t not in before and t.name.startswith("exec-")]
    assert len(workers) == len(Resource)
    del ex
    gc.collect()
    deadline = time.time() + 5
    while any(t.is_alive() for t in workers) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(t.is_alive() for t in workers)


def test_a_failing_task_is_raised_and_the_next_graph_still_runs():
    g = TaskGraph("fan")
    g.add(Resource.GPU, "boom", 0, 0)
    g.add(Resource.CPU, "op", 0, 1, [0])
    ex = Executor(CPU)

    def boom(task):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        ex.run(g, {"boom": boom, "op": lambda t: None})
    assert len(ex.run(g, {"boom": lambda t: None, "op": lambda t: None})) == 2


def test_serial_mode_overlaps_nothing():
    """Independent tasks of known duration: the pipelined executor runs them at once, serial mode not."""
    g = TaskGraph("fan")
    for r in (Resource.GPU, Resource.CPU, Resource.H2D):
        g.add(r, "sleep", 0, list(Resource).index(r))
    handlers = {"sleep": lambda t: time.sleep(0.05)}
    for serial, low, high in ((False, 2.0, 3.1), (True, 0.0, 1.01)):
        records = Executor(CPU, serial=serial).run(g, handlers)
        wall = max(r.end_s for r in records) - min(r.start_s for r in records)
        overlap = sum(r.end_s - r.start_s for r in records) / wall
        assert low <= overlap <= high, (serial, overlap)


def _hold_lock(q, lock_dir: str) -> None:
    import os

    os.environ["MOE_LIGHTNING_LOCK_DIR"] = lock_dir
    from moe_lightning.hostload import measurement_lock

    with measurement_lock():
        start = time.time()
        time.sleep(0.4)
        q.put((start, time.time()))


def test_measurement_lock_serializes_processes(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hold_lock, args=(q, str(tmp_path))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    (a0, a1), (b0, b1) = sorted([q.get(timeout=5), q.get(timeout=5)])
    assert b0 >= a1  # the second measurement started after the first ended
