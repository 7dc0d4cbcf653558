"""Layer math the model families share, as pure functions of tensors (gpt-fast style).

Placement lives elsewhere: these functions run on whatever device their tensors are on. Each family
(`moe_lightning.models.<family>`) splits its decoder layer where CGOPipe splits it:
    pre_attention   (norm, Q/K/V projections, the family's extras, RoPE)   -> q, k, v
    attention       (prefill: causal per sequence; decode: over the KV cache; shared, here)
    post_attention  (O projection, residual, norm, router, MoE FFN, residual)
and reads its experts through an `ExpertStack` with one of the shared MoE kernels.
Shapes: T tokens (packed over sequences, no padding), H hidden, E experts, F expert FFN dim,
nq / nkv query / KV heads, hd head dim, S cache length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_lightning.config import ModelSpec, yarn_mscale
from moe_lightning.memory import PREFILL_QUERY_CHUNK


@dataclass
class ExpertStack:
    """A layer's expert weights, addressed through a page table: expert e lives at
    `w13[r][idx]`, `w2[r][idx]` with `(r, idx) = slot_of[e]`.

    Each region is one contiguous stack, so kernels read weights in place (views, never gathers). The
    reference engine has one region with the identity table; CGOPipe's GPU expert cache has the layer's
    resident experts as one region and the streamed double buffer (`layer % 2`) as another.
    """

    w13: list[torch.Tensor]          # per region [n_r, 2F, H]: gate (w1) and up (w3), fused
    w2: list[torch.Tensor]           # per region [n_r, H, F]: down projection
    slot_of: list[tuple[int, int]]   # expert id -> (region, index in region)
    # Per-expert biases by expert id (gpt-oss; small, held with the layer, not paged): [E, 2F], [E, H].
    b13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    act: Callable[[torch.Tensor], torch.Tensor] | None = None   # [.., 2F] -> [.., F]; None: SwiGLU
    # Set where the device holds only part of the layer at a time (CGOPipe's MXFP4 scratch of fewer experts
    # than it streams, `engine.paged.GroupedMoE`): (first expert id, end, materialise) per group of
    # consecutive ids, in increasing order; materialise() puts the group on the device and returns its
    # experts as a stack of local ids 0..end-first-1. The page table then lists no expert: a kernel given
    # this stack directly fails on the first id instead of reading another group's weights.
    groups: list[tuple[int, int, Callable[[], ExpertStack]]] | None = None

    @classmethod
    def single(cls, w13: torch.Tensor, w2: torch.Tensor) -> ExpertStack:
        return cls([w13], [w2], [(0, e) for e in range(w13.shape[0])])

    def weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        r, idx = self.slot_of[e]
        return self.w13[r][idx], self.w2[r][idx]

    def region_experts(self, r: int) -> list[int]:
        """Expert ids of region r, by index in the region."""
        ids = [-1] * self.w13[r].shape[0]
        for e, (region, idx) in enumerate(self.slot_of):
            if region == r:
                ids[idx] = e
        return ids

    def activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The GLU between the two projections: [.., 2F] (gate | up) -> [.., F]."""
        if self.act is not None:
            return self.act(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


MoEKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ExpertStack], torch.Tensor]


