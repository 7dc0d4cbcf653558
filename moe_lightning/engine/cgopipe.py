"""The CGOPipe engine (MoE-Lightning): attention on the CPU beside the KV cache, the MoE FFN on the
GPU over paged expert weights streamed CPU -> pinned -> GPU, all under a hard GPU memory budget.

The schedule is data (`moe_lightning.schedule.cgopipe`); this module holds the state the tasks work
on and one handler per op. Index convention: `i` layer, `j` micro-batch, `p` page.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import torch

from moe_lightning.config import GiB, HardwareSpec, ModelSpec, ParallelConfig, Policy, Workload
from moe_lightning.engine.data_parallel import DataParallelMoE, Lockstep
from moe_lightning.engine.executor import Executor, TaskRecord, indexed
from moe_lightning.engine.kernel_table import KernelChooser
from moe_lightning.engine.kv_blocks import KVBlockPool, SequenceBlocks, kv_tensors
from moe_lightning.engine.memtrack import ActivationTracker
from moe_lightning.engine.paged import DevicePools, ExpertCache, GroupedMoE
from moe_lightning.engine.parallel import Ranks, RankSource, local_spec
from moe_lightning.engine.weights import WeightSource
from moe_lightning.errors import ConfigError, WorkloadError
from moe_lightning.kernels.cpu_attention import backend as attention_backend
from moe_lightning.kernels.cpu_attention import paged_decode_attention
from moe_lightning.memory import (
    engine_kv_tokens,
    expert_workspace,
    kv_cache_tokens,
    memory_plan,
    prefill_tokens,
    resident_experts_per_layer,
)
from moe_lightning.models import family
from moe_lightning.models.layers import decode_attention, prefill_attention
from moe_lightning.schedule.batching import gpu_partitions, kv_budget, padded_batch_size
from moe_lightning.schedule.cgopipe import (
    PipeShape,
    decode_graph,
    decode_graph_gpu_attention,
    prefill_graph,
)
from moe_lightning.schedule.graph import Resource, Task, TaskGraph
from moe_lightning.threads import configured, op_elements, plan_threads
from moe_lightning.trace import RunTimeline

log = logging.getLogger("moe_lightning.cgopipe")


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Which task graphs a run executes. The runtime below (state and one handler per op) serves any
    schedule built from its ops, so baselines are other `Schedule`s over the same kernels."""

    name: str
    prefill: Callable[[PipeShape], TaskGraph]
    decode_cpu_attention: Callable[[PipeShape], TaskGraph]
    decode_gpu_attention: Callable[[PipeShape], TaskGraph]

    def build(self, phase: str, shape: PipeShape, policy: Policy) -> TaskGraph:
        if phase == "prefill":
            return self.prefill(shape)
        return self.decode_gpu_attention(shape) if policy.attn_on_gpu else self.decode_cpu_attention(shape)


CGOPIPE = Schedule("cgopipe", prefill_graph, decode_graph, decode_graph_gpu_attention)


def pack_micro_batches(lengths: Sequence[int], micro_batch_size: int) -> list[list[int]]:
    """Longest-first into the least-filled micro-batch (by tokens) that still has room."""
    m = math.ceil(len(lengths) / micro_batch_size)
    groups: list[list[int]] = [[] for _ in range(m)]
    tokens = [0] * m
    for b in sorted(range(len(lengths)), key=lambda b: (-lengths[b], b)):
        j = min((j for j in range(m) if len(groups[j]) < micro_batch_size), key=lambda j: (tokens[j], j))
        groups[j].append(b)
        tokens[j] += lengths[b]
    return [sorted(g) for g in groups]


@dataclasses.dataclass
class MicroBatch:
    """One micro-batch of the current batch and its KV cache."""

    seqs: list[int]                 # indices into the batch
    lens: list[int]                 # cache slots used by each prompt (padding included)
    pads: list[int]                 # left padding per sequence (0 unless workload.padding)
    on_gpu: bool                    # KV cache on the GPU (r_c) or on the CPU
    k: torch.Tensor | None          # [L, mu_j, nkv, S_j, hd] (dense), or None with `blocks`
    v: torch.Tensor | None
    slots: torch.Tensor | None = None   # per sequence, the cache slot of the next token (CPU tensor)
    blocks: SequenceBlocks | None = None   # the unpadded mode's KV cache: blocks in a `KVBlockPool`
    prompt_at: tuple[torch.Tensor, torch.Tensor] | None = None   # (block, row) of each prompt token
    rows: list[int] | None = None   # its sequences' rows in the runner's input and logits (None: seqs)

    def at(self) -> list[int]:
        return self.seqs if self.rows is None else self.rows


