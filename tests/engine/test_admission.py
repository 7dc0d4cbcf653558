"""The unpadded mode's admission (Algorithm 2) and refill, through the CGOPipe engine: token-identical to
transformers with requests that wait, finish early, free their blocks and are replaced mid-batch."""

from __future__ import annotations

import math

import pytest
import torch

from moe_lightning.config import HardwareSpec, Policy
from moe_lightning.engine.cgopipe import CGOPipeRunner
from moe_lightning.engine.generation import GenerationParams, generate
from moe_lightning.errors import ConfigError, WorkloadError
from tests.conftest import PARITY_NEW_TOKENS, hf_greedy, prompt_workload

MAX_NEW = PARITY_NEW_TOKENS
CPU = torch.device("cpu")
# Per-request generation budgets: several requests finish long before the others.
OWN_MAX = [3, 16, 1, 9, 16, 5, 2, 16, 7, 12]

POLICIES = [
    Policy(batch_size=10, micro_batch_size=5, expert_kernel="loop"),
    Policy(batch_size=6, micro_batch_size=3, expert_gpu_fraction=0.5, expert_kernel="grouped"),
    Policy(batch_size=8, micro_batch_size=2, kv_gpu_fraction=0.5, expert_kernel="loop"),          # r_c share
    Policy(batch_size=6, micro_batch_size=2, attn_on_gpu=True, expert_kernel="loop"),             # KV streamed
    Policy(batch_size=6, micro_batch_size=3, attn_on_gpu=True, kv_gpu_fraction=0.5, expert_kernel="loop"),
    Policy(batch_size=4, micro_batch_size=1, expert_kernel="padded"),
]


def _id(p: Policy) -> str:
    return f"N{p.batch_size}-mu{p.micro_batch_size}-Ag{int(p.attn_on_gpu)}-rc{p.kv_gpu_fraction}-{p.expert_kernel}"


@pytest.fixture(scope="module")
def hf_own_max(hf_tiny, prompts):
    return [hf_greedy(hf_tiny, p, n) for p, n in zip(prompts, OWN_MAX)]


