"""Which requests run in each forward of a simulated run, as the engine's driver
(`moe_lightning.engine.generation`) forms them when every request generates exactly its own budget (no
EOS: the simulator's `sampling.ignore_eos`).

- Static batches (`generate_batches`: padded, and the baselines): every row of a batch runs until its
  longest budget is spent, a finished row included (its slot is kept), so a batch runs max(budget) - 1
  decode steps at the batch's full shape.
- Admission (`generate_admitted`, CGOPipe unpadded): Algorithm 2's `schedule.batching.admit` over the
  partitions' current loads. A request leaves its micro-batch after its own budget and its blocks go back;
  with `refill`, waiting requests are admitted into the room before the next decode step (a prefill
  round of the admitted requests only); without, once every running request has finished. A decode step
  runs the non-empty partitions, each sequence at its own context.

The run is a list of `Round`s: a prefill forward and the decode steps after it, before the next prefill.
The decode steps come in `Segment`s of constant membership (the contexts grow by one slot per step), so
the simulator builds a graph's costs once per segment and re-prices only its context-dependent tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from moe_lightning.schedule.batching import KVBudget, Partition, admit
from moe_lightning.tuner.costs import MicroBatchShape


@dataclass(frozen=True)
class Segment:
    """`steps` decode steps of the same micro-batches; `mbs[j].slots` is the cache (mean per sequence when
    paged, the longest when dense) before the first of them, so step k attends slots + k + 1."""

    mbs: list[MicroBatchShape]
    gpu_kv: frozenset[int]
    steps: int
    rows: int          # sequences decoded per step (a static batch's finished rows included)


@dataclass
class Round:
    """A prefill forward (its micro-batches, those with KV on the GPU) and the decode steps after it."""

    mbs: list[MicroBatchShape]
    gpu_kv: frozenset[int]
    decodes: list[Segment] = field(default_factory=list)

    @property
    def decode_steps(self) -> int:
        return sum(s.steps for s in self.decodes)


def static_rounds(batches: Sequence[tuple[list[MicroBatchShape], frozenset[int]]],
                  budgets: Sequence[Sequence[int]]) -> list[Round]:
    """Static batches (shapes from `simulator.batch_shapes`) and each one's requests' budgets: a batch decodes
    until its longest budget is spent, every row at every step (`generate_batches`)."""
    out = []
    for (mbs, gpu_kv), own in zip(batches, budgets):
        steps = max(own) - 1
        rnd = Round(mbs, gpu_kv)
        if steps > 0:
            rnd.decodes.append(Segment(mbs, gpu_kv, steps, sum(mb.seqs for mb in mbs)))
        out.append(rnd)
    return out


def _shape(contexts: list[int], prompts: list[int]) -> MicroBatchShape:
    """A paged micro-batch: each sequence reads its own context (`slots` the mean, `lens` each one's)."""
    tokens = sum(contexts)
    return MicroBatchShape(seqs=len(contexts), tokens=tokens, sum_sq=sum(n * n for n in prompts),
                           slots=tokens / len(contexts), lens=tuple(contexts))


def admitted_rounds(lengths: Sequence[int], budgets: Sequence[int], budget: KVBudget, n_gpu: int,
                    refill: bool = True, prefill_cap: int | None = None) -> list[Round]:
    """`generate_admitted` replayed without a model: the partitions' loads, admissions and finishes, step by
    step; the first `n_gpu` partitions keep their KV cache on the GPU; `prefill_cap` as `admit`'s (the
    runner's `prefill_cap`)."""
    parts = [Partition() for _ in range(budget.partitions)]
    part_of: dict[int, int] = {}
    context: dict[int, int] = {}   # tokens in each running request's cache
    left: dict[int, int] = {}      # decode steps each running request has still to run
    waiting = list(range(len(lengths)))
    rounds: list[Round] = []
    # The driver calls `admit` before every step while requests wait; with the loads unchanged since its last
    # call it admits nothing (the loads only grew since each waiting request was deferred, and the open
    # partitions only shrank), so it is called here only after requests finished.
    changed = True

    def finish(done: set[int]) -> None:
        for r in sorted(done):
            part = parts[part_of.pop(r)]
            part.requests.remove(r)
            part.reserved_blocks -= budget.blocks_for(lengths[r] + budgets[r])
            del context[r], left[r]

    while waiting or part_of:
        if waiting and (refill or not part_of) and changed:
            admitted, waiting = admit(waiting, lengths, budgets, budget, parts, prefill_cap)
            changed = False
            if admitted:
                mbs, gpu_kv = [], set()
                for j, reqs in admitted.items():
                    if j < n_gpu:
                        gpu_kv.add(len(mbs))
                    part_of.update(dict.fromkeys(reqs, j))
                    for r in reqs:
                        context[r], left[r] = lengths[r], budgets[r] - 1
                    mbs.append(_shape([lengths[r] for r in reqs], [lengths[r] for r in reqs]))
                rounds.append(Round(mbs, frozenset(gpu_kv)))
                done = {r for reqs in admitted.values() for r in reqs if left[r] == 0}   # one token: done
                finish(done)
                # The driver admits again at once: what the prefill cap deferred may fit a fresh round.
                changed = bool(done) or prefill_cap is not None
                continue
            if not part_of:
                raise ValueError(f"{len(waiting)} requests wait and none fits the empty KV cache")
        running = [p.requests for p in parts if p.requests]
        gpu_kv = frozenset(n for n, j in enumerate(j for j, p in enumerate(parts) if p.requests) if j < n_gpu)
        steps = min(left[r] for r in part_of)   # until the next request finishes
        rounds[-1].decodes.append(Segment([_shape([context[r] for r in reqs], [lengths[r] for r in reqs])
                                           for reqs in running], gpu_kv, steps, len(part_of)))
        for r in part_of:
            context[r] += steps
            left[r] -= steps
        finish({r for r in part_of if left[r] == 0})
        changed = True
    return rounds
