"""Every expert kernel computes the same MoE FFN as the loop kernel, through any page table."""

from __future__ import annotations

import pytest
import torch

from moe_lightning.engine.experts import KERNELS, moe_loop
from moe_lightning.engine.model import ExpertStack, route


@pytest.mark.parametrize("kernel", ["grouped", "padded", "dense"])
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_kernels_agree_with_loop(kernel, tokens):
    g = torch.Generator().manual_seed(tokens)
    E, H, F, k = 8, 32, 48, 2
    h = torch.randn(tokens, H, generator=g)
    router = torch.randn(E, H, generator=g)
    weights, ids = route(h, router, k)
    # Slots permuted and padded with spare slots, as in the GPU expert cache.
    slots = 11
    w13, w2 = torch.randn(slots, 2 * F, H, generator=g), torch.randn(slots, H, F, generator=g)
    slot_of = torch.randperm(slots, generator=g)[:E].tolist()
    stack = ExpertStack(w13, w2, slot_of)
    ref = moe_loop(h, weights, ids, stack)
    out = KERNELS[kernel](h, weights, ids, stack)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_loop_uses_the_page_table():
    g = torch.Generator().manual_seed(0)
    h, router = torch.randn(5, 16, generator=g), torch.randn(4, 16, generator=g)
    weights, ids = route(h, router, 2)
    w13, w2 = torch.randn(4, 32, 16, generator=g), torch.randn(4, 16, 16, generator=g)
    straight = moe_loop(h, weights, ids, ExpertStack(w13, w2, [0, 1, 2, 3]))
    perm = [2, 0, 3, 1]
    permuted = moe_loop(h, weights, ids, ExpertStack(w13[torch.argsort(torch.tensor(perm))],
                                                     w2[torch.argsort(torch.tensor(perm))], perm))
    torch.testing.assert_close(straight, permuted)
