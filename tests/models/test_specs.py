"""The memory plan's count of a model against its family's own checkpoint layout, for every preset and
the tiny test models: the plan sizes the GPU pool the engine carves the non-expert weights from, so an
undercount is a refused run and an overcount a smaller batch."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from moe_lightning.config import ModelSpec
from moe_lightning.errors import ConfigError
from moe_lightning.models import FEATURES, families, family
from tests.models.test_families import FAMILIES

PRESETS = sorted(Path(__file__).resolve().parents[2].joinpath("moe_lightning", "conf", "model").glob("*.yaml"))


def preset(path: Path) -> ModelSpec:
    return ModelSpec(**yaml.safe_load(path.read_text()))


SPECS = {p.stem: preset(p) for p in PRESETS if p.stem != "hf"} | FAMILIES


@pytest.mark.parametrize("name", [n for n, s in SPECS.items() if s.architecture in families()])
def test_non_expert_params_are_the_layouts_tensors(name):
    spec = SPECS[name]
    fam = family(spec)
    layer = [fam.layer_tensors(i, spec) for i in range(spec.num_layers)]
    counted = sum(math.prod(s) for s in fam.global_tensors(spec).values())
    counted += sum(math.prod(s) for tensors in layer for s in tensors.values())
    assert spec.non_expert_params == counted == sum(spec.non_expert_tensor_sizes)
    experts = sum(math.prod(s) for e in range(spec.num_experts) for s in fam.expert_tensors(0, e, spec).values())
    # DBRX and gpt-oss list a layer's experts fused, once; MXFP4 stores a byte per two weights and one per 32
    stored = spec.expert_params * (1 / 2 + 1 / 32 if spec.expert_format == "mxfp4" else 1)
    assert spec.num_experts * stored == experts


def test_every_preset_names_a_known_architecture():
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dbrx"} <= {s.architecture for s in SPECS.values()}


@pytest.mark.parametrize("arch", sorted(families()))
def test_a_family_refuses_the_features_it_does_not_implement(arch):
    fam = families()[arch]
    other = {"attention_bias": True, "qk_norm": "full", "norm_topk_prob": False, "shared_expert_size": 128,
             "clip_qkv": 2.0, "dense_layers": [0], "kv_lora_rank": 32, "scoring_func": "sigmoid", "n_group": 2,
             "routed_scaling_factor": 2.5, "rope_type": "yarn", "shared_expert_gate": False}
    accepted_of = {name: fam.implements.get(name, (default,)) for name, default in FEATURES.items()}
    base = {name: FEATURES[name] if a == "any" else a[0] for name, a in accepted_of.items()}
    if arch.startswith("deepseek"):   # multi-head latent attention is what the family is
        base |= dict(kv_lora_rank=32, qk_nope_head_dim=16, v_head_dim=16)
    assert family(ModelSpec(architecture=arch, **base)) is fam
    for name, value in other.items():
        accepted = accepted_of[name]
        mla = dict(qk_nope_head_dim=16, v_head_dim=16) if name == "kv_lora_rank" else {}
        tied = ({"attention_out_bias": value} if name == "attention_bias" and arch in ("gpt_oss", "qwen3_moe", "olmoe")
                else {})  # these bias all four projections or none
        spec = ModelSpec(architecture=arch, dense_intermediate_size=8, yarn_original_max_positions=64,
                         **(base | mla | {name: value} | tied))
        if accepted == "any" or value in accepted:
            assert family(spec) is fam
        else:
            with pytest.raises(ConfigError, match=f"model.{name}="):
                family(spec)


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe", "gpt_oss"])
def test_attention_bias_is_on_all_four_projections_or_none(arch):
    """transformers' Qwen3-MoE, OLMoE and gpt-oss put `attention_bias` on q/k/v_proj and on o_proj alike;
    Qwen2-MoE's `qkv_bias` never reaches o_proj."""
    norms = {"qwen3_moe": "head", "olmoe": "full"}
    extra = {"qk_norm": norms[arch]} if arch in norms else {}
    if arch == "gpt_oss":
        extra = dict(attention_sinks=True, router_bias=True, expert_bias=True, expert_act="clamped_swiglu")
    assert family(ModelSpec(architecture=arch, attention_bias=True, attention_out_bias=True, **extra))
    for q, o in ((True, False), (False, True)):
        with pytest.raises(ConfigError, match="all four attention projections or none"):
            family(ModelSpec(architecture=arch, attention_bias=q, attention_out_bias=o, **extra))
    with pytest.raises(ConfigError, match="model.attention_out_bias=True"):
        family(ModelSpec(architecture="qwen2_moe", attention_bias=True, attention_out_bias=True))


@pytest.mark.parametrize("arch", ["qwen2_moe", "qwen3_moe"])
@pytest.mark.parametrize("fields, dense", [({}, []), ({"decoder_sparse_step": 2}, [0, 2]),
                                           ({"mlp_only_layers": [3]}, [3]),
                                           ({"mlp_only_layers": [1], "decoder_sparse_step": 2}, [0, 1, 2]),
                                           ({"mlp_only_layers": [9]}, [])])
def test_qwen_dense_layers_are_the_ones_transformers_builds(arch, fields, dense):
    """Layer i is dense in transformers' Qwen-MoE iff it is in mlp_only_layers or (i + 1) is not a multiple of
    decoder_sparse_step; the spec read from config.json names the same layers, with their MLP's size."""
    import transformers

    from moe_lightning.engine.hf_config import _Config

    fam = families()[arch]
    spec = ModelSpec(architecture=arch, num_layers=4, qk_norm="head" if arch == "qwen3_moe" else "none")
    cfg = fam.hf_config(spec) | fields | {"intermediate_size": 96}
    model = getattr(transformers, fam.hf_class)(getattr(transformers, fam.hf_config_class)(**cfg))
    built = [i for i, layer in enumerate(model.model.layers) if not hasattr(layer.mlp, "experts")]
    assert built == dense
    got = fam.spec_fields(_Config(cfg | {"model_type": arch}, Path("config.json")))
    assert got["dense_layers"] == dense
    assert got["dense_intermediate_size"] == (96 if dense else 0)


