"""The schedule simulator: times the task graphs the engine runs, on any hardware profile.

`simulate_graph` is a discrete-event model of the executor (`moe_lightning.engine.executor`): each
resource (GPU, CPU, H2D, D2H, COPY) runs its tasks one at a time in issue order, and a task starts at
`max(its resource is free, every dependency has finished, it has been issued)`. One host thread issues
the tasks, one every `issue_s`; at a host barrier of the graph (`TaskGraph.sync`: FlexGen's `sync()`
after every step) it waits until every task issued so far has finished, then pays `sync_s` before it
issues the next. Both host costs are charged the same way to every schedule (the engine and the
baselines run on the same executor); only the schedules whose real systems synchronise have barriers
(see `moe_lightning.baselines.schedules`). Because the graph lists tasks in issue order with
dependencies pointing backwards, one pass over the list is exact for that model.

`simulate_run` rebuilds exactly the graphs the CGOPipe engine (`moe_lightning.engine.cgopipe`) runs for
a workload and a policy, and times them with `TaskCosts` (`moe_lightning.tuner.costs`, per-op roofline
durations):
- prompt lengths from `synthetic_lengths(workload)` unless given;
- CGOPipe unpadded (the engine's paged KV cache): the batches are Algorithm 2's admission rounds
  against the KV budget in tokens (`schedule.batching.admission_rounds`), micro-batches = the
  partitions, the first `gpu_partitions` with their KV cache on the GPU, attention charged at each
  sequence's own context;
- otherwise (padded, baselines): static batches of `policy.batch_size` (padded: as many as the KV
  budget holds), packed into micro-batches by `pack_micro_batches`, left-padded to the workload's
  longest prompt with `workload.padding`; micro-batches whose KV cache lives on the GPU chosen as the
  engine does (in packing order, while their sequences fit `int(r_c * batch)`);
- `PipeShape(num_pages = policy.num_pages if experts stream else 0, prefetch = policy.prefetch_depth)`;
- per batch (admission round) one prefill graph and one decode graph per decode step, each from
  its first issue to its last task's end (or the host's last barrier), plus `step_s`; the context
  of each sequence growing by one slot per step (every step is simulated unless `max_decode_steps`
  asks for a subset, in which case the steps in between are interpolated linearly and
  `SimResult.decode_steps_simulated` says how many were simulated);
- no early stop at EOS: every sequence generates its own budget (`gen_lens`: a prompts file's rows'
  max_new_tokens, `tasks.plan.planning_inputs`; else `workload.gen_len`), as `sampling.ignore_eos`. The
  forwards are the engine driver's (`tuner.sim_batches`): a static batch decodes until its longest
  budget is spent, its finished rows still in it; in admission mode a request leaves its micro-batch at
  its budget, its blocks go back, and (`refill`) waiting requests are admitted in a prefill round before
  the next decode step. Steps of unchanged membership form a segment; with `max_decode_steps` each
  segment samples its share of the steps and interpolates the rest;
- several GPUs (`parallel`, T x E ranks): one rank of each expert group is simulated, with its shard of
  the shapes, its share of the host, its requests (every E-th, `engine.data_parallel.shares`), and its
  collectives in its GPU tasks (`moe_lightning.tuner.parallel`, `TaskCosts.comm`); groups whose requests
  have the same lengths are simulated once. The groups then run in lockstep as the engine's `Lockstep`
  keeps them (`lockstep`): forward i of every group (a prefill round or a decode step) pairs with
  forward i of the others, so it lasts as long as the slowest of them, plus the one small all-reduce
  that starts it; a group that has finished keeps joining with ghost forwards until the last group is
  done. Prefill is the group whose own prefill forwards took longest at the machine's pace, decode the
  rest of the machine's time (as `generate_data_parallel` reports them). A forward's layers are paced
  as a whole, not layer by layer (each MoE layer's all-to-alls pair up too, which can only add to
  this), and a ghost forward is assumed never to be the slowest of its round.

On a CPU-only machine (`hardware.gpu.shares_host`) every resource runs on the same cores and memory
bus; there the tasks that run at the same time share it equally (processor sharing) instead of
overlapping for free. The issuing thread is not one of the sharers (its work is microseconds). The
"GPU" kernels are priced at the thread count the engine's thread budget gives the GPU role for the
policy (`TaskCosts.gpu_all_cores`: the profile's `*_all_cores` curves when no CPU attention overlaps
it). A measured co-run slowdown table (a kernel's and a copy's time beside 1-4 busy workers, measured
in calibration) was tried in place of equal sharing and predicted worse on the five policies of
`benchmarks/sim_vs_measured.py` (13-27% fast, where equal sharing was within 10%): beside the copies it models, a real
run slows the "GPU" thread in ways a pairwise table does not capture (thread wake-ups, the Python
between ops), which equal sharing happens to absorb. Not kept.

Host costs (`TaskCosts`): `issue_s` per task, `sync_s` per barrier followed by more tasks (a barrier at
a graph's end is the end of the graph, charged as `step_s`), `step_s` per graph; measured by
`task=calibrate` on the engine's executor (a barrier there: the issuing thread woken once the step is
done, on CUDA after a device-wide synchronise), otherwise documented defaults (`tuner.costs`).

Not modelled: what `TaskCosts` leaves out (contention between resources that share a GPU, caches,
the latency of a dependency hand-off between workers), the host-side work between graphs beyond the
profile's `step_overhead_us` (sampling, logits gathering), the Python of a real FlexGen step beyond
our executor's barrier (FlexGen's own bookkeeping around its six calls; the simulator times the
FlexGen schedule as our engine runs it), the OS scheduling of more busy threads than cores on a
shared host, memory allocation, and warm-up.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from moe_lightning.comm import all_reduce_s
from moe_lightning.config import HardwareSpec, ModelSpec, ParallelConfig, Policy, Workload
from moe_lightning.engine.executor import TaskRecord
from moe_lightning.report import Metrics
from moe_lightning.schedule.batching import KVBudget, padded_batch_size
from moe_lightning.schedule.cgopipe import PipeShape, decode_graph, decode_graph_gpu_attention, prefill_graph
from moe_lightning.schedule.graph import Resource, Task, TaskGraph
from moe_lightning.trace import RunTimeline
from moe_lightning.tuner.costs import CONTEXT_OPS, MicroBatchShape, TaskCosts, fit_op_scales
from moe_lightning.tuner.sim_batches import Segment, admitted_rounds, static_rounds

__all__ = ["MicroBatchShape", "SimResult", "TaskCosts", "batch_shapes", "fit_op_scales", "simulate_graph",
           "simulate_run"]

RESOURCES = list(Resource)
_RES_INDEX = {r: n for n, r in enumerate(RESOURCES)}
_H2D, _D2H = _RES_INDEX[Resource.H2D], _RES_INDEX[Resource.D2H]


# ---- the discrete-event model ---------------------------------------------------------------------

@dataclass(frozen=True)
class _Compiled:
    """A graph flattened for the event loop: resource index and dependencies of each task, and the
    host barriers (`TaskGraph.syncs`)."""

    resource: np.ndarray            # [n] index into RESOURCES
    res_list: list[int]
    deps: list[tuple[int, ...]]
    syncs: frozenset[int] = frozenset()

    @classmethod
    def of(cls, graph: TaskGraph) -> _Compiled:
        res = [_RES_INDEX[t.resource] for t in graph.tasks]
        return cls(np.array(res, dtype=np.int64), res, [t.deps for t in graph.tasks],
                   frozenset(n for n in graph.syncs if n < len(graph.tasks)))


@dataclass(frozen=True)
class _Timed:
    """The simulated times of one graph run, seconds from the moment its first task is issued."""

    issued: list[float]
    starts: list[float]
    ends: list[float]
    host_s: float                   # when the issuing thread is done (last issue, or last barrier)

    @property
    def wall_s(self) -> float:
        return max(max(self.ends, default=0.0), self.host_s)


def _schedule(c: _Compiled, durations: Sequence[float], issue_s: float = 0.0, sync_s: float = 0.0) -> _Timed:
    """FIFO per resource in issue order, after all dependencies and after the task is issued: the host
    issues one task every `issue_s`; at a barrier it waits for every task issued so far, then pays
    `sync_s` before it issues the next."""
    n = len(durations)
    issued, starts, ends = [0.0] * n, [0.0] * n, [0.0] * n
    free = [0.0] * len(RESOURCES)
    res, deps, syncs = c.res_list, c.deps, c.syncs
    host = last = 0.0
    for i in range(n):
        if i in syncs:
            host = max(host, last) + sync_s
        host += issue_s
        r = res[i]
        s = free[r] if free[r] > host else host
        for d in deps[i]:
            e = ends[d]
            if e > s:
                s = e
        e = s + durations[i]
        issued[i] = host
        starts[i] = s
        ends[i] = e
        free[r] = e
        if e > last:
            last = e
    return _Timed(issued, starts, ends, host)


def _schedule_shared(c: _Compiled, durations: Sequence[float], issue_s: float = 0.0,
                     sync_s: float = 0.0) -> _Timed:
    """As `_schedule`, but every resource lives on one host (a CPU-only machine, where the CPU plays the
    GPU and copies are memcpy threads): tasks running at the same time share it equally (processor
    sharing), so k concurrent tasks each progress at 1/k of their own speed. The issuing thread is not
    one of the sharers (its work per task is a few microseconds)."""
    from collections import deque

    n = len(durations)
    inf = float("inf")
    issued, starts, ends = [inf] * n, [0.0] * n, [0.0] * n
    waiting = [len(d) for d in c.deps]
    children: list[list[int]] = [[] for _ in range(n)]
    for i, ds in enumerate(c.deps):
        for d in ds:
            children[d].append(i)
    queues = [deque(i for i in range(n) if c.res_list[i] == r) for r in range(len(RESOURCES))]
    remaining = [float(x) for x in durations]
    active: dict[int, int] = {}  # resource -> task
    t, done = 0.0, 0
    host, last, nxt, outstanding = 0.0, 0.0, 0, 0   # the issuing thread: clock, next task, tasks in flight
    while done < n:
        while nxt < n:  # issue what the host can: up to a barrier whose tasks are not all finished
            if nxt in c.syncs:
                if outstanding:
                    break
                host = max(host, last) + sync_s
            host += issue_s
            issued[nxt] = host
            nxt += 1
            outstanding += 1
        for r, q in enumerate(queues):
            if r not in active and q and waiting[q[0]] == 0 and issued[q[0]] <= t:
                active[r] = q.popleft()
                starts[active[r]] = t
        # The next issue that frees a queue's head (its dependencies already met).
        upcoming = min((issued[q[0]] for r, q in enumerate(queues)
                        if r not in active and q and waiting[q[0]] == 0 and issued[q[0]] > t), default=inf)
        if not active:
            if upcoming == inf:
                raise ValueError("the task graph deadlocks: a resource's next task waits on a later one")
            t = upcoming
            continue
        share = len(active)
        step = min(remaining[i] for i in active.values()) * share
        if t + step > upcoming:  # a task is issued before the next one finishes: share from then on
            for i in active.values():
                remaining[i] -= (upcoming - t) / share
            t = upcoming
            continue
        t += step
        for r, i in list(active.items()):
            remaining[i] -= step / share
            if remaining[i] <= 1e-12:
                ends[i] = last = t
                del active[r]
                done += 1
                outstanding -= 1
                for ch in children[i]:
                    waiting[ch] -= 1
    return _Timed(issued, starts, ends, host)


def simulate_graph(graph: TaskGraph, duration: Callable[[Task], float], shared: bool = False, *,
                   issue_s: float = 0.0, sync_s: float = 0.0) -> list[TaskRecord]:
    """Time any task graph given each task's duration; records in issue order, seconds from the first
    issue. With `shared`, all resources share one host (processor sharing, see `_schedule_shared`).
    `issue_s`: the issuing thread's time per task (a task starts no earlier than its issue); `sync_s`:
    its time per host barrier (`TaskGraph.sync`), after every task issued before it has finished."""
    durations = [float(duration(t)) for t in graph.tasks]
    if any(d < 0 for d in durations) or issue_s < 0 or sync_s < 0:
        raise ValueError("task durations and host costs must be >= 0")
    timed = (_schedule_shared if shared else _schedule)(_Compiled.of(graph), durations, issue_s, sync_s)
    return [TaskRecord(t, s, e, h) for t, s, e, h in zip(graph.tasks, timed.starts, timed.ends, timed.issued)]


# ---- a whole run ----------------------------------------------------------------------------------

class GraphBuilder(Protocol):
    def build(self, phase: str, shape: PipeShape, policy: Policy) -> TaskGraph: ...


class _CGOPipeGraphs:
    """CGOPipe's graphs, chosen as the engine chooses them."""

    name = "cgopipe"

    def build(self, phase: str, shape: PipeShape, policy: Policy) -> TaskGraph:
        if phase == "prefill":
            return prefill_graph(shape)
        return decode_graph_gpu_attention(shape) if policy.attn_on_gpu else decode_graph(shape)


