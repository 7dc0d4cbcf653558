"""DBRX (databricks/dbrx-base, -instruct): a layer of
- LayerNorm without bias (eps 1e-5, not a config field) before attention and before the FFN, and as the
  final norm;
- one fused Q/K/V projection (`Wqkv`), clamped to [-clip_qkv, clip_qkv] before it is split;
- a router whose softmax runs in the activations' dtype, whose top-k weights are divided by their
  p-norm (`moe_normalize_expert_weights`; 1, the published value, is the renormalisation to sum 1);
- SwiGLU experts stored fused per layer on disk: `ffn.experts.mlp.w1`, `v1`, `w2`, each [E*F, H], where
  expert e is rows e*F..(e+1)*F and w2 is applied untransposed (x @ w2_e). The loader slices one
  expert's rows at a time (lazily, from the memory-mapped file) and stores them as the engine's fused
  pair (w13 = [w1_e; v1_e], w2 = w2_e^T).

RoPE theta: the checkpoint's `attn_config.rope_theta` (500000 for the published models), or the
top-level `rope_parameters` / `rope_theta` that transformers >= 5 writes; both present and different is
refused (transformers 5 reads only the top-level one, defaulting to 10000 when it is absent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_lightning.config import ModelSpec
from moe_lightning.models import Family, Getter
from moe_lightning.models.layers import (
    ExpertStack,
    MoEKernel,
    Weights,
    apply_rope,
    rope_cos_sin,
    split,
    split_segments,
)

LAYER_NORM_EPS = 1e-5        # nn.LayerNorm's default, as DBRX builds it
DBRX_ROPE_THETA = 10000.0    # transformers' default when config.json gives none


@dataclass
class LayerWeights(Weights):
    norm_1: torch.Tensor     # [H]   LayerNorm weight (no bias)
    wqkv: torch.Tensor       # [(nq + 2 nkv) hd, H]
    wo: torch.Tensor         # [H, nq*hd]
    norm_2: torch.Tensor     # [H]
    router: torch.Tensor     # [E, H]


def layer_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, None, LAYER_NORM_EPS)


def pre_attention(lw: LayerWeights, x: torch.Tensor, positions: torch.Tensor,
                  spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], positions [T] -> q [T, nq, hd], k [T, nkv, hd], v [T, nkv, hd]."""
    T, hd = x.shape[0], spec.head_dim
    qkv = F.linear(layer_norm(x, lw.norm_1), lw.wqkv)                   # [T, (nq + 2 nkv) hd]
    if spec.clip_qkv is not None:
        qkv = qkv.clamp(-spec.clip_qkv, spec.clip_qkv)
    q, k, v = qkv.split([spec.num_heads * hd, spec.num_kv_heads * hd, spec.num_kv_heads * hd], dim=-1)
    q, k, v = q.view(T, spec.num_heads, hd), k.view(T, spec.num_kv_heads, hd), v.view(T, spec.num_kv_heads, hd)
    cos, sin = rope_cos_sin(positions, spec, x.dtype)
    # v copied out of the fused projection, so that buffer (q's part too) is freed once RoPE has run
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.contiguous()