class CGOPipeRunner:
    """Implements the generation driver's `BatchRunner` with the CGOPipe schedule."""

    def __init__(self, spec: ModelSpec, source: WeightSource, hardware: HardwareSpec, policy: Policy,
                 workload: Workload, device: torch.device, trace: bool = False,
                 schedule: Schedule | None = None, kv_block_size: int = 16, kv_tokens: int | None = None,
                 track_activations: bool = False, prompt_lengths: Sequence[int] | None = None,
                 ranks: Ranks | None = None, chunks=1):
        if not policy.ffn_on_gpu:
            raise ConfigError("policy.ffn_on_gpu: the CGOPipe engine runs the MoE FFN on the GPU; "
                              "ffn_on_gpu=false can be planned (task=plan) but not executed")
        device = indexed(device)
        self.family = family(spec)   # the layer math: the runtime knows nothing else of the model
        # Tensor / expert parallel ranks (`engine.parallel`): this rank streams and holds its shards and
        # its experts (`source` becomes its view, `spec` the sizes it holds), its layer math runs on its
        # heads (`self.spec`), and the MoE layers dispatch across its expert group.
        self.ranks = ranks if ranks is not None and ranks.world_size > 1 else None
        if policy.dequant_experts and self.ranks is not None and self.ranks.expert > 1:
            raise ConfigError(f"policy.dequant_experts={policy.dequant_experts} with parallel.expert="
                              f"{self.ranks.expert}: a scratch of fewer experts runs on one expert group only "
                              "(set policy.dequant_experts=0)")
        math_spec = spec
        if self.ranks is not None:
            source = RankSource(source, spec, self.ranks)
            spec, math_spec = source.spec, local_spec(spec, self.ranks)
            # Data-parallel attention: an expert group runs its own share of the machine's batch.
            E = self.ranks.expert
            policy = ParallelConfig(tensor=self.ranks.tensor, expert=E).group_policy(policy)
            workload = dataclasses.replace(workload, num_requests=math.ceil(workload.num_requests / E))
        self.spec, self.policy, self.workload, self.device = math_spec, policy, workload, device
        self.schedule = schedule or CGOPIPE
        self.dtype = source.dtype
        self.cuda = device.type == "cuda"
        # Unpadded mode (kv_block_size > 0, workload.padding=false): the KV cache is a pool of blocks of
        # this many tokens, sized in tokens (`kv_cache_tokens`), and requests are admitted against it
        # (Algorithm 2, `open_partitions`/`admit`). Otherwise a dense tensor per micro-batch.
        self.kv_block_size = kv_block_size if not workload.padding else 0
        paged = self.kv_block_size > 0
        self.kv_tokens = kv_tokens or (engine_kv_tokens(spec, policy, workload, hardware, self.kv_block_size,
                                                        prompt_lengths) if paged
                                       else kv_cache_tokens(policy, workload, False))
        self.budget = kv_budget(policy.batch_size, policy.micro_batch_size, self.kv_tokens,
                                max(1, self.kv_block_size))
        longest = workload.prompt_len_max + workload.gen_len
        if kv_tokens and self.budget.blocks_per_partition < self.budget.blocks_for(longest):
            raise ConfigError(f"system.kv_cache_tokens={kv_tokens}: each of the {self.budget.partitions} micro-batches "
                              f"must hold the longest request ({longest} tokens), so at least "
                              f"{self.budget.partitions * self.budget.blocks_for(longest) * self.budget.block_size}")
        # The budget is checked before anything is allocated or read.
        # `prompt_lengths`: the run's prompts, when known (a synthetic workload's are): prefill
        # activations are planned for its longest prompts rather than every prompt at the longest.
        self.plan = memory_plan(spec, policy, workload, kv_tokens=self.kv_tokens, paged=paged, lengths=prompt_lengths,
                                block_size=max(1, self.kv_block_size))
        self.plan.check(hardware)
        if self.cuda:
            # The allocator is capped at the profile's GPU (a 16 GiB T4 on a larger card), not at the usable
            # share the plan fits: the rest is the headroom `memory` leaves for what it does not model, such
            # as cuBLAS's workspace of each thread that runs GEMMs (32 MiB each on Hopper) and caching slack.
            # Capped at the plan's budget, a plan that filled it would leave them no room.
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, hardware.gpu.memory_gib * GiB / total), device)
            torch.cuda.reset_peak_memory_stats(device)
        # Profile the expert kernels (when asked) before the pools take the budget; its scratch is freed.
        _, micro_tokens = prefill_tokens(workload, policy.batch_size, policy.micro_batch_size, self.kv_tokens, paged,
                                         prompt_lengths, max(1, self.kv_block_size))
        # Admission defers requests past the plan's prompt tokens per micro-batch (short budgets reserve
        # less KV than the plan assumes, so more prompts would fit a partition than it planned for).
        self.prefill_cap = int(micro_tokens) if paged else None
        self.threads = plan_threads(None, cuda=self.cuda, micro_batches=policy.num_micro_batches,
                                    attn_on_cpu=not policy.attn_on_gpu, op_elements=op_elements(spec),
                                    streamed=resident_experts_per_layer(spec, policy.expert_gpu_fraction)
                                    < spec.num_experts)
        # Profiled (once per machine) with the threads of the worker that runs the kernels: the GPU role.
        self.kernels = KernelChooser(policy.expert_kernel, spec, self.dtype, device,
                                     max_bytes=int(expert_workspace("grouped", spec, micro_tokens)),
                                     threads=None if self.cuda else self.threads.gpu)
        if self.cuda:
            torch.cuda.empty_cache()
        persistent = {k: v for k, v in self.plan.gpu.items() if k != "activations"}
        self.pools = DevicePools(persistent, device)
        self.embedding, self.norm, self.lm_head, self.layers = self._load_non_experts(source)
        # Each layer's attention arguments (scale, sinks, window) where attention runs: beside the device's
        # weights, and on the CPU for CPU attention.
        self._attn_dev = [self.family.attention_args(lw, i, spec) for i, lw in enumerate(self.layers)]
        self._attn_cpu = [self.family.attention_args(lw, i, spec, "cpu") for i, lw in enumerate(self.layers)]
        n_res = self.resident_experts = resident_experts_per_layer(spec, policy.expert_gpu_fraction)
        if n_res == 0 and policy.expert_gpu_fraction > 0:
            log.warning("policy.expert_gpu_fraction=%g keeps no expert resident: whole experts of %d per layer "
                        "(r_w >= %g keeps one)", policy.expert_gpu_fraction, spec.num_experts, 1 / spec.num_experts)
        self.experts = ExpertCache(spec, source, n_res, policy.num_pages, policy.prefetch_depth,
                                   self.pools, device, pin=self.cuda, dequant_experts=policy.dequant_experts)
        # A scratch of fewer MXFP4 experts than a layer streams: each MoE runs group by group.
        self.moe = GroupedMoE(self.kernels) if self.experts.grouped else self.kernels
        self.lockstep: Lockstep | None = None   # in step with the other expert groups (`engine.data_parallel`)
        if self.ranks is not None and self.ranks.expert > 1:
            slots = max(self.budget.partitions, policy.num_micro_batches)
            self.lockstep = Lockstep(self.ranks.ep_group, slots, chunks, self.ranks.collective_device(device))
            self.moe = DataParallelMoE(math_spec.num_experts, self.lockstep, kernel=self.kernels)
        self.executor = Executor(device, threads=self.threads, serial=configured().serial)
        self.timeline = RunTimeline(keep_records=trace)
        self._indices: dict[tuple, torch.Tensor] = {}   # `_index`
        self.link_bytes = {"h2d": 0, "d2h": 0}
        self.mbs: list[MicroBatch] = []
        self.kv_pool: KVBlockPool | None = None
        self.admits = self.kv_block_size > 0   # engine.generation.generate drives it in admission mode
        # Padded or dense: static batches, as many requests as the KV budget holds at the longest prompt.
        self.batch_size = (policy.batch_size if self.admits else padded_batch_size(
            policy.batch_size, policy.micro_batch_size, self.kv_tokens, longest))
        self.parts: list[MicroBatch] = []   # admission mode: one per partition of the budget
        self.attention_backend = "dense"
        if self.kv_block_size and not policy.attn_on_gpu:
            # Built (once per machine, ~30 s) or loaded here, before anything is timed.
            self.attention_backend = "paged-" + attention_backend(spec.num_heads, spec.cache_kv_heads, spec.attn_k_dim,
                                                                  spec.attn_v_dim)
        self._graphs: dict[tuple, TaskGraph] = {}
        self._state: dict[str, dict[int, object]] = {}
        # Without CUDA's allocator statistics, the GPU role's live bytes are counted when asked (slow).
        self.activations = ActivationTracker() if track_activations and not self.cuda else None
        log.info("cgopipe: %d resident + %d streamed experts per layer, %d pages per layer, %.3f GiB of GPU pools",
                 n_res, spec.num_experts - n_res, self.experts.num_pages, self.pools.allocated_bytes / 2**30)

    # ----------------------------------------------------------------------------------------------
    # placement

    def _load_non_experts(self, source: WeightSource):
        def place(t: torch.Tensor) -> torch.Tensor:
            return self.pools.take("non_expert_weights", tuple(t.shape), t.dtype).copy_(t)

        layers = [source.layer(i).map(place) for i in range(self.spec.num_layers)]
        return place(source.embedding()), place(source.final_norm()), place(source.lm_head()), layers

    def _alloc_kv(self, mu: int, slots: int, on_gpu: bool) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        lead = (s.num_layers, mu, s.cache_kv_heads, slots)
        if on_gpu:  # zeroed: masked slots still meet the attention matmul, and 0 * NaN is NaN
            return kv_tensors(s, lead, lambda shape: self.pools.take("kv_cache", shape, self.dtype).zero_())
        pin = self.cuda and self.policy.attn_on_gpu  # streamed KV copies want pinned memory
        return kv_tensors(s, lead, lambda shape: torch.zeros(shape, dtype=self.dtype, pin_memory=pin))

    # ----------------------------------------------------------------------------------------------
    # Admission mode (unpadded, paged): the continuous driver's runner API. The KV budget's partitions
    # are the micro-batches; requests join one at a prefill round (`admit`) and leave when finished
    # (`retire`), so membership changes between decode steps, never within one.

    def open_partitions(self) -> None:
        """Empty micro-batches, one per partition of the KV budget, with their block pools: the first
        floor(r_c x N / mu) on the GPU (the r_c share, its pool from the planned GPU budget), the rest
        on the CPU."""
        if not self.kv_block_size:
            raise ConfigError("admission needs the paged KV cache (system.kv_block_size > 0, workload.padding=false)")
        b = self.budget
        n_gpu = gpu_partitions(self.policy.kv_gpu_fraction, self.policy.batch_size, b)
        if n_gpu == 0 and self.policy.kv_gpu_fraction > 0:
            log.warning("policy.kv_gpu_fraction=%g keeps no KV cache on the GPU: whole micro-batches of mu=%d of "
                        "N=%d (r_c >= %g keeps one)", self.policy.kv_gpu_fraction, b.micro_batch_size,
                        self.policy.batch_size, b.micro_batch_size / self.policy.batch_size)
        self.kv_pool = KVBlockPool(self.spec, (b.partitions - n_gpu) * b.blocks_per_partition, b.block_size,
                                   self.dtype, pin=self.cuda and self.policy.attn_on_gpu)
        gpu_pool = None
        if n_gpu:
            self.pools.used["kv_cache"] = 0
            gpu_pool = KVBlockPool(self.spec, n_gpu * b.blocks_per_partition, b.block_size, self.dtype,
                                   alloc=lambda shape, dtype: self.pools.take("kv_cache", shape, dtype))
        self.parts = []
        for j in range(b.partitions):
            pool = gpu_pool if j < n_gpu else self.kv_pool
            self.parts.append(MicroBatch([], [], [], j < n_gpu, None, None, slots=torch.zeros(0, dtype=torch.long),
                                         blocks=SequenceBlocks(pool, [], 0)))
        self.mbs = []

    def check_requests(self, lengths: Sequence[int], max_new: Sequence[int]) -> None:
        """Refuse, before anything runs, a request the memory plan was not made for: a prompt longer than
        the workload's longest (its prefill activations are planned at most that), or a context past
        prompt_len_max + gen_len (attention on the GPU holds that much of it). The CLI plans for its prompts;
        a Python caller gives the runner a `workload` (and `prompt_lengths`) that covers them."""
        P, G = self.workload.prompt_len_max, self.workload.gen_len
        for r, (p, g) in enumerate(zip(lengths, max_new)):
            if p > P or p + g > P + G:
                raise WorkloadError(f"request {r} needs {p} prompt + {g} new tokens, but the memory plan was made "
                                    f"for prompts of at most {P} tokens and contexts of {P} + {G}: give the runner "
                                    "a workload that covers these prompts")

    def active(self) -> list[int]:
        """The running requests, in the row order of `decode`'s tokens and logits."""
        return [r for mb in self.parts for r in mb.seqs]

    def admit(self, admitted: dict[int, list[int]], prompts: Sequence[Sequence[int]],
              max_new: Sequence[int]) -> torch.Tensor:
        """Prefill the requests admitted to each partition (`{partition: request ids}`; `prompts[r]`,
        `max_new[r]` by request id) and add them to their micro-batches -> their next-token logits
        [n, V], rows in the order of `admitted`'s values."""
        self.mbs, row = [], 0
        for j, reqs in admitted.items():
            lens = [len(prompts[r]) for r in reqs]
            blocks = SequenceBlocks(self.parts[j].blocks.pool, lens, [n + max_new[r] for n, r in zip(lens, reqs)])
            self.mbs.append(MicroBatch(list(reqs), lens, [0] * len(reqs), self.parts[j].on_gpu, None, None,
                                       blocks=blocks, prompt_at=blocks.prompt_slots(),
                                       rows=list(range(row, row + len(reqs)))))
            row += len(reqs)
        self._state = {name: {} for name in ("x", "qkv", "kv", "attn", "logits")}
        self._tokens, self._positions = {}, {}
        for j, mb in enumerate(self.mbs):
            self._tokens[j] = torch.tensor([t for r in mb.seqs for t in prompts[r]], device=self.device)
            self._positions[j] = torch.cat([torch.arange(n, device=self.device) for n in mb.lens])
        self._run(self._graph("prefill"), "prefill")
        logits = self._gather_logits(self._state["logits"], row)
        for j, mb in zip(admitted, self.mbs):
            part = self.parts[j]
            part.seqs += mb.seqs
            part.lens += mb.lens
            part.pads += mb.pads
            part.slots = torch.cat([part.slots, torch.tensor(mb.lens, dtype=torch.long)])
            part.blocks.extend(mb.blocks)
        self._use_partitions()
        return logits

    def retire(self, finished: set[int]) -> None:
        """Drop finished requests from their micro-batches and give their blocks back."""
        for part in self.parts:
            gone = [b for b, r in enumerate(part.seqs) if r in finished]
            if not gone:
                continue
            keep = [b for b, r in enumerate(part.seqs) if r not in finished]
            part.blocks.remove(gone)
            part.seqs = [part.seqs[b] for b in keep]
            part.lens = [part.lens[b] for b in keep]
            part.pads = [part.pads[b] for b in keep]
            part.slots = part.slots[keep]
        self._use_partitions()

    def _use_partitions(self) -> None:
        """The decode step runs the non-empty partitions, rows in `active()` order."""
        self.mbs, row = [], 0
        for part in self.parts:
            if part.seqs:
                part.rows = list(range(row, row + len(part.seqs)))
                row += len(part.seqs)
                self.mbs.append(part)

    # ----------------------------------------------------------------------------------------------
    # BatchRunner

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> torch.Tensor:
        lengths = [len(p) for p in prompts]
        if max(lengths) > self.workload.prompt_len_max or max_new_tokens > self.workload.gen_len:
            raise WorkloadError(f"a batch needs {max(lengths)} prompt + {max_new_tokens} new tokens but the "
                                f"memory plan was made for {self.workload.prompt_len_max} + {self.workload.gen_len}")
        if self.admits:
            raise RuntimeError("the paged KV cache admits requests against its budget: drive this runner with "
                               "engine.generation.generate (admission mode), not prefill/decode batches")
        padded = self.workload.padding
        # Padded (MoE-Lightning(p), as FlexGen): every prompt to the workload's longest.
        width = self.workload.prompt_len_max if padded else max(lengths)
        if "kv_cache" in self.pools.used:  # a new batch: its GPU-resident KV cache starts the pool afresh
            self.pools.used["kv_cache"] = 0
        groups = pack_micro_batches(lengths, self.policy.micro_batch_size)
        gpu_seqs = int(self.policy.kv_gpu_fraction * len(prompts) + 1e-9)
        self.mbs, taken = [], 0
        for seqs in groups:
            on_gpu = taken + len(seqs) <= gpu_seqs and self.policy.kv_gpu_fraction > 0
            taken += len(seqs) if on_gpu else 0
            lens = [width if padded else lengths[b] for b in seqs]
            pads = [width - lengths[b] if padded else 0 for b in seqs]
            k, v = self._alloc_kv(len(seqs), max(lens) + max_new_tokens, on_gpu)
            self.mbs.append(MicroBatch(seqs, lens, pads, on_gpu, k, v))
        st = self._state = {name: {} for name in ("x", "qkv", "kv", "attn", "logits")}
        self._tokens = {}
        self._positions = {}
        for j, mb in enumerate(self.mbs):
            ids = [[0] * pad + list(prompts[b]) for b, pad in zip(mb.seqs, mb.pads)]
            self._tokens[j] = torch.tensor([t for p in ids for t in p], device=self.device)
            self._positions[j] = torch.cat([torch.arange(n, device=self.device) - pad
                                            for n, pad in zip(mb.lens, mb.pads)]).clamp_(min=0)
        self._run(self._graph("prefill"), "prefill")
        for mb in self.mbs:
            mb.slots = torch.tensor(mb.lens)
        return self._gather_logits(st["logits"], len(prompts))

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device)
        self._state = {name: {} for name in ("x", "qkv", "kv", "attn", "logits")}
        self._new_len, self._starts, self._slots_dev, self._append = {}, {}, {}, {}
        for j, mb in enumerate(self.mbs):
            if mb.blocks is not None:   # where each new token goes, and the lengths attended: once per step
                self._append[j] = (*mb.blocks.append_slots(), mb.blocks.lens + 1)
            self._tokens[j] = tokens[self._index(mb.at())]
            pads = self._index(mb.pads, on_device=False)
            self._positions[j] = (mb.slots - pads).to(self.device)
            self._slots_dev[j] = mb.slots.to(self.device)
            self._new_len[j] = mb.slots + 1
            self._starts[j] = pads
        self._run(self._graph("decode"), "decode")
        for mb in self.mbs:
            mb.slots = mb.slots + 1
            if mb.blocks is not None:
                mb.blocks.lens += 1
        return self._gather_logits(self._state["logits"], len(tokens))

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ----------------------------------------------------------------------------------------------
    # data-parallel attention (`engine.data_parallel`)

    def _moe(self, j: int):
        """Micro-batch j's MoE kernel."""
        return self.moe if self.lockstep is None else self.moe.at(j)

    def ghost_forward(self) -> None:
        """A forward with none of this group's requests, while other groups still run theirs: the weights
        stream as in any forward, and each MoE layer's experts serve the rows the other groups send."""
        shape = PipeShape(num_layers=self.spec.num_layers, num_micro_batches=1, num_pages=self.experts.num_pages,
                          prefetch=self.policy.prefetch_depth, gpu_kv=frozenset({0}),
                          dense_layers=frozenset(self.spec.dense_layers))
        key = ("ghost", shape)
        if key not in self._graphs:
            self._graphs[key] = self.schedule.prefill(shape)
        like = self.embedding[:0]

        def ghost_layer(t: Task) -> None:
            stack = self.experts.stack(t.layer)
            if stack is not None:
                self.moe.ghost(like, stack)
        self._run(self._graphs[key], "ghost", PrefillLayer=ghost_layer)   # workers run in inference mode

    # ----------------------------------------------------------------------------------------------
    # graphs

    def shape(self) -> PipeShape:
        return PipeShape(num_layers=self.spec.num_layers, num_micro_batches=len(self.mbs),
                         num_pages=self.experts.num_pages, prefetch=self.policy.prefetch_depth,
                         gpu_kv=frozenset(j for j, mb in enumerate(self.mbs) if mb.on_gpu),
                         dense_layers=frozenset(self.spec.dense_layers))

    def _graph(self, phase: str) -> TaskGraph:
        shape = self.shape()
        key = (phase, shape)
        if key not in self._graphs:
            self._graphs[key] = self.schedule.build(phase, shape, self.policy)
        return self._graphs[key]

    def _run(self, graph: TaskGraph, phase: str, **handlers: Callable[[Task], None]) -> list[TaskRecord]:
        """Execute a graph with the ops' handlers (`handlers` replaces some of them)."""
        if self.lockstep is not None and phase != "ghost":   # a forward: in step with the other groups'
            self.lockstep.begin([len(self._tokens[j]) for j in range(len(self.mbs))])
        handlers = {op: handlers.get(op) or getattr(self, f"_op_{op}") for op in {t.op for t in graph.tasks}}
        if self.activations is not None:
            handlers = {op: self._counted(h) for op, h in handlers.items()}
        records = self.executor.run(graph, handlers)
        self.timeline.add(phase, records)
        return records

    def _counted(self, handler: Callable[[Task], None]) -> Callable[[Task], None]:
        """`handler`, with what it allocates counted when its task runs on the GPU or lands there (H2D)."""
        def run(t: Task) -> None:
            if t.resource not in (Resource.GPU, Resource.H2D):
                return handler(t)
            with self.activations.tracking():
                return handler(t)
        return run

    def _gather_logits(self, per_mb: dict, batch: int) -> torch.Tensor:
        if self.activations is not None:
            with self.activations.tracking():
                return self._gather_logits_into(per_mb, batch)
        return self._gather_logits_into(per_mb, batch)

    def _gather_logits_into(self, per_mb: dict, batch: int) -> torch.Tensor:
        out = torch.empty(batch, self.spec.vocab_size, dtype=torch.float32, device=self.device)
        for j, mb in enumerate(self.mbs):
            out[self._index(mb.at())] = per_mb[j].float()
        return out

    def _index(self, values: list[int], on_device: bool = True) -> torch.Tensor:
        """`values` as a tensor, memoised: a micro-batch's rows and pads are the same every decode step of
        a batch, and a tensor a step per micro-batch is host time that small models feel."""
        key = (tuple(values), on_device)
        t = self._indices.get(key)
        if t is None:
            if len(self._indices) > 4096:
                self._indices.clear()
            t = self._indices[key] = torch.tensor(values, device=self.device if on_device else None)
        return t

    # ----------------------------------------------------------------------------------------------
    # transfers (byte-counted)

    def _to_cpu(self, t: torch.Tensor) -> torch.Tensor:
        """D2H on the current stream, waited for (the consumer is CPU code on this thread)."""
        self.link_bytes["d2h"] += t.numel() * t.element_size()
        if not self.cuda:
            return t.clone()
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        out.copy_(t, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return out

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """H2D on the current stream (ordered before later tasks by the executor's events)."""
        self.link_bytes["h2d"] += t.numel() * t.element_size()
        if not self.cuda:
            return t.clone()
        out = t.to(self.device, non_blocking=True)
        # Allocated on the copy stream, read on the compute stream: keep the block until that is done.
        out.record_stream(self.executor.stream(Resource.GPU))
        return out

    # ----------------------------------------------------------------------------------------------
    # ops: weights

    def _op_W_CtoPin(self, t: Task) -> None:
        self.experts.copy_to_pinned(t.layer, t.micro_batch)

    def _op_W_PinToGPU(self, t: Task) -> None:
        self.link_bytes["h2d"] += self.experts.copy_to_device(t.layer, t.micro_batch)

    # ----------------------------------------------------------------------------------------------
    # ops: prefill

    def _input(self, i: int, j: int) -> torch.Tensor:
        return self.embedding[self._tokens[j]] if i == 0 else self._state["x"][j]

    def _finish(self, i: int, j: int, x: torch.Tensor, last_rows: torch.Tensor | None = None) -> None:
        self._state["x"][j] = x
        if i == self.spec.num_layers - 1:
            rows = x if last_rows is None else x[last_rows]
            self._state["logits"][j] = self.family.final_logits(rows, self.norm, self.lm_head, self.spec)

    def _op_PrefillLayer(self, t: Task) -> None:
        i, j, mb = t.layer, t.micro_batch, self.mbs[t.micro_batch]
        x = self._input(i, j)
        q, k, v = self.family.pre_attention(self.layers[i], x, self._positions[j], self.spec)
        attn = prefill_attention(q, k, v, mb.lens, mb.pads if any(mb.pads) else None, **self._attn_dev[i])
        if mb.on_gpu:
            self._write_prompt_kv(mb, i, k, v)
        else:
            self._state["kv"][i, j] = (k, v)
        x = self.family.post_attention(self.layers[i], x, attn, self.spec, self.experts.stack(i), self._moe(j))
        last = torch.cumsum(torch.tensor(mb.lens, device=self.device), 0) - 1
        self._finish(i, j, x, last)

    def _op_OffloadKV(self, t: Task) -> None:
        mb = self.mbs[t.micro_batch]
        k, v = self._state["kv"].pop((t.layer, t.micro_batch))
        self._write_prompt_kv(mb, t.layer, self._to_cpu(k), self._to_cpu(v))

    def _write_prompt_kv(self, mb: MicroBatch, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if mb.blocks is not None:   # k, v [tokens, nkv, hd] -> each token's (block, row)
            blk, row = mb.prompt_at
            mb.blocks.pool.k[i][blk, :, row] = k
            mb.blocks.pool.v[i][blk, :, row] = v
            return
        start = 0
        for b, n in enumerate(mb.lens):
            mb.k[i, b, :, :n] = k[start:start + n].transpose(0, 1)
            mb.v[i, b, :, :n] = v[start:start + n].transpose(0, 1)
            start += n

    # ----------------------------------------------------------------------------------------------
    # ops: decode with attention on the CPU (A_g=0)

    def _op_PreAttn(self, t: Task) -> None:
        i, j = t.layer, t.micro_batch
        x = self._input(i, j)
        self._state["x"][j] = x
        self._state["qkv"][i, j] = self.family.pre_attention(self.layers[i], x, self._positions[j], self.spec)

    def _op_OffloadQKV(self, t: Task) -> None:
        key = (t.layer, t.micro_batch)
        self._state["qkv"][key] = tuple(self._to_cpu(a) for a in self._state["qkv"][key])

    def _attend(self, mb: MicroBatch, j: int, i: int, q, k, v, slots, new_len, starts) -> torch.Tensor:
        args = self._attn_cpu[i] if q.device.type == "cpu" else self._attn_dev[i]
        if mb.blocks is not None:   # append in place, then the paged kernel over the blocks
            blk, row, lens = self._append[j]
            pool = mb.blocks.pool
            pool.k[i][blk, :, row] = k
            pool.v[i][blk, :, row] = v
            out = paged_decode_attention(q, pool.k[i], pool.v[i], mb.blocks.table, lens, **args)
            return out.reshape(len(mb.seqs), -1)
        b = torch.arange(len(mb.seqs), device=slots.device)
        mb.k[i, b, :, slots] = k
        mb.v[i, b, :, slots] = v
        s = int(new_len.max())
        return decode_attention(q, mb.k[i, :, :, :s], mb.v[i, :, :, :s], new_len, starts, **args)

    def _op_CPUAttn(self, t: Task) -> None:
        i, j, mb = t.layer, t.micro_batch, self.mbs[t.micro_batch]
        q, k, v = self._state["qkv"].pop((i, j))
        attn = self._attend(mb, j, i, q, k, v, mb.slots, self._new_len[j], self._starts[j])
        self._state["attn"][i, j] = attn.pin_memory() if self.cuda else attn

    def _op_LoadHidden(self, t: Task) -> None:
        key = (t.layer, t.micro_batch)
        self._state["attn"][key] = self._to_device(self._state["attn"][key])

    def _op_GPUAttn(self, t: Task) -> None:
        """A micro-batch whose KV cache is on the GPU (r_c): attention where the cache is."""
        i, j, mb = t.layer, t.micro_batch, self.mbs[t.micro_batch]
        x = self._input(i, j)
        self._state["x"][j] = x
        q, k, v = self.family.pre_attention(self.layers[i], x, self._positions[j], self.spec)
        self._state["attn"][i, j] = self._attend(mb, j, i, q, k, v, self._slots_dev[j],
                                              self._new_len[j].to(self.device), self._starts[j].to(self.device))

    def _op_PostAttn(self, t: Task) -> None:
        i, j = t.layer, t.micro_batch
        x = self._state["x"][j]
        attn = self._state["attn"].pop((i, j))
        x = self.family.post_attention(self.layers[i], x, attn, self.spec, self.experts.stack(i), self._moe(j))
        self._finish(i, j, x)

    # ----------------------------------------------------------------------------------------------
    # ops: decode with attention on the GPU (A_g=1), KV streamed

    def _op_LoadKV(self, t: Task) -> None:
        i, j, mb = t.layer, t.micro_batch, self.mbs[t.micro_batch]
        if mb.blocks is not None:   # only the blocks the micro-batch holds cross the link
            self._state["kv"][i, j] = self._load_blocks(mb, i, j)
            return
        s = int(self._new_len[j].max())
        k = self._to_device(mb.k[i, :, :, :s])   # V a view of K (MLA): only K crosses the link
        self._state["kv"][i, j] = (k, k[..., :self.spec.attn_v_dim]) if self.spec.v_in_k else (
            k, self._to_device(mb.v[i, :, :, :s]))

    def _op_GPULayer(self, t: Task) -> None:
        i, j, mb = t.layer, t.micro_batch, self.mbs[t.micro_batch]
        x = self._input(i, j)
        q, k, v = self.family.pre_attention(self.layers[i], x, self._positions[j], self.spec)
        new_len, starts = self._new_len[j].to(self.device), self._starts[j].to(self.device)
        if mb.on_gpu:
            attn = self._attend(mb, j, i, q, k, v, self._slots_dev[j], new_len, starts)
        elif mb.blocks is not None:   # the loaded copy of its blocks, renumbered
            k_blocks, v_blocks, table, new_block = self._state["kv"].pop((i, j))
            _, row, lens = self._append[j]
            k_blocks[new_block, :, row] = k
            v_blocks[new_block, :, row] = v
            attn = paged_decode_attention(q, k_blocks, v_blocks, table, lens,
                                          **self._attn_dev[i]).reshape(len(mb.seqs), -1)
            self._state["qkv"][i, j] = (k, v)
        else:
            k_cache, v_cache = self._state["kv"].pop((i, j))
            b = torch.arange(len(mb.seqs), device=self.device)
            k_cache[b, :, self._slots_dev[j]] = k
            v_cache[b, :, self._slots_dev[j]] = v
            attn = decode_attention(q, k_cache, v_cache, new_len, starts, **self._attn_dev[i])
            self._state["qkv"][i, j] = (k, v)
        x = self.family.post_attention(self.layers[i], x, attn, self.spec, self.experts.stack(i), self._moe(j))
        self._finish(i, j, x)

    def _load_blocks(self, mb: MicroBatch, i: int, j: int):
        """Layer i's blocks of a CPU-resident micro-batch, gathered and copied to the GPU, with its block
        table and its new tokens' blocks renumbered into the copy."""
        pool = mb.blocks.pool
        # The table and the gathered blocks are host memory on a GPU; only the copies land on the device
        # (on the CPU the tracker would otherwise count the gathers as the GPU role's).
        with self.activations.host_side() if self.activations is not None else contextlib.nullcontext():
            held = sorted({b for ids in mb.blocks.blocks for b in ids})
            ids = torch.tensor(held, dtype=torch.long)
            number = torch.zeros(pool.num_blocks, dtype=torch.int32)
            number[ids] = torch.arange(len(held), dtype=torch.int32)
            blk, _, _ = self._append[j]
            table, new_block = number[mb.blocks.table.long()], number[blk].long()
            k_host = pool.k[i][ids]
            v_host = None if self.spec.v_in_k else pool.v[i][ids]
        k = self._to_device(k_host)
        v = k[..., :self.spec.attn_v_dim] if v_host is None else self._to_device(v_host)
        return k, v, table, new_block

    def _op_StoreKV(self, t: Task) -> None:
        i, j, mb = t.layer, t.micro_batch, self.mbs[t.micro_batch]
        k, v = (self._to_cpu(a) for a in self._state["qkv"].pop((i, j)))
        if mb.blocks is not None:
            blk, row, _ = self._append[j]
            mb.blocks.pool.k[i][blk, :, row] = k
            mb.blocks.pool.v[i][blk, :, row] = v
            return
        b = torch.arange(len(mb.seqs))
        mb.k[i, b, :, mb.slots] = k
        mb.v[i, b, :, mb.slots] = v

    # ----------------------------------------------------------------------------------------------

    def reset_stats(self) -> None:
        """Forget timings and byte counts (after a warm-up); peak memory is kept."""
        self.timeline = RunTimeline(keep_records=self.timeline.keep_records)
        self.link_bytes = {"h2d": 0, "d2h": 0}
        self.kernels.used = {}

    def _kv_blocks(self) -> dict | None:
        """The paged KV cache: its budget and each pool (CPU, and the GPU's r_c share)."""
        if not self.admits or not self.parts:
            return None
        pools = {("gpu" if p.on_gpu else "cpu"): p.blocks.pool for p in self.parts}
        return {"block_size": self.budget.block_size, "budget_tokens": self.budget.tokens,
                "blocks": sum(p.num_blocks for p in pools.values()),
                **{f"{side}_pool": {"blocks": p.num_blocks, "bytes": p.nbytes, "peak_blocks_held": p.peak_held,
                                    "peak_bytes_held": p.peak_held * p.block_nbytes} for side, p in pools.items()}}

    def stats(self) -> dict:
        peak_gpu = (int(torch.cuda.max_memory_allocated(self.device)) if self.cuda
                    else self.pools.allocated_bytes + (self.activations.peak if self.activations else 0))
        return {
            "peak_gpu_bytes": peak_gpu,
            "link_bytes": dict(self.link_bytes),
            "utilisation": self.timeline.utilisation("decode"),
            "threads": {**self.threads.to_dict(), "serial": self.executor.serial},
            "extra": {"memory_plan": {"gpu": self.plan.gpu, "cpu": self.plan.cpu},
                      # what the fractions came to (whole experts, whole micro-batches); the plan reserves
                      # the fractions' bytes
                      "effective_policy": {"resident_experts_per_layer": self.resident_experts,
                                           "gpu_kv_micro_batches": sum(p.on_gpu for p in (self.parts or self.mbs)),
                                           "micro_batches": len(self.parts or self.mbs)},
                      "cpu_attention": self.attention_backend,
                      "kv_blocks": self._kv_blocks(),
                      "gpu_pools_bytes": self.pools.allocated_bytes,
                      "gpu_activations_peak_bytes": self.activations.peak if self.activations else None,
                      "prefill_utilisation": self.timeline.utilisation("prefill"),
                      "expert_kernels_used": self.kernels.used},
        }
