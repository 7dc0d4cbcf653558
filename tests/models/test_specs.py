"""The memory plan's count of a model against its family's own checkpoint layout, for every preset and
the tiny test models: the plan sizes the GPU pool the engine carves the non-expert weights from, so an
undercount is a refused run and an overcount a smaller batch."""

from __future__ import annotations

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
    assert spec.num_experts * spec.expert_params == experts   # DBRX lists a layer's experts fused, once


def test_every_preset_names_a_known_architecture():
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "dbrx"} <= {s.architecture for s in SPECS.values()}


@pytest.mark.parametrize("arch", sorted(families()))
def test_a_family_refuses_the_features_it_does_not_implement(arch):
    fam = families()[arch]
    other = {"attention_bias": True, "qk_norm": "full", "norm_topk_prob": False, "shared_expert_size": 8,
             "clip_qkv": 2.0, "dense_layers": [0]}
    accepted_of = {name: fam.implements.get(name, (default,)) for name, default in FEATURES.items()}
    base = {name: FEATURES[name] if a == "any" else a[0] for name, a in accepted_of.items()}
    assert family(ModelSpec(architecture=arch, **base)) is fam
    for name, value in other.items():
        accepted = accepted_of[name]
        spec = ModelSpec(architecture=arch, dense_intermediate_size=8, **(base | {name: value}))
        if accepted == "any" or value in accepted:
            assert family(spec) is fam
        else:
            with pytest.raises(ConfigError, match=f"model.{name}="):
                family(spec)


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
