"""Checkpoint loading: lazy per-expert reads, and a one-line error naming the file/tensor/key for each
kind of bad checkpoint."""

from __future__ import annotations

import builtins
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_lightning.config import ModelSpec
from moe_lightning.engine.weights import RandomWeights, expected_shapes, resolve_model, spec_from_hf_config
from moe_lightning.errors import CheckpointError

EXPERT_W1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
DELETE = object()


def load(folder):
    return resolve_model(ModelSpec(name="hf", path=str(folder), dtype="auto"))


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def refused(folder, *fragments: str) -> str:
    """load(folder) raises one CheckpointError line holding every fragment; -> the line."""
    with pytest.raises(CheckpointError) as exc:
        load(folder)
    msg = one_line(exc)
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def edit_config(folder, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def edit_tensors(file, **tensors) -> None:
    """Add or replace tensors in a safetensors file (names with dots go through **{name: t})."""
    current = load_file(file)
    current.update(tensors)
    save_file(current, file)


def write_index(folder, weight_map: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def index_of(folder, file: str = "model.safetensors") -> dict:
    """A weight_map that puts every tensor of the single-file checkpoint in `file`."""
    return {name: file for name in load_file(folder / "model.safetensors")}


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_weights_drawn_in_chunks_do_not_depend_on_the_thread_count(monkeypatch, dtype):
    from moe_lightning.engine import weights

    spec = ModelSpec(num_layers=1)
    serial = RandomWeights(spec, dtype, seed=3).expert(0, 1)   # the test model's matrices: one generator each
    monkeypatch.setattr(weights, "RANDOM_CHUNK", 1000)   # now each matrix is many chunks
    drawn = {}
    for threads in (1, 3):
        monkeypatch.setattr(weights, "loader_threads", lambda threads=threads: threads)
        drawn[threads] = RandomWeights(spec, dtype, seed=3).expert(0, 1)
    assert all(torch.equal(a, b) for a, b in zip(drawn[1], drawn[3]))
    w13 = drawn[3][0].float().flatten()
    assert w13.shape == serial[0].flatten().shape and not torch.equal(drawn[3][0], serial[0])
    assert not torch.equal(w13[:1000], w13[1000:2000])   # each chunk its own generator, not one repeated
    assert abs(w13.std().item() - 0.02) < 0.002 and abs(w13.mean().item()) < 0.002


# ---- config.json: types and ranges ----

@pytest.mark.parametrize("changes, fragments", [
    ({"num_hidden_layers": 2.5}, ["num_hidden_layers must be a positive integer, got 2.5"]),
    ({"hidden_size": "4096"}, ["hidden_size must be a positive integer, got '4096'"]),
    ({"num_local_experts": True}, ["num_local_experts must be a positive integer, got true"]),
    ({"intermediate_size": None}, ["intermediate_size must be a positive integer, got null"]),
    ({"num_attention_heads": 0}, ["num_attention_heads must be a positive integer, got 0"]),
    ({"num_key_value_heads": -2}, ["num_key_value_heads must be a positive integer or null, got -2"]),
    ({"head_dim": 0}, ["head_dim must be a positive integer or null, got 0"]),
    ({"vocab_size": [512]}, ["vocab_size must be a positive integer, got [512]"]),
    ({"max_position_embeddings": 4096.0}, ["max_position_embeddings must be a positive integer, got 4096.0"]),
    ({"num_key_value_heads": 3}, ["num_attention_heads=4 must be a multiple of num_key_value_heads=3"]),
    ({"head_dim": None, "num_attention_heads": 6, "num_key_value_heads": 2},
     ["hidden_size=64 must be a multiple of num_attention_heads=6"]),
    ({"num_experts_per_tok": 9}, ["num_experts_per_tok=9 must be <= num_local_experts=8"]),
    ({"rms_norm_eps": -1}, ["rms_norm_eps must be a positive number, got -1"]),
    ({"rms_norm_eps": "1e-5"}, ["rms_norm_eps must be a positive number, got '1e-5'"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, ["rope_parameters.rope_theta", "got 0"]),
    ({"rope_parameters": None, "rope_theta": "1e6"}, ["rope_theta must be a positive number"]),
    ({"rope_parameters": [1]}, ["rope_parameters must be an object or null"]),
    ({"rope_theta": 10000.0}, ["rope_theta=10000.0 disagrees with rope_parameters.rope_theta=1000000.0"]),
    ({"vocab_size": DELETE}, ["missing key 'vocab_size'"]),
    ({"bos_token_id": 512}, ["bos_token_id must be a token id in [0, vocab_size=512)", "got 512"]),
    ({"eos_token_id": True}, ["eos_token_id must be a token id"]),
    ({"eos_token_id": [2, 512]}, ["eos_token_id must be a token id", "got [2, 512]"]),
    ({"eos_token_id": []}, ["eos_token_id must be a token id", "a non-empty list of them, or null, got []"]),
    ({"model_type": DELETE}, ["unsupported model_type null"]),
    ({"model_type": ["mixtral"]}, ["unsupported model_type [\"mixtral\"]"]),
])
def test_config_field_types_and_ranges(ckpt, changes, fragments):
    edit_config(ckpt, **changes)
    refused(ckpt, "config.json: ", *fragments)


# ---- config.json: fields that change the math are refused, not ignored ----

@pytest.mark.parametrize("changes, fragments", [
    ({"sliding_window": 1024}, ["sliding_window=1024 is smaller than max_position_embeddings=4096"]),
    ({"sliding_window": 0}, ["sliding_window must be a positive integer or null, got 0"]),
    ({"sliding_window": True}, ["sliding_window must be a positive integer or null, got true"]),
    ({"hidden_act": "gelu"}, ["hidden_act='gelu'", "silu only"]),
    ({"hidden_act": None}, ["hidden_act=null"]),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
     ["rope_parameters rope_type='linear'"]),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6}}},
     ["rope_parameters.full_attention: per-layer-type RoPE"]),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}},
     ["rope_parameters.partial_rotary_factor=0.5"]),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, ["rope_scaling rope_type='dynamic'"]),
    ({"partial_rotary_factor": 0.25}, ["partial_rotary_factor=0.25"]),
    ({"tie_word_embeddings": True}, ["tie_word_embeddings=true"]),
    ({"attention_bias": True}, ["attention_bias=true"]),
    ({"mlp_bias": 1}, ["mlp_bias=1"]),
    ({"norm_topk_prob": False}, ["norm_topk_prob=false"]),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, ["quantization_config="]),
    ({"final_logit_softcapping": 30.0}, ["final_logit_softcapping=30.0"]),
    ({"n_shared_experts": 2}, ["n_shared_experts=2"]),
    ({"layer_types": ["sliding_attention", "full_attention"]}, ["layer_types="]),
])
def test_config_fields_that_change_the_math_are_refused(ckpt, changes, fragments):
    edit_config(ckpt, **changes)
    refused(ckpt, "config.json: ", *fragments)


