"""Every expert kernel computes the same MoE FFN as the loop kernel, through any page table."""

from __future__ import annotations

import pytest
import torch

from moe_lightning.engine.experts import KERNELS, moe_loop
from moe_lightning.models.layers import ExpertStack, clamped_swiglu, route


@pytest.mark.parametrize("biased", [False, True], ids=["swiglu", "biased-clamped"])
@pytest.mark.parametrize("kernel", ["grouped", "padded", "dense"])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_kernels_agree_with_loop(kernel, tokens, biased):
    """`biased`: per-expert biases on both projections and gpt-oss's clamped SwiGLU (the loop kernel's
    own use of them is checked against transformers in tests/models)."""
    if kernel not in KERNELS:
        pytest.skip(f"{kernel} needs a newer torch")
    g = torch.Generator().manual_seed(tokens)
    E, H, F, k = 8, 32, 48, 2
    h = torch.randn(tokens, H, generator=g)
    router = torch.randn(E, H, generator=g)
    weights, ids = route(h, router, k)
    # Two regions (resident experts and a streamed buffer) with a permuted page table, as in the GPU
    # expert cache.
    sizes = (3, 5)
    w13 = [torch.randn(n, 2 * F, H, generator=g) for n in sizes]
    w2 = [torch.randn(n, H, F, generator=g) for n in sizes]
    slots = [(r, i) for r, n in enumerate(sizes) for i in range(n)]
    stack = ExpertStack(w13, w2, [slots[i] for i in torch.randperm(E, generator=g).tolist()])
    if biased:
        stack.b13, stack.b2 = torch.randn(E, 2 * F, generator=g), torch.randn(E, H, generator=g)
        stack.act = clamped_swiglu(1.702, 7.0)
    ref = moe_loop(h, weights, ids, stack)
    out = KERNELS[kernel](h, weights, ids, stack)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["grouped", "padded", "dense"])
def test_kernels_take_router_weights_in_the_model_dtype(kernel):
    """DBRX's and gpt-oss's routers give their top-k weights in the activations' dtype (bf16 in a bf16 run),
    the other families' in fp32: every kernel takes either, as the loop kernel does. The dense kernel had
    failed on bf16 weights (its fp32 combine matrix refused them), found by a randomized fuzz over every
    family: DBRX in bf16 crashed in the prefill where expert_kernel=auto picked it."""
    if kernel not in KERNELS:
        pytest.skip(f"{kernel} needs a newer torch")
    g = torch.Generator().manual_seed(3)
    E, H, F, k = 8, 32, 48, 2
    h = torch.randn(9, H, generator=g).bfloat16()
    weights, ids = route(h, torch.randn(E, H, generator=g).bfloat16(), k)
    weights = weights.bfloat16()
    stack = ExpertStack.single(torch.randn(E, 2 * F, H, generator=g).bfloat16(),
                               torch.randn(E, H, F, generator=g).bfloat16())
    out = KERNELS[kernel](h, weights, ids, stack)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, moe_loop(h, weights, ids, stack), rtol=2e-2, atol=2e-1)


def test_loop_uses_the_page_table():
    g = torch.Generator().manual_seed(0)
    h, router = torch.randn(5, 16, generator=g), torch.randn(4, 16, generator=g)
    weights, ids = route(h, router, 2)
    w13, w2 = torch.randn(4, 32, 16, generator=g), torch.randn(4, 16, 16, generator=g)
    straight = moe_loop(h, weights, ids, ExpertStack.single(w13, w2))
    perm = [2, 0, 3, 1]  # expert e stored at slot perm[e]
    inv = torch.argsort(torch.tensor(perm))
    permuted = moe_loop(h, weights, ids, ExpertStack([w13[inv]], [w2[inv]], [(0, s) for s in perm]))
    torch.testing.assert_close(straight, permuted)
