"""Qwen2-MoE (Qwen1.5-MoE) and Qwen3-MoE: Mixtral's layer with
- Qwen2-MoE: biases on Q/K/V (`qkv_bias`; never on O), and a shared expert beside the routed ones, always
  run, scaled by a sigmoid gate: moe(h) + sigmoid(h . g) * SwiGLU_shared(h);
- Qwen3-MoE: RMSNorm of q and k per head, before RoPE (`q_norm`, `k_norm` of size head_dim), and with
  `attention_bias` biases on all four of Q/K/V/O (as transformers' Qwen3MoeAttention builds them);
- both: `norm_topk_prob` (renormalise the top-k routing weights, or not).
Routed experts are `mlp.experts.{e}.gate_proj/up_proj/down_proj` in the checkpoint, streamed fused.

Dense layers (`mlp_only_layers`, `decoder_sparse_step` > 1) run one SwiGLU MLP of `intermediate_size`
(`mlp.gate_proj/up_proj/down_proj`) with no router. Sliding windows are refused: every published
Qwen1.5-MoE / Qwen2-MoE / Qwen3-MoE checkpoint has full attention.
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
    once,
    rms_norm,
    rope_cos_sin,
    route,
    split,
    swiglu_mlp,
)
from moe_lightning.models.mixtral import final_logits, global_tensors  # the same final norm, head and names

QWEN_ROPE_THETA = 10000.0   # Qwen2MoeConfig / Qwen3MoeConfig default


@dataclass
class LayerWeights(Weights):
    attn_norm: torch.Tensor               # [H]
    wq: torch.Tensor                      # [nq*hd, H]
    wk: torch.Tensor                      # [nkv*hd, H]
    wv: torch.Tensor                      # [nkv*hd, H]
    wo: torch.Tensor                      # [H, nq*hd]
    ffn_norm: torch.Tensor                # [H]
    router: torch.Tensor | None = None    # [E, H]    None in a dense layer
    bq: torch.Tensor | None = None        # [nq*hd]   attention_bias
    bk: torch.Tensor | None = None        # [nkv*hd]
    bv: torch.Tensor | None = None        # [nkv*hd]
    bo: torch.Tensor | None = None        # [H]       attention_out_bias (Qwen3-MoE's, OLMoE's attention_bias)
    q_norm: torch.Tensor | None = None    # [hd]      Qwen3-MoE
    k_norm: torch.Tensor | None = None    # [hd]
    shared_gate_proj: torch.Tensor | None = None   # [S, H]   Qwen2-MoE's shared expert
    shared_up_proj: torch.Tensor | None = None     # [S, H]
    shared_down_proj: torch.Tensor | None = None   # [H, S]
    shared_gate: torch.Tensor | None = None        # [1, H]   its sigmoid gate
    mlp_gate: torch.Tensor | None = None  # [Fd, H]   a dense layer's MLP
    mlp_up: torch.Tensor | None = None    # [Fd, H]
    mlp_down: torch.Tensor | None = None  # [H, Fd]


def pre_attention(lw: LayerWeights, x: torch.Tensor, positions: torch.Tensor,
                  spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], positions [T] -> q [T, nq, hd], k [T, nkv, hd], v [T, nkv, hd]."""
    T, eps = x.shape[0], spec.rms_norm_eps
    h = rms_norm(x, lw.attn_norm, eps)
    q = F.linear(h, lw.wq, lw.bq).view(T, spec.num_heads, spec.head_dim)
    k = F.linear(h, lw.wk, lw.bk).view(T, spec.num_kv_heads, spec.head_dim)
    v = F.linear(h, lw.wv, lw.bv).view(T, spec.num_kv_heads, spec.head_dim)
    if lw.q_norm is not None:   # per head, over head_dim
        q, k = rms_norm(q, lw.q_norm, eps), rms_norm(k, lw.k_norm, eps)
    cos, sin = rope_cos_sin(positions, spec, x.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def post_attention(lw: LayerWeights, x: torch.Tensor, attn: torch.Tensor, spec: ModelSpec,
                   experts: ExpertStack, moe_kernel: MoEKernel) -> torch.Tensor:
    """x [T, H] residual stream, attn [T, nq*hd] -> next layer's input [T, H]."""
    x = x + lw.reduce(F.linear(attn, lw.wo, lw.bo))
    h = rms_norm(x, lw.ffn_norm, spec.rms_norm_eps)
    if lw.router is None:   # a dense layer (`experts` is None)
        return x + lw.reduce(swiglu_mlp(h, lw.mlp_gate, lw.mlp_up, lw.mlp_down))
    weights, ids = route(h, lw.router, spec.top_k, normalize=spec.norm_topk_prob)
    out = moe_kernel(h, weights, ids, experts)
    if lw.shared_gate is not None:
        shared = swiglu_mlp(h, lw.shared_gate_proj, lw.shared_up_proj, lw.shared_down_proj)
        out = out + torch.sigmoid(F.linear(h, lw.shared_gate)) * shared
    return x + lw.reduce(out)


# The shared expert's and a dense layer's MLP: column-parallel gate and up, row-parallel down.
MLP_SPLITS = {"shared_gate_proj": split(0), "shared_up_proj": split(0), "shared_down_proj": split(-1),
              "mlp_gate": split(0), "mlp_up": split(0), "mlp_down": split(-1)}


def tensor_parallel(spec: ModelSpec) -> dict:
    """Heads (and their biases) column-parallel into attention, row-parallel out (its bias added once); the
    shared expert and dense MLPs split on their intermediate rows (its sigmoid gate and the per-head q/k
    norms replicated)."""
    return {"wq": split(0), "wk": split(0), "wv": split(0), "wo": split(-1), "bq": split(0), "bk": split(0),
            "bv": split(0), "bo": once, **MLP_SPLITS}


# ---- checkpoint layout (shared with OLMoE, which names its tensors the same way) ----

def layer_tensors(i: int, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    H, S = spec.hidden_size, spec.shared_expert_size
    q, kv, p = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, f"model.layers.{i}."
    out = {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
           p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
           p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q)}
    if spec.attention_bias:
        out |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,)}
    if spec.attention_out_bias:
        out[p + "self_attn.o_proj.bias"] = (H,)
    if spec.qk_norm != "none":
        per_head = spec.qk_norm == "head"
        out |= {p + "self_attn.q_norm.weight": (spec.head_dim if per_head else q,),
                p + "self_attn.k_norm.weight": (spec.head_dim if per_head else kv,)}
    if not spec.is_moe_layer(i):
        Fd = spec.dense_intermediate_size
        return out | {p + "mlp.gate_proj.weight": (Fd, H), p + "mlp.up_proj.weight": (Fd, H),
                      p + "mlp.down_proj.weight": (H, Fd)}
    out[p + "mlp.gate.weight"] = (spec.num_experts, H)
    if S:
        out |= {p + "mlp.shared_expert.gate_proj.weight": (S, H), p + "mlp.shared_expert.up_proj.weight": (S, H),
                p + "mlp.shared_expert.down_proj.weight": (H, S), p + "mlp.shared_expert_gate.weight": (1, H)}
    return out


