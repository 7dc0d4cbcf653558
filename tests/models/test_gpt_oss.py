"""gpt-oss pieces checked against transformers' own: the MXFP4 dequantization and the published shapes."""

from __future__ import annotations

import json

import pytest
import torch

from moe_lightning.engine.hf_config import spec_from_hf_config
from moe_lightning.models.gpt_oss import mxfp4_dequantize
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
