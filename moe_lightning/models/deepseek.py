"""DeepSeek-V2 and DeepSeek-V3 (`deepseek_v2`, `deepseek_v3`): multi-head latent attention (MLA), routed
experts beside always-run shared experts, dense first layers, and their routers.

MLA. A token's K and V are both expanded from one latent: c = RMSNorm(x W_kv_a[:r]) of `kv_lora_rank`
r, plus one RoPE key k_pe of `qk_rope_head_dim` dr shared by every head; head h's key is
[W_uk[h] c | k_pe] and its value W_uv[h] c (W_uk, W_uv: the rows of `kv_b_proj`). The engine caches only
[c | k_pe] (r + dr values a token and a layer, against 2 nh (dn + dr) for the expanded K and V) and
runs attention absorbed, as DeepSeek-V2's paper (section 2.1.2) and FlashMLA do in decode:
    q' = [q_nope W_uk[h] | RoPE(q_pe)]            (per head: [r + dr])
    k' = [c | RoPE(k_pe)],  v' = c                (one KV head: k' [r + dr], v' = its first r values)
    o  = softmax(q' k'^T * scale) v' W_uv[h]^T    (then o_proj)
so the shared attention kernels see grouped-query attention with one KV head of K dim r + dr and V dim
r, and the cache's V is a view of its K (`ModelSpec.v_in_k`). The math equals transformers' (which
re-expands K and V from the cached latent every step) up to float rounding, not bit for bit.

Dense layers (`first_k_dense_replace`) run one SwiGLU MLP of `intermediate_size`; the others run the
routed experts plus `n_shared_experts` shared ones fused as one ungated SwiGLU of width
n_shared x `moe_intermediate_size`.

Routers, as transformers runs them (fp32 throughout):
- V2: softmax scores; `greedy` top-k, or `group_limited_greedy` (keep the `topk_group` groups of
  `n_group` with the highest max score, zero the rest); weights never renormalised; x `routed_scaling_factor`.
- V3 (`noaux_tc`): sigmoid scores; the choice adds `e_score_correction_bias`; a group's score is the sum
  of its two best choices; top-k of the kept groups' choices; weights are the scores without the bias,
  renormalised when `norm_topk_prob`; x `routed_scaling_factor`.
RoPE over dr only, on interleaved pairs (V2 always; V3 unless `rope_interleave` is false), with YaRN
(`rope_scaling` / `rope_parameters` of type yarn) as the published configs set it.
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
    rms_norm,
    rope_cos_sin,
    split,
    swiglu_mlp,
)
from moe_lightning.models.mixtral import final_logits, global_tensors  # the same final norm, head and names
from moe_lightning.models.qwen_moe import MLP_SPLITS

LATENT_EPS = 1e-6   # q_a_layernorm and kv_a_layernorm: transformers builds them with the default eps
DEEPSEEK_ROPE_THETA = 10000.0
# DeepseekV3Config's routing defaults (DeepSeek-V3's own), which transformers runs where config.json has no key
V3_ROUTING = {"routed_scaling_factor": 2.5, "n_group": 8, "topk_group": 4, "norm_topk_prob": True}


@dataclass
class LayerWeights(Weights):
    attn_norm: torch.Tensor                   # [H]
    wkv_a: torch.Tensor                       # [r + dr, H]        kv_a_proj_with_mqa
    kv_norm: torch.Tensor                     # [r]                kv_a_layernorm
    w_uk: torch.Tensor                        # [nh, dn, r]        kv_b_proj's key rows, per head
    w_uv: torch.Tensor                        # [nh, dv, r]        kv_b_proj's value rows, per head
    wo: torch.Tensor                          # [H, nh*dv]
    ffn_norm: torch.Tensor                    # [H]
    wq: torch.Tensor | None = None            # [nh*(dn+dr), H]    q_lora_rank null
    wq_a: torch.Tensor | None = None          # [rq, H]            else: q_a_proj,
    q_norm: torch.Tensor | None = None        # [rq]               q_a_layernorm,
    wq_b: torch.Tensor | None = None          # [nh*(dn+dr), rq]   q_b_proj
    router: torch.Tensor | None = None        # [E, H]             None in a dense layer
    router_bias: torch.Tensor | None = None   # [E]                V3's e_score_correction_bias
    shared_gate_proj: torch.Tensor | None = None   # [S, H]        the shared experts, fused
    shared_up_proj: torch.Tensor | None = None     # [S, H]
    shared_down_proj: torch.Tensor | None = None   # [H, S]
    mlp_gate: torch.Tensor | None = None      # [Fd, H]            a dense layer's MLP
    mlp_up: torch.Tensor | None = None        # [Fd, H]
    mlp_down: torch.Tensor | None = None      # [H, Fd]


def _pairs_to_halves(x: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE pairs (x0, x1), (x2, x3).. laid out as halves [x0 x2 .. | x1 x3 ..]: the
    half-split rotation then turns each pair by its own frequency (transformers' V3 interleave)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def pre_attention(lw: LayerWeights, x: torch.Tensor, positions: torch.Tensor,
                  spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] -> q' [T, nh, r + dr], k' [T, 1, r + dr], v' [T, 1, r] (a view of k'), absorbed MLA."""
    T, nh, dn, dr, r = x.shape[0], spec.num_heads, spec.qk_nope_head_dim, spec.head_dim, spec.kv_lora_rank
    h = rms_norm(x, lw.attn_norm, spec.rms_norm_eps)
    if lw.wq is not None:
        q = F.linear(h, lw.wq)
    else:
        q = F.linear(rms_norm(F.linear(h, lw.wq_a), lw.q_norm, LATENT_EPS), lw.wq_b)
    q = q.view(T, nh, dn + dr)
    kv = F.linear(h, lw.wkv_a)                                        # [T, r + dr]
    latent = rms_norm(kv[:, :r], lw.kv_norm, LATENT_EPS)
    q_pe, k_pe = q[..., dn:], kv[:, None, r:]
    if spec.rope_interleave:
        q_pe, k_pe = _pairs_to_halves(q_pe), _pairs_to_halves(k_pe)
    cos, sin = rope_cos_sin(positions, spec, x.dtype)
    q_lat = torch.bmm(q[..., :dn].transpose(0, 1), lw.w_uk).transpose(0, 1)   # [T, nh, r]
    q_out = torch.cat((q_lat, apply_rope(q_pe, cos, sin)), dim=-1)
    k = torch.cat((latent[:, None], apply_rope(k_pe, cos, sin)), dim=-1)      # [T, 1, r + dr]
    return q_out, k, k[..., :r]