def expert_tensors(i: int, e: int, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    H, Fd, p = spec.hidden_size, spec.intermediate_size, f"model.layers.{i}.mlp.experts.{e}."
    return {p + "gate_proj.weight": (Fd, H), p + "up_proj.weight": (Fd, H), p + "down_proj.weight": (H, Fd)}


def layer(get: Getter, i: int, spec: ModelSpec) -> LayerWeights:
    p = f"model.layers.{i}."
    a, m = p + "self_attn.", p + "mlp."
    optional = {}
    if spec.attention_bias:
        optional |= dict(bq=get(a + "q_proj.bias"), bk=get(a + "k_proj.bias"), bv=get(a + "v_proj.bias"))
    if spec.attention_out_bias:
        optional["bo"] = get(a + "o_proj.bias")
    if spec.qk_norm != "none":
        optional |= dict(q_norm=get(a + "q_norm.weight"), k_norm=get(a + "k_norm.weight"))
    if not spec.is_moe_layer(i):
        optional |= dict(mlp_gate=get(m + "gate_proj.weight"), mlp_up=get(m + "up_proj.weight"),
                         mlp_down=get(m + "down_proj.weight"))
    else:
        optional["router"] = get(m + "gate.weight")
    if spec.shared_expert_size and spec.is_moe_layer(i):
        optional |= dict(shared_gate_proj=get(m + "shared_expert.gate_proj.weight"),
                         shared_up_proj=get(m + "shared_expert.up_proj.weight"),
                         shared_down_proj=get(m + "shared_expert.down_proj.weight"),
                         shared_gate=get(m + "shared_expert_gate.weight"))
    return LayerWeights(
        attn_norm=get(p + "input_layernorm.weight"), wq=get(a + "q_proj.weight"), wk=get(a + "k_proj.weight"),
        wv=get(a + "v_proj.weight"), wo=get(a + "o_proj.weight"), ffn_norm=get(p + "post_attention_layernorm.weight"),
        **optional)


def expert(get: Getter, i: int, e: int, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (w13 [2F, H] = gate_proj and up_proj fused, w2 [H, F] = down_proj)."""
    p = f"model.layers.{i}.mlp.experts.{e}."
    return torch.cat([get(p + "gate_proj.weight"), get(p + "up_proj.weight")], dim=0), get(p + "down_proj.weight")


# ---- config.json ----

def _dense_layers(cfg, layers: int) -> tuple[list[int], int]:
    """Which layers are dense, as transformers builds them (layer i is sparse iff it is not in
    `mlp_only_layers` and (i + 1) % `decoder_sparse_step` == 0), and their MLP's FFN dim."""
    only = cfg.get("mlp_only_layers", None)
    only = [] if only is None else only
    if not (isinstance(only, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in only)):
        raise cfg.fail(f"mlp_only_layers must be a list of layer indices, got {only!r}")
    step = cfg.count("decoder_sparse_step", 1, minimum=1)
    dense = [i for i in range(layers) if i in only or (i + 1) % step]
    if not dense:
        return [], 0
    return dense, cfg.positive_int("intermediate_size")


def qwen2_spec_fields(cfg) -> dict:
    from moe_lightning.engine.hf_config import common_fields

    out = common_fields(cfg, "qwen2_moe", experts_key=("num_experts", "num_local_experts"),
                        expert_size_key="moe_intermediate_size", family_name="Qwen2-MoE",
                        implements=("norm_topk_prob", "qkv_bias", "moe_intermediate_size",
                                    "shared_expert_intermediate_size", "mlp_only_layers", "decoder_sparse_step"),
                        default_rope_theta=QWEN_ROPE_THETA, default_eps=1e-6)
    shared = cfg.count("shared_expert_intermediate_size", 0)
    # Qwen2MoeAttention's Q/K/V biases: `qkv_bias` (transformers >= 5), always on before it.
    dense, dense_size = _dense_layers(cfg, out["num_layers"])
    return out | dict(attention_bias=cfg.flag("qkv_bias", True), shared_expert_size=shared,
                      dense_layers=dense, dense_intermediate_size=dense_size,
                      norm_topk_prob=cfg.flag("norm_topk_prob", False))


def qwen3_spec_fields(cfg) -> dict:
    from moe_lightning.engine.hf_config import common_fields

    out = common_fields(cfg, "qwen3_moe", experts_key=("num_experts", "num_local_experts"),
                        expert_size_key="moe_intermediate_size", family_name="Qwen3-MoE",
                        implements=("norm_topk_prob", "attention_bias", "moe_intermediate_size",
                                    "mlp_only_layers", "decoder_sparse_step"),
                        default_rope_theta=QWEN_ROPE_THETA, default_eps=1e-6)
    dense, dense_size = _dense_layers(cfg, out["num_layers"])
    bias = cfg.flag("attention_bias", False)   # Qwen3MoeAttention: on q/k/v_proj and on o_proj
    return out | dict(attention_bias=bias, attention_out_bias=bias, qk_norm="head",
                      dense_layers=dense, dense_intermediate_size=dense_size,
                      norm_topk_prob=cfg.flag("norm_topk_prob", False))


def check_all_four_biased(spec: ModelSpec) -> None:
    """Qwen3-MoE's and OLMoE's `attention_bias` biases Q, K, V and O together (transformers has one flag)."""
    from moe_lightning.errors import ConfigError

    if spec.attention_bias != spec.attention_out_bias:
        raise ConfigError(f"model.attention_out_bias={str(spec.attention_out_bias).lower()}: {spec.architecture}'s "
                          "attention_bias biases all four attention projections or none (set it equal to "
                          "model.attention_bias)")


def _hf_common(spec: ModelSpec) -> dict:
    return dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, moe_intermediate_size=spec.intermediate_size,
        intermediate_size=spec.dense_intermediate_size or 4 * spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads, num_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k, max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps, rope_theta=spec.rope_theta, bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id, tie_word_embeddings=False, norm_topk_prob=spec.norm_topk_prob,
        decoder_sparse_step=1, mlp_only_layers=list(spec.dense_layers), use_sliding_window=False,
    )


def qwen2_hf_config(spec: ModelSpec) -> dict:
    return _hf_common(spec) | dict(qkv_bias=spec.attention_bias,
                                   shared_expert_intermediate_size=spec.shared_expert_size)


def qwen3_hf_config(spec: ModelSpec) -> dict:
    return _hf_common(spec) | dict(head_dim=spec.head_dim, attention_bias=spec.attention_bias)


_LAYOUT = dict(pre_attention=pre_attention, post_attention=post_attention, final_logits=final_logits,
               global_tensors=global_tensors, layer_tensors=layer_tensors, expert_tensors=expert_tensors,
               layer=layer, expert=expert,
               tensor_parallel=tensor_parallel)

QWEN2_MOE = Family(
    architecture="qwen2_moe", model_types=("qwen2_moe",), hf_class="Qwen2MoeForCausalLM",
    hf_config_class="Qwen2MoeConfig", spec_fields=qwen2_spec_fields, hf_config=qwen2_hf_config,
    implements={"attention_bias": (False, True), "norm_topk_prob": (False, True), "shared_expert_size": "any",
                "dense_layers": "any"},
    **_LAYOUT)

QWEN3_MOE = Family(
    architecture="qwen3_moe", model_types=("qwen3_moe",), hf_class="Qwen3MoeForCausalLM",
    hf_config_class="Qwen3MoeConfig", spec_fields=qwen3_spec_fields, hf_config=qwen3_hf_config,
    implements={"attention_bias": (False, True), "attention_out_bias": (False, True),
                "norm_topk_prob": (False, True), "qk_norm": ("head",), "dense_layers": "any"},
    check=check_all_four_biased,
    **_LAYOUT)
