"""Every baseline produces transformers' greedy tokens on the tiny model: the engine baselines under
their own (auto) policies and under given ones (the ablation: any policy on any schedule), and the
accelerate peer with left padding and an attention mask."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moe_lightning.baselines import (
    AccelerateSystem,
    DeepSpeedSystem,
    FastDecodeSystem,
    FlexGenCSystem,
    FlexGenSystem,
)
from moe_lightning.config import HardwareSpec, ModelSpec, Policy
from moe_lightning.engine.generation import GenerationParams, generate
from tests.conftest import PARITY_NEW_TOKENS, prompt_workload

MAX_NEW = PARITY_NEW_TOKENS
CPU = torch.device("cpu")
SYSTEMS = {"flexgen": FlexGenSystem, "flexgen_c": FlexGenCSystem, "deepspeed": DeepSpeedSystem,
           "fastdecode": FastDecodeSystem}




def run(system, spec, source, policy, wl, prompts, device=CPU):
    runner = system.build(spec, source, HardwareSpec(), policy, wl, device)
    result = generate(runner, prompts, GenerationParams(max_new_tokens=MAX_NEW, eos_token_id=2), policy.batch_size)
    return runner, result.output_ids


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_auto_policy_tokens_identical_to_transformers(tiny, prompts, hf_outputs, name, device):
    spec, source = tiny
    system = SYSTEMS[name]()
    wl = prompt_workload(prompts)
    policy = system.resolve_policy(spec, HardwareSpec(), wl, Policy())
    runner, out = run(system, spec, source, policy, wl, prompts, device)
    assert out == hf_outputs
    assert runner.schedule.name == ("flexgen" if name.startswith("flexgen") else name)


G = dict(pages_per_layer=1, prefetch_depth=1, expert_kernel="loop")
GIVEN = [
    ("flexgen", Policy(batch_size=10, micro_batch_size=3, attn_on_gpu=True, **G), False),
    ("flexgen", Policy(batch_size=10, micro_batch_size=5, attn_on_gpu=True, expert_gpu_fraction=0.5,
                       kv_gpu_fraction=0.5, **G), True),
    ("flexgen", Policy(batch_size=10, micro_batch_size=2, expert_kernel="loop"), False),   # CGOPipe-like policy
    ("flexgen_c", Policy(batch_size=10, micro_batch_size=3, expert_gpu_fraction=0.25, **G), False),
    ("flexgen_c", Policy(batch_size=8, micro_batch_size=2, kv_gpu_fraction=0.5, **G), True),
    ("deepspeed", Policy(batch_size=10, micro_batch_size=10, attn_on_gpu=True, **G), False),
    ("deepspeed", Policy(batch_size=10, micro_batch_size=10, attn_on_gpu=True, kv_gpu_fraction=1.0, **G), True),
    ("fastdecode", Policy(batch_size=10, micro_batch_size=2, **G), False),
    ("fastdecode", Policy(batch_size=10, micro_batch_size=3, expert_gpu_fraction=0.5, kv_gpu_fraction=0.4, **G), True),
    ("fastdecode", Policy(batch_size=10, micro_batch_size=4, attn_on_gpu=True, pages_per_layer=3,
                          expert_kernel="grouped"), False),
]


@pytest.mark.parametrize("name, policy, padded", GIVEN,
                         ids=[f"{n}-N{p.batch_size}-mu{p.micro_batch_size}-Ag{int(p.attn_on_gpu)}-rw"
                              f"{p.expert_gpu_fraction}-rc{p.kv_gpu_fraction}{'-pad' if pad else ''}"
                              for n, p, pad in GIVEN])
def test_given_policy_tokens_identical_to_transformers(tiny, prompts, hf_outputs, name, policy, padded, device):
    spec, source = tiny
    wl = prompt_workload(prompts, padded)
    runner, out = run(SYSTEMS[name](policy_source="given"), spec, source, policy, wl, prompts, device)
    assert out == hf_outputs
    if policy.expert_gpu_fraction < 1:
        assert runner.stats()["link_bytes"]["h2d"] > 0


OWN_MAX = [3, 16, 1, 9, 16, 5, 2, 16, 7, 12]


@pytest.mark.parametrize("name", list(SYSTEMS))
def test_requests_that_finish_early_are_token_identical(tiny, prompts, hf_tiny, name):
    """Per-request budgets in static batches: a finished sequence stops growing its output while its
    batch runs on (as FlexGen's batches do)."""
    from tests.conftest import hf_greedy

    spec, source = tiny
    system = SYSTEMS[name](policy_source="given")
    deepspeed = name == "deepspeed"   # ZeRO-Inference: one micro-batch, attention on the GPU
    policy = Policy(batch_size=4, micro_batch_size=4 if deepspeed else 2, attn_on_gpu=deepspeed, **G)
    runner = system.build(spec, source, HardwareSpec(), policy, prompt_workload(prompts), CPU)
    result = generate(runner, prompts, GenerationParams(max_new_tokens=MAX_NEW, eos_token_id=2), 4, max_new=OWN_MAX)
    assert result.output_ids == [hf_greedy(hf_tiny, p, n) for p, n in zip(prompts, OWN_MAX)]


def test_auto_system_refuses_an_unresolved_policy(tiny, prompts):
    spec, source = tiny
    with pytest.raises(Exception, match="chooses its own policy"):
        FlexGenSystem().build(spec, source, HardwareSpec(), Policy(batch_size=3, micro_batch_size=1),
                              prompt_workload(prompts), CPU)


def test_deepspeed_refuses_cpu_attention(tiny, prompts):
    spec, source = tiny
    with pytest.raises(Exception, match="attention on the GPU"):
        DeepSpeedSystem(policy_source="given").build(spec, source, HardwareSpec(), Policy(),
                                                     prompt_workload(prompts), CPU)


def test_accelerate_tokens_identical_to_transformers(tiny, prompts, hf_outputs, device):
    """Left padding + attention mask + mask-derived positions, fp32: the same greedy tokens as unpadded
    one-prompt-at-a-time `generate`."""
    spec, source = tiny
    system = AccelerateSystem()
    wl = prompt_workload(prompts)
    policy = system.resolve_policy(spec, HardwareSpec(), wl, Policy())
    runner, out = run(system, spec, source, policy, wl, prompts, device)
    assert out == hf_outputs
    assert runner.stats()["extra"]["device_map"]


def test_accelerate_random_weights_are_the_engines(tiny, prompts):
    """model.weights=random: the temporary checkpoint accelerate loads holds exactly the engine's random
    weights (logits of a prefill agree with the reference engine's)."""
    from moe_lightning.engine.experts import KERNELS
    from moe_lightning.engine.reference import ReferenceRunner
    from moe_lightning.engine.weights import resolve_model

    spec, source = resolve_model(dataclasses.replace(ModelSpec(), weights="random", seed=3))
    wl = prompt_workload(prompts[:4])
    policy = Policy(batch_size=4, micro_batch_size=4, attn_on_gpu=True, kv_gpu_fraction=1.0)
    peer = AccelerateSystem(policy_source="given").build(spec, source, HardwareSpec(), policy, wl, CPU)
    ref = ReferenceRunner(spec, source, CPU, KERNELS["loop"])
    a, b = peer.prefill(prompts[:4], MAX_NEW), ref.prefill(prompts[:4], MAX_NEW)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    tokens = a.argmax(-1)
    torch.testing.assert_close(peer.decode(tokens), ref.decode(tokens), atol=1e-4, rtol=1e-4)


def test_gpu_resident_kv_starts_clean(tiny, prompts, hf_outputs, device):
    """Whatever the pool memory held before (here NaN everywhere), a GPU-resident KV cache's masked
    slots cannot leak into attention."""
    from moe_lightning.baselines.schedules import FLEXGEN
    from moe_lightning.engine.cgopipe import CGOPipeRunner

    spec, source = tiny
    policy = Policy(batch_size=10, micro_batch_size=10, kv_gpu_fraction=1.0, **G)
    runner = CGOPipeRunner(spec, source, HardwareSpec(), policy, prompt_workload(prompts), device, schedule=FLEXGEN)
    runner.pools.buffers["kv_cache"].fill_(0xFF)  # float32 NaN bytes
    result = generate(runner, prompts, GenerationParams(max_new_tokens=MAX_NEW, eos_token_id=2), policy.batch_size)
    assert result.output_ids == hf_outputs
