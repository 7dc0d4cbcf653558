"""gpt-oss (`gpt_oss`): GQA with biases on all four projections, attention sinks, sliding-window and full
layers alternating, YaRN RoPE, a biased router whose top-k logits are softmaxed, and experts with biases
and a clamped SwiGLU. As transformers' GptOssForCausalLM runs it:

- RMSNorm keeps its weight in fp32 (`_keep_in_fp32_modules`): out = (w * x32 * rsqrt(mean x32^2 + eps)).to(dtype).
- Attention: softmax over [q.k^T / sqrt(hd) (masked) | s_h], one learned sink logit per head, whose column
  is dropped after the softmax (a row's weights sum below 1). Layers in `layer_types` marked
  sliding_attention see the token itself and the `sliding_window` - 1 before it.
- Router: logits = x W^T + b; the top-k logits, softmaxed among themselves (in the activation dtype).
- Experts: z = x W_gu + b_gu with gate and up interleaved (z[0::2], z[1::2]); g = min(gate, limit),
  u = clamp(up, -limit, limit); y = ((u + 1) g sigmoid(alpha g)) W_d + b_d.

Checkpoint layout: a layer's experts fused, `mlp.experts.gate_up_proj` [E, H, 2F] and `down_proj` [E, F, H]
applied as x @ W, or in the published checkpoints as MXFP4 (`quantization_config.quant_method` mxfp4):
`*_blocks` uint8 [E, R, C/32, 16] and `*_scales` uint8 [E, R, C/32] of the [R, C] = [2F, H] and [H, F]
matrices applied as x W^T. The engine's canonical expert is w13 = [gate rows | up rows] [2F, H], w2 [H, F],
so the interleaved gate/up rows (and their biases, and MXFP4's rows of blocks and scales) are
de-interleaved once, as they load. MXFP4 experts (`models.mxfp4`) stream as stored, 4-bit pages that the
engine dequantizes on the GPU; resident experts and the reference engine's are dequantized as they load.
"""

from __future__ import annotations

import dataclasses
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
    clamped_swiglu,
    once,
    rope_cos_sin,
    split,
    split_halves,
)
from moe_lightning.models.mixtral import global_tensors  # the same embedding, final norm and head names
from moe_lightning.models.mxfp4 import dequantize, largest_scale, matrix_shapes

GPT_OSS_ROPE_THETA = 150000.0   # GptOssConfig.default_theta


@dataclass
class LayerWeights(Weights):
    attn_norm: torch.Tensor        # [H]
    wq: torch.Tensor               # [nq*hd, H]
    wk: torch.Tensor               # [nkv*hd, H]
    wv: torch.Tensor               # [nkv*hd, H]
    wo: torch.Tensor               # [H, nq*hd]
    sinks: torch.Tensor            # [nq]
    ffn_norm: torch.Tensor         # [H]
    router: torch.Tensor           # [E, H]
    router_bias: torch.Tensor      # [E]
    b13: torch.Tensor              # [E, 2F]  the experts' gate_up biases, de-interleaved: [gate | up]
    b2: torch.Tensor               # [E, H]   their down_proj biases
    bq: torch.Tensor | None = None   # [nq*hd]   attention_bias
    bk: torch.Tensor | None = None
    bv: torch.Tensor | None = None
    bo: torch.Tensor | None = None   # [H]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """gpt-oss's RMSNorm: the weight applied in fp32, then cast (Mixtral's casts first)."""
    x32 = x.float()
    return (weight.float() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)