def test_neutral_values_and_inference_only_fields_are_accepted(ckpt):
    """A window that can never bind (>= max_position_embeddings: longer contexts are refused by the
    workload check), explicit neutral values, legacy keys and training-only knobs all load."""
    edit_config(ckpt, sliding_window=4096, attention_bias=False, norm_topk_prob=True, rope_scaling=None,
                rope_theta=1e6, attention_dropout=0.1, router_jitter_noise=0.5, hidden_act="silu",
                tie_word_embeddings=None, eos_token_id=[2, 2], layer_types=["full_attention"] * 2)
    spec, source = load(ckpt)
    assert spec.eos_token_id == 2 and spec.rope_theta == 1e6
    assert source.expert(0, 0)[0].shape == (256, 64)


MIXTRAL_8X7B_CONFIG = {  # mistralai/Mixtral-8x7B-v0.1's config.json (transformers 4.36 era), verbatim
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_the_real_mixtral_config_is_accepted(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B_CONFIG))
    spec = spec_from_hf_config(tmp_path, name="mixtral-8x7b")
    assert (spec.num_layers, spec.head_dim, spec.num_kv_heads, spec.dtype) == (32, 128, 8, "bfloat16")
    assert spec.rope_theta == 1e6 and spec.max_position_embeddings == 32768


