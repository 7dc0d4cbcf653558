"""Every model family beside Mixtral (whose tests live in tests/engine and tests/baselines) is
token-identical in fp32 to transformers' own greedy generate, on a tiny sharded checkpoint written by
transformers with every parameter random (norm weights and biases too): through the reference engine,
CGOPipe under three policies and every baseline schedule, on prompts of mixed lengths. bf16 agrees
within a stated tolerance."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from moe_lightning.baselines import (
    AccelerateSystem,
    DeepSpeedSystem,
    FastDecodeSystem,
    FlexGenCSystem,
    FlexGenSystem,
)
from moe_lightning.config import HardwareSpec, ModelSpec, Policy
from moe_lightning.engine.cgopipe import CGOPipeRunner
from moe_lightning.engine.generation import GenerationParams, generate
from moe_lightning.engine.reference import ReferenceRunner
from moe_lightning.engine.weights import resolve_model
from tests.conftest import (
    PARITY_NEW_TOKENS,
    check_bf16_against_fp32,
    check_bf16_teacher_forced,
    hf_greedy,
    prompt_workload,
)

CPU = torch.device("cpu")
SHAPES = dict(hidden_size=64, intermediate_size=32, num_heads=4, num_kv_heads=2, head_dim=16, num_experts=8,
              top_k=2, vocab_size=512, rope_theta=1e4, rms_norm_eps=1e-6, max_position_embeddings=4096)
MLA_SHAPES = SHAPES | dict(num_kv_heads=4, head_dim=8, max_position_embeddings=256)   # head_dim: the RoPE dim
# transformers reads gpt-oss's swiglu_limit from config.json since 5.18-5.23; before, its experts clamp at 7.0
# (the published checkpoints' value) whatever the file says, so a binding 0.3 is only testable against a
# transformers that reads it (the GPU machine's 5.17 does not).
HF_READS_SWIGLU_LIMIT = hasattr(transformers.GptOssConfig, "swiglu_limit")
GPT_OSS = ModelSpec(name="hf", architecture="gpt_oss", attention_bias=True, attention_out_bias=True,
                    attention_sinks=True, sliding_window=4, sliding_layers=[0, 2], num_layers=3, router_bias=True,
                    expert_bias=True, expert_act="clamped_swiglu", swiglu_limit=0.3 if HF_READS_SWIGLU_LIMIT else 7.0,
                    rope_type="yarn", yarn_factor=4.0, yarn_original_max_positions=64, yarn_truncate=False, **SHAPES)
# Each family with the features that tell it apart switched on (a shared expert, Q/K/V(/O) biases, q/k norms,
# a clamp that binds, routing weights left unnormalised, dense layers: between two MoE layers, and first
# and third of four, so that the expert stream skips them and starts after one).
FAMILIES = {
    "qwen2_moe": ModelSpec(name="hf", architecture="qwen2_moe", attention_bias=True, shared_expert_size=48,
                           norm_topk_prob=False, num_layers=3, dense_layers=[1], dense_intermediate_size=40,
                           **SHAPES),
    # Qwen3-MoE's and OLMoE's attention_bias: biases on Q/K/V and on O (transformers' o_proj has them too).
    "qwen3_moe": ModelSpec(name="hf", architecture="qwen3_moe", qk_norm="head", norm_topk_prob=True, num_layers=4,
                           dense_layers=[0, 2], dense_intermediate_size=24, attention_bias=True,
                           attention_out_bias=True, **SHAPES),
    "olmoe": ModelSpec(name="hf", architecture="olmoe", qk_norm="full", clip_qkv=1.0, norm_topk_prob=False,
                       attention_bias=True, attention_out_bias=True, **SHAPES),
    "dbrx": ModelSpec(name="hf", architecture="dbrx", clip_qkv=0.5, norm_topk_prob=True,
                      **(SHAPES | dict(rms_norm_eps=1e-5))),
    # MLA (no q LoRA in V2, q LoRA in V3), a dense first layer, shared experts, group-limited routing
    # (V2: softmax, groups by their best; V3: sigmoid with a correction bias, groups by their best two),
    # the routed weights scaled, YaRN with its attention temperature.
    "deepseek_v2": ModelSpec(name="hf", architecture="deepseek_v2", kv_lora_rank=32, qk_nope_head_dim=16,
                             v_head_dim=12, rope_interleave=True, num_layers=3, dense_layers=[0],
                             dense_intermediate_size=48, shared_expert_size=64, shared_expert_gate=False,
                             norm_topk_prob=False, n_group=4, topk_group=1, routed_scaling_factor=1.5,
                             rope_type="yarn", yarn_factor=4.0, yarn_original_max_positions=64, yarn_mscale=0.707,
                             yarn_mscale_all_dim=0.707, **MLA_SHAPES),
    "deepseek_v3": ModelSpec(name="hf", architecture="deepseek_v3", kv_lora_rank=32, q_lora_rank=24,
                             qk_nope_head_dim=16, v_head_dim=12, rope_interleave=True, num_layers=3,
                             dense_layers=[0], dense_intermediate_size=48, shared_expert_size=32,
                             shared_expert_gate=False, norm_topk_prob=True, scoring_func="sigmoid", n_group=4,
                             topk_group=2, routed_scaling_factor=2.5, rope_type="yarn", yarn_factor=4.0,
                             yarn_original_max_positions=64, yarn_mscale=1.0, yarn_mscale_all_dim=0.8,
                             **MLA_SHAPES),
    # gpt-oss: biases on Q/K/V/O, the router and the experts, attention sinks, a 4-token window on layers 0
    # and 2, a clamp that binds, YaRN without truncation; then the same with MXFP4 experts (random 4-bit
    # blocks and scales, which transformers dequantizes itself as it loads).
    "gpt_oss": GPT_OSS,
    "gpt_oss_mxfp4": dataclasses.replace(GPT_OSS, expert_format="mxfp4"),
}
CGOPIPE_POLICIES = {
    "all-resident": Policy(batch_size=10, micro_batch_size=5, expert_gpu_fraction=1.0),
    "all-streamed": Policy(batch_size=10, micro_batch_size=3, expert_gpu_fraction=0.0, pages_per_layer=2),
    "mixed-cpu-attention": Policy(batch_size=10, micro_batch_size=2, expert_gpu_fraction=0.5, kv_gpu_fraction=0.4),
}
G = dict(pages_per_layer=1, prefetch_depth=1, expert_kernel="loop")
BASELINES = {
    "flexgen": (FlexGenSystem, Policy(batch_size=10, micro_batch_size=3, attn_on_gpu=True, **G)),
    "flexgen_c": (FlexGenCSystem, Policy(batch_size=10, micro_batch_size=3, expert_gpu_fraction=0.25, **G)),
    "deepspeed": (DeepSpeedSystem, Policy(batch_size=10, micro_batch_size=10, attn_on_gpu=True, **G)),
    "fastdecode": (FastDecodeSystem, Policy(batch_size=10, micro_batch_size=2, **G)),
    "accelerate": (AccelerateSystem, Policy(batch_size=10, micro_batch_size=10, attn_on_gpu=True,
                                            kv_gpu_fraction=1.0)),
}


class Tiny:
    """One family's tiny checkpoint, its transformers model and transformers' greedy outputs."""

    def __init__(self, key: str, prompts: list[list[int]]):
        from moe_lightning.engine.tiny import ensure_tiny, hf_classes

        self.key = key
        self.path = ensure_tiny(FAMILIES[key], seed=11, max_shard_size="60KB", perturb=True)
        self.spec, self.source = resolve_model(ModelSpec(name="hf", path=str(self.path), dtype="float32"))
        hf = hf_classes(self.spec)[1].from_pretrained(self.path, dtype=torch.float32)
        # transformers 5.17 (the GPU machine's) dequantizes MXFP4 experts to bf16 even in an fp32 model and runs
        # its experts on those bf16 weights. The values are exact in bf16 (e2m1 times a power of two), so
        # .float() gives back the exact fp32 model; on a transformers that keeps fp32 it changes nothing.
        self.hf_runs_bf16_experts = any(p.dtype == torch.bfloat16 for p in hf.parameters())
        self.hf = hf.float().eval()
        self.outputs = [hf_greedy(self.hf, p, PARITY_NEW_TOKENS) for p in prompts]


_BUILT: dict[str, Tiny] = {}


@pytest.fixture(params=list(FAMILIES))
def fam(request, prompts) -> Tiny:
    if request.param not in _BUILT:
        _BUILT[request.param] = Tiny(request.param, prompts)
    return _BUILT[request.param]


def test_the_checkpoint_is_read_as_its_family(fam):
    want = FAMILIES[fam.key]
    for f in dataclasses.fields(ModelSpec):
        if f.name not in ("name", "path", "dtype", "weights", "seed", "bos_token_id", "eos_token_id"):
            assert getattr(fam.spec, f.name) == getattr(want, f.name), f.name
    assert len(list(fam.path.glob("*.safetensors"))) > 1   # sharded


def test_reference_engine_tokens_identical(fam, prompts):
    runner = ReferenceRunner(fam.spec, fam.source)
    result = generate(runner, prompts, GenerationParams(max_new_tokens=PARITY_NEW_TOKENS, eos_token_id=2), 8)
    assert result.output_ids == fam.outputs


@pytest.mark.parametrize("policy", list(CGOPIPE_POLICIES))
def test_cgopipe_tokens_identical(fam, prompts, policy, device):
    p = CGOPIPE_POLICIES[policy]
    runner = CGOPipeRunner(fam.spec, fam.source, HardwareSpec(), p, prompt_workload(prompts), device)
    result = generate(runner, prompts, GenerationParams(max_new_tokens=PARITY_NEW_TOKENS, eos_token_id=2),
                      p.batch_size)
    assert result.output_ids == fam.outputs
    if p.expert_gpu_fraction < 1:
        assert runner.stats()["link_bytes"]["h2d"] > 0   # experts really streamed


@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_tokens_identical(fam, prompts, name, device):
    system, policy = BASELINES[name]
    runner = system(policy_source="given").build(fam.spec, fam.source, HardwareSpec(), policy,
                                                 prompt_workload(prompts), device)
    if name == "accelerate" and fam.hf_runs_bf16_experts:
        # The peer runs what transformers runs: bf16 experts under an fp32 model, with no fp32 ground truth to
        # match. Its run document must say so.
        assert "bfloat16" in runner.stats()["extra"]["weight_dtypes"]
        pytest.skip(f"transformers {transformers.__version__} runs this checkpoint's MXFP4 experts in bf16 under an "
                    "fp32 model (the peer's run document records it)")
    if name == "accelerate":
        assert runner.stats()["extra"]["weight_dtypes"] == ["float32"]
    result = generate(runner, prompts, GenerationParams(max_new_tokens=PARITY_NEW_TOKENS, eos_token_id=2),
                      policy.batch_size)
    assert result.output_ids == fam.outputs


def test_a_dropped_feature_changes_the_tokens(fam, prompts):
    """The parity above is not vacuous: the same weights through the family's math without its feature
    (biases and the shared expert zeroed, q/k norm weights at one, no clamp) give other tokens."""
    def drop(t: torch.Tensor, name: str) -> torch.Tensor:
        return torch.ones_like(t) if "norm" in name else torch.zeros_like(t)

    runner = ReferenceRunner(fam.spec, fam.source)
    for lw in runner.weights.layers:
        for f in ("bq", "bk", "bv", "bo", "q_norm", "k_norm", "shared_down_proj", "mlp_down", "router_bias", "kv_norm",
                  "sinks", "b13", "b2"):
            if getattr(lw, f, None) is not None:
                setattr(lw, f, drop(getattr(lw, f), f))
    spec = dataclasses.replace(fam.spec, clip_qkv=None, norm_topk_prob=not fam.spec.norm_topk_prob, rope_type="default",
                               routed_scaling_factor=1.0, n_group=1, topk_group=1, sliding_window=0, sliding_layers=[],
                               swiglu_limit=1e9)
    runner.spec = spec
    result = generate(runner, prompts, GenerationParams(max_new_tokens=PARITY_NEW_TOKENS, eos_token_id=2), 8)
    assert result.output_ids != fam.outputs


def test_bf16_within_tolerance(fam, prompts):
    """bf16: conftest's BF16_REL_ERR and BF16_AGREE, teacher-forced on transformers' own continuation; for
    gpt-oss, whose tiny checkpoint transformers itself runs 15% off its fp32 logits in bf16 (sharpened
    attention, a clamp that binds), no further from fp32 than transformers' bf16 (BF16_VS_FP32)."""
    from moe_lightning.engine.tiny import hf_classes

    spec, source = resolve_model(ModelSpec(name="hf", path=str(fam.path), dtype="bfloat16"))
    hf = hf_classes(spec)[1].from_pretrained(fam.path, dtype=torch.bfloat16).eval()
    if spec.architecture == "gpt_oss":
        check_bf16_against_fp32(ReferenceRunner(spec, source), hf, fam.hf, prompts, 8)
    else:
        check_bf16_teacher_forced(ReferenceRunner(spec, source), hf, prompts, 8)