def pre_attention(lw: LayerWeights, x: torch.Tensor, positions: torch.Tensor,
                  spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], positions [T] -> q [T, nq, hd], k [T, nkv, hd], v [T, nkv, hd]."""
    T = x.shape[0]
    h = rms_norm(x, lw.attn_norm, spec.rms_norm_eps)
    q = F.linear(h, lw.wq, lw.bq).view(T, spec.num_heads, spec.head_dim)
    k = F.linear(h, lw.wk, lw.bk).view(T, spec.num_kv_heads, spec.head_dim)
    v = F.linear(h, lw.wv, lw.bv).view(T, spec.num_kv_heads, spec.head_dim)
    cos, sin = rope_cos_sin(positions, spec, x.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def route(h: torch.Tensor, lw: LayerWeights, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """-> weights [T, k] (softmax over the top-k logits, in h's dtype), expert ids [T, k]."""
    top, ids = torch.topk(F.linear(h, lw.router, lw.router_bias), spec.top_k, dim=-1)
    return torch.softmax(top, dim=1, dtype=top.dtype), ids


def post_attention(lw: LayerWeights, x: torch.Tensor, attn: torch.Tensor, spec: ModelSpec,
                   experts: ExpertStack, moe_kernel: MoEKernel) -> torch.Tensor:
    """x [T, H] residual stream, attn [T, nq*hd] -> next layer's input [T, H]."""
    x = x + lw.reduce(F.linear(attn, lw.wo, lw.bo))
    h = rms_norm(x, lw.ffn_norm, spec.rms_norm_eps)
    weights, ids = route(h, lw, spec)
    stack = dataclasses.replace(experts, b13=lw.b13, b2=lw.b2,
                                act=clamped_swiglu(spec.swiglu_alpha, spec.swiglu_limit))
    return x + lw.reduce(moe_kernel(h, weights, ids, stack))


def final_logits(x: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    return F.linear(rms_norm(x, norm, spec.rms_norm_eps), lm_head)


def attention_sinks(lw: LayerWeights) -> torch.Tensor:
    return lw.sinks


def tensor_parallel(spec: ModelSpec) -> dict:
    """Heads with their biases and sinks column-parallel, Wo row-parallel (its bias added once); the
    experts' gate/up biases split with their rows, their down bias added once."""
    return {"wq": split(0), "wk": split(0), "wv": split(0), "bq": split(0), "bk": split(0), "bv": split(0),
            "sinks": split(0), "wo": split(-1), "bo": once, "b13": split_halves(-1), "b2": once}


# ---- checkpoint layout ----

def _halves(t: torch.Tensor) -> torch.Tensor:
    """Interleaved gate/up along the last dim -> [gate | up]."""
    return torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)


def layer_tensors(i: int, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    H, E, F2 = spec.hidden_size, spec.num_experts, 2 * spec.intermediate_size
    q, kv, p, a = (spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, f"model.layers.{i}.",
                   f"model.layers.{i}.self_attn.")
    out = {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
           a + "q_proj.weight": (q, H), a + "k_proj.weight": (kv, H), a + "v_proj.weight": (kv, H),
           a + "o_proj.weight": (H, q), a + "sinks": (spec.num_heads,),
           p + "mlp.router.weight": (E, H), p + "mlp.router.bias": (E,),
           p + "mlp.experts.gate_up_proj_bias": (E, F2), p + "mlp.experts.down_proj_bias": (E, H)}
    if spec.attention_bias:
        out |= {a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,), a + "o_proj.bias": (H,)}
    return out


def expert_tensors(i: int, e: int, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The layer's fused expert tensors, listed once (with expert 0): every expert lives in them."""
    if e:
        return {}
    H, Fd, E, p = spec.hidden_size, spec.intermediate_size, spec.num_experts, f"model.layers.{i}.mlp.experts."
    if spec.expert_format == "mxfp4":
        (gu_b, gu_s), (d_b, d_s) = matrix_shapes(2 * Fd, H), matrix_shapes(H, Fd)
        return {p + "gate_up_proj_blocks": (E, *gu_b), p + "gate_up_proj_scales": (E, *gu_s),
                p + "down_proj_blocks": (E, *d_b), p + "down_proj_scales": (E, *d_s)}
    return {p + "gate_up_proj": (E, H, 2 * Fd), p + "down_proj": (E, Fd, H)}


def layer(get: Getter, i: int, spec: ModelSpec) -> LayerWeights:
    p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
    biases = {}
    if spec.attention_bias:
        biases = dict(bq=get(a + "q_proj.bias"), bk=get(a + "k_proj.bias"), bv=get(a + "v_proj.bias"),
                      bo=get(a + "o_proj.bias"))
    return LayerWeights(
        attn_norm=get(p + "input_layernorm.weight"), wq=get(a + "q_proj.weight"), wk=get(a + "k_proj.weight"),
        wv=get(a + "v_proj.weight"), wo=get(a + "o_proj.weight"), sinks=get(a + "sinks"),
        ffn_norm=get(p + "post_attention_layernorm.weight"), router=get(p + "mlp.router.weight"),
        router_bias=get(p + "mlp.router.bias"), b13=_halves(get(p + "mlp.experts.gate_up_proj_bias")),
        b2=get(p + "mlp.experts.down_proj_bias"), **biases)


def expert(get: Getter, i: int, e: int, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's slices of the fused tensors -> (w13 [2F, H] = [gate | up], w2 [H, F]), dequantized where
    the checkpoint stores MXFP4."""
    p, rows = f"model.layers.{i}.mlp.experts.", (e, e + 1)
    if spec.expert_format == "mxfp4":
        dtype = get(p + "down_proj_bias", rows).dtype   # the run's dtype
        gu_blocks, gu_scales, d_blocks, d_scales = expert_packed(get, i, e, spec, dtype)
        return dequantize(gu_blocks, gu_scales, dtype), dequantize(d_blocks, d_scales, dtype)
    gate_up, down = get(p + "gate_up_proj", rows)[0], get(p + "down_proj", rows)[0]      # [H, 2F], [F, H]
    return _halves(gate_up).t().contiguous(), down.t().contiguous()


def expert_packed(get: Getter, i: int, e: int, spec: ModelSpec, dtype: torch.dtype | None = None
                  ) -> tuple[torch.Tensor, ...]:
    """Expert e of an MXFP4 checkpoint as stored, with gate/up's rows de-interleaved ([gate | up], as w13):
    -> (w13 blocks [2F, H/32, 16], w13 scales [2F, H/32], w2 blocks [H, F/32, 16], w2 scales [H, F/32]),
    uint8. A scale whose values would not be finite in `dtype` (the run's) is refused, naming it."""
    p, rows = f"model.layers.{i}.mlp.experts.", (e, e + 1)
    if dtype is None:
        dtype = get(p + "down_proj_bias", rows).dtype
    out = []
    for name in ("gate_up_proj", "down_proj"):
        blocks, scales = get(p + name + "_blocks", rows)[0], get(p + name + "_scales", rows)[0]
        if int(scales.max()) > largest_scale(dtype):   # E8M0's 255 is NaN; above, 6 x 2^(s-127) overflows
            from moe_lightning.errors import CheckpointError

            raise CheckpointError(f"tensor {p + name + '_scales'!r}: expert {e}'s scales make values beyond "
                                  f"{str(dtype).removeprefix('torch.')} (a corrupt checkpoint?)")
        if name == "gate_up_proj":
            blocks, scales = (torch.cat((t[0::2], t[1::2])) for t in (blocks, scales))
        out += [blocks.contiguous(), scales.contiguous()]
    return tuple(out)


# ---- config.json ----

SLIDING, FULL = "sliding_attention", "full_attention"
DEFAULT_WINDOW = 128   # GptOssConfig.sliding_window
# GptOssConfig's RoPE where config.json gives neither rope_parameters nor rope_scaling: YaRN, not the
# default RoPE (the published checkpoints write it out; a config.json without it still runs it).
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}


def spec_fields(cfg) -> dict:
    from moe_lightning.engine.hf_config import _Config, common_fields, shown

    if cfg.get("rope_parameters", None) is None and not cfg.get("rope_scaling", None):
        cfg = _Config(cfg.cfg | {"rope_parameters": dict(DEFAULT_ROPE)}, cfg.path)
    out = common_fields(cfg, "gpt_oss", experts_key="num_local_experts", expert_size_key="intermediate_size",
                        family_name="gpt-oss", default_rope_theta=GPT_OSS_ROPE_THETA, rope_types=("default", "yarn"),
                        implements=("attention_bias", "quantization_config", "sliding_window", "layer_types",
                                    "hidden_act"), default_max_positions=131072)
    layers = out["num_layers"]
    # GptOssConfig's 128 where config.json has no key (null: no window)
    window = cfg.count("sliding_window", 0, minimum=1) if "sliding_window" in cfg.cfg else DEFAULT_WINDOW
    types = cfg.get("layer_types", None)
    if types is None:   # GptOssConfig's default: sliding first, then alternating
        types = [SLIDING if i % 2 == 0 else FULL for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in (SLIDING, FULL) for t in types):
        raise cfg.fail(f"layer_types={shown(types)} must list {layers} entries (num_hidden_layers), each "
                       f"{SLIDING!r} or {FULL!r}")
    sliding = [i for i, t in enumerate(types) if t == SLIDING] if window else []
    window = window if sliding else 0   # every layer full: the window is read by none (as in transformers)
    quant = cfg.get("quantization_config", None)
    expert_format = "dense"
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        if method != "mxfp4":
            raise cfg.fail(f"quantization_config={shown(quant)} is not implemented by the gpt-oss path "
                           "(quant_method mxfp4 only: the published checkpoints' experts)")
        expert_format = "mxfp4"
        for key, cols in (("hidden_size", out["hidden_size"]), ("intermediate_size", out["intermediate_size"])):
            if cols % 32:
                raise cfg.fail(f"{key}={cols} must be a multiple of 32 under MXFP4 (blocks of 32 values)")
    bias = cfg.flag("attention_bias", True)   # GptOssConfig's default
    alpha = cfg.positive_number("swiglu_alpha", cfg.get("swiglu_alpha", 1.702))
    limit = cfg.positive_number("swiglu_limit", cfg.get("swiglu_limit", 7.0))
    return out | dict(attention_bias=bias, attention_out_bias=bias, attention_sinks=True, sliding_window=window,
                      sliding_layers=sliding, router_bias=True, expert_bias=True, expert_act="clamped_swiglu",
                      swiglu_alpha=alpha, swiglu_limit=limit, expert_format=expert_format,
                      **cfg.yarn("gpt-oss"))


def hf_config(spec: ModelSpec) -> dict:
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_type == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": spec.rope_theta, "factor": spec.yarn_factor,
                "original_max_position_embeddings": spec.yarn_original_max_positions,
                "beta_fast": spec.yarn_beta_fast, "beta_slow": spec.yarn_beta_slow, "truncate": spec.yarn_truncate}
    out = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, num_local_experts=spec.num_experts, num_experts_per_tok=spec.top_k,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=spec.rms_norm_eps, rope_parameters=rope,
        sliding_window=spec.sliding_window or None,
        layer_types=[SLIDING if i in spec.sliding_layers else FULL for i in range(spec.num_layers)],
        attention_bias=spec.attention_bias, swiglu_alpha=spec.swiglu_alpha, swiglu_limit=spec.swiglu_limit,
        bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id, pad_token_id=None, tie_word_embeddings=False)
    if spec.expert_format == "mxfp4":
        out["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return out


def check(spec: ModelSpec) -> None:
    from moe_lightning.errors import ConfigError

    if spec.attention_bias != spec.attention_out_bias:
        raise ConfigError(f"model.attention_out_bias={str(spec.attention_out_bias).lower()}: gpt-oss biases all four "
                          "attention projections or none (set it equal to model.attention_bias)")


FAMILY = Family(
    architecture="gpt_oss", model_types=("gpt_oss",), hf_class="GptOssForCausalLM", hf_config_class="GptOssConfig",
    pre_attention=pre_attention, post_attention=post_attention, final_logits=final_logits,
    global_tensors=global_tensors, layer_tensors=layer_tensors, expert_tensors=expert_tensors, layer=layer,
    expert=expert, spec_fields=spec_fields, hf_config=hf_config, check=check, attention_sinks=attention_sinks,
    expert_packed=expert_packed, tensor_parallel=tensor_parallel,
    implements={"attention_bias": (False, True), "attention_out_bias": (False, True), "attention_sinks": (True,),
                "sliding_window": "any", "sliding_layers": "any", "router_bias": (True,), "expert_bias": (True,),
                "expert_act": ("clamped_swiglu",), "rope_type": ("default", "yarn"), "yarn_truncate": (True, False),
                "expert_format": ("dense", "mxfp4")},
)