def route(h: torch.Tensor, router: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """-> weights [T, k] (the activations' dtype, as DBRX computes them), ids [T, k]."""
    probs = torch.softmax(F.linear(h, router), dim=-1)                   # in h's dtype, not fp32
    weights, ids = torch.topk(probs, spec.top_k, dim=-1)
    if spec.norm_topk_prob:
        weights = weights / torch.norm(weights, p=1, dim=-1, keepdim=True)
    return weights, ids


def post_attention(lw: LayerWeights, x: torch.Tensor, attn: torch.Tensor, spec: ModelSpec,
                   experts: ExpertStack, moe_kernel: MoEKernel) -> torch.Tensor:
    x = x + lw.reduce(F.linear(attn, lw.wo))
    h = layer_norm(x, lw.norm_2)
    weights, ids = route(h, lw.router, spec)
    return x + lw.reduce(moe_kernel(h, weights, ids, experts))


def final_logits(x: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    return F.linear(layer_norm(x, norm), lm_head)


def tensor_parallel(spec: ModelSpec) -> dict:
    """The fused Wqkv split within each of its q, k and v parts (heads column-parallel), Wo row-parallel."""
    parts = [n * spec.head_dim for n in (spec.num_heads, spec.num_kv_heads, spec.num_kv_heads)]
    return {"wqkv": split_segments(0, lambda t: parts), "wo": split(-1)}


# ---- checkpoint layout ----

def global_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    V, H = spec.vocab_size, spec.hidden_size
    return {"transformer.wte.weight": (V, H), "transformer.norm_f.weight": (H,), "lm_head.weight": (V, H)}


def layer_tensors(i: int, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    H, hd, p = spec.hidden_size, spec.head_dim, f"transformer.blocks.{i}."
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * hd
    return {p + "norm_attn_norm.norm_1.weight": (H,), p + "norm_attn_norm.norm_2.weight": (H,),
            p + "norm_attn_norm.attn.Wqkv.weight": (qkv, H),
            p + "norm_attn_norm.attn.out_proj.weight": (H, spec.num_heads * hd),
            p + "ffn.router.layer.weight": (spec.num_experts, H)}


def expert_tensors(i: int, e: int, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The layer's three fused tensors, listed once (with expert 0): every expert lives in them."""
    if e:
        return {}
    rows, p = spec.num_experts * spec.intermediate_size, f"transformer.blocks.{i}.ffn.experts.mlp."
    return {p + w: (rows, spec.hidden_size) for w in ("w1", "v1", "w2")}


def layer(get: Getter, i: int, spec: ModelSpec) -> LayerWeights:
    p = f"transformer.blocks.{i}.norm_attn_norm."
    return LayerWeights(norm_1=get(p + "norm_1.weight"), wqkv=get(p + "attn.Wqkv.weight"),
                        wo=get(p + "attn.out_proj.weight"), norm_2=get(p + "norm_2.weight"),
                        router=get(f"transformer.blocks.{i}.ffn.router.layer.weight"))


def expert(get: Getter, i: int, e: int, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's rows of the fused tensors -> (w13 [2F, H] = w1 and v1, w2 [H, F] = its w2 rows^T)."""
    p, rows = f"transformer.blocks.{i}.ffn.experts.mlp.", (e * spec.intermediate_size, (e + 1) * spec.intermediate_size)
    w13 = torch.cat([get(p + "w1", rows), get(p + "v1", rows)], dim=0)
    return w13, get(p + "w2", rows).t().contiguous()


# ---- config.json ----

def _sub(cfg, key: str):
    from moe_lightning.engine.hf_config import _Config, shown

    value = cfg.get(key, None)
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise cfg.fail(f"{key} must be an object, got {shown(value)}")
    sub = _Config(value, cfg.path)
    sub.fail = lambda message: cfg.fail(f"{key}.{message}")   # name the nested field
    return sub


def spec_fields(cfg) -> dict:
    from moe_lightning.engine.hf_config import _is_number, shown

    attn, ffn = _sub(cfg, "attn_config"), _sub(cfg, "ffn_config")
    layers, hidden = cfg.positive_int("n_layers"), cfg.positive_int("d_model")
    heads, vocab = cfg.positive_int("n_heads"), cfg.positive_int("vocab_size")
    max_positions = cfg.positive_int("max_seq_len", 2048)
    kv_heads = attn.positive_int("kv_n_heads", 1)
    experts, top_k = ffn.positive_int("moe_num_experts", 4), ffn.positive_int("moe_top_k", 1)
    ffn_size = ffn.positive_int("ffn_hidden_size", 3584)
    if hidden % heads:
        raise cfg.fail(f"d_model={hidden} must be a multiple of n_heads={heads}")
    if heads % kv_heads:
        raise cfg.fail(f"n_heads={heads} must be a multiple of attn_config.kv_n_heads={kv_heads}")
    if top_k > experts:
        raise cfg.fail(f"ffn_config.moe_top_k={top_k} must be <= ffn_config.moe_num_experts={experts}")
    clip = attn.get("clip_qkv", None)
    if clip is not None and not (_is_number(clip) and clip > 0):
        raise attn.fail(f"clip_qkv must be a positive number or null, got {shown(clip)}")
    act = ffn.get("ffn_act_fn", None) or {"name": "silu"}
    if not isinstance(act, dict) or act.get("name", "silu") not in ("silu", "swish") or set(act) - {"name"}:
        raise ffn.fail(f"ffn_act_fn={shown(act)} is not implemented by the DBRX path ({{\"name\": \"silu\"}} only)")
    p = ffn.get("moe_normalize_expert_weights", 1.0)
    if p is not None and not (_is_number(p) and p == 1):
        raise ffn.fail(f"moe_normalize_expert_weights={shown(p)} is not implemented by the DBRX path (1 or null)")
    if ffn.get("uniform_expert_assignment", False) not in (False, None):
        raise ffn.fail("uniform_expert_assignment=true changes the routing and is not implemented by the DBRX path")
    nested = attn.get("rope_theta", None)
    top = cfg.rope_theta("DBRX", DBRX_ROPE_THETA)
    given_top = cfg.get("rope_theta", None) is not None or \
        (cfg.get("rope_parameters", None) or {}).get("rope_theta") is not None
    if nested is not None and given_top and top != nested:
        raise cfg.fail(f"attn_config.rope_theta={shown(nested)} disagrees with the top-level rope theta {shown(top)} "
                       "(transformers >= 5 reads only the top-level one); keep one")
    if nested is not None and not given_top and nested != DBRX_ROPE_THETA:
        # the published DBRX layout: transformers >= 5 runs its default theta, not this one
        raise cfg.fail(f"attn_config.rope_theta={shown(nested)} is not read by transformers >= 5, which runs the "
                       f"top-level rope theta ({shown(DBRX_ROPE_THETA)} when absent); add \"rope_theta\": "
                       f"{shown(nested)} at the top level to run it")
    cfg.refuse_unimplemented(max_positions, "DBRX")
    bos = cfg.token_id("bos_token_id", cfg.get("bos_token_id", None), vocab)
    dtype = cfg.get("dtype", None) or cfg.get("torch_dtype", None)
    from moe_lightning.config import DTYPES

    return dict(architecture="dbrx", num_layers=layers, hidden_size=hidden, intermediate_size=ffn_size,
                num_heads=heads, num_kv_heads=kv_heads, head_dim=hidden // heads, num_experts=experts, top_k=top_k,
                vocab_size=vocab, rope_theta=top, rms_norm_eps=LAYER_NORM_EPS, max_position_embeddings=max_positions,
                dtype=dtype if isinstance(dtype, str) and dtype in DTYPES else "float32", bos_token_id=bos,
                **cfg.eos(vocab), norm_topk_prob=p is not None,
                clip_qkv=None if clip is None else float(clip))


def hf_config(spec: ModelSpec) -> dict:
    return dict(
        vocab_size=spec.vocab_size, d_model=spec.hidden_size, n_heads=spec.num_heads, n_layers=spec.num_layers,
        max_seq_len=spec.max_position_embeddings, bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id,
        tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        attn_config=dict(kv_n_heads=spec.num_kv_heads, clip_qkv=spec.clip_qkv, rope_theta=spec.rope_theta),
        ffn_config=dict(ffn_hidden_size=spec.intermediate_size, moe_num_experts=spec.num_experts,
                        moe_top_k=spec.top_k, moe_normalize_expert_weights=1.0 if spec.norm_topk_prob else None),
    )


FAMILY = Family(
    architecture="dbrx", model_types=("dbrx",), hf_class="DbrxForCausalLM", hf_config_class="DbrxConfig",
    pre_attention=pre_attention, post_attention=post_attention, final_logits=final_logits,
    global_tensors=global_tensors, layer_tensors=layer_tensors, expert_tensors=expert_tensors, layer=layer,
    expert=expert, spec_fields=spec_fields, hf_config=hf_config,
    implements={"norm_topk_prob": (False, True), "clip_qkv": "any"}, tensor_parallel=tensor_parallel,
)