def test_missing_optional_fields_take_transformers_defaults(ckpt):
    edit_config(ckpt, num_key_value_heads=None, head_dim=DELETE, rope_parameters=DELETE, sliding_window=DELETE)
    spec = spec_from_hf_config(ckpt)
    assert (spec.num_kv_heads, spec.head_dim, spec.rope_theta) == (4, 16, 1e6)


# ---- config.json: the file itself ----

@pytest.mark.parametrize("content, fragments", [
    (b"[1, 2]", ["must be a JSON object", "got an array [1, 2]"]),
    (b'"mixtral"', ["must be a JSON object", "got a string"]),
    (b"{\"model_type\": \"mixtral\",", ["not valid JSON"]),
    (b"\xff\xfe{}", ["not UTF-8 text"]),
    (b"[" * 100_000, ["not valid JSON (nested too deeply)"]),
    (b"", ["not valid JSON"]),
])
def test_malformed_config_file(ckpt, content, fragments):
    (ckpt / "config.json").write_bytes(content)
    refused(ckpt, "config.json: ", *fragments)


def test_nan_in_config_is_a_bad_number(ckpt):
    text = (ckpt / "config.json").read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')
    (ckpt / "config.json").write_text(text)
    refused(ckpt, "config.json: rms_norm_eps must be a positive number, got NaN")


def test_missing_and_folder_config(ckpt):
    (ckpt / "config.json").unlink()
    refused(ckpt, "config.json: not found")
    (ckpt / "config.json").mkdir()
    refused(ckpt, "config.json: cannot read the file (it is a folder, not a file)")


def test_model_path_is_a_file_or_missing(ckpt):
    refused(ckpt / "model.safetensors", "model.safetensors: not a folder")
    refused(ckpt / "nowhere", "nowhere: no such folder")


def test_unreadable_config_says_permission_denied(ckpt, monkeypatch):
    real = Path.read_bytes

    def faulty(self):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", faulty)
    msg = refused(ckpt, "config.json: cannot read the file (permission denied)")
    assert "corrupt" not in msg and "No such file" not in msg


def test_unreadable_folder_says_permission_denied(ckpt, monkeypatch):
    real = os.listdir

    def faulty(path="."):
        if Path(path) == ckpt:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", faulty)
    refused(ckpt, f"model.path {ckpt}: cannot list the folder (permission denied)")


def test_unreadable_shard_says_permission_denied(ckpt, monkeypatch):
    real = builtins.open

    def faulty(file, *args, **kwargs):
        if str(file).endswith(".safetensors"):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", faulty)
    msg = refused(ckpt, "model.safetensors: cannot read the file (permission denied)")
    assert "corrupt" not in msg


@pytest.mark.parametrize("target", ["config.json", "model.safetensors", "."])
def test_unreadable_by_mode(ckpt, target):
    """The real thing, where permissions bind (not for root with CAP_DAC_OVERRIDE: the tests above fault
    the calls instead)."""
    path = ckpt / target
    mode = path.stat().st_mode
    path.chmod(0)
    try:
        try:
            if target == ".":
                os.listdir(ckpt)
            else:
                path.read_bytes()
        except PermissionError:
            refused(ckpt, "permission denied")
        else:
            pytest.skip("this user reads a mode-000 file (root)")
    finally:
        path.chmod(mode)


# ---- tensors: NaN, Inf, overflow, checked as each is read ----

def test_nan_in_an_expert_names_the_tensor_and_file(ckpt):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    t = load_file(ckpt / "model.safetensors")[name]
    t[5, 7] = float("nan")
    edit_tensors(ckpt / "model.safetensors", **{name: t})
    spec, source = load(ckpt)  # the check is per tensor as it is read, not a second pass at load
    source.expert(1, 2)
    with pytest.raises(CheckpointError) as exc:
        source.expert(1, 3)
    msg = one_line(exc)
    assert name in msg and "model.safetensors" in msg and "NaN or Inf" in msg


def test_inf_in_the_embedding(ckpt):
    t = load_file(ckpt / "model.safetensors")["model.embed_tokens.weight"]
    t[0, 0] = float("-inf")
    edit_tensors(ckpt / "model.safetensors", **{"model.embed_tokens.weight": t})
    with pytest.raises(CheckpointError) as exc:
        load(ckpt)[1].embedding()
    assert "'model.embed_tokens.weight' holds NaN or Inf" in one_line(exc)


