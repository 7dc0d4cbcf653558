"""Data-parallel attention across the expert groups (EPS-MoE's serving layout) under expert parallelism.

With E expert groups (each the T tensor ranks of one e), every group runs its own requests: every E-th
of them (`shares`), with its own KV cache and its own micro-batches of the machine's policy (N / E
sequences in micro-batches of mu / E: `ParallelConfig.group_policy`). Only the MoE layers cross the
groups: each rank sends its own tokens' (token, expert) rows to the experts' ranks and gets their
outputs back (`ep_moe`), with no all-gather. So a rank attends and caches 1/E of the batch, as the plans
(HRM, simulator) assume.

The groups' collectives must pair up in the same order on every rank, while the groups' requests run
for different numbers of steps (prompts, generation lengths, EOS and refill differ). `Lockstep` keeps
them in step, forward by forward:
- before each forward (a prefill round or a decode step), the ranks of an expert group sum, in one
  all-reduce, how many are running and each micro-batch slot's tokens: M slots are in use (the most any
  rank has), and each slot's chunk count for EPS-MoE's pipeline comes from its tokens over all groups,
  so every rank pipelines a slot alike;
- in the forward, a rank with m < M micro-batches makes M - m empty MoE calls per MoE layer right after
  its last real one (`DataParallelMoE.at`): it sends nothing but still runs its experts on the rows the
  others send it;
- a rank whose requests are all done keeps joining the others' forwards with ghost forwards (its
  expert weights streamed as in any forward, each MoE layer's M calls empty) until every rank is done
  (`Lockstep.drain`).
The MoE calls of a forward run in (layer, micro-batch) order on one thread: the schedule's GPU tasks are
issued in that order on one worker (`engine.executor`), and the reference engine runs one micro-batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moe_lightning.engine.expert_parallel import ep_moe
from moe_lightning.models.layers import ExpertStack, MoEKernel


def shares(requests: Sequence[int], groups: int) -> list[list[int]]:
    """Each expert group's requests: every `groups`-th, in order (the plans' `RankView.lengths`)."""
    return [list(requests[g::groups]) for g in range(groups)]


class Lockstep:
    """Keeps an expert group's ranks in step forward by forward (module docstring). `slots`: the most
    micro-batches a forward of this rank can have; `chunks`: EPS-MoE's chunk count, fixed or from a slot's
    tokens over all groups. Collectives on `device` (CPU for gloo, the rank's GPU for NCCL)."""

    def __init__(self, group, slots: int, chunks: int | Callable[[int], int], device: torch.device):
        self.group, self.slots, self.chunks, self.device = group, slots, chunks, device
        self.groups, self.group_rank = dist.get_world_size(group), dist.get_rank(group)
        self.m = 0                     # this forward's real micro-batches on this rank
        self.per_slot: list[int] = []  # this forward's chunk count of each slot in use (M of them)
        self.forwards = 0
        self.ghost_forwards = 0
        self.ghost_s = 0.0

    def begin(self, tokens: Sequence[int]) -> None:
        """Before one of this rank's forwards: `tokens[j]` of its micro-batch j."""
        if not tokens or len(tokens) > self.slots or min(tokens) <= 0:
            raise ValueError(f"a forward of {len(tokens)} micro-batches ({list(tokens)} tokens): 1 to {self.slots} "
                             "non-empty ones")
        self._exchange([1, *tokens])
        self.m = len(tokens)
        self.forwards += 1

    def drain(self, ghost_forward: Callable[[], None]) -> int:
        """After this rank's last forward: ghost forwards while any rank of the group still runs; -> how many."""
        n, t0 = 0, time.perf_counter()
        while True:
            self.m = 0
            if self._exchange([0]) == 0:
                self.ghost_forwards += n
                self.ghost_s += time.perf_counter() - t0
                return n
            ghost_forward()
            n += 1

    def _exchange(self, row: list[int]) -> int:
        counts = torch.zeros(self.slots + 1, dtype=torch.int64)
        counts[:len(row)] = torch.tensor(row, dtype=torch.int64)
        counts = counts.to(self.device)
        dist.all_reduce(counts, group=self.group)
        running, *totals = counts.tolist()
        used = max((j + 1 for j, n in enumerate(totals) if n), default=0)
        self.per_slot = [self.chunks(n) if callable(self.chunks) else self.chunks for n in totals[:used]]
        return running


class DataParallelMoE:
    """The MoE kernel of a rank holding its own tokens (data-parallel attention): `ep_moe` over them across
    the expert group, nothing gathered. `at(j)` is the kernel for micro-batch slot j of the current
    forward (its chunk count is the slot's), which after the rank's last real slot makes the empty calls
    of the slots only other ranks use; `ghost(experts)` is one MoE layer of a ghost forward."""

    def __init__(self, num_experts: int, lockstep: Lockstep, kernel: str | MoEKernel | None = None):
        self.num_experts, self.lockstep, self.kernel = num_experts, lockstep, kernel

    def at(self, j: int) -> MoEKernel:
        lock = self.lockstep

        def run(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, experts: ExpertStack) -> torch.Tensor:
            out = self._call(h, weights, ids, experts, j)
            if j == lock.m - 1:
                for slot in range(lock.m, len(lock.per_slot)):
                    self._empty(h, experts, slot)
            return out
        return run

    def ghost(self, like: torch.Tensor, experts: ExpertStack) -> None:
        """One MoE layer of a ghost forward: every slot's call, with no tokens of this rank's."""
        for slot in range(len(self.lockstep.per_slot)):
            self._empty(like, experts, slot)

    def _call(self, h, weights, ids, experts, slot: int) -> torch.Tensor:
        return ep_moe(h, weights, ids, experts, self.num_experts, chunks=self.lockstep.per_slot[slot],
                      group=self.lockstep.group, kernel=self.kernel)

    def _empty(self, like: torch.Tensor, experts: ExpertStack, slot: int) -> None:
        none = torch.empty(0, 1, dtype=torch.int64, device=like.device)
        self._call(like.new_empty(0, like.shape[-1]), none.float(), none, experts, slot)


@dataclass
class GroupRun:
    """One expert group's part of a data-parallel run (what each of its ranks timed)."""

    group: int
    requests: int
    tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    forwards: int
    ghost_forwards: int
    ghost_s: float
    outputs: dict[int, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "outputs"}


def generate_data_parallel(runner, prompts: Sequence[Sequence[int]], params, batch_size: int,
                           on_tokens: Callable[[int], None] | None = None, start: int = 0,
                           max_new: Sequence[int] | None = None, refill: bool = True,
                           skip: frozenset[int] = frozenset(),
                           on_finished: Callable[[list[tuple[int, list[int]]]], None] | None = None,
                           on_batch=None):
    """`generate` for a runner of one expert group (`runner.lockstep`): this group's share of the requests
    not in `skip` (nor before `start`), by admission (the unpadded mode) or in static batches of
    `batch_size` (the group's), then ghost forwards until every group is done. Every rank returns the
    whole machine's result: outputs by request index (skipped ones empty), prefill the slowest group's,
    decode the rest of the machine's time (the groups step together: a group's prefill, decode and ghost
    forwards add up to it), `groups` each group's own figures. `on_finished` gets this group's requests as
    they finish, then the other groups' at the end."""
    from moe_lightning.engine.generation import AdmissionStats, GenerationResult, generate_admitted, generate_batches

    if on_batch is not None:
        raise ValueError("data-parallel groups finish requests out of input order: report them with on_finished")
    lock: Lockstep = runner.lockstep
    n = len(prompts)
    max_new = [params.max_new_tokens if max_new is None else min(params.max_new_tokens, g)
               for g in (max_new or [params.max_new_tokens] * n)]
    remaining = [r for r in range(start, n) if r not in skip]
    mine = shares(remaining, lock.groups)[lock.group_rank]
    forwards0, ghosts0, ghost_s0 = lock.forwards, lock.ghost_forwards, lock.ghost_s
    if getattr(runner, "admits", False):
        own = generate_admitted(runner, prompts, params, max_new=max_new, refill=refill,
                                skip=frozenset(range(n)) - frozenset(mine), on_tokens=on_tokens,
                                on_finished=on_finished)
        outputs = {r: own.output_ids[r] for r in mine}
    else:
        def finished(first: int, outs: list[list[int]]) -> None:
            if on_finished:
                on_finished([(mine[first + b], o) for b, o in enumerate(outs)])

        own = generate_batches(runner, [prompts[r] for r in mine], params, batch_size, on_tokens=on_tokens,
                               on_batch=finished, max_new=[max_new[r] for r in mine])
        outputs = dict(zip(mine, own.output_ids))
    lock.drain(runner.ghost_forward)
    run = GroupRun(group=lock.group_rank, requests=len(mine), tokens=own.generated_tokens, prefill_s=own.prefill_s,
                   decode_s=own.decode_s, decode_steps=len(own.decode_step_s), forwards=lock.forwards - forwards0,
                   ghost_forwards=lock.ghost_forwards - ghosts0, ghost_s=lock.ghost_s - ghost_s0, outputs=outputs)
    runs: list = [None] * lock.groups
    dist.all_gather_object(runs, (run, own.decode_step_s, own.admission), group=lock.group)
    result = GenerationResult(output_ids=[[] for _ in range(n)])
    for g, steps, _ in runs:
        for r, out in g.outputs.items():
            result.output_ids[r] = out
        result.decode_step_s += steps
    # Every group takes part in every forward, so each group's own prefill, decode and ghost forwards add up
    # to the machine's time: prefill is the slowest group's, decode the rest of the longest of those sums
    # (so prefill + decode is the machine's time, not one group's prefill plus another's decode).
    result.prefill_s = max(g.prefill_s for g, _, _ in runs)
    result.decode_s = max(g.prefill_s + g.decode_s + g.ghost_s for g, _, _ in runs) - result.prefill_s
    stats = [s for _, _, s in runs if s is not None]
    if stats:
        result.admission = AdmissionStats(prefill_rounds=max(s.prefill_rounds for s in stats),
                                          decode_steps=max(s.decode_steps for s in stats),
                                          deferred=sum(s.deferred for s in stats),
                                          max_active=sum(s.max_active for s in stats))
    result.groups = [g.to_dict() for g, _, _ in runs]
    others = [g for g, _, _ in runs if g.group != lock.group_rank]
    if on_tokens:
        on_tokens(sum(g.tokens for g in others))
    if on_finished and any(g.outputs for g in others):
        on_finished(sorted((r, out) for g in others for r, out in g.outputs.items()))
    return result
