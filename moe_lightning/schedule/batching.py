"""Which requests run together: the paper's Algorithm 2 (admission against a KV budget in tokens) and
the engine's refill. Pure Python, shared by the engine's driver and anything that prices a batch.

Algorithm 2 (MoE-Lightning, App. A.2): requests are sorted by prompt length, longest first; each goes
to the partition (micro-batch) holding the fewest tokens, and is admitted only if that partition's
tokens plus its prompt plus (1 + its requests) x gen_len still fit the partition's share of the KV
cache; otherwise it waits for the next batch (no other partition is tried). A partition holds at most
`micro_batch_size` requests, and all of them together at most the batch size N (ceil(N / mu) x mu can
exceed N).

Generalised here in two ways, both reducing to the paper's rule in its setting:
- each request reserves its own prompt + its own generation budget (`max_new_tokens`, `gen_len` when
  the request gives none), so (1 + requests) x gen_len is the paper's special case;
- the cache is a pool of blocks of `block_size` tokens (the engine's `KVBlockPool`), so a request
  reserves ceil((prompt + max_new) / block_size) blocks. block_size = 1 is the paper's token count.

Refill: when a request finishes, its blocks go back to its partition, and at the next admission round
waiting requests are admitted into that room by the same rule (`admit` with the partitions' current
loads). Without refill, admission runs only when every partition is empty: the paper's batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class KVBudget:
    """The KV cache's room: `partitions` micro-batches of at most `micro_batch_size` requests, each with
    `blocks_per_partition` blocks of `block_size` tokens, and at most `batch_size` requests in all."""

    partitions: int
    micro_batch_size: int
    blocks_per_partition: int
    block_size: int
    batch_size: int = 0   # 0: partitions x micro_batch_size

    @property
    def tokens(self) -> int:
        return self.partitions * self.blocks_per_partition * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)


def kv_budget(batch_size: int, micro_batch_size: int, tokens: int, block_size: int) -> KVBudget:
    """`tokens` of KV cache (the memory plan's, `memory.kv_cache_tokens`) split evenly over the
    ceil(N / mu) micro-batches, each share floored to whole blocks."""
    partitions = -(-batch_size // micro_batch_size)
    return KVBudget(partitions, micro_batch_size, tokens // partitions // block_size, block_size, batch_size)


@dataclass
class Partition:
    """A micro-batch's load: its requests and the blocks they reserve."""

    requests: list[int] = field(default_factory=list)
    reserved_blocks: int = 0


def admit(waiting: Sequence[int], prompt_len: Sequence[int], max_new: Sequence[int], budget: KVBudget,
          partitions: list[Partition], prefill_cap: int | None = None) -> tuple[dict[int, list[int]], list[int]]:
    """One admission round of Algorithm 2 over `waiting` (request indices; `prompt_len[r]`, `max_new[r]`
    per request). `partitions` (current loads, one per micro-batch) are updated in place.

    `prefill_cap`: the most prompt tokens one partition may take in this round (the engine's memory
    plan sizes a micro-batch's prefill activations for that many, `memory.prefill_tokens`, reserving
    gen_len for every request; requests with smaller budgets reserve less, so more of them would fit).
    A request that would exceed it waits like one that does not fit the KV share; the first request of
    a partition's round is always taken, so the cap never starves a request.

    -> ({partition: admitted requests, in admission order}, partitions in order; requests still waiting,
    in input order)."""
    admitted: dict[int, list[int]] = {}
    deferred: list[int] = []
    order = sorted(waiting, key=lambda r: (-prompt_len[r], r))
    room = (budget.batch_size or budget.partitions * budget.micro_batch_size) - sum(len(p.requests) for p in partitions)
    round_tokens = [0] * len(partitions)   # prompt tokens admitted to each partition in this round
    for n, r in enumerate(order):
        open_ = [j for j, p in enumerate(partitions) if len(p.requests) < budget.micro_batch_size] if room else []
        if not open_:   # every micro-batch is full, or N are running: the rest wait, without a pass over each
            deferred += order[n:]
            break
        j = min(open_, key=lambda j: (partitions[j].reserved_blocks, j))
        need = budget.blocks_for(prompt_len[r] + max_new[r])
        over_cap = prefill_cap is not None and round_tokens[j] and round_tokens[j] + prompt_len[r] > prefill_cap
        if partitions[j].reserved_blocks + need > budget.blocks_per_partition or over_cap:
            deferred.append(r)
            continue
        round_tokens[j] += prompt_len[r]
        partitions[j].requests.append(r)
        partitions[j].reserved_blocks += need
        admitted.setdefault(j, []).append(r)
        room -= 1
    return dict(sorted(admitted.items())), sorted(deferred)


def gpu_partitions(kv_gpu_fraction: float, batch_size: int, budget: KVBudget) -> int:
    """How many partitions (the first ones) keep their KV cache on the GPU: the r_c share, whole
    micro-batches of mu requests."""
    return min(budget.partitions, int(kv_gpu_fraction * batch_size + 1e-9) // budget.micro_batch_size)


def admission_rounds(prompt_len: Sequence[int], max_new: int, budget: KVBudget) -> list[dict[int, list[int]]]:
    """The batches the engine's driver forms when every request generates exactly `max_new` tokens (no
    EOS: what the simulator models): the requests admitted together finish together, so refill or not,
    each round admits into empty partitions. -> per round, {partition: requests}."""
    waiting, rounds = list(range(len(prompt_len))), []
    news = [max_new] * len(prompt_len)
    while waiting:
        admitted, waiting = admit(waiting, prompt_len, news, budget, [Partition() for _ in range(budget.partitions)])
        if not admitted:
            raise ValueError(f"request {waiting[0]} does not fit an empty partition")
        rounds.append(admitted)
    return rounds


def too_large(prompt_len: Sequence[int], max_new: Sequence[int], budget: KVBudget) -> int | None:
    """The first request that could not be admitted even into an empty partition, or None."""
    for r, (p, g) in enumerate(zip(prompt_len, max_new)):
        if budget.blocks_for(p + g) > budget.blocks_per_partition:
            return r
    return None


def padded_batch_size(batch_size: int, micro_batch_size: int, tokens: int, per_request: int) -> int:
    """Padded mode (MoE-Lightning(p)): every request reserves the same `per_request` tokens (the longest
    prompt + gen_len), so Algorithm 2 fills each of the ceil(N / mu) partitions with as many requests as
    its share of `tokens` holds (at most mu, and at most N in all)."""
    if tokens >= batch_size * per_request:
        return batch_size
    partitions = -(-batch_size // micro_batch_size)
    per_partition = min(micro_batch_size, tokens // partitions // per_request)
    return min(batch_size, partitions * per_partition)
