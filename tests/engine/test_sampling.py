from __future__ import annotations

import torch

from moe_lightning.engine.generation import GenerationParams, generate, sample
from moe_lightning.engine.reference import ReferenceRunner


def test_greedy_is_argmax_and_tiny_top_p_is_greedy():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, 0.0, 1.0, g), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, 1e-6, g), logits.argmax(-1))


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(1)
    drawn = sample(logits, 1.0, 0.9, g)
    probs = torch.softmax(logits[0], -1)
    assert probs[:2].sum() >= 0.9 - 1e-6
    assert set(drawn.tolist()) <= {0, 1} and len(set(drawn.tolist())) == 2


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny, prompts):
    spec, source = tiny
    runner = ReferenceRunner(spec, source)

    def run(seed):
        p = GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=seed)
        return generate(runner, prompts[:4], p, batch_size=4).output_ids

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_eos_stops_a_sequence_and_max_new_tokens_caps_it(tiny, prompts):
    spec, source = tiny
    runner = ReferenceRunner(spec, source)
    free = generate(runner, prompts[:4], GenerationParams(max_new_tokens=10), 4).output_ids
    assert all(len(o) == 10 for o in free)
    eos = free[0][3]  # pretend the 4th token of sequence 0 is EOS
    stopped = generate(runner, prompts[:4], GenerationParams(max_new_tokens=10, eos_token_id=eos), 4)
    assert stopped.output_ids[0] == free[0][:free[0].index(eos) + 1]


def test_one_token_each_has_no_decode_rate(tiny, prompts):
    """max_new_tokens=1: prefill gives every token, no decode step runs, so there is no decode rate (None,
    as the run document writes it), not 0 tokens/s; the throughput is measured."""
    spec, source = tiny
    result = generate(ReferenceRunner(spec, source), prompts[:2], GenerationParams(max_new_tokens=1), 2)
    assert [len(o) for o in result.output_ids] == [1, 1] and result.decode_s == 0
    assert result.decode_tok_s is None
    assert result.throughput_tok_s is not None and result.throughput_tok_s > 0


def test_nothing_timed_has_no_throughput():
    from moe_lightning.engine.generation import GenerationResult

    assert GenerationResult(output_ids=[]).throughput_tok_s is None
