"""The reference engine: every weight on one device, the whole batch through each layer in turn.

It is the correctness anchor (token-identical to `transformers`) and the simplest `BatchRunner`:
prefill packs prompts of different lengths without padding; decode attends over a per-sequence KV
cache with per-sequence lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moe_lightning.config import ModelSpec
from moe_lightning.engine.data_parallel import DataParallelMoE, Lockstep
from moe_lightning.engine.experts import moe_loop
from moe_lightning.engine.kv_blocks import kv_tensors
from moe_lightning.engine.parallel import Ranks, RankSource, local_spec
from moe_lightning.engine.weights import WeightSource
from moe_lightning.models import family
from moe_lightning.models.layers import ExpertStack, MoEKernel, decode_attention, prefill_attention


@dataclass
class DenseWeights:
    embedding: torch.Tensor
    norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list          # the family's LayerWeights
    experts: list[ExpertStack | None]   # None for a dense layer


def load_dense(source: WeightSource, device: torch.device, experts_of=None) -> DenseWeights:
    """Every weight on `device`; `experts_of(w13, w2)`, when given, keeps only this rank's experts of a
    layer (an `ExpertParallelKernel`'s)."""
    layers, experts = [], []
    for i in range(source.spec.num_layers):
        layers.append(source.layer(i).to(device))
        if not source.spec.is_moe_layer(i):
            experts.append(None)
            continue
        w13, w2 = source.experts(i)
        experts.append(experts_of(w13.to(device), w2.to(device)) if experts_of else
                       ExpertStack.single(w13.to(device), w2.to(device)))
    return DenseWeights(source.embedding().to(device), source.final_norm().to(device),
                        source.lm_head().to(device), layers, experts)


class KVCache:
    """K and V per layer as [B, nkv, S, hd] (contiguous per head: attention is one batched matmul)."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        def zeros(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        pairs = [kv_tensors(spec, (batch, spec.cache_kv_heads, max_len), zeros) for _ in range(spec.num_layers)]
        self.k, self.v = [k for k, _ in pairs], [v for _, v in pairs]

    def write_prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, seq_lens: Sequence[int]) -> None:
        start = 0
        for b, n in enumerate(seq_lens):
            self.k[layer][b, :, :n] = k[start:start + n].transpose(0, 1)
            self.v[layer][b, :, :n] = v[start:start + n].transpose(0, 1)
            start += n

    def write_decode(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        b = torch.arange(k.shape[0], device=k.device)
        self.k[layer][b, :, positions] = k
        self.v[layer][b, :, positions] = v


def packed_positions(seq_lens: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.cat([torch.arange(n, device=device) for n in seq_lens])


def last_token_index(seq_lens: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.cumsum(torch.tensor(seq_lens, device=device), 0) - 1


class ReferenceRunner:
    """All weights resident on `device`; implements the generation driver's `BatchRunner`.

    With `ranks` (tensor and expert parallelism, `engine.parallel`), this rank holds its shards of each
    layer and its share of the experts and runs attention on its heads; when E > 1 its expert group runs
    its own requests (data-parallel attention, `engine.data_parallel`), the MoE layers through `ep_moe`
    across the expert groups (`chunks` per layer). With an `ExpertParallelKernel` as `moe_kernel` (and no
    `ranks`), the MoE layers alone run across the kernel's process group."""

    def __init__(self, spec: ModelSpec, source: WeightSource, device: torch.device | str = "cpu",
                 moe_kernel: MoEKernel = moe_loop, ranks: Ranks | None = None, chunks=1):
        self.device, self.family = torch.device(device), family(spec)
        experts_of = getattr(moe_kernel, "local_experts", None)
        self.lockstep: Lockstep | None = None
        if ranks is not None and ranks.world_size > 1:   # this rank's shards and experts (as CGOPipe's)
            source, experts_of = RankSource(source, spec, ranks), None
            if ranks.expert > 1:   # data-parallel attention: this group's requests, one micro-batch a forward
                self.lockstep = Lockstep(ranks.ep_group, 1, chunks, ranks.collective_device(device))
                moe_kernel = DataParallelMoE(spec.num_experts, self.lockstep, kernel=moe_kernel)
            spec = local_spec(spec, ranks)
        self.spec, self.moe_kernel = spec, moe_kernel
        self.weights = load_dense(source, self.device, experts_of)
        self.dtype = source.dtype
        self.cache: KVCache | None = None
        self.lengths: torch.Tensor | None = None

    @torch.inference_mode()
    def forward_prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> torch.Tensor:
        """-> logits of every prompt token, packed [T, V]."""
        spec, w, dev, fam = self.spec, self.weights, self.device, self.family
        seq_lens = [len(p) for p in prompts]
        self.cache = KVCache(spec, len(prompts), max(seq_lens) + max_new_tokens, self.dtype, dev)
        self.lengths = torch.tensor(seq_lens, device=dev)
        tokens = torch.tensor([t for p in prompts for t in p], device=dev)
        positions = packed_positions(seq_lens, dev)
        moe = self._moe(len(tokens))
        x = w.embedding[tokens]                                              # [T, H]
        for i, lw in enumerate(w.layers):
            q, k, v = fam.pre_attention(lw, x, positions, spec)
            self.cache.write_prefill(i, k, v, seq_lens)
            attn = prefill_attention(q, k, v, seq_lens, **fam.attention_args(lw, i, spec))
            x = fam.post_attention(lw, x, attn, spec, w.experts[i], moe)
        return fam.final_logits(x, w.norm, w.lm_head, spec)

    def prefill(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> torch.Tensor:
        logits = self.forward_prefill(prompts, max_new_tokens)
        return logits[last_token_index([len(p) for p in prompts], self.device)]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        spec, w, cache, fam = self.spec, self.weights, self.cache, self.family
        positions = self.lengths                                             # new token's position
        self.lengths = self.lengths + 1
        moe = self._moe(len(tokens))
        x = w.embedding[tokens.to(self.device)]                              # [B, H]
        for i, lw in enumerate(w.layers):
            q, k, v = fam.pre_attention(lw, x, positions, spec)
            cache.write_decode(i, k, v, positions)
            s = int(self.lengths.max())
            attn = decode_attention(q, cache.k[i][:, :, :s], cache.v[i][:, :, :s], self.lengths,
                                    **fam.attention_args(lw, i, spec))
            x = fam.post_attention(lw, x, attn, spec, w.experts[i], moe)
        return fam.final_logits(x, w.norm, w.lm_head, spec)

    def _moe(self, tokens: int) -> MoEKernel:
        """The MoE kernel of a forward of `tokens` tokens (in step with the other expert groups')."""
        if self.lockstep is None:
            return self.moe_kernel
        self.lockstep.begin([tokens])
        return self.moe_kernel.at(0)

    @torch.inference_mode()
    def ghost_forward(self) -> None:
        """A forward with no requests of this group's: each MoE layer's experts serve the others' rows."""
        like = self.weights.embedding[:0]
        for stack in self.weights.experts:
            if stack is not None:
                self.moe_kernel.ghost(like, stack)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