class Weights:
    """Mixin of a family's per-layer weights dataclass: move every tensor (absent ones stay None), and sum
    a row-parallel output over the tensor-parallel ranks holding this layer's shards (`reduce`)."""

    # Tensor parallelism: the process group whose ranks hold this layer's shards (`engine.parallel`
    # sets it); None: this process holds the whole layer.
    tp_group = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None):
        return self.map(lambda t: t.to(device=device, dtype=dtype))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        out = type(self)(**{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name))
                            for f in fields(self)})
        if self.tp_group is not None:   # a tensor rank's shards stay its shards
            out.tp_group = self.tp_group
        return out

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """A row-parallel projection's output summed over the tensor-parallel ranks (Megatron's all-reduce
        after the attention output and after the MLP down projection); as is on one rank."""
        if self.tp_group is None:
            return partial
        dist.all_reduce(partial, group=self.tp_group)
        return partial

    def norm_width(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """`rms_norm` over the whole row of which this tensor rank holds x's 1/T (OLMoE's q/k norm over
        every head): the sum of squares is all-reduced."""
        if self.tp_group is None:
            return rms_norm(x, weight, eps)
        x32 = x.float()
        squares = self.reduce(x32.pow(2).sum(-1, keepdim=True))
        width = x.shape[-1] * dist.get_world_size(self.tp_group)
        return weight * (x32 * torch.rsqrt(squares / width + eps)).to(x.dtype)


# Tensor-parallel shard rules (a family's `Family.tensor_parallel`, field -> rule): what of a weight rank
# `rank` of `world` holds. Fields without a rule are replicated.
ShardRule = Callable[[torch.Tensor, int, int], torch.Tensor]   # (weight, rank, world) -> its shard


def split(dim: int) -> ShardRule:
    """The rank's contiguous 1/world of `dim` (column-parallel: dim 0 of a [out, in] weight, head-major;
    row-parallel: its last dim)."""
    def rule(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        return t.chunk(world, dim)[rank].contiguous()
    return rule


def split_halves(dim: int) -> ShardRule:
    """`dim` holds [gate | up]: the rank's 1/world of each half, still [gate | up]."""
    def rule(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        return torch.cat([h.chunk(world, dim)[rank] for h in t.chunk(2, dim)], dim).contiguous()
    return rule


def split_segments(dim: int, sizes: Callable[[torch.Tensor], list[int]]) -> ShardRule:
    """`dim` concatenates segments (a fused QKV): the rank's 1/world of each, concatenated again."""
    def rule(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
        return torch.cat([p.chunk(world, dim)[rank] for p in t.split(sizes(t), dim)], dim).contiguous()
    return rule


def once(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """A bias added after a row-parallel sum: rank 0 adds it, the others add zeros."""
    return t.clone() if rank == 0 else torch.zeros_like(t)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 and cast back before the scale, as transformers does (bit-for-bit in fp32).
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_inv_freq(spec: ModelSpec, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies over head_dim, and the gain on cos/sin (1 but for YaRN).

    YaRN (`rope_type=yarn`): dims that turn fewer than `beta_slow` times over the original context are
    interpolated (frequency / factor), those turning more than `beta_fast` times kept, a linear ramp
    between (the dim bounds floored and ceiled); the gain is mscale(factor, mscale) / mscale(factor,
    mscale_all_dim) when both are set, else mscale(factor). `yarn_truncate` false (gpt-oss) keeps the dim
    bounds unrounded."""
    hd = spec.head_dim
    idx = torch.arange(0, hd, 2, dtype=torch.int64, device=device).float()
    pos_freq = spec.rope_theta ** (idx / hd)
    if spec.rope_type != "yarn":
        return 1.0 / pos_freq, 1.0
    f, original = spec.yarn_factor, spec.yarn_original_max_positions

    def dim_of(turns: float) -> float:
        return hd * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(spec.rope_theta))

    low, high = dim_of(spec.yarn_beta_fast), dim_of(spec.yarn_beta_slow)
    if spec.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    ramp = ((torch.arange(hd // 2, dtype=torch.float32, device=device) - low)
            / ((high - low) or 0.001)).clamp(0, 1)
    kept = 1 - ramp
    inv_freq = 1.0 / (f * pos_freq) * (1 - kept) + 1.0 / pos_freq * kept
    if spec.yarn_mscale and spec.yarn_mscale_all_dim:
        gain = yarn_mscale(f, spec.yarn_mscale) / yarn_mscale(f, spec.yarn_mscale_all_dim)
    else:
        gain = yarn_mscale(f)
    return inv_freq, gain


def rope_cos_sin(positions: torch.Tensor, spec: ModelSpec, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    inv_freq, gain = rope_inv_freq(spec, positions.device)
    freqs = positions[:, None].float() * inv_freq                    # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)                          # [T, hd]
    if gain != 1.0:
        return (emb.cos() * gain).to(dtype), (emb.sin() * gain).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, heads, hd]; cos/sin [T, hd]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: list[int],
                      pads: list[int] | None = None, scale: float | None = None, sinks: torch.Tensor | None = None,
                      window: int | None = None) -> torch.Tensor:
    """Causal attention over packed sequences: q [T, nq, hd], k [T, nkv, hd], v [T, nkv, dv] ->
    [T, nq*dv]; `scale` (default hd^-0.5) multiplies q.k; `sinks` [nq]: attention-sink logits; `window`:
    each token sees itself and the window - 1 tokens before it.

    With `pads`, sequence b begins with pads[b] padding tokens that attend to nothing and are
    attended by nothing (their output is zero).
    """
    out = torch.zeros(q.shape[0], q.shape[1] * v.shape[2], dtype=q.dtype, device=q.device)
    start = 0
    for b, n in enumerate(seq_lens):
        pad = pads[b] if pads else 0
        start, n = start + pad, n - pad
        sl = slice(start, start + n)
        qs, ks, vs = q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1)
        if sinks is None and window is None:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True, scale=scale)
            out[sl] = o.transpose(0, 1).reshape(n, -1)
        else:   # the eager path, PREFILL_QUERY_CHUNK queries at a time: its scores are [nq, chunk, n]
            group = qs.shape[0] // ks.shape[0]
            ks, vs = ks.repeat_interleave(group, dim=0), vs.repeat_interleave(group, dim=0)
            keys = torch.arange(n, device=q.device)
            for lo in range(0, n, PREFILL_QUERY_CHUNK):
                hi = min(n, lo + PREFILL_QUERY_CHUNK)
                rows = keys[lo:hi, None]
                seen = keys[None, :] <= rows                                  # [query, key]: causal
                if window is not None:
                    seen &= keys[None, :] > rows - window
                o = _attend(qs[:, lo:hi], ks, vs, seen, qs.shape[-1] ** -0.5 if scale is None else scale, sinks)
                out[start + lo:start + hi] = o.transpose(0, 1).reshape(hi - lo, -1)
        start += n
    return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seen: torch.Tensor, scale: float,
            sinks: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention with a mask, and attention sinks where given, as transformers' eager path runs it:
    q [nq, n, hd], k [nq, s, hd] and v [nq, s, dv] (already repeated over the query heads of a group),
    seen [n, s] (True: attended), sinks [nq] -> [nq, n, dv]. A sink is one more logit per head in the
    softmax, dropped after it: the row's weights sum below 1."""
    scores = torch.matmul(q, k.transpose(1, 2)) * scale
    scores = scores.masked_fill(~seen, float("-inf"))
    if sinks is None:
        return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
    logits = torch.cat([scores, sinks.to(scores.dtype)[:, None, None].expand(-1, scores.shape[1], 1)], dim=-1)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     lengths: torch.Tensor, starts: torch.Tensor | None = None,
                     scale: float | None = None, sinks: torch.Tensor | None = None,
                     window: int | None = None) -> torch.Tensor:
    """One new token per sequence over its cached context.

    q [B, nq, hd]; k_cache [B, nkv, S, hd], v_cache [B, nkv, S, dv] already holding the new token's K/V;
    cache slots [starts, lengths) are valid per sequence (starts > 0 skips left padding) -> [B, nq*dv];
    with `window`, only the last `window` of them; `sinks` [nq] as in `prefill_attention`.
    """
    B, nq, hd = q.shape
    nkv, S = k_cache.shape[1], k_cache.shape[2]
    qg = q.view(B, nkv, nq // nkv, hd)
    scores = torch.matmul(qg, k_cache.transpose(-1, -2)) * (hd**-0.5 if scale is None else scale)  # [B, nkv, g, S]
    slot = torch.arange(S, device=q.device)[None, :]
    invalid = slot >= lengths[:, None]                                        # [B, S]
    if starts is not None:
        invalid |= slot < starts[:, None]
    if window is not None:
        invalid |= slot < lengths[:, None] - window
    scores = scores.masked_fill(invalid[:, None, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, nkv, nq // nkv, 1).expand(B, -1, -1, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1].to(q.dtype)
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v_cache).reshape(B, -1)                       # [B, nkv, g, dv]


def route(h: torch.Tensor, router: torch.Tensor, top_k: int,
          normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (fp32) then top-k routing, the top-k weights renormalised to sum to 1 when `normalize`
    (Mixtral; `norm_topk_prob` in Qwen-MoE and OLMoE): -> weights [T, k] fp32, ids [T, k]."""
    probs = torch.softmax(F.linear(h, router).float(), dim=-1)               # [T, E]
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True) if normalize else weights), ids


def swiglu_mlp(h: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU MLP with separate gate and up projections (a dense layer's FFN, a shared expert)."""
    return F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)


def expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU expert: x [t, H], w13 [2F, H], w2 [H, F] -> [t, H]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def stack_expert_ffn(x: torch.Tensor, experts: ExpertStack, e: int) -> torch.Tensor:
    """Expert e of a stack on x [t, H], with its biases and the stack's GLU where it has them -> [t, H]."""
    w13, w2 = experts.weights(e)
    if experts.b13 is None and experts.act is None:
        return expert_ffn(x, w13, w2)
    gate_up = F.linear(x, w13)
    if experts.b13 is not None:
        gate_up = gate_up + experts.b13[e]
    y = F.linear(experts.activate(gate_up), w2)
    return y if experts.b2 is None else y + experts.b2[e]


def clamped_swiglu(alpha: float, limit: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """gpt-oss's GLU over [gate | up]: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha g), g = min(gate,
    limit)."""
    def act(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * (gate * torch.sigmoid(gate * alpha))
    return act
