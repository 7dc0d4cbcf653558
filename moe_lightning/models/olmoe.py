"""OLMoE: Mixtral's layer with an RMSNorm over all of q and over all of k (not per head: `q_norm` is of
size nq*hd, `k_norm` of nkv*hd) right after the projections, an optional clamp of Q, K and V to
[-clip_qkv, clip_qkv] after the norms, `norm_topk_prob` (OLMoE-1B-7B does not renormalise), and with
`attention_bias` biases on all four of Q/K/V/O (as transformers' OlmoeAttention builds them).
The checkpoint names its tensors as Qwen-MoE does (`mlp.experts.{e}.gate_proj`, ...)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_lightning.config import ModelSpec
from moe_lightning.models import Family
from moe_lightning.models.layers import apply_rope, rms_norm, rope_cos_sin, split
from moe_lightning.models.qwen_moe import (
    LayerWeights,
    check_all_four_biased,
    expert,
    expert_tensors,
    final_logits,
    global_tensors,
    layer,
    layer_tensors,
    post_attention,
)
from moe_lightning.models.qwen_moe import tensor_parallel as qwen_tensor_parallel

OLMOE_ROPE_THETA = 10000.0   # OlmoeConfig default


def pre_attention(lw: LayerWeights, x: torch.Tensor, positions: torch.Tensor,
                  spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], positions [T] -> q [T, nq, hd], k [T, nkv, hd], v [T, nkv, hd]."""
    T, eps = x.shape[0], spec.rms_norm_eps
    h = rms_norm(x, lw.attn_norm, eps)
    q = lw.norm_width(F.linear(h, lw.wq, lw.bq), lw.q_norm, eps)   # [T, nq*hd], normalised as a whole
    k = lw.norm_width(F.linear(h, lw.wk, lw.bk), lw.k_norm, eps)
    v = F.linear(h, lw.wv, lw.bv)
    if spec.clip_qkv is not None:
        c = spec.clip_qkv
        q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
    q = q.view(T, spec.num_heads, spec.head_dim)
    k = k.view(T, spec.num_kv_heads, spec.head_dim)
    cos, sin = rope_cos_sin(positions, spec, x.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.view(T, spec.num_kv_heads, spec.head_dim)


def tensor_parallel(spec: ModelSpec) -> dict:
    """Qwen-MoE's split, with the q and k norms (over every head) split beside their heads: the norm's sum of
    squares is all-reduced (`Weights.norm_width`)."""
    return qwen_tensor_parallel(spec) | {"q_norm": split(0), "k_norm": split(0)}


def spec_fields(cfg) -> dict:
    from moe_lightning.engine.hf_config import _is_number, common_fields

    out = common_fields(cfg, "olmoe", experts_key="num_experts", expert_size_key="intermediate_size",
                        family_name="OLMoE", implements=("norm_topk_prob", "attention_bias", "clip_qkv"),
                        head_dim_key=False, default_rope_theta=OLMOE_ROPE_THETA, default_eos=50279,
                        default_max_positions=4096)
    if out["num_heads"] * out["head_dim"] != out["hidden_size"]:
        raise cfg.fail("OLMoE's q_norm is over hidden_size: num_attention_heads x head_dim must equal hidden_size")
    clip = cfg.get("clip_qkv", None)
    if clip is not None and not (_is_number(clip) and clip > 0):
        raise cfg.fail(f"clip_qkv must be a positive number or null, got {clip!r}")
    flags = {}
    for key, default in (("attention_bias", False), ("norm_topk_prob", False)):
        value = cfg.get(key, None)
        if value is not None and not isinstance(value, bool):
            raise cfg.fail(f"{key} must be true or false, got {value!r}")
        flags[key] = default if value is None else value
    flags["attention_out_bias"] = flags["attention_bias"]   # OlmoeAttention: on q/k/v_proj and on o_proj
    return out | flags | dict(qk_norm="full", clip_qkv=None if clip is None else float(clip))


def hf_config(spec: ModelSpec) -> dict:
    return dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, num_experts=spec.num_experts, num_experts_per_tok=spec.top_k,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=spec.rms_norm_eps,
        rope_theta=spec.rope_theta, bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id,
        pad_token_id=None, tie_word_embeddings=False, norm_topk_prob=spec.norm_topk_prob,
        attention_bias=spec.attention_bias, clip_qkv=spec.clip_qkv,
    )


FAMILY = Family(
    architecture="olmoe", model_types=("olmoe",), hf_class="OlmoeForCausalLM", hf_config_class="OlmoeConfig",
    pre_attention=pre_attention, post_attention=post_attention, final_logits=final_logits,
    global_tensors=global_tensors, layer_tensors=layer_tensors, expert_tensors=expert_tensors, layer=layer,
    expert=expert, spec_fields=spec_fields, hf_config=hf_config,
    implements={"attention_bias": (False, True), "attention_out_bias": (False, True),
                "norm_topk_prob": (False, True), "qk_norm": ("full",), "clip_qkv": "any"},
    check=check_all_four_biased,
    tensor_parallel=tensor_parallel,
)