def test_mla_presets_cache_the_latent_and_scale_attention_as_deepseek_does():
    """Against figures computed outside this code (../shared/briefs/model-families.md, from the published
    configs): the cache holds the normed latent (512) and the RoPE key (64) a token and a layer, 1152 B in
    bf16; the softmax scale is 192^-0.5 times YaRN's temperature squared."""
    v2, v3 = SPECS["deepseek-v2-lite"], SPECS["deepseek-v3"]
    assert v2.kv_bytes_per_token == 31_104 and v3.kv_bytes_per_token == 70_272
    assert v2.attn_scale == pytest.approx(0.114721, abs=1e-6)
    assert v3.attn_scale == pytest.approx(0.135234, abs=1e-6)
    # Against the same heads' K and V expanded (nh (dn + dr) + nh dv values, bf16): 8.9x and 71x fewer bytes.
    assert 2 * 16 * (128 + 64 + 128) * 27 / v2.kv_bytes_per_token == pytest.approx(8.89, abs=0.01)
    assert 2 * 128 * (128 + 64 + 128) * 61 / v3.kv_bytes_per_token == pytest.approx(71.1, abs=0.1)


def test_an_mla_kv_pool_stores_k_only():
    import torch

    from moe_lightning.engine.kv_blocks import KVBlockPool

    spec = FAMILIES["deepseek_v2"]
    pool = KVBlockPool(spec, num_blocks=5, block_size=4, dtype=torch.bfloat16)
    assert pool.k.shape == (3, 5, 1, 4, 32 + 8) and pool.v.shape == (3, 5, 1, 4, 32)
    assert pool.v.data_ptr() == pool.k.data_ptr()          # V is K's first kv_lora_rank values
    assert pool.nbytes == 3 * 5 * 4 * 40 * 2


@pytest.mark.parametrize(("name", "key"), [
    ("deepseek_v3", "norm_topk_prob"), ("deepseek_v3", "routed_scaling_factor"), ("deepseek_v3", "n_group"),
    ("deepseek_v3", "topk_group"), ("gpt_oss", "sliding_window"),
    ("qwen2_moe", "rms_norm_eps"), ("qwen3_moe", "rms_norm_eps"), ("deepseek_v2", "rms_norm_eps"),
    ("deepseek_v3", "rms_norm_eps"), ("olmoe", "rms_norm_eps"), ("gpt_oss", "rms_norm_eps"),
    *((name, "max_position_embeddings") for name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2",
                                                     "deepseek_v3", "gpt_oss")),
])
def test_a_config_without_a_field_reads_as_its_config_class_default(tmp_path, name, key):
    """A field config.json leaves out is what transformers runs there, its config class's default (DeepSeek-V3's
    routing: 2.5, 8 groups, top 4, renormalised; gpt-oss's 128-token window; Qwen's and DeepSeek's
    rms_norm_eps 1e-6; max_position_embeddings from 2048 to 131072, where the engine had read 32768): the
    checkpoint reads as with the field set to that default."""
    import json

    from moe_lightning.engine.hf_config import spec_from_hf_config
    from moe_lightning.engine.tiny import hf_classes
    from tests.models.test_families import SHAPES

    spec = FAMILIES.get(name) or ModelSpec(name="hf", architecture="mixtral", num_layers=2, **SHAPES)
    config_cls = hf_classes(spec)[0]
    cfg = config_cls(**family(spec).hf_config(spec)).to_dict() | ({"n_routed_experts": 16} if name == "deepseek_v3"
                                                                   else {})
    default = getattr(config_cls(), key)
    read = {}
    for case, value in (("given", default), ("absent", None)):
        folder = tmp_path / case
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({k: v for k, v in (cfg | {key: value}).items()
                                                        if v is not None}))
        read[case] = dataclasses.replace(spec_from_hf_config(folder), name="", path="")
    assert read["absent"] == read["given"]


@pytest.mark.parametrize("name", ["mixtral", *(n for n, s in FAMILIES.items() if s.expert_format == "dense")])
def test_a_config_without_eos_token_id_stops_where_transformers_generate_does(tmp_path, name):
    """No eos_token_id in config.json and no generation_config.json: transformers' generate stops on the config
    class's default (Mixtral and DeepSeek-V2: 2, DeepSeek-V3: 1; OLMoE's 50279 lies past a tiny vocabulary, so
    it never stops). The engine had never stopped early there."""
    import json

    from transformers import GenerationConfig

    from moe_lightning.engine.hf_config import spec_from_hf_config
    from moe_lightning.engine.tiny import hf_classes
    from tests.models.test_families import SHAPES

    spec = FAMILIES.get(name) or ModelSpec(name="hf", architecture="mixtral", num_layers=2, **SHAPES)
    config_cls = hf_classes(spec)[0]
    config_cls(**family(spec).hf_config(spec)).save_pretrained(tmp_path)   # as transformers writes it
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("eos_token_id", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    want = GenerationConfig.from_model_config(config_cls.from_pretrained(tmp_path)).eos_token_id
    want = want if want is not None and want < spec.vocab_size else None
    assert spec_from_hf_config(tmp_path).eos_token_id == want
