"""Checkpoint loading: lazy per-expert reads, and a one-line error naming the file/tensor/key for each
kind of bad checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_lightning.config import ModelSpec
from moe_lightning.engine.weights import RandomWeights, expected_shapes, resolve_model
from moe_lightning.errors import CheckpointError


@pytest.fixture
def ckpt(tiny_path, tmp_path):
    """A private copy of the tiny checkpoint that a test may damage."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_path, folder)
    return folder


def load(folder):
    return resolve_model(ModelSpec(name="hf", path=str(folder), dtype="auto"))


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_expert_reads_match_transformers_layout(tiny, hf_tiny):
    spec, source = tiny
    w13, w2 = source.expert(1, 5)
    experts = hf_tiny.model.layers[1].mlp.experts
    assert torch.equal(w13, experts.gate_up_proj[5])
    assert torch.equal(w2, experts.down_proj[5])
    assert torch.equal(source.layer(0).router, hf_tiny.model.layers[0].mlp.gate.weight)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as exc:
        load(ckpt)
    assert "model.safetensors" in one_line(exc) and "truncated" in str(exc.value)


def test_corrupt_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError) as exc:
        load(ckpt)
    assert "model.safetensors" in one_line(exc)


def test_missing_tensor(ckpt):
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError) as exc:
        load(ckpt)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in one_line(exc)


def test_wrong_shape(ckpt):
    f = ckpt / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, f)
    with pytest.raises(CheckpointError) as exc:
        load(ckpt)
    msg = one_line(exc)
    assert "q_proj" in msg and "[32, 64]" in msg and "[64, 64]" in msg


def test_unsupported_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as exc:
        load(ckpt)
    assert "config.json" in one_line(exc) and "'llama'" in str(exc.value) and "mixtral" in str(exc.value)


def test_pickle_checkpoints_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError) as exc:
        load(ckpt)
    assert "pickle" in one_line(exc)


def test_preset_mismatch_names_the_key(ckpt):
    with pytest.raises(CheckpointError) as exc:
        resolve_model(ModelSpec(name="mixtral-8x7b", path=str(ckpt), hidden_size=4096))
    assert "hidden_size" in one_line(exc)


def test_random_weights_are_deterministic_and_order_free():
    spec = ModelSpec(num_layers=3)
    a, b = RandomWeights(spec, torch.float32, seed=3), RandomWeights(spec, torch.float32, seed=3)
    later = b.expert(2, 7)
    first = a.expert(0, 0)
    assert torch.equal(a.expert(2, 7)[0], later[0]) and not torch.equal(first[0], later[0])
    assert not torch.equal(RandomWeights(spec, torch.float32, seed=4).expert(2, 7)[0], later[0])
    assert set(expected_shapes(spec)) == set(a.shapes)