def route(h: torch.Tensor, lw: LayerWeights, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """-> weights [T, k] fp32, expert ids [T, k]."""
    E, G = spec.num_experts, spec.n_group
    logits = F.linear(h.float(), lw.router.float())
    if spec.scoring_func == "softmax":   # V2
        scores = logits.softmax(dim=-1)
        if G > 1:   # group_limited_greedy: a group's score is its best expert's
            groups = scores.view(-1, G, E // G).max(dim=-1).values
            keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, spec.topk_group, dim=-1)[1], 1.0)
            scores = scores.masked_fill(~keep.bool().repeat_interleave(E // G, dim=1), 0.0)
        weights, ids = torch.topk(scores, spec.top_k, dim=-1)
        return weights * spec.routed_scaling_factor, ids
    scores = logits.sigmoid()           # V3, noaux_tc
    choice = scores + lw.router_bias.float()
    groups = choice.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
    keep = torch.zeros_like(groups).scatter_(1, torch.topk(groups, spec.topk_group, dim=-1)[1], 1.0)
    choice = choice.masked_fill(~keep.bool().repeat_interleave(E // G, dim=1), float("-inf"))
    ids = torch.topk(choice, spec.top_k, dim=-1)[1]
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * spec.routed_scaling_factor, ids


def post_attention(lw: LayerWeights, x: torch.Tensor, attn: torch.Tensor, spec: ModelSpec,
                   experts: ExpertStack | None, moe_kernel: MoEKernel) -> torch.Tensor:
    """x [T, H], attn [T, nh*r] (latent-space head outputs) -> next layer's input [T, H]."""
    T, nh, r = attn.shape[0], spec.num_heads, spec.kv_lora_rank
    heads = torch.bmm(attn.view(T, nh, r).transpose(0, 1), lw.w_uv.transpose(1, 2))   # [nh, T, dv]
    x = x + lw.reduce(F.linear(heads.transpose(0, 1).reshape(T, -1), lw.wo))
    del heads   # not held through the MoE below
    h = rms_norm(x, lw.ffn_norm, spec.rms_norm_eps)
    if lw.router is None:   # a dense layer
        return x + lw.reduce(swiglu_mlp(h, lw.mlp_gate, lw.mlp_up, lw.mlp_down))
    weights, ids = route(h, lw, spec)
    out = moe_kernel(h, weights, ids, experts)
    if lw.shared_gate_proj is not None:
        out = out + swiglu_mlp(h, lw.shared_gate_proj, lw.shared_up_proj, lw.shared_down_proj)
    return x + lw.reduce(out)


def tensor_parallel(spec: ModelSpec) -> dict:
    """MLA's heads split: the query projections (head-major rows), each head's absorbed up-projections
    and Wo's columns; the latent (kv_a, its norm) and q_a replicated, so every tensor rank keeps the
    whole latent cache. Shared experts and dense MLPs split on their intermediate rows."""
    return {"wq": split(0), "wq_b": split(0), "w_uk": split(0), "w_uv": split(0), "wo": split(-1),
            **MLP_SPLITS}


# ---- checkpoint layout ----

def layer_tensors(i: int, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    H, nh, r, dr = spec.hidden_size, spec.num_heads, spec.kv_lora_rank, spec.head_dim
    dn, dv, rq, S = spec.qk_nope_head_dim, spec.v_head_dim, spec.q_lora_rank, spec.shared_expert_size
    p, a, m = f"model.layers.{i}.", f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    out = {p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)}
    if rq:
        out |= {a + "q_a_proj.weight": (rq, H), a + "q_a_layernorm.weight": (rq,),
                a + "q_b_proj.weight": (nh * (dn + dr), rq)}
    else:
        out[a + "q_proj.weight"] = (nh * (dn + dr), H)
    out |= {a + "kv_a_proj_with_mqa.weight": (r + dr, H), a + "kv_a_layernorm.weight": (r,),
            a + "kv_b_proj.weight": (nh * (dn + dv), r), a + "o_proj.weight": (H, nh * dv)}
    if not spec.is_moe_layer(i):
        Fd = spec.dense_intermediate_size
        return out | {m + "gate_proj.weight": (Fd, H), m + "up_proj.weight": (Fd, H), m + "down_proj.weight": (H, Fd)}
    out[m + "gate.weight"] = (spec.num_experts, H)
    if spec.scoring_func == "sigmoid":
        out[m + "gate.e_score_correction_bias"] = (spec.num_experts,)
    if S:
        out |= {m + "shared_experts.gate_proj.weight": (S, H), m + "shared_experts.up_proj.weight": (S, H),
                m + "shared_experts.down_proj.weight": (H, S)}
    return out


def expert_tensors(i: int, e: int, spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    H, Fd, p = spec.hidden_size, spec.intermediate_size, f"model.layers.{i}.mlp.experts.{e}."
    return {p + "gate_proj.weight": (Fd, H), p + "up_proj.weight": (Fd, H), p + "down_proj.weight": (H, Fd)}


def layer(get: Getter, i: int, spec: ModelSpec) -> LayerWeights:
    a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    nh, dn, dv, r = spec.num_heads, spec.qk_nope_head_dim, spec.v_head_dim, spec.kv_lora_rank
    kv_b = get(a + "kv_b_proj.weight").view(nh, dn + dv, r)
    optional: dict = {}
    if spec.q_lora_rank:
        optional |= dict(wq_a=get(a + "q_a_proj.weight"), q_norm=get(a + "q_a_layernorm.weight"),
                         wq_b=get(a + "q_b_proj.weight"))
    else:
        optional["wq"] = get(a + "q_proj.weight")
    if not spec.is_moe_layer(i):
        optional |= dict(mlp_gate=get(m + "gate_proj.weight"), mlp_up=get(m + "up_proj.weight"),
                         mlp_down=get(m + "down_proj.weight"))
    else:
        optional["router"] = get(m + "gate.weight")
        if spec.scoring_func == "sigmoid":
            optional["router_bias"] = get(m + "gate.e_score_correction_bias")
        if spec.shared_expert_size:
            optional |= dict(shared_gate_proj=get(m + "shared_experts.gate_proj.weight"),
                             shared_up_proj=get(m + "shared_experts.up_proj.weight"),
                             shared_down_proj=get(m + "shared_experts.down_proj.weight"))
    return LayerWeights(
        attn_norm=get(f"model.layers.{i}.input_layernorm.weight"), wkv_a=get(a + "kv_a_proj_with_mqa.weight"),
        kv_norm=get(a + "kv_a_layernorm.weight"), w_uk=kv_b[:, :dn].contiguous(), w_uv=kv_b[:, dn:].contiguous(),
        wo=get(a + "o_proj.weight"), ffn_norm=get(f"model.layers.{i}.post_attention_layernorm.weight"), **optional)


def expert(get: Getter, i: int, e: int, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (w13 [2F, H] = gate_proj and up_proj fused, w2 [H, F] = down_proj)."""
    p = f"model.layers.{i}.mlp.experts.{e}."
    return torch.cat([get(p + "gate_proj.weight"), get(p + "up_proj.weight")], dim=0), get(p + "down_proj.weight")


# ---- config.json ----

def _spec_fields(cfg, version: int) -> dict:
    from moe_lightning.engine.hf_config import common_fields

    family_name = f"DeepSeek-V{version}"
    reads = ("moe_intermediate_size", "n_shared_experts", "first_k_dense_replace", "routed_scaling_factor",
             "scoring_func", "topk_method", "norm_topk_prob")
    out = common_fields(cfg, f"deepseek_v{version}", experts_key="n_routed_experts",
                        expert_size_key="moe_intermediate_size", family_name=family_name, implements=reads,
                        head_dim_key=False, default_rope_theta=DEEPSEEK_ROPE_THETA, rope_types=("default", "yarn"),
                        default_eps=1e-6, default_eos=2 if version == 2 else 1,
                        default_max_positions=2048 if version == 2 else 4096)
    layers, experts = out["num_layers"], out["num_experts"]
    r, rq = cfg.positive_int("kv_lora_rank"), cfg.count("q_lora_rank", 0, minimum=1)
    dn, dr, dv = (cfg.positive_int(k) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    if dr % 2:
        raise cfg.fail(f"qk_rope_head_dim={dr} must be even (RoPE turns pairs)")
    freq = cfg.get("moe_layer_freq", 1)
    if freq != 1:
        raise cfg.fail(f"moe_layer_freq={freq!r} is not implemented by the {family_name} path (1 only: every "
                       "layer from first_k_dense_replace on is an MoE layer)")
    first = cfg.count("first_k_dense_replace", 0)
    if first >= layers:
        raise cfg.fail(f"first_k_dense_replace={first} must be below num_hidden_layers={layers}")
    shared = cfg.count("n_shared_experts", 0)
    # Where config.json leaves them out, transformers runs its config class's defaults: V3's are its routing
    defaults = V3_ROUTING if version == 3 else {"routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1}
    scale = cfg.positive_number("routed_scaling_factor", cfg.get("routed_scaling_factor",
                                                                 defaults["routed_scaling_factor"]))
    n_group = cfg.count("n_group", 1, minimum=1) if "n_group" in cfg.cfg else defaults["n_group"]
    topk_group = cfg.count("topk_group", 1, minimum=1) if "topk_group" in cfg.cfg else defaults["topk_group"]
    norm = cfg.get("norm_topk_prob", False)
    if version == 2:
        scoring, method = cfg.get("scoring_func", "softmax"), cfg.get("topk_method", "greedy")
        if scoring not in ("softmax", None):
            raise cfg.fail(f"scoring_func={scoring!r} is not implemented by the DeepSeek-V2 path (softmax only)")
        if method not in ("greedy", "group_limited_greedy", None):
            raise cfg.fail(f"topk_method={method!r} is not implemented by the DeepSeek-V2 path (greedy, "
                           "group_limited_greedy)")
        if norm not in (False, None):   # transformers' V2 ignores it, DeepSeek's own code honours it
            raise cfg.fail(f"norm_topk_prob={norm!r}: DeepSeek-V2's routing weights are not renormalised by "
                           "transformers (false only)")
        if method != "group_limited_greedy":
            n_group = topk_group = 1
        norm, interleave, mtp = False, True, 0
    else:
        scoring, method = cfg.get("scoring_func", "sigmoid"), cfg.get("topk_method", "noaux_tc")
        if scoring not in ("sigmoid", None) or method not in ("noaux_tc", None):
            raise cfg.fail(f"scoring_func={scoring!r}, topk_method={method!r}: the DeepSeek-V3 path implements "
                           "sigmoid scoring with noaux_tc routing only")
        norm = cfg.flag("norm_topk_prob", False) if "norm_topk_prob" in cfg.cfg else V3_ROUTING["norm_topk_prob"]
        interleave = cfg.flag("rope_interleave", True)
        scoring = "sigmoid"
        mtp = cfg.count("num_nextn_predict_layers", cfg.count("num_mtp_layers", 0))
    if experts % n_group or not 1 <= topk_group <= n_group:
        raise cfg.fail(f"n_group={n_group} must divide n_routed_experts={experts}, with topk_group={topk_group} "
                       "in [1, n_group]")
    if scoring == "sigmoid" and experts // n_group < 2:
        raise cfg.fail(f"n_routed_experts / n_group = {experts // n_group}: noaux_tc scores a group by its two "
                       "best experts (2 or more per group)")
    dense = list(range(first))
    return out | dict(
        head_dim=dr, kv_lora_rank=r, q_lora_rank=rq, qk_nope_head_dim=dn, v_head_dim=dv,
        rope_interleave=interleave, scoring_func=scoring, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=scale, norm_topk_prob=norm, shared_expert_size=shared * out["intermediate_size"],
        shared_expert_gate=False, dense_layers=dense, mtp_layers=mtp,
        dense_intermediate_size=cfg.positive_int("intermediate_size") if dense else 0,
        **cfg.yarn(family_name))


def v2_spec_fields(cfg) -> dict:
    return _spec_fields(cfg, 2)


def v3_spec_fields(cfg) -> dict:
    return _spec_fields(cfg, 3)


def hf_config(spec: ModelSpec) -> dict:
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_type == "yarn":
        rope = {"rope_type": "yarn", "rope_theta": spec.rope_theta, "factor": spec.yarn_factor,
                "original_max_position_embeddings": spec.yarn_original_max_positions,
                "beta_fast": spec.yarn_beta_fast, "beta_slow": spec.yarn_beta_slow,
                "mscale": spec.yarn_mscale, "mscale_all_dim": spec.yarn_mscale_all_dim}
        rope |= {} if spec.yarn_truncate else {"truncate": False}
    out = dict(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, moe_intermediate_size=spec.intermediate_size,
        intermediate_size=spec.dense_intermediate_size or 4 * spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
        n_routed_experts=spec.num_experts, num_experts_per_tok=spec.top_k,
        n_shared_experts=spec.shared_expert_size // spec.intermediate_size,
        first_k_dense_replace=len(spec.dense_layers), kv_lora_rank=spec.kv_lora_rank,
        q_lora_rank=spec.q_lora_rank or None, qk_nope_head_dim=spec.qk_nope_head_dim,
        qk_rope_head_dim=spec.head_dim, v_head_dim=spec.v_head_dim, n_group=spec.n_group,
        topk_group=spec.topk_group, routed_scaling_factor=spec.routed_scaling_factor,
        max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=spec.rms_norm_eps,
        rope_parameters=rope, bos_token_id=spec.bos_token_id, eos_token_id=spec.eos_token_id,
        tie_word_embeddings=False, attention_bias=False)
    if spec.scoring_func == "softmax":
        return out | dict(topk_method="group_limited_greedy" if spec.n_group > 1 else "greedy", norm_topk_prob=False)
    return out | dict(norm_topk_prob=spec.norm_topk_prob, rope_interleave=spec.rope_interleave,
                      num_nextn_predict_layers=spec.mtp_layers)


def check(spec: ModelSpec) -> None:
    from moe_lightning.errors import ConfigError

    if not spec.mla:
        raise ConfigError(f"model.kv_lora_rank=0: the {spec.architecture} layer math is multi-head latent "
                          "attention (kv_lora_rank > 0, with qk_nope_head_dim and v_head_dim)")
    if spec.dense_layers != list(range(len(spec.dense_layers))):
        raise ConfigError(f"model.dense_layers={spec.dense_layers}: {spec.architecture}'s dense layers are its first "
                          "ones (first_k_dense_replace), [0, 1, .., k-1]")
    if spec.scoring_func == "sigmoid" and spec.num_experts // spec.n_group < 2:
        raise ConfigError(f"model.n_group={spec.n_group}: sigmoid routing scores a group by its two best experts "
                          "(2 or more experts per group)")
    if spec.shared_expert_size % spec.intermediate_size:
        raise ConfigError(f"model.shared_expert_size={spec.shared_expert_size}: DeepSeek's shared experts are "
                          f"n_shared_experts x intermediate_size ({spec.intermediate_size}) wide")


_LAYOUT = dict(pre_attention=pre_attention, post_attention=post_attention, final_logits=final_logits,
               global_tensors=global_tensors, layer_tensors=layer_tensors, expert_tensors=expert_tensors,
               layer=layer, expert=expert, hf_config=hf_config, check=check,
               tensor_parallel=tensor_parallel)
_MLA = {"kv_lora_rank": "any", "q_lora_rank": "any", "qk_nope_head_dim": "any", "v_head_dim": "any",
        "rope_interleave": (True, False), "shared_expert_size": "any", "shared_expert_gate": (False,),
        "rope_type": ("default", "yarn"), "yarn_truncate": (True, False), "routed_scaling_factor": "any",
        "dense_layers": "any"}

DEEPSEEK_V2 = Family(
    architecture="deepseek_v2", model_types=("deepseek_v2",), hf_class="DeepseekV2ForCausalLM",
    hf_config_class="DeepseekV2Config", spec_fields=v2_spec_fields,
    implements=_MLA | {"norm_topk_prob": (False,), "scoring_func": ("softmax",), "n_group": "any",
                       "topk_group": "any", "rope_interleave": (True,)},
    **_LAYOUT)

DEEPSEEK_V3 = Family(
    architecture="deepseek_v3", model_types=("deepseek_v3",), hf_class="DeepseekV3ForCausalLM",
    hf_config_class="DeepseekV3Config", spec_fields=v3_spec_fields,
    implements=_MLA | {"norm_topk_prob": (False, True), "scoring_func": ("sigmoid",), "n_group": "any",
                       "topk_group": "any", "mtp_layers": "any"},
    **_LAYOUT)