def test_overflow_in_the_run_dtype_is_named(ckpt):
    t = load_file(ckpt / "model.safetensors")[Q_PROJ]
    t[0, 0] = 1e6  # fine in float32, beyond float16
    edit_tensors(ckpt / "model.safetensors", **{Q_PROJ: t})
    assert torch.isfinite(load(ckpt)[1].layer(0).wq).all()
    _, source = resolve_model(ModelSpec(name="hf", path=str(ckpt), dtype="float16"))
    with pytest.raises(CheckpointError) as exc:
        source.layer(0)
    assert Q_PROJ in one_line(exc) and "overflows float16" in str(exc.value)


# ---- tensors: unknown, duplicate and stray ----

def test_unknown_tensor_is_refused_by_name(ckpt):
    name = EXPERT_W1 + "_scale"
    edit_tensors(ckpt / "model.safetensors", **{name: torch.ones(128)})
    refused(ckpt, "model.safetensors", f"unexpected tensor {name!r}")


def test_stray_shard_with_a_duplicate_tensor_names_both_files(ckpt):
    save_file({Q_PROJ: torch.zeros(64, 64)}, ckpt / "model-fixed.safetensors")
    refused(ckpt, "model-fixed.safetensors", "model.safetensors", repr(Q_PROJ), "also in")


def test_stray_file_beside_an_index_holding_an_indexed_tensor(ckpt):
    write_index(ckpt, index_of(ckpt))
    save_file({Q_PROJ: torch.zeros(64, 64)}, ckpt / "extra.safetensors")
    refused(ckpt, "extra.safetensors", "not listed in model.safetensors.index.json", repr(Q_PROJ))


def test_unrelated_file_beside_an_index_is_ignored_with_a_warning(ckpt, caplog):
    """As transformers does (e.g. a consolidated.safetensors in Mistral's own layout next to HF shards)."""
    write_index(ckpt, index_of(ckpt))
    save_file({"layers.0.attention.wq.weight": torch.zeros(64, 64)}, ckpt / "consolidated.safetensors")
    with caplog.at_level(logging.WARNING, logger="moe_lightning.weights"):
        load(ckpt)
    assert "consolidated.safetensors: not listed" in caplog.text


def test_truncated_model_does_not_call_later_layers_unknown(tiny_path):
    spec, source = resolve_model(ModelSpec(num_layers=1))
    assert spec.num_layers == 1 and source.layer(0).wq.shape == (64, 64)


def test_a_huge_layer_count_fails_at_the_first_missing_layer(ckpt):
    edit_config(ckpt, num_hidden_layers=10**9)
    refused(ckpt, "missing tensor 'model.layers.2.")


# ---- the index: confined, well-formed, agreeing with its files ----

