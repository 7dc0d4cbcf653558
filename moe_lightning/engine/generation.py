"""The generation driver shared by every engine and baseline: batches requests, samples, stops at EOS
or `max_new_tokens`, and times prefill and each decode step.

An engine implements `BatchRunner` (prefill a batch of prompts, decode one token per sequence); the
driver owns everything else, so all systems sample, stop and are timed identically.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class GenerationParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    eos_token_id: int | None = None   # None: never stop early (benchmarks)


@dataclass
class GenerationResult:
    """Outputs and times of `passes` runs of the same prompts (outputs of the first; times summed)."""

    output_ids: list[list[int]]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_step_s: list[float] = field(default_factory=list)
    passes: int = 1

    @property
    def generated_tokens(self) -> int:
        """Tokens of one pass."""
        return sum(len(o) for o in self.output_ids)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def throughput_tok_s(self) -> float:
        return self.passes * self.generated_tokens / self.total_s if self.total_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        """Tokens after each sequence's first / decode time."""
        n_seq = len(self.output_ids)
        return self.passes * (self.generated_tokens - n_seq) / self.decode_s if self.decode_s else 0.0


class BatchRunner(Protocol):
    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> torch.Tensor:
        """Run the prompts, fill the KV cache: -> next-token logits [B, V]."""

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence [B] -> next-token logits [B, V]."""

    def synchronize(self) -> None:
        """Wait for all queued device work (timing boundaries)."""


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B] (on the CPU). temperature 0 is greedy."""
    logits = logits.float().cpu()
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """The sampling generator of one batch: seeded by (seed, batch index), so that a batch draws the same
    tokens whether or not the batches before it ran in this process (a resumed run is identical)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + batch_index) % 2**63)


def generate(runner: BatchRunner, prompts: Sequence[Sequence[int]], params: GenerationParams,
             batch_size: int, on_tokens: Callable[[int], None] | None = None,
             on_batch: Callable[[int, list[list[int]]], None] | None = None, start: int = 0) -> GenerationResult:
    """Generate for every prompt from index `start` (a multiple of `batch_size`), `batch_size` sequences at
    a time; outputs in input order. `on_batch(first index, outputs)` is called as each batch finishes."""
    if start % batch_size:
        raise ValueError(f"start={start} is not a multiple of batch_size={batch_size}")
    result = GenerationResult(output_ids=[])
    for first in range(start, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        generator = batch_generator(params.seed, first // batch_size)
        outputs: list[list[int]] = [[] for _ in batch]
        done = torch.zeros(len(batch), dtype=torch.bool)

        n = len(batch)

        def take(logits: torch.Tensor, outputs=outputs, done=done, n=n, generator=generator) -> torch.Tensor:
            tokens = sample(logits, params.temperature, params.top_p, generator)
            for b in torch.nonzero(~done).flatten().tolist():
                outputs[b].append(int(tokens[b]))
            if params.eos_token_id is not None:
                done.logical_or_(tokens == params.eos_token_id)
            if on_tokens:
                on_tokens(n)
            return tokens

        runner.synchronize()
        t0 = time.perf_counter()
        tokens = take(runner.prefill(batch, params.max_new_tokens))
        runner.synchronize()
        result.prefill_s += time.perf_counter() - t0
        for _ in range(params.max_new_tokens - 1):
            if bool(done.all()):
                break
            t0 = time.perf_counter()
            tokens = take(runner.decode(tokens))
            runner.synchronize()
            step = time.perf_counter() - t0
            result.decode_step_s.append(step)
            result.decode_s += step
        result.output_ids.extend(outputs)
        if on_batch:
            on_batch(first, outputs)
    return result