def test_deepseek_v3_multi_token_prediction_layers_are_present_and_not_read(tmp_path, prompts):
    """DeepSeek-V3's checkpoints carry num_nextn_predict_layers MTP modules after the last layer (layer 61
    of the published one); transformers ignores their tensors on load, and so does the engine: the same
    tokens. Without that field they are tensors the family does not read, refused by name."""
    import json
    import shutil

    from safetensors.torch import save_file

    from moe_lightning.engine.tiny import ensure_tiny
    from moe_lightning.errors import CheckpointError

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ensure_tiny(FAMILIES["deepseek_v3"], seed=11, max_shard_size="60KB", perturb=True), ckpt)
    extra = {"model.layers.3.eh_proj.weight": torch.randn(64, 128), "model.layers.3.enorm.weight": torch.ones(64)}
    save_file(extra, ckpt / "model-mtp.safetensors")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"] |= dict.fromkeys(extra, "model-mtp.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 1}))
    spec, source = resolve_model(ModelSpec(name="hf", path=str(ckpt), dtype="float32"))
    assert spec.mtp_layers == 1 and spec.num_layers == 3
    want = Tiny("deepseek_v3", prompts).outputs
    result = generate(ReferenceRunner(spec, source), prompts,
                      GenerationParams(max_new_tokens=PARITY_NEW_TOKENS, eos_token_id=2), 8)
    assert result.output_ids == want
    (ckpt / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.3.eh_proj.weight'"):
        resolve_model(ModelSpec(name="hf", path=str(ckpt), dtype="float32"))
