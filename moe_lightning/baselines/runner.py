"""The runtime the engine baselines run on: `CGOPipeRunner` (same state, same op handlers, same kernels)
with a baseline's `Schedule`.

One local fix composed on top, pending the same fix in `moe_lightning.engine.cgopipe`: a GPU-resident
KV cache is carved from the (uninitialised) `kv_cache` pool, and decode attention multiplies masked-out
slots' zero probabilities by whatever those slots hold, so a NaN left in freshly allocated memory turns
a sequence's output into NaN (seen as all-zero greedy tokens for the shortest prompt, intermittently).
Zeroing the cache at allocation, as the CPU-resident cache already is, removes it.
"""

from __future__ import annotations

import torch

from moe_lightning.engine.cgopipe import CGOPipeRunner


class BaselineRunner(CGOPipeRunner):
    def _alloc_kv(self, mu: int, slots: int, on_gpu: bool) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = super()._alloc_kv(mu, slots, on_gpu)
        if on_gpu:
            k.zero_()
            v.zero_()
        return k, v