def average_budget(prompts, policy) -> int:
    """The paper's cache_size: N x (average prompt + gen_len) tokens, so long requests wait."""
    return policy.batch_size * (sum(len(p) for p in prompts) // len(prompts) + MAX_NEW)


def run(tiny, prompts, policy, device=CPU, block_size=16, kv_tokens=None, refill=True, max_new=None):
    spec, source = tiny
    runner = CGOPipeRunner(spec, source, HardwareSpec(), policy, prompt_workload(prompts), device,
                           kv_block_size=block_size, kv_tokens=kv_tokens)
    result = generate(runner, prompts, GenerationParams(max_new_tokens=MAX_NEW, eos_token_id=2),
                      policy.batch_size, max_new=max_new, refill=refill)
    return runner, result


@pytest.mark.parametrize("policy", POLICIES, ids=[_id(p) for p in POLICIES])
@pytest.mark.parametrize("refill", [True, False], ids=["refill", "batches"])
def test_admitted_requests_are_token_identical(tiny, prompts, hf_own_max, policy, refill, device):
    """Mixed prompt lengths (1 to 40), per-request budgets, a KV budget planned at the average prompt, so
    requests wait; early finishers free their blocks."""
    kv_tokens = max(average_budget(prompts, policy), policy.num_micro_batches * 64)   # a longest request fits
    runner, result = run(tiny, prompts, policy, device, refill=refill, max_new=OWN_MAX, kv_tokens=kv_tokens)
    assert result.output_ids == hf_own_max
    assert result.admission.prefill_rounds >= 2 and result.admission.deferred > 0   # some requests waited
    assert all(not p.seqs for p in runner.parts)                                     # every request left
    pools = {id(p.blocks.pool): p.blocks.pool for p in runner.parts}
    assert all(pool.free_blocks == pool.num_blocks for pool in pools.values())    # every block came back


@pytest.mark.parametrize("block_size", [1, 3, 64])
@pytest.mark.parametrize("micro_batch_size", [10, 3])
def test_kv_blocks_of_any_size_are_token_identical(tiny, prompts, hf_outputs, block_size, micro_batch_size):
    """Blocks smaller than a prompt, not dividing it, or larger than it. The pool is the plan's KV budget
    in whole blocks; the blocks in use follow the real lengths, never the longest prompt."""
    policy = Policy(batch_size=10, micro_batch_size=micro_batch_size, expert_kernel="loop")
    spec, source = tiny
    runner = CGOPipeRunner(spec, source, HardwareSpec(), policy, prompt_workload(prompts), CPU,
                           kv_block_size=block_size)
    held = []
    decode = runner.decode

    def counting(tokens):
        held.append((runner.kv_pool.num_blocks - runner.kv_pool.free_blocks, runner.active()))
        return decode(tokens)

    runner.decode = counting
    result = generate(runner, prompts, GenerationParams(max_new_tokens=MAX_NEW, eos_token_id=2), 10)
    assert result.output_ids == hf_outputs
    assert all(mb.blocks is not None and mb.k is None for mb in runner.parts)
    pool = runner.stats()["extra"]["kv_blocks"]
    m = policy.num_micro_batches
    # Room for the N longest requests (40 + 16 tokens, in whole blocks), ceil(N / m) in each share.
    assert pool["blocks"] == m * math.ceil(10 / m) * math.ceil((40 + MAX_NEW) / block_size)
    # Before the first decode step every running request holds its prompt's blocks, nothing more.
    blocks, running = held[0]
    assert len(running) >= 9 and blocks == sum(-(-len(prompts[r]) // block_size) for r in running)


def test_refill_takes_fewer_decode_steps(tiny, prompts, hf_own_max):
    """A tight budget (one micro-batch of 2 x 56 tokens): without refill each pair waits for its longer
    request; with refill a finished request's room is taken at once."""
    policy = Policy(batch_size=2, micro_batch_size=2, expert_kernel="loop")
    _, batches = run(tiny, prompts, policy, refill=False, max_new=OWN_MAX)
    _, refilled = run(tiny, prompts, policy, refill=True, max_new=OWN_MAX)
    assert batches.output_ids == refilled.output_ids == hf_own_max
    assert refilled.admission.decode_steps < batches.admission.decode_steps
    assert refilled.admission.prefill_rounds > batches.admission.prefill_rounds


def test_admission_respects_the_kv_budget(tiny, prompts, hf_outputs):
    """At most the budget's blocks are ever held: the pool is exactly the budget, and taking a block
    beyond it raises."""
    policy = Policy(batch_size=10, micro_batch_size=5, expert_kernel="loop")
    runner, result = run(tiny, prompts, policy, kv_tokens=2 * 64)     # two partitions of 64 tokens
    assert result.output_ids == hf_outputs
    assert runner.kv_pool.num_blocks * runner.kv_pool.block_size == 128
    assert result.admission.max_active < 10


def test_too_small_a_budget_is_refused(tiny, prompts):
    with pytest.raises(ConfigError, match="kv_cache_tokens"):
        run(tiny, prompts, Policy(batch_size=10, micro_batch_size=5, expert_kernel="loop"), kv_tokens=60)


@pytest.mark.parametrize("planned,extra", [(1, 0), (None, 1)], ids=["longer-prompt", "longer-context"])
def test_a_request_the_plan_was_not_made_for_is_refused_before_it_runs(tiny, prompts, planned, extra):
    """A runner planned for shorter prompts (the Python API: its `workload`) ran longer ones past its
    memory plan (2,122,304 B held against 2,116,000 planned, on one 40-token prompt); now refused, before
    any partition is opened. Likewise a context past prompt_len_max + gen_len."""
    spec, source = tiny
    runner = CGOPipeRunner(spec, source, HardwareSpec(), Policy(batch_size=2, micro_batch_size=1),
                           prompt_workload(prompts[:planned]), CPU)
    with pytest.raises(WorkloadError, match="the memory plan was made for prompts of at most"):
        generate(runner, prompts, GenerationParams(max_new_tokens=MAX_NEW + extra), 2)
    assert runner.kv_pool is None   # nothing was allocated or run


def test_short_budgets_admit_no_more_prompt_tokens_than_the_plan_holds(tiny, hf_tiny):
    """Requests with budgets below gen_len reserve fewer blocks, so more of them fit a partition than the
    plan's prefill activations assume (it reserves gen_len for each): a partition holding 22 tokens plans
    one request of 3 + 16, yet four requests of budget 1-6 fit. Admission defers what would exceed the
    plan's prompt tokens per micro-batch, so the GPU role's peak stays within the plan (it was 2x over
    the activations with the dense kernel)."""
    from moe_lightning.config import Workload

    spec, source = tiny
    g = torch.Generator().manual_seed(5)
    lengths, own = [3, 3, 3, 1, 2, 2, 1], [6, 1, 15, 1, 16, 2, 1]
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]
    wl = Workload(prompt_len_avg=2, prompt_len_max=3, gen_len=16, num_requests=len(lengths))
    policy = Policy(batch_size=3, micro_batch_size=3, expert_kernel="dense")
    runner = CGOPipeRunner(spec, source, HardwareSpec(), policy, wl, CPU, kv_block_size=1, kv_tokens=22,
                           track_activations=True, prompt_lengths=lengths)
    result = generate(runner, prompts, GenerationParams(max_new_tokens=16, eos_token_id=2), 3, max_new=own)
    assert result.output_ids == [hf_greedy(hf_tiny, p, n) for p, n in zip(prompts, own)]
    peak = runner.stats()["peak_gpu_bytes"]
    planned = runner.plan.gpu_total_bytes
    assert peak <= planned, f"the engine held {peak} B, the plan reserves {planned} B"
