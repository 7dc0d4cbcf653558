"""Mixtral (and the Mistral-style MoE layout): RMSNorm, GQA with RoPE, softmax top-k routing with
renormalised weights, SwiGLU experts. Checkpoint layout: transformers' MixtralForCausalLM, per expert
(`block_sparse_moe.experts.{e}.w1/w3/w2`)."""

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
    rms_norm,
    rope_cos_sin,
    route,
    split,
)


@dataclass
class LayerWeights(Weights):
    """Non-expert weights of one decoder layer (row-major, as nn.Linear stores them)."""

    attn_norm: torch.Tensor  # [H]
    wq: torch.Tensor         # [nq*hd, H]
    wk: torch.Tensor         # [nkv*hd, H]
    wv: torch.Tensor         # [nkv*hd, H]
    wo: torch.Tensor         # [H, nq*hd]
    ffn_norm: torch.Tensor   # [H]
    router: torch.Tensor     # [E, H]


def pre_attention(lw: LayerWeights, x: torch.Tensor, positions: torch.Tensor,
                  spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], positions [T] -> q [T, nq, hd], k [T, nkv, hd], v [T, nkv, hd]."""
    T = x.shape[0]
    h = rms_norm(x, lw.attn_norm, spec.rms_norm_eps)
    q = F.linear(h, lw.wq).view(T, spec.num_heads, spec.head_dim)
    k = F.linear(h, lw.wk).view(T, spec.num_kv_heads, spec.head_dim)
    v = F.linear(h, lw.wv).view(T, spec.num_kv_heads, spec.head_dim)
    cos, sin = rope_cos_sin(positions, spec, x.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def post_attention(lw: LayerWeights, x: torch.Tensor, attn: torch.Tensor, spec: ModelSpec,
                   experts: ExpertStack, moe_kernel: MoEKernel) -> torch.Tensor:
    """x [T, H] residual stream, attn [T, nq*hd] attention output -> next layer's input [T, H]."""
    x = x + lw.reduce(F.linear(attn, lw.wo))
    h = rms_norm(x, lw.ffn_norm, spec.rms_norm_eps)
    weights, ids = route(h, lw.router, spec.top_k)
    return x + lw.reduce(moe_kernel(h, weights, ids, experts))


def final_logits(x: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    return F.linear(rms_norm(x, norm, spec.rms_norm_eps), lm_head)


def tensor_parallel(spec: ModelSpec) -> dict:
    """Heads column-parallel into attention, row-parallel out of it."""
    return {"wq": split(0), "wk": split(0), "wv": split(0), "wo": split(-1)}


# ---- checkpoint layout ----

def global_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    V, H = spec.vocab_size, spec.hidden_size
    return {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}


def layer_tensors(i: int, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    H = spec.hidden_size
    q, kv, p = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, f"model.layers.{i}."
    return {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
            p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
            p + "block_sparse_moe.gate.weight": (spec.num_experts, H)}


def expert_tensors(i: int, e: int, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    H, Fd, p = spec.hidden_size, spec.intermediate_size, f"model.layers.{i}.block_sparse_moe.experts.{e}."
    return {p + "w1.weight": (Fd, H), p + "w3.weight": (Fd, H), p + "w2.weight": (H, Fd)}


def layer(get: Getter, i: int, spec: ModelSpec) -> LayerWeights:
    p = f"model.layers.{i}."
    return LayerWeights(
        attn_norm=get(p + "input_layernorm.weight"), wq=get(p + "self_attn.q_proj.weight"),
        wk=get(p + "self_attn.k_proj.weight"), wv=get(p + "self_attn.v_proj.weight"),
        wo=get(p + "self_attn.o_proj.weight"), ffn_norm=get(p + "post_attention_layernorm.weight"),
        router=get(p + "block_sparse_moe.gate.weight"))


def expert(get: Getter, i: int, e: int, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (w13 [2F, H] = gate (w1) and up (w3) fused, w2 [H, F])."""
    p = f"model.layers.{i}.block_sparse_moe.experts.{e}."
    return torch.cat([get(p + "w1.weight"), get(p + "w3.weight")], dim=0), get(p + "w2.weight")


# ---- config.json ----

def spec_fields(cfg) -> dict:
    from moe_lightning.engine.hf_config import common_fields

    return common_fields(cfg, "mixtral", experts_key="num_local_experts", expert_size_key="intermediate_size",
                         family_name="Mixtral", default_eos=2,
                         default_max_positions=131072)


def hf_config(spec: ModelSpec) -> dict:
    return dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim, num_local_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k, max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps, rope_theta=spec.rope_theta, bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id, tie_word_embeddings=False,
    )


FAMILY = Family(
    architecture="mixtral", model_types=("mixtral",), hf_class="MixtralForCausalLM",
    hf_config_class="MixtralConfig", pre_attention=pre_attention, post_attention=post_attention,
    final_logits=final_logits, global_tensors=global_tensors, layer_tensors=layer_tensors,
    expert_tensors=expert_tensors, layer=layer, expert=expert, spec_fields=spec_fields, hf_config=hf_config,
    tensor_parallel=tensor_parallel,
)