CGOPIPE_GRAPHS = _CGOPipeGraphs()

@dataclass
class SimResult:
    """A simulated run; times in seconds, as the engine's `Metrics` would report them."""

    prefill_s: float
    decode_s: float
    generated_tokens: int
    num_requests: int
    decode_step_s: list[float]
    utilisation: dict[str, float]              # decode, per resource
    prefill_utilisation: dict[str, float]
    link_bytes: dict[str, int]
    timeline: RunTimeline
    num_batches: int
    decode_steps_total: int
    decode_steps_simulated: int
    tasks_simulated: int
    sim_wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    prefill_batch_s: list[float] = field(default_factory=list)   # each batch's (admission round's) prefill
    groups: list[dict] = field(default_factory=list)              # several expert groups: each one's figures
    round_steps: list[int] = field(default_factory=list)          # decode steps after each batch's prefill

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def throughput_tok_s(self) -> float:
        """End-to-end: generated tokens / (prefill + decode)."""
        return self.generated_tokens / self.total_s if self.total_s else 0.0

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after the first of each sequence / decode time (as the engine's metric); None with no
        decode step (one token per request), as the engine reports it: 0.0 would read as measured zero."""
        if not self.decode_step_s:
            return None
        return (self.generated_tokens - self.num_requests) / self.decode_s

    @property
    def decode_step_median_s(self) -> float | None:
        """None with no decode step, as the engine's `Metrics`."""
        return statistics.median(self.decode_step_s) if self.decode_step_s else None

    def metrics(self) -> Metrics:
        return Metrics(throughput_tok_s=self.throughput_tok_s, prefill_s=self.prefill_s,
                       decode_s=self.decode_s, generated_tokens=self.generated_tokens,
                       decode_step_median_s=self.decode_step_median_s, decode_tok_s=self.decode_tok_s,
                       link_bytes=dict(self.link_bytes), utilisation=dict(self.utilisation), kind="simulated")

    def summary(self) -> dict:
        return {"throughput_tok_s": self.throughput_tok_s, "decode_tok_s": self.decode_tok_s,
                "prefill_s": self.prefill_s, "decode_s": self.decode_s,
                "decode_step_median_s": self.decode_step_median_s, "utilisation": self.utilisation,
                "prefill_utilisation": self.prefill_utilisation, "link_bytes": self.link_bytes,
                "num_batches": self.num_batches, "decode_steps_total": self.decode_steps_total,
                "decode_steps_simulated": self.decode_steps_simulated,
                "tasks_simulated": self.tasks_simulated, "sim_wall_s": self.sim_wall_s, "notes": self.notes,
                **({"groups": self.groups} if self.groups else {})}

    def forwards(self) -> list[tuple[str, float]]:
        """(phase, seconds) of each forward in the order run: each batch's prefill, then its decode steps."""
        out: list[tuple[str, float]] = []
        first = 0
        for pre, steps in zip(self.prefill_batch_s, self.round_steps):
            out.append(("prefill", pre))
            out += [("decode", s) for s in self.decode_step_s[first:first + steps]]
            first += steps
        return out


def admission_budget(spec: ModelSpec, hw: HardwareSpec, lengths: Sequence[int], policy: Policy, workload: Workload,
                     block_size: int, kv_tokens: int | None) -> tuple[KVBudget, int, int]:
    """The engine's KV budget for admission (`schedule.batching.kv_budget`, at the plan's tokens unless
    `kv_tokens`), how many of its partitions (the first) keep their KV cache on the GPU, and the prompt
    tokens a partition may take per round (`CGOPipeRunner.prefill_cap`: the plan's, `prefill_tokens`)."""
    from moe_lightning.memory import engine_kv_tokens, prefill_tokens
    from moe_lightning.schedule.batching import gpu_partitions, kv_budget

    wl = replace(workload, prompt_len_max=max(lengths), num_requests=len(lengths),
                 prompt_len_avg=min(max(lengths), round(sum(lengths) / len(lengths))))
    tokens = kv_tokens or engine_kv_tokens(spec, policy, wl, hw, block_size, lengths)
    budget = kv_budget(policy.batch_size, policy.micro_batch_size, tokens, block_size)
    longest = max(lengths) + workload.gen_len
    if budget.blocks_per_partition < budget.blocks_for(longest):
        from moe_lightning.errors import ConfigError

        raise ConfigError(f"system.kv_cache_tokens={tokens}: each of the {budget.partitions} micro-batches must hold "
                          f"the longest request ({longest} tokens)")
    _, cap = prefill_tokens(wl, policy.batch_size, policy.micro_batch_size, tokens, True, lengths, block_size)
    return budget, gpu_partitions(policy.kv_gpu_fraction, policy.batch_size, budget), int(cap)


def batch_shapes(lengths: Sequence[int], policy: Policy, padding: bool,
                 width: int | None = None) -> tuple[list[MicroBatchShape], frozenset[int]]:
    """Micro-batches of one static batch as `CGOPipeRunner.prefill` builds them, and those with KV on the
    GPU; padded to `width` (the workload's longest prompt; by default the batch's)."""
    from moe_lightning.engine.cgopipe import pack_micro_batches  # imports torch

    groups = pack_micro_batches(list(lengths), policy.micro_batch_size)
    width = width or max(lengths)
    gpu_seqs = int(policy.kv_gpu_fraction * len(lengths) + 1e-9)
    shapes, gpu_kv, taken = [], set(), 0
    for j, seqs in enumerate(groups):
        on_gpu = taken + len(seqs) <= gpu_seqs and policy.kv_gpu_fraction > 0
        if on_gpu:
            taken += len(seqs)
            gpu_kv.add(j)
        lens = [width if padding else lengths[b] for b in seqs]
        shapes.append(MicroBatchShape(seqs=len(seqs), tokens=sum(lens),
                                      sum_sq=sum(lengths[b] ** 2 for b in seqs), slots=max(lens)))
    return shapes, frozenset(gpu_kv)


class _Accumulator:
    """Adds graphs to the run's timeline: records for the first `keep` graphs, sums for the rest."""

    def __init__(self, keep: int):
        self.timeline = RunTimeline(keep_records=True)
        self.keep = keep
        self.link = np.zeros(len(RESOURCES))
        self.tasks = 0

    def add(self, phase: str, graph: TaskGraph, c: _Compiled, durations: np.ndarray, nbytes: np.ndarray,
            timed: _Timed) -> float:
        wall = timed.wall_s
        self.link += np.bincount(c.resource, weights=nbytes, minlength=len(RESOURCES))
        self.tasks += len(durations)
        if len(self.timeline.graphs) < self.keep:
            self.timeline.add(phase, [TaskRecord(t, s, e, h) for t, s, e, h
                                      in zip(graph.tasks, timed.starts, timed.ends, timed.issued)])
        else:
            busy = np.bincount(c.resource, weights=durations, minlength=len(RESOURCES))
            self.add_sums(phase, wall, busy)
        return wall

    def add_sums(self, phase: str, wall: float, busy: np.ndarray) -> None:
        """A graph known only by its wall time and per-resource busy time (RunTimeline.add's sums)."""
        tl = self.timeline
        tl.wall_s[phase] += wall
        for n, r in enumerate(RESOURCES):
            tl.busy_s[phase][r.value] += float(busy[n])
        tl._clock += wall  # keeps later kept graphs' offsets right (none are kept after this point)


def _costs_of(graph: TaskGraph, costs: TaskCosts, mbs: Sequence[MicroBatchShape]) -> tuple[np.ndarray, np.ndarray]:
    dur, nbytes = np.empty(len(graph)), np.empty(len(graph))
    for n, t in enumerate(graph.tasks):
        dur[n] = costs.duration(t, mbs)
        nbytes[n] = costs.cost(t, mbs)[1]
    return dur, nbytes


def _decode_steps(total: int, max_steps: int | None) -> list[int]:
    if max_steps is None or total <= max_steps:
        return list(range(total))
    return sorted({round(x) for x in np.linspace(0, total - 1, max(2, max_steps))})


def simulate_run(spec: ModelSpec, hw: HardwareSpec, workload: Workload, policy: Policy,
                 prompt_lengths: Sequence[int] | None = None, *, costs: TaskCosts | None = None,
                 keep_graphs: int = 4, max_decode_steps: int | None = None,
                 schedule: GraphBuilder | None = None, admission: bool | None = None, kv_block_size: int = 16,
                 kv_tokens: int | None = None, parallel: ParallelConfig | None = None,
                 gen_lens: Sequence[int] | None = None, refill: bool = True) -> SimResult:
    """Simulate the engine generating `workload` with `policy` on `hw` (see module docstring).

    `schedule` builds the graphs (`.build(phase, shape, policy)`, as the engine's `Schedule`); by
    default CGOPipe's. `admission` (default: CGOPipe unpadded with `kv_block_size` > 0, as the engine):
    batches are Algorithm 2's rounds against the KV budget (`kv_tokens`, default the plan's), not
    static batches of N; `refill` as the engine's driver (`generate_admitted`). `gen_lens[r]`: request r's
    own generation budget (1 to `workload.gen_len`; None: every request `workload.gen_len`), run as the
    engine runs it (`tuner.sim_batches`). `keep_graphs` graphs keep their records in the timeline (for
    plots and traces). `parallel`: T x E ranks over `hw`'s GPUs (one rank simulated, see the module
    docstring; `kv_tokens` and `costs` then a rank's).
    """
    from moe_lightning.workload_io import synthetic_lengths

    lengths = list(prompt_lengths) if prompt_lengths is not None else synthetic_lengths(workload)
    gens = [workload.gen_len] * len(lengths) if gen_lens is None else [int(g) for g in gen_lens]
    if len(gens) != len(lengths) or not all(1 <= g <= workload.gen_len for g in gens):
        raise ValueError(f"gen_lens: one budget of 1 to workload.gen_len={workload.gen_len} per prompt "
                         f"({len(lengths)}), got {len(gens)} from {min(gens, default=0)} to {max(gens, default=0)}")
    if parallel is not None and parallel.world_size > 1:
        from moe_lightning.tuner.parallel import rank_view

        view = rank_view(spec, hw, parallel)
        policy_r = view.policy(policy)
        costs = costs or TaskCosts.for_policy(view.spec, view.hw, policy_r, comm=view.comm)
        shares = [(tuple(lengths[g::view.groups]), tuple(gens[g::view.groups])) for g in range(view.groups)]
        runs: dict[tuple[tuple[int, ...], tuple[int, ...]], SimResult] = {}
        for share, own in shares:
            if share and (share, own) not in runs:
                runs[share, own] = simulate_run(
                    view.spec, view.hw, replace(workload, num_requests=len(share)), policy_r, share, costs=costs,
                    keep_graphs=keep_graphs, max_decode_steps=max_decode_steps, schedule=schedule,
                    admission=admission, kv_block_size=kv_block_size, kv_tokens=kv_tokens, gen_lens=own,
                    refill=refill)
        groups = [runs.get(key) for key in shares]
        # the all-reduce that starts each forward: running, and each micro-batch slot's tokens (int64)
        sync_s = all_reduce_s(8 * (policy_r.num_micro_batches + 1), view.groups,
                              latency_s=view.comm.latency_s, bytes_per_s=view.comm.bytes_per_s) if view.comm else 0.0
        res = lockstep(groups, sync_s)
        note = (f"one rank of tensor={parallel.tensor} x expert={parallel.expert} simulated (its collectives in its "
                "GPU tasks)")
        if view.groups > 1:
            note = (f"one rank of each of the {view.groups} expert groups of tensor={parallel.tensor} x "
                    f"expert={parallel.expert} simulated (its collectives in its GPU tasks), in lockstep: "
                    f"{max(g['ghost_forwards'] for g in res.groups)} ghost forwards at most")
        return replace(res, generated_tokens=sum(gens), num_requests=len(lengths), notes=[*res.notes, note])
    t0 = time.perf_counter()
    if not policy.ffn_on_gpu:
        from moe_lightning.errors import ConfigError

        raise ConfigError("policy.ffn_on_gpu: the CGOPipe schedule runs the MoE FFN on the GPU; "
                          "ffn_on_gpu=false has no schedule to simulate")
    costs = costs or TaskCosts.for_policy(spec, hw, policy)
    acc = _Accumulator(keep_graphs)
    graphs: dict[tuple[str, PipeShape], tuple[TaskGraph, _Compiled]] = {}
    L = spec.num_layers

    builder = schedule or CGOPIPE_GRAPHS
    timed = _schedule_shared if hw.gpu.shares_host else _schedule

    def graph_for(phase: str, mbs: Sequence[MicroBatchShape], gpu_kv: frozenset[int]) -> tuple[TaskGraph, _Compiled]:
        shape = PipeShape(num_layers=L, num_micro_batches=len(mbs), num_pages=costs.num_pages,
                          prefetch=policy.prefetch_depth, gpu_kv=gpu_kv, dense_layers=frozenset(spec.dense_layers))
        if (phase, shape) not in graphs:
            g = builder.build(phase, shape, policy)
            graphs[phase, shape] = (g, _Compiled.of(g))
        return graphs[phase, shape]

    prefill_s = 0.0
    prefill_walls: list[float] = []
    step_walls: list[float] = []
    simulated_steps = 0
    if admission is None:   # CGOPipe's unpadded mode admits against its paged KV budget, as the engine does
        admission = getattr(builder, "name", "cgopipe") == "cgopipe" and not workload.padding and kv_block_size > 0
    if admission:
        budget, n_gpu, cap = admission_budget(spec, hw, lengths, policy, workload, kv_block_size, kv_tokens)
        rounds = admitted_rounds(lengths, gens, budget, n_gpu, refill, cap)
    else:   # static batches; padded: every prompt to the longest, as many as the KV budget holds
        width = max(lengths) if workload.padding else None
        n = policy.batch_size if not (workload.padding and kv_tokens) else padded_batch_size(
            policy.batch_size, policy.micro_batch_size, kv_tokens, max(lengths) + workload.gen_len)
        rounds = static_rounds([batch_shapes(lengths[a:a + n], policy, workload.padding, width)
                                for a in range(0, len(lengths), n)], [gens[a:a + n] for a in range(0, len(lengths), n)])
    for rnd in rounds:
        g, c = graph_for("prefill", rnd.mbs, rnd.gpu_kv)
        dur, nbytes = _costs_of(g, costs, rnd.mbs)
        prefill_walls.append(acc.add("prefill", g, c, dur, nbytes, timed(c, dur.tolist(), costs.issue_s,
                                                                         costs.sync_s)) + costs.step_s)
        prefill_s += prefill_walls[-1]
        for seg in rnd.decodes:
            # as many steps sampled per segment as its share of the longest request's steps
            most = None if max_decode_steps is None else max(
                2, math.ceil(max_decode_steps * seg.steps / max(workload.gen_len - 1, 1)))
            walls, simulated = _decode_segment(seg, graph_for("decode", seg.mbs, seg.gpu_kv), costs, acc, timed,
                                               spec, most)
            step_walls += walls
            simulated_steps += simulated

    tl = acc.timeline
    total_steps = len(step_walls)
    notes = []
    if simulated_steps < total_steps:
        notes.append(f"{simulated_steps} of {total_steps} decode steps simulated, the rest "
                     "interpolated linearly in the context")
    return SimResult(
        prefill_s=prefill_s, decode_s=sum(step_walls), generated_tokens=sum(gens),
        num_requests=len(lengths), decode_step_s=step_walls, utilisation=tl.utilisation("decode"),
        prefill_utilisation=tl.utilisation("prefill"),
        link_bytes={"h2d": int(acc.link[_H2D]), "d2h": int(acc.link[_D2H])}, timeline=tl,
        num_batches=len(rounds), decode_steps_total=total_steps,
        decode_steps_simulated=simulated_steps, tasks_simulated=acc.tasks,
        sim_wall_s=time.perf_counter() - t0, notes=notes, prefill_batch_s=prefill_walls,
        round_steps=[rnd.decode_steps for rnd in rounds])


def _decode_segment(seg: Segment, graph: tuple[TaskGraph, _Compiled], costs: TaskCosts, acc: _Accumulator, timed,
                    spec: ModelSpec, max_steps: int | None) -> tuple[list[float], int]:
    """Time a segment's decode steps (`sim_batches.Segment`: step k attends slots + k + 1), the steps not
    simulated interpolated linearly between simulated neighbours. -> (each step's wall, steps simulated)."""
    g, c = graph
    L = spec.num_layers
    mbs = seg.mbs
    dur, nbytes = _costs_of(g, costs, [replace(mb, slots=mb.slots + 1) for mb in mbs])
    # Tasks whose cost grows with the context, grouped by (op, micro-batch, first/last layer, window).
    ctx = [n for n, t in enumerate(g.tasks) if t.op in CONTEXT_OPS]
    keys = [(g.tasks[n].op, g.tasks[n].micro_batch, g.tasks[n].layer == 0, g.tasks[n].layer == L - 1,
             spec.window(g.tasks[n].layer)) for n in ctx]
    reps = {k: g.tasks[n] for k, n in zip(keys, ctx)}
    ctx_idx = np.array(ctx, dtype=np.int64)
    walls: dict[int, tuple[float, np.ndarray, np.ndarray]] = {}
    for step in _decode_steps(seg.steps, max_steps):
        step_mbs = [replace(mb, slots=mb.slots + step + 1) for mb in mbs]
        if len(ctx):
            per_key = {k: (costs.duration(t, step_mbs), costs.cost(t, step_mbs)[1]) for k, t in reps.items()}
            dur[ctx_idx] = [per_key[k][0] for k in keys]
            nbytes[ctx_idx] = [per_key[k][1] for k in keys]
        wall = acc.add("decode", g, c, dur, nbytes, timed(c, dur.tolist(), costs.issue_s, costs.sync_s)) \
            + costs.step_s
        walls[step] = (wall, np.bincount(c.resource, weights=dur, minlength=len(RESOURCES)),
                       np.bincount(c.resource, weights=nbytes, minlength=len(RESOURCES)))
    known = sorted(walls)
    out = []
    for step in range(seg.steps):  # steps not simulated: linear between the simulated neighbours
        if step in walls:
            out.append(walls[step][0])
            continue
        hi = next(k for k in known if k > step)
        lo = max(k for k in known if k < step)
        w = (step - lo) / (hi - lo)
        wall, busy, link = (a * (1 - w) + b * w for a, b in zip(walls[lo], walls[hi]))
        acc.add_sums("decode", float(wall), busy)
        acc.link += link
        out.append(float(wall))
    return out, len(walls)


def lockstep(groups: Sequence[SimResult | None], sync_s: float = 0.0) -> SimResult:
    """The machine's run from each expert group's own simulated run (None: a group with no requests),
    paced as `engine.data_parallel.Lockstep` paces them (module docstring): forward i lasts the slowest
    group's forward i plus `sync_s`; a finished group's ghost forwards keep pace. Utilisation, link bytes
    and the timeline are the first group's rank's."""
    seqs = [g.forwards() if g is not None else [] for g in groups]
    pace = [max(s[i][1] for s in seqs if i < len(s)) + sync_s for i in range(max(map(len, seqs)))]
    total = sum(pace)
    rows = []
    for n, s in enumerate(seqs):
        pre = sum(pace[i] for i, (phase, _) in enumerate(s) if phase == "prefill")
        rows.append({"group": n, "requests": groups[n].num_requests if groups[n] else 0, "forwards": len(s),
                     "ghost_forwards": len(pace) - len(s), "prefill_s": pre, "decode_s": total - pre,
                     "own_s": sum(t for _, t in s)})
    first = next(g for g in groups if g is not None)
    distinct = list({id(g): g for g in groups if g is not None}.values())
    prefill_s = max(r["prefill_s"] for r in rows)
    return replace(
        first, prefill_s=prefill_s, decode_s=total - prefill_s,
        decode_step_s=[pace[i] for s in seqs for i, (phase, _) in enumerate(s) if phase == "decode"],
        prefill_batch_s=[pace[i] for i, (phase, _) in enumerate(seqs[0]) if phase == "prefill"],
        num_batches=max(g.num_batches for g in groups if g is not None),
        decode_steps_total=sum(g.decode_steps_total for g in groups if g is not None),
        decode_steps_simulated=sum(g.decode_steps_simulated for g in groups if g is not None),
        # the simulator's own work: a run shared by groups with equal requests was done once
        tasks_simulated=sum(g.tasks_simulated for g in distinct), sim_wall_s=sum(g.sim_wall_s for g in distinct),
        groups=rows)


def default_max_decode_steps(workload: Workload, policy: Policy, spec: ModelSpec,
                             budget_tasks: int = 3_000_000) -> int | None:
    """Decode steps per batch to simulate so that a run stays under about `budget_tasks` tasks."""
    per_step = spec.num_layers * policy.num_micro_batches * 8
    batches = math.ceil(workload.num_requests / policy.batch_size)
    total = per_step * batches * max(workload.gen_len - 1, 1)
    if total <= budget_tasks:
        return None
    return max(2, budget_tasks // (per_step * batches))