@pytest.mark.parametrize("entry", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors", ""])
def test_index_entry_outside_the_folder(ckpt, entry):
    weight_map = index_of(ckpt)
    weight_map[Q_PROJ] = entry
    write_index(ckpt, weight_map)
    refused(ckpt, "model.safetensors.index.json", f"weight_map[{Q_PROJ!r}]", "inside the checkpoint folder")


def test_index_entry_symlinked_outside_the_folder(ckpt, tmp_path):
    shutil.move(ckpt / "model.safetensors", tmp_path / "outside.safetensors")
    (ckpt / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    write_index(ckpt, index_of(ckpt))
    refused(ckpt, "model.safetensors.index.json", "outside the checkpoint folder")


def test_shard_symlinked_outside_the_folder_without_index(ckpt, tmp_path):
    shutil.move(ckpt / "model.safetensors", tmp_path / "outside.safetensors")
    (ckpt / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    refused(ckpt, "model.safetensors: resolves to", "outside the checkpoint folder")


def test_hub_cache_snapshot_links_into_blobs_are_allowed(tiny_path, tmp_path):
    """transformers' cache: <repo>/snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    repo = tmp_path / "models--x--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for i, name in enumerate(["config.json", "model.safetensors"]):
        shutil.copy(tiny_path / name, repo / "blobs" / f"blob{i}")
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    weight_map = index_of(snapshot)
    (repo / "blobs" / "blob2").write_text(json.dumps({"weight_map": weight_map}))
    (snapshot / "model.safetensors.index.json").symlink_to(Path("..") / ".." / "blobs" / "blob2")
    spec, source = load(snapshot)
    assert source.expert(1, 7)[1].shape == (64, 128)


@pytest.mark.parametrize("text, fragments", [
    ("{not json", ["not valid JSON"]),
    ("[]", ["has no 'weight_map'"]),
    ('{"weight_map": ["model.safetensors"]}', ["has no 'weight_map'"]),
    ('{"weight_map": {"model.norm.weight": 3}}', ["weight_map['model.norm.weight'] = 3"]),
])
def test_malformed_index(ckpt, text, fragments):
    (ckpt / "model.safetensors.index.json").write_text(text)
    refused(ckpt, "model.safetensors.index.json", *fragments)


def test_index_disagreeing_with_its_files(ckpt):
    weight_map = index_of(ckpt)
    save_file({"model.norm.weight": load_file(ckpt / "model.safetensors")["model.norm.weight"]},
              ckpt / "other.safetensors")
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, ckpt / "model.safetensors")
    write_index(ckpt, weight_map)  # still says model.safetensors, but only other.safetensors (unlisted) has it
    refused(ckpt, "lists tensor 'model.norm.weight' in model.safetensors, which does not hold it")
    del weight_map[Q_PROJ]
    weight_map["model.norm.weight"] = "other.safetensors"
    write_index(ckpt, weight_map)
    refused(ckpt, "model.safetensors", f"holds tensor {Q_PROJ!r}, which model.safetensors.index.json does not list")


def test_index_listing_a_missing_shard(ckpt):
    weight_map = index_of(ckpt)
    weight_map[Q_PROJ] = "model-00002-of-00002.safetensors"
    write_index(ckpt, weight_map)
    refused(ckpt, "model-00002-of-00002.safetensors: shard listed in model.safetensors.index.json is missing")


def test_shard_that_is_a_folder(ckpt):
    (ckpt / "model-extra.safetensors").mkdir()
    refused(ckpt, "model-extra.safetensors: cannot read the file (it is a folder, not a file)")


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
def test_auto_dtype_without_one_in_config_is_the_weights_as_transformers_loads_them(ckpt, stored, sharded):
    """No dtype in config.json: transformers' dtype="auto" loads the weights' own dtype. The engine ran float32."""
    from transformers import MixtralForCausalLM

    tensors = {k: v.to(getattr(torch, stored)) for k, v in load_file(ckpt / "model.safetensors").items()}
    (ckpt / "model.safetensors").unlink()
    if sharded:   # two shards, the first by name holding the first tensors
        names = sorted(tensors)
        save_file({k: tensors[k] for k in names[: len(names) // 2]}, ckpt / "model-00001-of-00002.safetensors")
        save_file({k: tensors[k] for k in names[len(names) // 2:]}, ckpt / "model-00002-of-00002.safetensors")
        write_index(ckpt, {k: f"model-0000{1 + (i >= len(names) // 2)}-of-00002.safetensors"
                           for i, k in enumerate(names)})
    else:
        save_file(tensors, ckpt / "model.safetensors")
    edit_config(ckpt, dtype=DELETE, torch_dtype=DELETE)
    want = MixtralForCausalLM.from_pretrained(ckpt, dtype="auto").dtype
    spec, _ = load(ckpt)
    assert want == getattr(torch, stored) and spec.dtype == stored
    assert resolve_model(ModelSpec(name="hf", path=str(ckpt), dtype="float32"))[0].dtype == "float32"   # given: kept


def test_auto_dtype_refuses_weights_the_engine_does_not_run(ckpt):
    tensors = {k: v.double() for k, v in load_file(ckpt / "model.safetensors").items()}
    save_file(tensors, ckpt / "model.safetensors")
    edit_config(ckpt, dtype=DELETE, torch_dtype=DELETE)
    refused(ckpt, "model.safetensors: its weights are float64", "give model.dtype=float32")
