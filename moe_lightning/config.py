"""The typed vocabulary of a run: what model, on what hardware, for what workload, with what policy.

These dataclasses are the single source of truth for every concept. Hydra's ConfigStore registers them
(`moe_lightning.conf.store`), YAML files in `conf/` only fill them in, and plain Python code can build
them directly. Validation happens once, in `__post_init__`, with messages that name the key and the
accepted values.

Units: memory capacities in `_gib` are GiB (2^30 bytes, as `torch.cuda.mem_get_info` and nvidia-smi
count them), bandwidths in `_gbps` are decimal GB/s (1e9 bytes, not bits), compute peaks in `_tflops`
are 1e12 FLOP/s.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from moe_lightning.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
EXPERT_KERNELS = ("auto", "loop", "grouped", "padded", "dense")
GB = 1e9        # bandwidths and byte counts moved (decimal)
GiB = 2**30     # memory capacities


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _positive(obj: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value is not None and value > 0, f"{prefix}.{name}", f"must be > 0, got {value}")


def _fraction(obj: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(0.0 <= value <= 1.0, f"{prefix}.{name}", f"must be in [0, 1], got {value}")


def _choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"got {value!r}; accepted: {', '.join(choices)}")


# A measured run waits out, and re-times in, a host running slowed for up to this long (`hostload.HostSpeed`).
HOST_WAIT_S = 30.0


def check_repeats(repeats: int, max_cv: float, prefix: str, min_repeat_s: float = 0.0,
                  host_wait_s: float = 0.0) -> None:
    """Settings of a measured run: timed repeats, the noise threshold, the shortest repeat, the time it
    may wait for a slowed host."""
    _check(min_repeat_s >= 0, f"{prefix}.min_repeat_s", f"must be >= 0, got {min_repeat_s!r}")
    check_host_wait(host_wait_s, prefix)
    _check(isinstance(repeats, int) and repeats >= 1, f"{prefix}.repeats", f"must be an integer >= 1, got {repeats!r}")
    _check(0 < max_cv < 10, f"{prefix}.max_cv", f"must be in (0, 10) (a coefficient of variation), got {max_cv!r}")


def check_host_wait(host_wait_s: float, prefix: str) -> None:
    _check(host_wait_s >= 0, f"{prefix}.host_wait_s", f"must be >= 0 (0: never wait), got {host_wait_s!r}")


def check_warmup(warmup_tokens: int, prefix: str) -> None:
    """The untimed warm-up of a measured run: tokens generated first (0: none)."""
    _check(isinstance(warmup_tokens, int) and not isinstance(warmup_tokens, bool) and warmup_tokens >= 0,
           f"{prefix}.warmup_tokens", f"must be an integer >= 0 (0: no warm-up), got {warmup_tokens!r}")


def check_finite(obj: object, prefix: str = "") -> None:
    """Every float of a config dataclass is a finite number: its own fields, its nested dataclasses' and
    the values of its lists. Each class's checks compare its fields with bounds, which NaN fails but
    infinity passes (`inf > 0`), and an infinite setting then breaks whatever uses it: an integer
    conversion (OverflowError), a JSON document (`Infinity` is not JSON). `RunConfig` calls this over the
    whole config, so no float field of any group needs its own check."""
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_finite(value, key)
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
        _check(not bad, key, f"must be a finite number, got {value}")


def _curve(xs: list, ys: list, key: str) -> None:
    """A measured curve: as many values as points, points increasing, values positive."""
    where = f"{key}_*"
    _check(len(xs) == len(ys), where, f"{len(xs)} points but {len(ys)} values")
    _check(all(x > 0 for x in xs) and all(a < b for a, b in zip(xs, xs[1:])), where,
           f"points must be positive and increasing, got {list(xs)}")
    _check(all(y > 0 for y in ys), where, f"values must be > 0, got {list(ys)}")


ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dbrx", "deepseek_v2", "deepseek_v3", "gpt_oss")
QK_NORMS = ("none", "head", "full")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "yarn")
EXPERT_ACTS = ("silu", "clamped_swiglu")
EXPERT_FORMATS = ("dense", "mxfp4")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 mscale ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass
class ModelSpec:
    """Architecture of an MoE decoder: the shapes every family shares, and the features that tell the
    families apart (`attention_bias` onwards). Each family (`moe_lightning.models`) implements some
    values of those features and refuses the rest; the memory plan and the HRM count them here.
    `intermediate_size` is one routed expert's FFN dim (Qwen's and DeepSeek's `moe_intermediate_size`);
    under multi-head latent attention `head_dim` is the RoPE dim (`qk_rope_head_dim`) and the attention
    kernels see the `attn_*` dims below."""

    name: str = "tiny-mixtral"
    architecture: str = "mixtral"   # the layer math: one module per family in moe_lightning.models
    num_layers: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    num_experts: int = 8
    top_k: int = 2
    vocab_size: int = 512
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    dtype: str = "float32"          # auto: the checkpoint's own dtype
    # "checkpoint": read `path` (a Hugging Face folder); "random": real shapes, seeded random values.
    weights: str = "checkpoint"
    path: str | None = None
    seed: int = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # How generation stops and penalises, as transformers' generate takes them from the checkpoint's
    # generation_config.json (else config.json; `engine.hf_generation`): the ids a sequence stops on, any
    # of them, when they are not just eos_token_id ([]: none); and RepetitionPenaltyLogitsProcessor's
    # penalty (1.0: none; sampling.repetition_penalty overrides it).
    eos_token_ids: list[int] | None = None
    repetition_penalty: float = 1.0
    # Features some families have (each family says which values it implements):
    attention_bias: bool = False    # biases on the Q/K/V projections (Qwen2-MoE's qkv_bias)
    qk_norm: str = "none"           # RMSNorm of q and k: per head (Qwen3-MoE) or over all heads (OLMoE)
    norm_topk_prob: bool = True     # renormalise the top-k routing weights to sum to 1
    shared_expert_size: int = 0     # FFN dim of an always-resident shared expert with a sigmoid gate (Qwen2-MoE)
    clip_qkv: float | None = None   # clamp Q, K, V to [-c, c] (OLMoE, DBRX)
    # Dense layers: their FFN is one SwiGLU MLP of FFN dim `dense_intermediate_size`, resident, with no
    # router and no routed experts (Qwen-MoE's mlp_only_layers / decoder_sparse_step, DeepSeek's
    # first_k_dense_replace). Nothing of theirs streams.
    dense_layers: list[int] = field(default_factory=list)
    dense_intermediate_size: int = 0
    shared_expert_gate: bool = True  # the shared expert behind a sigmoid gate (Qwen2-MoE); DeepSeek's has none
    # Multi-head latent attention (DeepSeek-V2/V3), when kv_lora_rank > 0: each token caches one latent of
    # kv_lora_rank and one RoPE key of head_dim (the RoPE dim, `qk_rope_head_dim`) for all heads.
    kv_lora_rank: int = 0
    q_lora_rank: int = 0            # 0: q_proj straight from the hidden state
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False   # RoPE turns interleaved pairs (x0, x1), .. instead of halves
    # Routing beyond softmax top-k (DeepSeek): sigmoid scores with a correction bias, expert groups.
    scoring_func: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # RoPE scaling: YaRN (DeepSeek's published configs); mscale 0 means absent.
    rope_type: str = "default"
    yarn_factor: float = 1.0
    yarn_original_max_positions: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 0.0
    yarn_mscale_all_dim: float = 0.0
    yarn_truncate: bool = True      # the interpolation ramp's dim bounds floored and ceiled (gpt-oss: false)
    # gpt-oss: attention sinks (a learned logit per query head, an extra key column in the softmax that
    # takes probability mass and gives no value), sliding-window attention on `sliding_layers` (a token
    # attends to itself and the sliding_window - 1 before it), a bias on o_proj (beside Q/K/V's
    # attention_bias), on the router and on each expert's two projections, and its clamped SwiGLU:
    # (clamp(up, +-limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit).
    attention_sinks: bool = False
    sliding_window: int = 0         # 0: no window
    sliding_layers: list[int] = field(default_factory=list)
    attention_out_bias: bool = False   # a bias on o_proj too (gpt-oss; Qwen3-MoE's and OLMoE's attention_bias)
    router_bias: bool = False
    expert_bias: bool = False
    expert_act: str = "silu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # How the checkpoint stores the routed experts: "mxfp4" (gpt-oss's published checkpoints: 4-bit e2m1
    # values in blocks of 32 sharing one power-of-two scale), dequantized to the run's dtype as they load.
    expert_format: str = "dense"
    # Multi-token-prediction modules a checkpoint carries after its last layer (DeepSeek-V3's
    # num_nextn_predict_layers): their tensors may be present and are not read, as transformers ignores
    # them; greedy decoding predicts one token a step.
    mtp_layers: int = 0
    # One rank's share of a model (`engine.parallel.rank_spec`) holds fewer experts than its router scores:
    # the router's rows and the experts' biases stay every expert's. 0: num_experts (a whole model).
    router_experts: int = 0

    def __post_init__(self) -> None:
        _choice(self.architecture, "model.architecture", ARCHITECTURES)
        _choice(self.qk_norm, "model.qk_norm", QK_NORMS)
        _check(isinstance(self.shared_expert_size, int) and self.shared_expert_size >= 0,
               "model.shared_expert_size", f"must be an integer >= 0, got {self.shared_expert_size!r}")
        _check(self.clip_qkv is None or self.clip_qkv > 0, "model.clip_qkv",
               f"must be > 0 or null, got {self.clip_qkv!r}")
        _choice(self.dtype, "model.dtype", ("auto", *DTYPES))
        _choice(self.weights, "model.weights", ("checkpoint", "random"))
        _positive(self, "model", "num_layers", "hidden_size", "intermediate_size", "num_heads",
                  "num_kv_heads", "head_dim", "num_experts", "top_k", "vocab_size",
                  "max_position_embeddings", "rope_theta", "rms_norm_eps")
        _check(self.num_heads % self.num_kv_heads == 0, "model.num_heads",
               f"must be a multiple of model.num_kv_heads ({self.num_heads} vs {self.num_kv_heads})")
        _check(self.top_k <= self.num_experts, "model.top_k",
               f"must be <= model.num_experts ({self.top_k} > {self.num_experts})")
        dense = list(self.dense_layers)
        _check(all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers for i in dense)
               and dense == sorted(set(dense)), "model.dense_layers",
               f"must be distinct layer indices in [0, {self.num_layers}) in increasing order, got {dense}")
        _check(len(dense) < self.num_layers, "model.dense_layers",
               f"every one of the {self.num_layers} layers is dense: no routed experts for an MoE engine to run "
               "(keep more layers, e.g. a larger model.num_layers)")
        _check(isinstance(self.dense_intermediate_size, int) and (self.dense_intermediate_size > 0 or not dense)
               and self.dense_intermediate_size >= 0, "model.dense_intermediate_size",
               f"must be an integer > 0 when model.dense_layers is set, got {self.dense_intermediate_size!r}")
        self.dense_layers = dense
        _choice(self.scoring_func, "model.scoring_func", SCORING_FUNCS)
        _choice(self.rope_type, "model.rope_type", ROPE_TYPES)
        for name in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0, f"model.{name}",
                   f"must be an integer >= 0, got {value!r}")
        if self.mla:
            _check(self.qk_nope_head_dim > 0 and self.v_head_dim > 0 and self.head_dim % 2 == 0,
                   "model.kv_lora_rank", "multi-head latent attention needs qk_nope_head_dim > 0, v_head_dim > 0 "
                   f"and an even head_dim (the RoPE dim), got {self.qk_nope_head_dim}, {self.v_head_dim}, "
                   f"{self.head_dim}")
        _check(self.n_group >= 1 and self.num_experts % self.n_group == 0, "model.n_group",
               f"must divide model.num_experts ({self.n_group} vs {self.num_experts})")
        _check(1 <= self.topk_group <= self.n_group, "model.topk_group",
               f"must be in [1, model.n_group={self.n_group}], got {self.topk_group}")
        _positive(self, "model", "routed_scaling_factor")
        if self.rope_type == "yarn":
            _positive(self, "model", "yarn_factor", "yarn_original_max_positions", "yarn_beta_fast",
                      "yarn_beta_slow")
        _check(isinstance(self.sliding_window, int) and not isinstance(self.sliding_window, bool)
               and self.sliding_window >= 0, "model.sliding_window",
               f"must be an integer >= 0 (0: no window), got {self.sliding_window!r}")
        sliding = list(self.sliding_layers)
        _check(all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_layers for i in sliding)
               and sliding == sorted(set(sliding)), "model.sliding_layers",
               f"must be distinct layer indices in [0, {self.num_layers}) in increasing order, got {sliding}")
        _check(bool(sliding) == bool(self.sliding_window), "model.sliding_layers",
               f"set both or neither of model.sliding_window ({self.sliding_window}) and model.sliding_layers "
               f"({sliding})")
        self.sliding_layers = sliding
        _check(isinstance(self.mtp_layers, int) and not isinstance(self.mtp_layers, bool) and self.mtp_layers >= 0,
               "model.mtp_layers", f"must be an integer >= 0, got {self.mtp_layers!r}")
        _check(isinstance(self.router_experts, int) and self.router_experts >= 0, "model.router_experts",
               f"must be an integer >= 0 (0: model.num_experts), got {self.router_experts!r}")
        _choice(self.expert_act, "model.expert_act", EXPERT_ACTS)
        _choice(self.expert_format, "model.expert_format", EXPERT_FORMATS)
        _check(self.expert_format != "mxfp4" or (self.hidden_size % 32 == 0 and self.intermediate_size % 32 == 0),
               "model.expert_format", "mxfp4 stores blocks of 32 values: hidden_size and intermediate_size must be "
               f"multiples of 32, got {self.hidden_size} and {self.intermediate_size}")
        _positive(self, "model", "swiglu_alpha", "swiglu_limit")
        if self.eos_token_ids is not None:
            ids = list(self.eos_token_ids)
            _check(all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.vocab_size for i in ids),
                   "model.eos_token_ids", f"must be token ids in [0, model.vocab_size={self.vocab_size}) or null, "
                   f"got {ids}")
            self.eos_token_ids = ids
        _positive(self, "model", "repetition_penalty")

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The ids a generated sequence stops on (any of them)."""
        if self.eos_token_ids is not None:
            return tuple(self.eos_token_ids)
        return () if self.eos_token_id is None else (self.eos_token_id,)

    # Derived sizes, in elements unless the name says bytes.
    @property
    def dtype_bytes(self) -> int:
        return 4 if self.dtype == "float32" else 2  # "auto" (checkpoint dtype) plans as 16-bit

    # Attention as the kernels and caches see it. MLA runs absorbed (`models.deepseek`): one KV head whose
    # K is [latent | RoPE key] and whose V is the latent, K's first kv_lora_rank values (a view: the
    # cache stores K only).
    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def cache_kv_heads(self) -> int:
        return 1 if self.mla else self.num_kv_heads

    @property
    def attn_k_dim(self) -> int:
        """Per head, the dim of q and k as attention multiplies them."""
        return self.kv_lora_rank + self.head_dim if self.mla else self.head_dim

    @property
    def attn_v_dim(self) -> int:
        """Per head, the dim of v and of attention's output."""
        return self.kv_lora_rank if self.mla else self.head_dim

    @property
    def v_in_k(self) -> bool:
        return self.mla

    @property
    def attn_scale(self) -> float:
        """The softmax scale: 1/sqrt(q.k dim), MLA's over its unabsorbed (nope + rope) dims, with YaRN's
        temperature squared where `yarn_mscale_all_dim` is set (DeepSeek)."""
        if not self.mla:
            return self.head_dim ** -0.5
        scale = (self.qk_nope_head_dim + self.head_dim) ** -0.5
        if self.rope_type == "yarn" and self.yarn_mscale_all_dim:
            scale *= yarn_mscale(self.yarn_factor, self.yarn_mscale_all_dim) ** 2
        return scale

    @property
    def kv_token_layer_elements(self) -> int:
        """Cached values of one token in one layer: K and V (K only when V is a view of it)."""
        return self.cache_kv_heads * (self.attn_k_dim + (0 if self.v_in_k else self.attn_v_dim))

    @property
    def qkv_elements(self) -> int:
        """q, k and v of one token as attention takes them (v not counted apart when a view of k)."""
        return self.num_heads * self.attn_k_dim + self.kv_token_layer_elements

    @property
    def attn_out_elements(self) -> int:
        """Attention's output of one token (the latent-space head outputs under MLA)."""
        return self.num_heads * self.attn_v_dim

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_bytes(self) -> int:
        """One routed expert in the run's dtype, as the kernels read it (and as resident experts are held)."""
        return self.expert_params * self.dtype_bytes

    @property
    def expert_stream_bytes(self) -> int:
        """One streamed expert as it is held on the CPU and crosses the link: MXFP4 experts as stored (4 bits
        a weight and a byte of scale per 32: `models.mxfp4`), dequantized on the GPU; else expert_bytes."""
        if self.expert_format == "mxfp4":
            return 3 * self.hidden_size * self.intermediate_size * 17 // 32
        return self.expert_bytes

    @property
    def attention_params(self) -> int:
        """Q, K, V and O projections, with their biases and q/k norms where the model has them."""
        return sum(self.attention_tensor_sizes)

    @property
    def attention_tensor_sizes(self) -> list[int]:
        """Elements of each attention tensor: projections, then biases and norms (MLA: q (or q_a, its norm,
        q_b), kv_a, its norm, kv_b split into its key and value rows, o)."""
        H, nh = self.hidden_size, self.num_heads
        if self.mla:
            r, dr, dn, dv, rq = (self.kv_lora_rank, self.head_dim, self.qk_nope_head_dim, self.v_head_dim,
                                 self.q_lora_rank)
            q = [rq * H, rq, nh * (dn + dr) * rq] if rq else [nh * (dn + dr) * H]
            return q + [(r + dr) * H, r, nh * dn * r, nh * dv * r, H * nh * dv]
        hd = self.head_dim
        q, kv = nh * hd, self.num_kv_heads * hd
        out = [q * H, kv * H, kv * H, H * q]
        out += [q, kv, kv] if self.attention_bias else []
        out += [H] if self.attention_out_bias else []
        out += [nh] if self.attention_sinks else []
        return out + {"none": [], "head": [hd, hd], "full": [q, kv]}[self.qk_norm]

    @property
    def attention_in_params(self) -> int:
        """Projection weights applied before attention (MLA: with kv_b's key rows, absorbed into q)."""
        if self.mla:
            return self.attention_params - self.attention_tensor_sizes[-2] - self.attention_tensor_sizes[-1]
        return self.attention_params - self.attention_tensor_sizes[3]

    @property
    def attention_out_params(self) -> int:
        return self.attention_params - self.attention_in_params

    @property
    def shared_expert_params(self) -> int:
        """The shared expert (SwiGLU) and its sigmoid gate where it has one: resident, run on every token."""
        if not self.shared_expert_size:
            return 0
        return 3 * self.hidden_size * self.shared_expert_size + self.hidden_size * self.shared_expert_gate

    @property
    def router_params(self) -> int:
        """The router, and its per-expert bias: DeepSeek-V3's score correction, gpt-oss's logit bias."""
        return (self.router_experts or self.num_experts) * (self.hidden_size + (self.scoring_func == "sigmoid")
                                                             + self.router_bias)

    @property
    def expert_bias_params(self) -> int:
        """Every routed expert's biases of one layer (gpt-oss), held with the layer, not paged."""
        return (self.router_experts or self.num_experts) * (2 * self.intermediate_size + self.hidden_size) \
            if self.expert_bias else 0

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window in tokens, None for full attention."""
        return self.sliding_window if layer in self.sliding_layers else None

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def num_moe_layers(self) -> int:
        """Layers with a router and routed experts (the others are `dense_layers`)."""
        return self.num_layers - len(self.dense_layers)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @property
    def dense_mlp_params(self) -> int:
        """A dense layer's SwiGLU MLP (gate, up, down)."""
        return 3 * self.hidden_size * self.dense_intermediate_size

    @property
    def layer_non_expert_params(self) -> int:
        """Everything of an MoE layer but its routed experts: attention, two norms, router, shared expert, and
        the routed experts' biases where the model has them."""
        return (self.attention_params + 2 * self.hidden_size + self.router_params + self.shared_expert_params
                + self.expert_bias_params)

    @property
    def dense_layer_params(self) -> int:
        """Everything of a dense layer: attention, two norms, its MLP."""
        return self.attention_params + 2 * self.hidden_size + self.dense_mlp_params

    @property
    def non_expert_tensor_sizes(self) -> list[int]:
        """Elements of each non-expert tensor (embedding, final norm, LM head, then every layer's), the
        projections counted apart (a family that fuses them holds fewer, larger tensors): each is carved
        from a pool at an aligned offset, so the plan rounds each one up."""
        H, S, Fd = self.hidden_size, self.shared_expert_size, self.dense_intermediate_size
        E = self.router_experts or self.num_experts   # the router's rows and the expert biases: every expert's
        attention = self.attention_tensor_sizes
        layer = [H, H, *attention, E * H] + ([E] if self.scoring_func == "sigmoid" else [])
        layer += [E] if self.router_bias else []
        layer += [E * 2 * self.intermediate_size, E * H] if self.expert_bias else []
        layer += [S * H, S * H, H * S] + ([H] if self.shared_expert_gate else []) if S else []
        dense = [H, H, *attention, Fd * H, Fd * H, H * Fd]
        return [self.vocab_size * H, H, self.vocab_size * H] + [
            n for i in range(self.num_layers) for n in (layer if self.is_moe_layer(i) else dense)]

    @property
    def non_expert_params(self) -> int:
        embeddings = 2 * self.vocab_size * self.hidden_size  # untied embedding and LM head
        return (self.num_moe_layers * self.layer_non_expert_params + len(self.dense_layers) * self.dense_layer_params
                + embeddings + self.hidden_size)

    @property
    def streamed_weight_bytes(self) -> int:
        """Every weight as the engine holds it when every routed expert streams: the experts as they stream
        (MXFP4: 4-bit pages), the rest in the run's dtype."""
        return (self.non_expert_params * self.dtype_bytes
                + self.num_moe_layers * self.num_experts * self.expert_stream_bytes)

    @property
    def total_params(self) -> int:
        return self.non_expert_params + self.num_moe_layers * self.num_experts * self.expert_params

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of the KV cache for one token across all layers (MLA: its latent and RoPE key)."""
        return self.num_layers * self.kv_token_layer_elements * self.dtype_bytes


@dataclass
class GpuSpec:
    name: str = "cpu-as-gpu"
    count: int = 1
    memory_gib: float = 8.0
    bandwidth_gbps: float = 10.0
    peak_tflops: float = 0.1
    usable_fraction: float = 0.86
    # The CPU plays the GPU (a CPU-only machine): every resource runs on the host's cores and memory bus,
    # so the simulator makes concurrent tasks share them instead of overlapping for free.
    shares_host: bool = False
    # Measured by task=calibrate (empty: every kernel runs at peak_tflops). Achieved TFLOP/s of a GEMM
    # with gemm_rows[n] rows (tokens), and of the engine's fastest expert kernel (EPS-MoE choice) at
    # expert_loads[n] tokens per expert: small GEMMs fall far short of the peak, which the simulator
    # charges; the HRM keeps the paper's peaks.
    gemm_rows: list[int] = field(default_factory=list)
    gemm_tflops: list[float] = field(default_factory=list)
    expert_loads: list[int] = field(default_factory=list)
    expert_tflops: list[float] = field(default_factory=list)
    # A CPU-only host (shares_host): the curves above are at the GPU role's share of the cores while CPU
    # attention overlaps it (the thread budget's split, `moe_lightning.threads`); these are the same
    # curves with the GPU role on every core, its layout when nothing overlaps it (one micro-batch, or
    # attention on the "GPU"). Empty: the split curves serve both layouts.
    gemm_tflops_all_cores: list[float] = field(default_factory=list)
    expert_tflops_all_cores: list[float] = field(default_factory=list)


@dataclass
class CpuSpec:
    name: str = "cpu"
    cores: int = 2
    memory_gib: float = 16.0   # the cpu preset's: two thirds of a 24 GiB host, the GPU role holding the rest
    bandwidth_gbps: float = 10.0
    peak_tflops: float = 0.1
    usable_fraction: float = 0.8
    attn_gbps: float = 0.0  # measured decode attention, GB/s of K/V read (task=calibrate); 0: roofline


@dataclass
class LinkSpec:
    """CPU<->GPU link, per GPU. Opposite directions overlap; the same direction is serial."""

    h2d_gbps: float = 5.0
    d2h_gbps: float = 5.0


INTERCONNECT_KINDS = ("none", "pcie", "nvlink")


@dataclass
class InterconnectSpec:
    """GPU<->GPU link of a several-GPU machine, per GPU and per direction (decimal GB/s), as collectives
    achieve it (NCCL's bus bandwidth), and its per-message latency. `kind`: none (one GPU), pcie (peer to
    peer over PCIe, possibly through the host bridge) or nvlink. `shared_host_link`: the GPUs' host links
    hang off one PCIe switch whose uplink is the `link` bandwidth, so the ranks' concurrent H2D streams
    divide it; False: each GPU has its own host link at `link` bandwidth."""

    kind: str = "none"
    bandwidth_gbps: float = 0.0
    latency_us: float = 0.0
    shared_host_link: bool = False


@dataclass
class HardwareSpec:
    name: str = "cpu"
    gpu: GpuSpec = None  # type: ignore[assignment]  # filled in __post_init__ (mutable default)
    cpu: CpuSpec = None  # type: ignore[assignment]
    link: LinkSpec = None  # type: ignore[assignment]
    # Between the GPUs (several-GPU profiles; absent or kind none on one GPU).
    interconnect: InterconnectSpec = None  # type: ignore[assignment]
    # The engine executor's measured cost per task (dependency hand-off, launch) and per graph (worker
    # threads started and joined around one prefill or decode step); 0: simulator defaults.
    task_overhead_us: float = 0.0
    step_overhead_us: float = 0.0
    # The issuing thread's measured cost per task issued and per host barrier (FlexGen's sync(): thread
    # wake-ups, on CUDA a device-wide synchronize); 0: simulator defaults (tuner/costs.py).
    issue_overhead_us: float = 0.0
    sync_overhead_us: float = 0.0

    def __post_init__(self) -> None:
        self.gpu = self.gpu if self.gpu is not None else GpuSpec()
        self.cpu = self.cpu if self.cpu is not None else CpuSpec()
        self.link = self.link if self.link is not None else LinkSpec()
        self.interconnect = self.interconnect if self.interconnect is not None else InterconnectSpec()
        _choice(self.interconnect.kind, "hardware.interconnect.kind", INTERCONNECT_KINDS)
        for name in ("bandwidth_gbps", "latency_us"):
            value = getattr(self.interconnect, name)
            _check(value >= 0, f"hardware.interconnect.{name}", f"must be >= 0, got {value}")
        _positive(self.gpu, "hardware.gpu", "count", "memory_gib", "bandwidth_gbps", "peak_tflops")
        _positive(self.cpu, "hardware.cpu", "cores", "memory_gib", "bandwidth_gbps", "peak_tflops")
        _positive(self.link, "hardware.link", "h2d_gbps", "d2h_gbps")
        _fraction(self.gpu, "hardware.gpu", "usable_fraction")
        _fraction(self.cpu, "hardware.cpu", "usable_fraction")
        _check(self.cpu.attn_gbps >= 0, "hardware.cpu.attn_gbps", f"must be >= 0, got {self.cpu.attn_gbps}")
        for name in ("task_overhead_us", "step_overhead_us", "issue_overhead_us", "sync_overhead_us"):
            _check(getattr(self, name) >= 0, f"hardware.{name}", f"must be >= 0, got {getattr(self, name)}")
        _curve(self.gpu.gemm_rows, self.gpu.gemm_tflops, "hardware.gpu.gemm")
        _curve(self.gpu.expert_loads, self.gpu.expert_tflops, "hardware.gpu.expert")
        for rows, name in ((self.gpu.gemm_rows, "gemm_tflops_all_cores"),
                           (self.gpu.expert_loads, "expert_tflops_all_cores")):
            if getattr(self.gpu, name):
                _curve(rows, getattr(self.gpu, name), f"hardware.gpu.{name.removesuffix('_tflops_all_cores')}")

    @classmethod
    def from_dict(cls, d: dict) -> HardwareSpec:
        """A hardware profile as conf/hardware/*.yaml writes it (raises KeyError / TypeError if not one)."""
        link = d.get("interconnect")   # profiles written before several-GPU planning have none
        return cls(name=d["name"], gpu=GpuSpec(**d["gpu"]), cpu=CpuSpec(**d["cpu"]), link=LinkSpec(**d["link"]),
                   interconnect=InterconnectSpec(**link) if link else None,
                   **{k: d.get(k, 0.0) for k in ("task_overhead_us", "step_overhead_us", "issue_overhead_us",
                                                 "sync_overhead_us")})

    @property
    def gpu_budget_bytes(self) -> int:
        """Usable memory of one GPU: what one rank plans against (several GPUs are several ranks, each with
        its own budget, never one pooled GPU: `moe_lightning.tuner.parallel`)."""
        return int(self.gpu.memory_gib * GiB * self.gpu.usable_fraction)

    @property
    def cpu_budget_bytes(self) -> int:
        return int(self.cpu.memory_gib * GiB * self.cpu.usable_fraction)


# The numbers a hardware profile must give: the dataclasses' defaults are the CPU runner's (the `cpu`
# preset), so a profile file missing one would silently describe part of another machine. The rest
# (usable fractions, calibrated curves, overheads, interconnect) have documented neutral defaults.
REQUIRED_HARDWARE_FIELDS = ("name", "gpu.name", "gpu.count", "gpu.memory_gib", "gpu.bandwidth_gbps", "gpu.peak_tflops",
                            "cpu.name", "cpu.cores", "cpu.memory_gib", "cpu.bandwidth_gbps", "cpu.peak_tflops",
                            "link.h2d_gbps", "link.d2h_gbps")


def missing_hardware_fields(profile: dict) -> list[str]:
    """The REQUIRED_HARDWARE_FIELDS a profile's YAML (as a dict) does not give."""
    def given(key: str) -> bool:
        node: object = profile
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    return [key for key in REQUIRED_HARDWARE_FIELDS if not given(key)]


@dataclass
class Workload:
    """What is asked of the model: prompt lengths, generation length, how many requests.

    Without `path`, prompts are synthetic token ids with lengths drawn (seeded) around
    `prompt_len_avg`, capped at `prompt_len_max`. With `path`, prompts come from a JSONL file.
    """

    name: str = "synthetic"
    prompt_len_avg: int = 16
    prompt_len_max: int = 32
    gen_len: int = 16
    num_requests: int = 8
    padding: bool = False
    path: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "workload", "prompt_len_avg", "prompt_len_max", "gen_len", "num_requests")
        _check(self.name != "jsonl" or bool(self.path), "workload.path",
               "is required for workload=jsonl (a prompts JSONL file)")
        _check(self.prompt_len_avg <= self.prompt_len_max, "workload.prompt_len_avg",
               f"must be <= workload.prompt_len_max ({self.prompt_len_avg} > {self.prompt_len_max})")


@dataclass
class Sampling:
    """Token selection. temperature 0 is greedy; otherwise seeded temperature + top-p sampling. A
    checkpoint's generation_config.json never changes these (its sampling settings are not applied)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False
    # transformers' repetition penalty over each sequence's prompt and output (1.0: none); null: the
    # model's (its generation_config.json's repetition_penalty, else 1.0)
    repetition_penalty: float | None = None

    def __post_init__(self) -> None:
        _check(self.temperature >= 0, "sampling.temperature", f"must be >= 0, got {self.temperature}")
        _check(0 < self.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {self.top_p}")
        _check(self.repetition_penalty is None or self.repetition_penalty > 0, "sampling.repetition_penalty",
               f"must be > 0 or null, got {self.repetition_penalty}")


@dataclass(frozen=True)
class Policy:
    """One run's placement and batching knobs: (N, mu, A_g, F_g, r_w, r_c) plus engine knobs.

    Built with keyword arguments only. Derived values are properties.
    """

    batch_size: int = 8                 # N: sequences through the whole model per decode step
    micro_batch_size: int = 4           # mu: sequences per GPU kernel invocation
    attn_on_gpu: bool = False           # A_g
    ffn_on_gpu: bool = True             # F_g
    expert_gpu_fraction: float = 0.0    # r_w: share of expert weights resident on the GPU
    kv_gpu_fraction: float = 0.0        # r_c: share of the KV cache resident on the GPU
    pages_per_layer: int = 0            # 0: as many pages as micro-batches (CGOPipe's choice)
    prefetch_depth: int = 2             # pages the CPU->pinned copy worker runs ahead
    expert_kernel: str = "auto"         # auto: chosen per call by tokens per expert
    kv_dtype: str = "auto"              # auto: the model dtype (the only one implemented; others are refused)
    weight_dtype: str = "auto"          # likewise
    # MXFP4 experts (gpt-oss): streamed experts the GPU dequantizes at a time into its dtype scratch. 0: a
    # whole layer's, once per layer; fewer: the layer's experts in groups of this many, each group that a
    # micro-batch routes to dequantized again for it (a smaller scratch, more GPU passes).
    dequant_experts: int = 0

    def __post_init__(self) -> None:
        _positive(self, "policy", "batch_size", "micro_batch_size")
        _check(self.micro_batch_size <= self.batch_size, "policy.micro_batch_size",
               f"must be <= policy.batch_size ({self.micro_batch_size} > {self.batch_size})")
        _fraction(self, "policy", "expert_gpu_fraction", "kv_gpu_fraction")
        _check(self.pages_per_layer >= 0, "policy.pages_per_layer",
               f"must be >= 0 (0 = one page per micro-batch), got {self.pages_per_layer}")
        _check(self.prefetch_depth >= 1, "policy.prefetch_depth", f"must be >= 1, got {self.prefetch_depth}")
        _check(isinstance(self.dequant_experts, int) and self.dequant_experts >= 0, "policy.dequant_experts",
               f"must be an integer >= 0 (0: a whole layer's streamed experts), got {self.dequant_experts!r}")
        _choice(self.expert_kernel, "policy.expert_kernel", EXPERT_KERNELS)
        _choice(self.kv_dtype, "policy.kv_dtype", ("auto", *DTYPES))
        _choice(self.weight_dtype, "policy.weight_dtype", ("auto", *DTYPES))
        # Weights and the KV cache are held in the model's dtype; another dtype for either is not built yet,
        # and a field that changes the math is refused rather than ignored.
        for key, what in (("kv_dtype", "the KV cache"), ("weight_dtype", "the weights")):
            value = getattr(self, key)
            _check(value == "auto", f"policy.{key}", f"got {value!r}: {what} in a dtype other than the model's is "
                   f"not implemented (auto: model.dtype); set model.dtype={value} to run the whole model in {value}")

    @property
    def num_micro_batches(self) -> int:
        return math.ceil(self.batch_size / self.micro_batch_size)

    @property
    def num_pages(self) -> int:
        return self.pages_per_layer or self.num_micro_batches


# The fields a policy rule decides (the HRM plan, a baseline's own chooser): batching, placement, the
# page schedule and the MXFP4 scratch (the plan sizes it to fit its batch: a simulation or run that kept
# the default whole-layer scratch would not fit the budget the plan was made for). The expert kernel
# stays the user's under any rule.
RULE_FIELDS = ("batch_size", "micro_batch_size", "attn_on_gpu", "ffn_on_gpu", "expert_gpu_fraction",
               "kv_gpu_fraction", "pages_per_layer", "prefetch_depth", "dequant_experts")


def mark_given(policy: Policy, names: Iterable[str]) -> None:
    """Record the fields the user gave `policy` explicitly (the command line's `policy.*` overrides and the
    fields a config file of theirs sets, `cli.config_policy_fields`): a rule that would replace one must
    refuse it even when its value is the default, which comparing values cannot see. Kept on the instance
    only: a policy derived by `dataclasses.replace` is the program's."""
    object.__setattr__(policy, "_given", frozenset(names))


def set_policy_fields(policy: Policy, names: tuple[str, ...] = RULE_FIELDS) -> dict[str, object]:
    """The fields among `names` that `policy` sets: given explicitly (`mark_given`), whatever the value, or
    away from their defaults (a config file, a policy built in code)."""
    default, given = Policy(), getattr(policy, "_given", frozenset())
    return {n: getattr(policy, n) for n in names if n in given or getattr(policy, n) != getattr(default, n)}


def refuse_ignored_fields(policy: Policy, why: str, instead: str, names: tuple[str, ...] = RULE_FIELDS) -> None:
    """Raise ConfigError naming the first of `names` that `policy` sets, which `why` would replace."""
    set_here = set_policy_fields(policy, names)
    if set_here:
        name, value = next(iter(set_here.items()))
        shown = str(value).lower() if isinstance(value, bool) else value   # as the command line spells it
        raise ConfigError(f"policy.{name}={shown}: {why}, so it would be ignored; {instead}")


def ruled_policy(chosen: Policy, given: Policy, rule: str, instead: str) -> Policy:
    """`given` with the fields `rule` decides taken from `chosen`. A field the user set that the rule
    decides would be silently replaced: it is refused, and `instead` says how to run it."""
    refuse_ignored_fields(given, f"{rule} chooses the policy's batching and placement", instead)
    return dataclasses.replace(given, **{n: getattr(chosen, n) for n in RULE_FIELDS})


def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


@dataclass
class TunerConfig:
    """The Optuna search (task=tune): objective, budget, storage, seeding."""

    objective: str = "measure"         # measure: run the engine in a child process; simulate: the simulator
    n_trials: int = 8                  # total over all workers (completed, pruned and failed count)
    repeats: int = 3                   # measured trials: timed repeats after a warm-up; the objective is the median
    max_cv: float = 0.10               # a measured trial whose throughput varies more than this is noisy ...
    remeasure: int = 1                 # ... and is measured again this many times (the steadiest is kept)
    min_repeat_s: float = 0.25         # a shorter workload is run several times per repeat (pyperf's loops)
    host_wait_s: float = HOST_WAIT_S   # a trial waits out a slowed host, re-timing its repeats, this long at most
    trial_timeout_s: float = 300.0     # a measured trial running longer is killed and recorded as failed
    trial_memory_gib: float = 0.0       # 0: no limit; else the child's address-space cap (a trial OOM fails)
    storage: str | None = None         # SQLAlchemy URL; None: SQLite under results/studies/
    study_name: str | None = None      # None: system, model, hardware, workload and the config's fingerprint
    workers: int = 1                   # processes sharing the study
    seed: int = 0
    seed_with_hrm: bool = True         # enqueue the HRM optimum and its neighbours first
    neighbours: int = 4
    multi_objective: bool = False      # throughput vs peak GPU memory: the Pareto front
    max_batch_size: int = 0            # 0: the workload's number of requests
    max_micro_batches: int = 64
    heartbeat_s: int = 10              # a RUNNING trial silent for 3 heartbeats is failed on resume

    def __post_init__(self) -> None:
        _choice(self.objective, "tuner.objective", ("measure", "simulate"))
        _positive(self, "tuner", "n_trials", "trial_timeout_s", "workers", "max_micro_batches")
        _check(self.trial_memory_gib >= 0, "tuner.trial_memory_gib", f"must be >= 0, got {self.trial_memory_gib}")
        check_repeats(self.repeats, self.max_cv, "tuner", self.min_repeat_s, self.host_wait_s)
        _check(self.remeasure >= 0, "tuner.remeasure", f"must be >= 0, got {self.remeasure}")
        _check(0 <= self.seed < 2**32, "tuner.seed", f"must be 0 to 2**32 - 1 (the sampler's seed), got {self.seed}")
        _check(self.max_batch_size >= 0, "tuner.max_batch_size",
               f"must be >= 0 (0: the workload's number of requests), got {self.max_batch_size}")


PIN_CHOICES = ("auto", "one", "none")


@dataclass
class ThreadsConfig:
    """Intra-op threads per engine worker (`moe_lightning.threads` plans them); 0: planned from the
    detected cores. Set a field only to try another layout: the planned one is the fast one."""

    cores: int = 0              # cores the run may use; 0: detected (affinity, cgroup quota, OMP_NUM_THREADS)
    gpu: int = 0                # the GPU role (on a CPU-only host, the thread that plays the GPU)
    cpu: int = 0                # CPU attention
    copy: int = 0               # pageable -> pinned copy worker
    h2d: int = 0
    d2h: int = 0
    main: int = 0               # the main thread (sampling, reference engine, accelerate)
    serial: bool = False        # debug: one thread runs every task in issue order, nothing overlaps
    pin: str = "auto"           # bind the engine's threads to one core: auto (planned), one, none

    def __post_init__(self) -> None:
        _check(self.pin in PIN_CHOICES, "threads.pin", f"must be one of {', '.join(PIN_CHOICES)}, got {self.pin!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("serial", "pin"):
                continue
            _check(isinstance(value, int) and value >= 0, f"threads.{f.name}",
                   f"must be an integer >= 0 (0 = planned), got {value!r}")
        teams = [f"threads.{f.name}={getattr(self, f.name)}" for f in fields(self)
                 if f.name not in ("cores", "serial", "pin") and getattr(self, f.name) > 1]
        _check(self.pin != "one" or not teams, "threads.pin",
               f"one with {', '.join(teams)}: bound to one core the engine runs one thread per team, and a team of "
               "more takes turns through OpenMP's spin-waits (measured ~150x slower); set threads.pin=none, or "
               "drop the team sizes")


@dataclass
class ParallelConfig:
    """Several ranks (one per GPU; on a CPU-only host, processes sharing its cores) over torch.distributed:
    `tensor` = T splits attention heads and each expert's intermediate dimension, `expert` = E splits
    the experts; T x E ranks, rank = e T + t (a tensor group's ranks are adjacent). 1 x 1: one process."""

    tensor: int = 1             # T
    expert: int = 1             # E
    chunks: int = 0             # EPS-MoE's pipelined all-to-all: chunks per MoE layer; 0: from the comm model
    backend: str = "auto"       # auto: nccl on CUDA, gloo on the CPU

    def __post_init__(self) -> None:
        for name in ("tensor", "expert"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, f"parallel.{name}", f"must be an integer >= 1, got {value!r}")
        _check(isinstance(self.chunks, int) and self.chunks >= 0, "parallel.chunks",
               f"must be an integer >= 0 (0 = from the communication model), got {self.chunks!r}")
        _choice(self.backend, "parallel.backend", ("auto", "gloo", "nccl"))

    @property
    def world_size(self) -> int:
        return self.tensor * self.expert

    def model_problems(self, spec: ModelSpec) -> list[str]:
        """Why this split cannot run `spec` (empty: it can), one phrase each: T must divide the heads, the KV
        heads (but MLA's, whose latent cache every tensor rank keeps whole) and every intermediate size, E
        the experts; MXFP4 experts stream whole, as stored, so they split over experts only."""
        T, E, out = self.tensor, self.expert, []
        sizes = [("num_heads", spec.num_heads)] + ([] if spec.mla else [("num_kv_heads", spec.num_kv_heads)])
        sizes += [("intermediate_size", spec.intermediate_size)]
        sizes += [("shared_expert_size", spec.shared_expert_size)] if spec.shared_expert_size else []
        sizes += [("dense_intermediate_size", spec.dense_intermediate_size)] if spec.dense_layers else []
        out += [f"parallel.tensor={T} does not divide model.{name}={value}" for name, value in sizes if value % T]
        if T > 1 and spec.expert_format != "dense":
            out.append(f"parallel.tensor={T}: {spec.expert_format} experts stream as the checkpoint stores them, "
                       "whole; split them over experts (parallel.expert) instead")
        if spec.num_experts % E:
            out.append(f"parallel.expert={E} does not divide model.num_experts={spec.num_experts}")
        return out

    def group_policy(self, policy: Policy) -> Policy:
        """An expert group's share of the machine's `policy` (data-parallel attention: each of the E groups
        runs its own 1/E of the requests): N / E sequences in micro-batches of mu / E."""
        E = self.expert
        if E == 1:
            return policy
        if policy.batch_size % E or policy.micro_batch_size % E:
            raise ConfigError(f"policy.batch_size={policy.batch_size} and policy.micro_batch_size="
                              f"{policy.micro_batch_size} must be multiples of parallel.expert={E} (each expert "
                              "group holds an equal share of the batch)")
        return dataclasses.replace(policy, batch_size=policy.batch_size // E,
                                   micro_batch_size=policy.micro_batch_size // E)
