"""A token-granular KV cache: a pool of fixed-size blocks for every layer, and a block table per sequence.

The engine's unpadded mode keeps the CPU-resident KV cache here. A sequence holds ceil(tokens /
block_size) blocks, so memory follows its real length (no micro-batch is padded to its longest prompt),
and CPU attention reads the blocks in place (`moe_lightning.kernels.cpu_attention`), with no per-step
gather of the cache. Layout [layer, block, kv head, slot, head_dim]: one (block, kv head) is a
contiguous run of block_size x head_dim values, which the attention kernel streams. Under multi-head
latent attention the one "KV head" holds a token's latent and RoPE key, and V is a view of K's first
values (`kv_tensors`), so the pool stores K only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from moe_lightning.config import ModelSpec
from moe_lightning.errors import MemoryBudgetError


def kv_tensors(spec: ModelSpec, lead: Sequence[int],
               make: Callable[[tuple[int, ...]], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache's K [*lead, attn_k_dim] and V [*lead, attn_v_dim], each from `make(shape)` (zeroed), V a
    view of K where the model's V is part of its K (MLA)."""
    k = make((*lead, spec.attn_k_dim))
    return k, k[..., :spec.attn_v_dim] if spec.v_in_k else make((*lead, spec.attn_v_dim))


class KVBlockPool:
    """The blocks of every layer on one device; blocks are taken and given back by sequence."""

    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", pin: bool = False,
                 alloc: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None):
        """`alloc(shape, dtype)`, when given, supplies the two tensors (the GPU pool takes them from the
        engine's budgeted `DevicePools`); they are zeroed here."""
        lead = (spec.num_layers, num_blocks, spec.cache_kv_heads, block_size)
        if alloc is not None:
            self.k, self.v = kv_tensors(spec, lead, lambda shape: alloc(shape, dtype).zero_())
        else:
            self.k, self.v = kv_tensors(spec, lead, lambda shape: torch.zeros(shape, dtype=dtype, device=device,
                                                                               pin_memory=pin))
        self.v_in_k = spec.v_in_k
        self.block_size, self.num_blocks = block_size, num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))   # pop() hands out low block ids first
        self.peak_held = 0   # the most blocks held at once

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return (self.k.numel() + (0 if self.v_in_k else self.v.numel())) * self.k.element_size()

    @property
    def block_nbytes(self) -> int:
        """K and V of one block, every layer."""
        return self.nbytes // max(1, self.num_blocks)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryBudgetError(f"KV block pool: {n} blocks asked for, {len(self._free)} of "
                                    f"{self.num_blocks} free")
        taken = [self._free.pop() for _ in range(n)]
        self.peak_held = max(self.peak_held, self.num_blocks - len(self._free))
        return taken

    def give_back(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class SequenceBlocks:
    """The block tables and context lengths of a group of sequences (one micro-batch) in a pool.

    The group changes between steps, never within one: `extend` takes over another group's sequences
    (the requests a refill admitted, after their prefill), `remove` gives finished sequences' blocks
    back to the pool."""

    def __init__(self, pool: KVBlockPool, lengths: list[int], capacity: int | list[int]):
        """Blocks for each sequence's `lengths` tokens; room in the table for `capacity` tokens each
        (one number for all, or one per sequence)."""
        self.pool = pool
        caps = capacity if isinstance(capacity, list) else [capacity] * len(lengths)
        self.caps = [pool.blocks_for(c) for c in caps]
        self.blocks = [pool.take(pool.blocks_for(n)) for n in lengths]
        self.lens = torch.tensor(lengths, dtype=torch.int32)
        self._build_table()

    def __len__(self) -> int:
        return len(self.blocks)

    def _build_table(self) -> None:
        self.table = torch.zeros(len(self.blocks), max(self.caps, default=1), dtype=torch.int32)
        for b, ids in enumerate(self.blocks):
            self.table[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)

    def extend(self, other: SequenceBlocks) -> None:
        """Append `other`'s sequences (same pool), which gives up its hold on them."""
        if other.pool is not self.pool:
            raise ValueError("sequences of another pool")
        self.blocks += other.blocks
        self.caps += other.caps
        self.lens = torch.cat([self.lens, other.lens])
        other.blocks, other.caps, other.lens = [], [], other.lens[:0]
        self._build_table()

    def remove(self, rows: list[int]) -> None:
        """Give back the blocks of the sequences at `rows` and drop them from the group."""
        gone = set(rows)
        for b in sorted(gone):
            self.pool.give_back(self.blocks[b])
        keep = [b for b in range(len(self.blocks)) if b not in gone]
        self.blocks = [self.blocks[b] for b in keep]
        self.caps = [self.caps[b] for b in keep]
        self.lens = self.lens[keep] if keep else self.lens[:0]
        self._build_table()

    def prompt_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, row) of every prompt token, sequences in order: where prefill writes its K/V."""
        bs = self.pool.block_size
        tokens = [torch.arange(int(n)) for n in self.lens]
        blocks = torch.cat([self.table[b, t // bs] for b, t in enumerate(tokens)]).long()
        return blocks, torch.cat(tokens) % bs

    def append_slots(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, row) of each sequence's next token, taking a block where one is full."""
        bs = self.pool.block_size
        for b, n in enumerate(self.lens.tolist()):
            if n // bs == len(self.blocks[b]):
                (new,) = self.pool.take(1)
                self.table[b, len(self.blocks[b])] = new
                self.blocks[b].append(new)
        lens = self.lens.long()
        return self.table[torch.arange(len(self.blocks)), lens // bs].long(), lens % bs

    def release(self) -> None:
        for ids in self.blocks:
            self.pool.give_back(ids)
        self.blocks = [[] for _ in self.blocks]
