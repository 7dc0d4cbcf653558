"""The generation driver shared by every engine and baseline: batches requests, picks each token (with
transformers' repetition penalty where asked), stops at an EOS id or `max_new_tokens`, and times
prefill and each decode step.

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
    eos_token_id: int | Sequence[int] | None = None   # a sequence stops on any of these; None: never early
    repetition_penalty: float = 1.0   # transformers' RepetitionPenaltyLogitsProcessor (1.0: none)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)


@dataclass
class GenerationResult:
    """Outputs and times of `passes` runs of the same prompts (outputs of the first; times summed)."""

    output_ids: list[list[int]]
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_step_s: list[float] = field(default_factory=list)
    passes: int = 1
    admission: AdmissionStats | None = None   # admission mode (`generate_admitted`) only
    groups: list[dict] | None = None          # data-parallel groups (`data_parallel`): each group's figures

    @property
    def generated_tokens(self) -> int:
        """Tokens of one pass."""
        return sum(len(o) for o in self.output_ids)

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def throughput_tok_s(self) -> float | None:
        """Tokens / (prefill + decode time); None when nothing was timed (no request ran): nothing
        measured is no figure, not 0 tokens/s."""
        return self.passes * self.generated_tokens / self.total_s if self.total_s else None

    @property
    def decode_tok_s(self) -> float | None:
        """Tokens after each sequence's first / decode time; None without a decode step (every sequence
        stopped at its first token, max_new_tokens=1 say): there is no decode rate to report."""
        decoded = self.generated_tokens - sum(1 for o in self.output_ids if o)
        return self.passes * decoded / self.decode_s if decoded and self.decode_s else None


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


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor, op for op: logits [B, V] (fp32, as generate casts
    them), seen [B, L] each row's ids so far (its prompt and its output; a repeated id changes nothing). A
    seen id's logit is multiplied by `penalty` where < 0 and divided by it elsewhere."""
    score = logits.gather(1, seen)
    return logits.scatter(1, seen, torch.where(score < 0, score * penalty, score / penalty))


