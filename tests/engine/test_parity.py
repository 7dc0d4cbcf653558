"""The reference engine is token-identical to `transformers` (fp32) and within tolerance (bf16)."""

from __future__ import annotations

import pytest
import torch

from moe_lightning.config import ModelSpec
from moe_lightning.engine.generation import GenerationParams, generate
from moe_lightning.engine.reference import ReferenceRunner
from moe_lightning.engine.weights import resolve_model
from tests.conftest import check_bf16_teacher_forced, hf_greedy

MAX_NEW = 24


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def check_greedy_parity(spec, source, hf, prompts, device="cpu", batch_size=8):
    runner = ReferenceRunner(spec, source, device)
    result = generate(runner, prompts, GenerationParams(max_new_tokens=MAX_NEW, eos_token_id=2), batch_size)
    for prompt, ours in zip(prompts, result.output_ids):
        assert ours == hf_greedy(hf, prompt, MAX_NEW), f"prompt of {len(prompt)} tokens diverged"


def test_greedy_tokens_identical_to_transformers(tiny, hf_tiny, prompts):
    spec, source = tiny
    assert len(prompts) >= 8 and len({len(p) for p in prompts}) == len(prompts)
    check_greedy_parity(spec, source, hf_tiny, prompts, batch_size=8)  # a batch of 8 and one of 2


def test_prefill_and_decode_logits_match(tiny, hf_tiny, prompts):
    spec, source = tiny
    runner = ReferenceRunner(spec, source)
    # Prefill: every prompt token's logits, packed, against transformers on each unpadded prompt.
    packed = runner.forward_prefill(prompts, max_new_tokens=4)
    start = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf_tiny(torch.tensor([p])).logits[0]
        assert rel_err(packed[start:start + len(p)], ref) < 1e-4
        start += len(p)
    # Decode: logits of each step against transformers' scores for the same greedy continuation.
    last = runner.prefill(prompts, max_new_tokens=4)
    tokens = last.argmax(-1)
    for step in range(3):
        logits = runner.decode(tokens)
        for b, p in enumerate(prompts):
            with torch.no_grad():
                out = hf_tiny.generate(torch.tensor([p]), max_new_tokens=step + 2, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True, pad_token_id=0,
                                       eos_token_id=None)
            assert rel_err(logits[b], out.logits[step + 1][0]) < 1e-4
        tokens = logits.argmax(-1)


def test_bf16_within_tolerance(tiny_path, prompts):
    from transformers import MixtralForCausalLM

    spec, source = resolve_model(ModelSpec(dtype="bfloat16"))
    hf = MixtralForCausalLM.from_pretrained(tiny_path, dtype=torch.bfloat16).eval()
    check_bf16_teacher_forced(ReferenceRunner(spec, source), hf, prompts, 16)


def test_sharded_checkpoint_parity(tmp_path, prompts):
    """A checkpoint saved by the test itself with save_pretrained in a sharded layout."""
    from transformers import MixtralForCausalLM

    from moe_lightning.engine.tiny import write_hf_checkpoint

    folder = tmp_path / "sharded"
    write_hf_checkpoint(ModelSpec(), folder, seed=7, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").exists()
    assert len(list(folder.glob("*.safetensors"))) > 3
    spec, source = resolve_model(ModelSpec(name="hf", path=str(folder), dtype="auto"))
    hf = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    check_greedy_parity(spec, source, hf, prompts[:8])


@pytest.mark.gpu
def test_greedy_parity_on_cuda(tiny, tiny_path, prompts):
    from transformers import MixtralForCausalLM

    spec, source = tiny
    hf = MixtralForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).cuda().eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    check_greedy_parity(spec, source, hf, prompts, device="cuda")


@pytest.mark.gpu
def test_bf16_logits_on_cuda(tiny_path, prompts):
    from transformers import MixtralForCausalLM

    spec, source = resolve_model(ModelSpec(dtype="bfloat16"))
    hf = MixtralForCausalLM.from_pretrained(tiny_path, dtype=torch.bfloat16).cuda().eval()
    runner = ReferenceRunner(spec, source, "cuda")
    ours = runner.forward_prefill(prompts, max_new_tokens=1)
    start = 0
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p], device="cuda")).logits[0]
        assert rel_err(ours[start:start + len(p)], ref) < 3e-2
        start += len(p)
