"""gpt-oss pieces checked against transformers' own: the MXFP4 dequantization and the published shapes."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from moe_lightning.engine.hf_config import spec_from_hf_config
from moe_lightning.models.mxfp4 import dequantize as mxfp4_dequantize
from tests.models.test_specs import SPECS


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mxfp4_dequantize_is_transformers(dtype):
    """Every byte value in both nibbles and every usable scale, against transformers'
    convert_moe_packed_tensors (which returns the transpose, [E, C, R]); exact."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), generator=g, dtype=torch.uint8)
    blocks[0, 0, 0] = torch.arange(16, dtype=torch.uint8) * 17   # both nibbles alike: 0x00, 0x11, .. 0xff
    blocks[0, 0, 1] = torch.arange(16, dtype=torch.uint8)        # low nibble only
    scales = torch.randint(100, 140, (3, 8, 4), generator=g, dtype=torch.uint8)
    ours = mxfp4_dequantize(blocks, scales, dtype)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)
    assert ours.dtype == dtype and ours.shape == (3, 8, 128)
    assert torch.equal(ours, theirs)
    e2m1 = torch.tensor([0.0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])
    first = e2m1 * 2.0 ** (int(scales[0, 0, 0]) - 127)
    assert torch.equal(ours[0, 0, :32:2].float(), first) and torch.equal(ours[0, 0, 1:32:2].float(), first)


def test_the_120b_preset_is_transformers_default_config(tmp_path):
    """GptOssConfig's defaults are gpt-oss-120b's: its config.json, read as a checkpoint's, gives the preset."""
    import transformers

    cfg = transformers.GptOssConfig().to_dict() | {"eos_token_id": 200002}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    read, preset = spec_from_hf_config(tmp_path), SPECS["gpt-oss-120b"]
    for field in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                  "num_experts", "top_k", "vocab_size", "rope_theta", "rms_norm_eps", "max_position_embeddings",
                  "attention_bias", "attention_out_bias", "attention_sinks", "sliding_window", "sliding_layers",
                  "router_bias", "expert_bias", "expert_act", "swiglu_alpha", "swiglu_limit", "rope_type",
                  "yarn_factor", "yarn_original_max_positions", "yarn_beta_fast", "yarn_beta_slow", "yarn_truncate"):
        assert getattr(read, field) == getattr(preset, field), field
    assert read.expert_format == "dense" and preset.expert_format == "mxfp4"   # the default config is unquantized


def test_streamed_mxfp4_pages_cross_as_stored_and_dequantize_exactly(prompts):
    """The expert cache of an MXFP4 checkpoint: the CPU copy, the pinned ring and the device's double
    buffer hold 4-bit pages (3 H F x 17/32 B an expert: a quarter of bf16's bytes plus a byte of scale per
    32 weights), carved from the memory plan's pools; once a layer's pages are on the device, its stack
    serves the experts dequantized exactly as the load-time path (checked against transformers above)
    does, and still does after another layer has used the scratch."""
    from moe_lightning.config import Policy
    from moe_lightning.engine.paged import DevicePools, ExpertCache
    from moe_lightning.memory import memory_plan
    from tests.conftest import prompt_workload
    from tests.models.test_families import Tiny

    tiny = Tiny("gpt_oss_mxfp4", prompts)
    spec, source = tiny.spec, tiny.source
    H, F, E = spec.hidden_size, spec.intermediate_size, spec.num_experts
    policy = Policy(batch_size=4, micro_batch_size=2, expert_gpu_fraction=0.25, pages_per_layer=3)
    plan = memory_plan(spec, policy, prompt_workload(prompts))
    n_res, cpu = 2, torch.device("cpu")
    pools = DevicePools({k: v for k, v in plan.gpu.items() if k != "activations"}, cpu)
    cache = ExpertCache(spec, source, n_res, 3, 1, pools, cpu, pin=False)
    page = 3 * H * F * 17 // 32
    assert cache.quantized and cache.layer_bytes == (E - n_res) * page
    assert all(blob.numel() == (E - n_res) * page for blob in cache.cpu_layers)
    assert plan.cpu["streamed_experts"] == spec.num_moe_layers * (E - n_res) * page
    for layer in (0, 1):
        for p in range(3):
            cache.copy_to_pinned(layer, p)
            cache.copy_to_device(layer, p)
    for layer in (0, 1, 0):
        stack = cache.stack(layer)
        for e in range(E):
            w13, w2 = stack.weights(e)
            want13, want2 = source.expert(layer, e)
            assert torch.equal(w13, want13) and torch.equal(w2, want2), (layer, e)


@pytest.mark.parametrize(("resident", "group"), [(0.25, 1), (0.25, 3), (0.0, 5)],
                         ids=["2-resident-groups-of-1", "2-resident-groups-of-3", "groups-of-5-and-3"])