class History:
    """Each running sequence's ids so far, its prompt then its output, for the repetition penalty: a row
    of `width` ids per sequence (by key), the unfilled tail repeating the prompt's first id."""

    def __init__(self, width: int):
        self.width = width
        self.rows: dict[int, torch.Tensor] = {}
        self.used: dict[int, int] = {}

    def start(self, key: int, prompt: Sequence[int]) -> None:
        row = torch.full((self.width,), prompt[0], dtype=torch.long)
        row[:len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.rows[key], self.used[key] = row, len(prompt)

    def add(self, key: int, token: int) -> None:
        self.rows[key][self.used[key]] = token
        self.used[key] += 1

    def drop(self, key: int) -> None:
        del self.rows[key], self.used[key]

    def penalize(self, logits: torch.Tensor, keys: Sequence[int], penalty: float) -> torch.Tensor:
        """logits [B, V] of the sequences `keys` -> fp32 CPU logits with the penalty applied."""
        return penalize_repeats(logits.float().cpu(), torch.stack([self.rows[k] for k in keys]), penalty)


def history_for(params: GenerationParams, prompts: Sequence[Sequence[int]], max_new: Sequence[int]) -> History | None:
    """A `History` wide enough for `prompts` with their budgets, when the penalty applies; else None."""
    if params.repetition_penalty == 1.0 or not prompts:
        return None
    return History(max(len(p) + m for p, m in zip(prompts, max_new)))


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    """The sampling generator of one batch: seeded by (seed, batch index), so that a batch draws the same
    tokens whether or not the batches before it ran in this process (a resumed run is identical)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + batch_index) % 2**63)


def generate(runner: BatchRunner, prompts: Sequence[Sequence[int]], params: GenerationParams,
             batch_size: int, on_tokens: Callable[[int], None] | None = None,
             on_batch: Callable[[int, list[list[int]]], None] | None = None, start: int = 0,
             max_new: Sequence[int] | None = None, **admission) -> GenerationResult:
    """Generate for every prompt from index `start` (a multiple of `batch_size`), `batch_size` sequences at
    a time; outputs in input order. `on_batch(first index, outputs)` is called as each batch finishes.
    `max_new[r]`: request r's own budget (at most `params.max_new_tokens`); a static batch still runs
    until its last sequence is done, as FlexGen's do.

    A runner that admits requests against its KV budget (`runner.admits`: the engine's unpadded, paged
    mode) is driven by `generate_admitted` instead, which takes `admission` (refill, skip, on_finished);
    there `batch_size`, `on_batch` and `start` do not apply. A runner of one expert group under
    data-parallel attention (`runner.lockstep`) runs its group's share (`data_parallel.
    generate_data_parallel`: `batch_size` is then a group's, and finished requests go to on_finished)."""
    if getattr(runner, "lockstep", None) is not None:
        from moe_lightning.engine.data_parallel import generate_data_parallel

        return generate_data_parallel(runner, prompts, params, batch_size, on_tokens=on_tokens, on_batch=on_batch,
                                      start=start, max_new=max_new, **admission)
    return generate_batches(runner, prompts, params, batch_size, on_tokens, on_batch, start, max_new, **admission)


def generate_batches(runner: BatchRunner, prompts: Sequence[Sequence[int]], params: GenerationParams,
                     batch_size: int, on_tokens: Callable[[int], None] | None = None,
                     on_batch: Callable[[int, list[list[int]]], None] | None = None, start: int = 0,
                     max_new: Sequence[int] | None = None, **admission) -> GenerationResult:
    """`generate` on one process's requests (or on one expert group's, for `generate_data_parallel`)."""
    if getattr(runner, "admits", False):
        if on_batch is not None or start:
            raise ValueError("an admitting runner reports finished requests by on_finished, and skips by skip")
        return generate_admitted(runner, prompts, params, max_new=max_new, on_tokens=on_tokens, **admission)
    if admission:
        raise ValueError(f"{sorted(admission)}: for admitting runners only")
    if start % batch_size:
        raise ValueError(f"start={start} is not a multiple of batch_size={batch_size}")
    result = GenerationResult(output_ids=[])
    eos = torch.tensor(params.eos_ids, dtype=torch.long)
    for first in range(start, len(prompts), batch_size):
        batch = prompts[first:first + batch_size]
        generator = batch_generator(params.seed, first // batch_size)
        outputs: list[list[int]] = [[] for _ in batch]
        done = torch.zeros(len(batch), dtype=torch.bool)

        n = len(batch)
        own = torch.tensor([params.max_new_tokens if max_new is None else min(params.max_new_tokens, max_new[r])
                            for r in range(first, first + n)])
        # Every row of a static batch runs the whole max_new_tokens steps (a finished one too).
        history = history_for(params, batch, [params.max_new_tokens] * n)
        for b in range(n if history is not None else 0):
            history.start(b, batch[b])

        def take(logits: torch.Tensor, outputs=outputs, done=done, n=n, generator=generator, own=own,
                 history=history) -> torch.Tensor:
            if history is not None:
                logits = history.penalize(logits, range(n), params.repetition_penalty)
            tokens = sample(logits, params.temperature, params.top_p, generator)
            for b in torch.nonzero(~done).flatten().tolist():
                outputs[b].append(int(tokens[b]))
            for b in range(n if history is not None else 0):
                history.add(b, int(tokens[b]))
            if eos.numel():
                done.logical_or_(torch.isin(tokens, eos))
            done.logical_or_(torch.tensor([len(o) for o in outputs]) >= own)
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


def request_generator(seed: int, request: int) -> torch.Generator:
    """The sampling generator of one request (admission mode): seeded by (seed, request index), so a
    request draws the same tokens whichever requests share its micro-batch, and when it runs again in a
    resumed run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + 7_919 * request + 1) % 2**63)


@dataclass
class AdmissionStats:
    prefill_rounds: int = 0
    decode_steps: int = 0
    deferred: int = 0              # admission rounds' deferrals, summed (a request can wait several)
    max_active: int = 0


class AdmittingRunner(Protocol):
    budget: object

    def open_partitions(self) -> None: ...
    def active(self) -> list[int]: ...
    def admit(self, admitted: dict[int, list[int]], prompts: Sequence[Sequence[int]],
              max_new: Sequence[int]) -> torch.Tensor: ...
    def decode(self, tokens: torch.Tensor) -> torch.Tensor: ...
    def retire(self, finished: set[int]) -> None: ...
    def synchronize(self) -> None: ...


def generate_admitted(runner: AdmittingRunner, prompts: Sequence[Sequence[int]], params: GenerationParams,
                      max_new: Sequence[int] | None = None, refill: bool = True,
                      skip: frozenset[int] = frozenset(),
                      on_tokens: Callable[[int], None] | None = None,
                      on_finished: Callable[[list[tuple[int, list[int]]]], None] | None = None) -> GenerationResult:
    """Generate for every prompt not in `skip`, admitted against the runner's KV budget by Algorithm 2
    (`schedule.batching`). A request leaves its micro-batch as soon as it finishes (EOS or its own
    `max_new[r]`, at most `params.max_new_tokens`) and its blocks go back to the pool;
    `on_finished([(r, outputs), ...])` is called then, once per step. With `refill`, waiting requests
    are admitted into the freed room before the next decode step (a prefill round); without, only once
    every running request has finished (the paper's batches). Outputs by request index (skipped ones
    empty); counts in `result.admission`."""
    from moe_lightning.errors import WorkloadError
    from moe_lightning.schedule.batching import Partition, admit, too_large

    n = len(prompts)
    max_new = [min(params.max_new_tokens, g) for g in (max_new or [params.max_new_tokens] * n)]
    lengths = [len(p) for p in prompts]
    budget = runner.budget
    if hasattr(runner, "check_requests"):   # the runner's memory plan covers every request (CGOPipe)
        runner.check_requests(lengths, max_new)
    big = too_large(lengths, max_new, budget)
    if big is not None:
        raise WorkloadError(f"request {big} needs {lengths[big]} prompt + {max_new[big]} new tokens, more than a "
                            f"micro-batch's share of the KV cache ({budget.blocks_per_partition * budget.block_size} "
                            f"tokens); raise system.kv_cache_tokens")
    runner.open_partitions()
    parts = [Partition() for _ in range(budget.partitions)]
    part_of: dict[int, int] = {}
    waiting = [r for r in range(n) if r not in skip]
    outputs: list[list[int]] = [[] for _ in range(n)]
    gens = {r: request_generator(params.seed, r) for r in waiting}
    stats = AdmissionStats()
    result = GenerationResult(output_ids=outputs, admission=stats)
    next_token: dict[int, int] = {}
    eos = set(params.eos_ids)
    history = history_for(params, [prompts[r] for r in waiting], [max_new[r] for r in waiting])

    def take(rows: list[int], logits: torch.Tensor) -> set[int]:
        """Sample each row's next token with its request's generator; -> the requests that finished."""
        if history is not None:
            logits = history.penalize(logits, rows, params.repetition_penalty)
        if params.temperature == 0:
            tokens = logits.float().argmax(dim=-1).tolist()
        else:
            tokens = [int(sample(logits[b:b + 1], params.temperature, params.top_p, gens[r])[0])
                      for b, r in enumerate(rows)]
        done = set()
        for r, tok in zip(rows, tokens):
            outputs[r].append(tok)
            next_token[r] = tok
            if history is not None:
                history.add(r, tok)
            if len(outputs[r]) >= max_new[r] or tok in eos:
                done.add(r)
        if on_tokens:
            on_tokens(len(rows))
        return done

    def finish(done: set[int]) -> None:
        if not done:
            return
        runner.retire(done)
        for r in sorted(done):
            part = parts[part_of.pop(r)]
            part.requests.remove(r)
            part.reserved_blocks -= budget.blocks_for(lengths[r] + max_new[r])
            next_token.pop(r)
            if history is not None:
                history.drop(r)
        if on_finished:
            on_finished([(r, outputs[r]) for r in sorted(done)])

    while waiting or part_of:
        if waiting and (refill or not part_of):
            # The runner's plan covers so many prompt tokens per micro-batch and round (`prefill_cap`).
            admitted, waiting_next = admit(waiting, lengths, max_new, budget, parts,
                                           getattr(runner, "prefill_cap", None))
            stats.deferred += len(waiting_next)
            waiting = waiting_next
            if admitted:
                for j, reqs in admitted.items():
                    part_of.update(dict.fromkeys(reqs, j))
                rows = [r for reqs in admitted.values() for r in reqs]
                for r in rows if history is not None else ():
                    history.start(r, prompts[r])
                runner.synchronize()
                t0 = time.perf_counter()
                logits = runner.admit(admitted, prompts, max_new)
                runner.synchronize()
                result.prefill_s += time.perf_counter() - t0
                stats.prefill_rounds += 1
                stats.max_active = max(stats.max_active, len(part_of))
                finish(take(rows, logits))
                # Dropped before the next forward: the device holds one step's gathered logits, not two.
                del logits
                continue   # a refill may admit more into what the first tokens freed
            if not part_of:   # nothing runs and nothing fits: cannot happen after too_large's check
                raise WorkloadError(f"{len(waiting)} requests wait and none fits the empty KV cache")
        rows = runner.active()
        t0 = time.perf_counter()
        logits = runner.decode(torch.tensor([next_token[r] for r in rows]))
        runner.synchronize()
        step = time.perf_counter() - t0
        result.decode_step_s.append(step)
        result.decode_s += step
        stats.decode_steps += 1
        finish(take(rows, logits))
        del logits   # as after a prefill round
    return result
