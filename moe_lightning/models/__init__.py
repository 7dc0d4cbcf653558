"""Model families: what the engines, schedules, baselines and loaders know of a model, and nothing more.

Each family is one module of plain functions over its per-layer weights dataclass (gpt-fast style), and
exposes one `Family`: its layer math split where CGOPipe splits a layer, its checkpoint layout (tensor
names and shapes, and how they assemble into the canonical weights), its config.json mapping with the
fields it refuses, and the `ModelSpec` feature values it implements. The engines call only these.

Every family streams its routed experts as fused SwiGLU pairs (w13 [2F, H] = gate and up, w2 [H, F]), so
the expert kernels, the paged expert cache and the memory plan serve all of them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from moe_lightning.config import ModelSpec
from moe_lightning.errors import ConfigError

# A checkpoint tensor by its Hugging Face name; with rows (start, stop), only those rows (one expert of a
# tensor that fuses a layer's experts), read without the rest.
Getter = Callable[..., torch.Tensor]
TensorShapes = Iterator[tuple[str, tuple[int, ...]]]


@dataclass(frozen=True)
class Family:
    architecture: str                  # ModelSpec.architecture
    model_types: tuple[str, ...]       # config.json model_type values it reads
    hf_class: str                      # transformers' causal-LM class (the accelerate peer, parity tests)
    hf_config_class: str
    # Layer math (see moe_lightning.models.layers): placement-free.
    pre_attention: Callable            # (lw, x [T, H], positions [T], spec) -> q, k, v
    post_attention: Callable           # (lw, x, attn [T, nq*hd], spec, experts, moe_kernel) -> x
    final_logits: Callable             # (x, norm, lm_head, spec) -> logits
    # Checkpoint layout: names and shapes of everything but the experts, per layer, and of one expert.
    global_tensors: Callable[[ModelSpec], dict[str, tuple[int, ...]]]   # embedding, final norm, LM head
    layer_tensors: Callable[[int, ModelSpec], dict[str, tuple[int, ...]]]
    expert_tensors: Callable[[int, int, ModelSpec], dict[str, tuple[int, ...]]]
    layer: Callable[[Getter, int, ModelSpec], object]                   # -> its LayerWeights
    expert: Callable[[Getter, int, int, ModelSpec], tuple[torch.Tensor, torch.Tensor]]  # -> (w13, w2)
    # config.json -> ModelSpec fields (each checked; what it does not implement refused) and back.
    spec_fields: Callable[[object], dict]
    hf_config: Callable[[ModelSpec], dict]
    # ModelSpec features this family implements: field -> accepted values (absent: the default only).
    implements: dict[str, tuple] = field(default_factory=dict)
    # What the family needs of a spec beyond single values (one ConfigError line), if anything.
    check: Callable[[ModelSpec], None] | None = None
    # A layer's attention-sink logits [nq] (an extra key column of each head's softmax), if it has them.
    attention_sinks: Callable[[object], torch.Tensor | None] = lambda lw: None
    # One expert as a quantized checkpoint stores it (model.expert_format, `models.mxfp4`), for the 4-bit
    # pages the engine streams: (get, layer, expert, spec) -> its arrays, uint8, w13's first.
    expert_packed: Callable | None = None
    # Tensor parallelism (`engine.parallel`): spec -> {LayerWeights field: its shard rule} (see
    # `layers.split`; fields without a rule are replicated); None: the family does not split.
    tensor_parallel: Callable[[ModelSpec], dict] | None = None

    def attention_args(self, lw: object, layer: int, spec: ModelSpec, device: torch.device | str | None = None
                       ) -> dict:
        """Keyword arguments of the shared attention functions for layer `layer`: its softmax scale, its
        attention sinks (on `device` when given) and its sliding window."""
        sinks = self.attention_sinks(lw)
        if sinks is not None and device is not None:
            sinks = sinks.to(device)
        return dict(scale=spec.attn_scale, sinks=sinks, window=spec.window(layer))

    def tensors(self, spec: ModelSpec) -> TensorShapes:
        """Every tensor of a checkpoint, layer by layer (lazily: a config.json claiming 10^9 layers
        fails at the first missing one, not after listing 10^10 names)."""
        yield from self.global_tensors(spec).items()
        for i in range(spec.num_layers):
            yield from self.layer_tensors(i, spec).items()
            for e in range(spec.num_experts if spec.is_moe_layer(i) else 0):
                yield from self.expert_tensors(i, e, spec).items()


# The features a family may implement, and their defaults (ModelSpec's).
FEATURES = {"attention_bias": False, "qk_norm": "none", "norm_topk_prob": True, "shared_expert_size": 0,
            "clip_qkv": None, "dense_layers": [], "shared_expert_gate": True, "kv_lora_rank": 0, "q_lora_rank": 0,
            "qk_nope_head_dim": 0, "v_head_dim": 0, "rope_interleave": False, "scoring_func": "softmax",
            "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "rope_type": "default",
            "yarn_truncate": True, "attention_sinks": False, "sliding_window": 0, "sliding_layers": [],
            "attention_out_bias": False, "router_bias": False, "expert_bias": False, "expert_act": "silu",
            "expert_format": "dense", "mtp_layers": 0}


def _registry() -> dict[str, Family]:
    from moe_lightning.models import dbrx, deepseek, gpt_oss, mixtral, olmoe, qwen_moe

    return {f.architecture: f for f in (mixtral.FAMILY, qwen_moe.QWEN2_MOE, qwen_moe.QWEN3_MOE, olmoe.FAMILY,
                                        dbrx.FAMILY, deepseek.DEEPSEEK_V2, deepseek.DEEPSEEK_V3, gpt_oss.FAMILY)}


def families() -> dict[str, Family]:
    global _FAMILIES
    if _FAMILIES is None:
        _FAMILIES = _registry()
    return _FAMILIES


_FAMILIES: dict[str, Family] | None = None


def family_for_model_type(model_type: str) -> Family | None:
    return next((f for f in families().values() if model_type in f.model_types), None)


def family(spec: ModelSpec) -> Family:
    """The family that runs `spec`, after checking it implements every feature `spec` asks for."""
    fam = families().get(spec.architecture)
    if fam is None:
        runnable = ", ".join(families())
        raise ConfigError(f"model.architecture={spec.architecture}: its layer math is not implemented yet, so "
                          f"it can be planned (task=plan, task=simulate) but not run; runnable: {runnable}")
    for name, default in FEATURES.items():
        value = getattr(spec, name)
        accepted = fam.implements.get(name, (default,))
        if accepted != "any" and value not in accepted:
            if name == "dense_layers":
                raise ConfigError(f"model.dense_layers={value}: the {fam.architecture} layer math has no dense "
                                  "layers (every layer routes to experts; accepted: [])")
            shown = ", ".join(str(a).lower() if isinstance(a, bool) else str(a) for a in accepted)
            raise ConfigError(f"model.{name}={value}: the {fam.architecture} layer math does not implement it "
                              f"(accepted: {shown})")
    if fam.check is not None:
        fam.check(spec)
    return fam