def test_a_scratch_of_fewer_experts_is_token_identical(prompts, device, resident, group):
    """policy.dequant_experts: the GPU dequantizes a layer's streamed MXFP4 experts `group` at a time inside
    each micro-batch's MoE (the last group shorter where they do not divide), with a scratch that much
    smaller in the memory plan; the tokens are still transformers'."""
    from moe_lightning.config import HardwareSpec, Policy
    from moe_lightning.engine.cgopipe import CGOPipeRunner
    from moe_lightning.engine.generation import GenerationParams, generate
    from moe_lightning.memory import memory_plan
    from tests.conftest import PARITY_NEW_TOKENS, prompt_workload
    from tests.models.test_families import Tiny

    tiny = Tiny("gpt_oss_mxfp4", prompts)
    policy = Policy(batch_size=10, micro_batch_size=3, expert_gpu_fraction=resident, pages_per_layer=2,
                    dequant_experts=group)
    whole = memory_plan(tiny.spec, dataclasses.replace(policy, dequant_experts=0), prompt_workload(prompts))
    grouped = memory_plan(tiny.spec, policy, prompt_workload(prompts))
    n_str = round(tiny.spec.num_experts * (1 - resident))
    assert whole.gpu["streamed_experts"] - grouped.gpu["streamed_experts"] == (n_str - group) * tiny.spec.expert_bytes
    runner = CGOPipeRunner(tiny.spec, tiny.source, HardwareSpec(), policy, prompt_workload(prompts), device)
    assert runner.experts.grouped and runner.experts.scratch_n == group
    result = generate(runner, prompts, GenerationParams(max_new_tokens=PARITY_NEW_TOKENS, eos_token_id=2),
                      policy.batch_size)
    assert result.output_ids == tiny.outputs


def test_dequant_experts_is_refused_for_experts_stored_dense(prompts):
    from moe_lightning.config import Policy
    from moe_lightning.errors import ConfigError
    from moe_lightning.memory import memory_plan
    from tests.conftest import prompt_workload
    from tests.models.test_families import Tiny

    tiny = Tiny("gpt_oss", prompts)
    with pytest.raises(ConfigError, match="policy.dequant_experts=2: .* not MXFP4"):
        memory_plan(tiny.spec, Policy(batch_size=4, micro_batch_size=2, dequant_experts=2), prompt_workload(prompts))


def test_prefill_attention_a_few_queries_at_a_time_is_transformers(prompts, monkeypatch):
    """The eager prefill path (attention sinks, sliding windows) in steps of 3 queries: the reference
    engine on the tiny gpt-oss checkpoint is still token-identical to transformers."""
    from moe_lightning.engine.generation import GenerationParams, generate
    from moe_lightning.engine.reference import ReferenceRunner
    from moe_lightning.models import layers
    from tests.conftest import PARITY_NEW_TOKENS
    from tests.models.test_families import Tiny

    tiny = Tiny("gpt_oss", prompts)
    monkeypatch.setattr(layers, "PREFILL_QUERY_CHUNK", 3)
    assert max(len(p) for p in prompts) > 3 * 3
    result = generate(ReferenceRunner(tiny.spec, tiny.source), prompts,
                      GenerationParams(max_new_tokens=PARITY_NEW_TOKENS, eos_token_id=2), 8)
    assert result.output_ids == tiny.outputs


@pytest.mark.parametrize(("edit", "want"), [
    # GptOssConfig runs YaRN (factor 32 over 4096 positions) where config.json gives no RoPE at all
    ({"rope_parameters": None, "rope_theta": 1e4},
     dict(rope_type="yarn", yarn_factor=32.0, yarn_original_max_positions=4096, yarn_truncate=False)),
    # every layer full attention: the window is read by none
    ({"layer_types": ["full_attention"] * 3}, dict(sliding_window=0, sliding_layers=[])),
], ids=["no-rope-parameters", "no-sliding-layer"])
def test_config_defaults_transformers_applies_are_applied(tmp_path, prompts, edit, want):
    """config.json as a user may write it, run by transformers with its defaults: read as it reads it,
    and token-identical in fp32 through the reference engine."""
    import shutil

    from moe_lightning.config import ModelSpec
    from moe_lightning.engine.generation import GenerationParams, generate
    from moe_lightning.engine.reference import ReferenceRunner
    from moe_lightning.engine.tiny import ensure_tiny, hf_classes
    from moe_lightning.engine.weights import resolve_model
    from tests.conftest import PARITY_NEW_TOKENS, hf_greedy
    from tests.models.test_families import FAMILIES

    ckpt = tmp_path / "ckpt"
    shutil.copytree(ensure_tiny(FAMILIES["gpt_oss"], seed=11, max_shard_size="60KB", perturb=True), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config = {k: v for k, v in (config | edit).items() if v is not None}
    (ckpt / "config.json").write_text(json.dumps(config))
    spec, source = resolve_model(ModelSpec(name="hf", path=str(ckpt), dtype="float32"))
    assert {k: getattr(spec, k) for k in want} == want
    hf = hf_classes(spec)[1].from_pretrained(ckpt, dtype=torch.float32).eval()
    result = generate(ReferenceRunner(spec, source), prompts,
                      GenerationParams(max_new_tokens=PARITY_NEW_TOKENS, eos_token_id=2), 8)
    assert result.output_ids == [hf_greedy(hf, p, PARITY_NEW_TOKENS) for p in prompts]
