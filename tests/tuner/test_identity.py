"""Study identity: a study resumes only under the config it was measured with."""

from __future__ import annotations

import dataclasses
import json

import optuna
import pytest

from moe_lightning.config import ModelSpec, TunerConfig, Workload
from moe_lightning.errors import ConfigError
from moe_lightning.run_config import RunConfig
from moe_lightning.systems import CGOPipeSystem
from moe_lightning.tuner.search import TrialFailed, objective, open_study, study_identity
from tests.conftest import cli_with_peak_rss


def cfg_for(tmp_path, name=None, objective="simulate", model=None, **kw) -> RunConfig:
    tuner = TunerConfig(storage=f"sqlite:///{tmp_path / 'studies.db'}", study_name=name, objective=objective)
    return RunConfig(system=CGOPipeSystem(), tuner=tuner, device="cpu", model=model or ModelSpec(), **kw)


def spec_of(cfg):
    from moe_lightning.engine.weights import resolve_model

    return resolve_model(cfg.model)[0]


def one_trial(cfg):
    spec = spec_of(cfg)
    study = open_study(cfg, spec)
    study.optimize(objective(cfg, spec), n_trials=1, catch=(TrialFailed,))
    return study


def test_another_gen_len_or_dtype_starts_its_own_study(tmp_path, tiny_path):
    base = cfg_for(tmp_path)
    first = one_trial(base)
    assert len(first.trials) == 1
    other = dataclasses.replace(base, workload=Workload(gen_len=64),
                                model=dataclasses.replace(base.model, dtype="bfloat16"))
    second = open_study(other, spec_of(other))
    assert second.study_name != first.study_name and second.trials == []   # nothing resumed
    again = open_study(base, spec_of(base))
    assert again.study_name == first.study_name and len(again.trials) == 1  # the same config resumes


def test_a_reused_name_under_another_config_names_the_fields(tmp_path, tiny_path):
    one_trial(cfg_for(tmp_path, name="X"))
    other = cfg_for(tmp_path, name="X", workload=Workload(gen_len=64))
    with pytest.raises(ConfigError) as exc:
        open_study(other, spec_of(other))
    msg = str(exc.value)
    assert "\n" not in msg and "workload.gen_len: 16 -> 64" in msg


def test_simulate_then_measure_under_one_name_is_refused(tmp_path, tiny_path):
    one_trial(cfg_for(tmp_path, name="X", objective="simulate"))
    measured = cfg_for(tmp_path, name="X", objective="measure")
    with pytest.raises(ConfigError, match='objective: "simulate" -> "measure"'):
        open_study(measured, spec_of(measured))
    assert len(optuna.load_study(study_name="X", storage=measured.tuner.storage).trials) == 1


def test_the_split_is_part_of_a_several_gpu_study(tmp_path):
    """On several GPUs the T x E split, searched or given, and the EPS-MoE chunk count are in the
    fingerprint: a study never mixes layouts; on one GPU `parallel` is not (nothing reads it)."""
    from moe_lightning.config import ParallelConfig
    from moe_lightning.tuner.presets import load_preset

    def fields(hardware, parallel=None, name="split"):
        cfg = cfg_for(tmp_path, name=name, model=load_preset("model", "mixtral-8x22b"),
                      hardware=load_preset("hardware", hardware),
                      workload=dataclasses.replace(load_preset("workload", "mtbench"), num_requests=64),
                      parallel=parallel or ParallelConfig())
        return cfg, study_identity(cfg, cfg.model)[1]

    searched_cfg, searched = fields("4xt4")
    assert (searched["parallel.tensor"], searched["parallel.expert"]) == ("searched", "searched")
    assert searched["search_space.tensor"] == [1, 2, 4]
    given_cfg, given = fields("4xt4", ParallelConfig(tensor=4, expert=1))
    assert (given["parallel.tensor"], given["parallel.expert"]) == (4, 1) and "search_space.tensor" not in given
    assert fields("4xt4", ParallelConfig(tensor=2, expert=2, chunks=3))[1]["parallel.chunks"] == 3
    assert not any(k.startswith("parallel") for k in fields("t4", name="one")[1])

    open_study(searched_cfg, searched_cfg.model)
    with pytest.raises(ConfigError) as exc:
        open_study(given_cfg, given_cfg.model)
    assert "\n" not in str(exc.value)
    assert 'parallel.expert: "searched" -> 1; parallel.tensor: "searched" -> 4' in str(exc.value)
    chunks_cfg = dataclasses.replace(searched_cfg, parallel=ParallelConfig(chunks=3))
    with pytest.raises(ConfigError, match="parallel.chunks: 0 -> 3"):
        open_study(chunks_cfg, chunks_cfg.model)
    open_study(searched_cfg, searched_cfg.model)   # the same split resumes


def _checkpoint(tmp_path, experts: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=experts,
                        num_experts_per_tok=2, max_position_embeddings=256)
    folder = tmp_path / f"ckpt-{experts}"
    MixtralForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_two_hf_checkpoints_never_share_a_study(tmp_path):
    a, b = _checkpoint(tmp_path, 8), _checkpoint(tmp_path, 4)
    cfg_a = cfg_for(tmp_path, model=ModelSpec(name="hf", path=str(a)))
    cfg_b = cfg_for(tmp_path, model=ModelSpec(name="hf", path=str(b)))
    name_a, fields_a = study_identity(cfg_a, spec_of(cfg_a))
    name_b, fields_b = study_identity(cfg_b, spec_of(cfg_b))
    assert name_a != name_b and fields_a["model.num_experts"] == 8 and fields_b["model.num_experts"] == 4
    assert fields_a["model.checkpoint_content"] != fields_b["model.checkpoint_content"]
    one_trial(dataclasses.replace(cfg_a, tuner=dataclasses.replace(cfg_a.tuner, study_name="hf")))
    with pytest.raises(ConfigError, match="model.num_experts: 8 -> 4"):
        named_b = dataclasses.replace(cfg_b, tuner=dataclasses.replace(cfg_b.tuner, study_name="hf"))
        open_study(named_b, spec_of(named_b))


def test_same_shapes_other_weights_differ_by_content(tmp_path):
    a = _checkpoint(tmp_path, 8)
    b = tmp_path / "copy"
    b.mkdir()
    for f in a.iterdir():
        data = bytearray(f.read_bytes())
        if f.suffix == ".safetensors":
            data[-4:] = bytes(4)  # the last weight values changed, shapes and header the same
        (b / f.name).write_bytes(bytes(data))
    fa = study_identity(cfg_for(tmp_path, model=ModelSpec(name="hf", path=str(a))),
                        spec_of(cfg_for(tmp_path, model=ModelSpec(name="hf", path=str(a)))))[1]
    fb = study_identity(cfg_for(tmp_path, model=ModelSpec(name="hf", path=str(b))),
                        spec_of(cfg_for(tmp_path, model=ModelSpec(name="hf", path=str(b)))))[1]
    assert fa["model.checkpoint_content"] != fb["model.checkpoint_content"]


def test_a_study_without_fingerprint_is_not_resumed(tmp_path, tiny_path):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    old = optuna.create_study(storage=storage, study_name="old", direction="maximize")
    old.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    cfg = cfg_for(tmp_path, name="old")
    with pytest.raises(ConfigError, match="no fingerprint"):
        open_study(cfg, spec_of(cfg))


@pytest.mark.slow
def test_a_simulated_tune_for_absent_hardware_never_measures(tmp_path):
    """Mixtral-8x7B on a T4 profile, simulated: a simulated comparison, in minutes, and the model's 90+ GB
    never allocated on this CPU machine."""
    r, peak_kib = cli_with_peak_rss("task=tune", "tuner.objective=simulate", "hardware=t4", "model=mixtral-8x7b",
                                    "workload=mtbench", "workload.num_requests=128", "tuner.n_trials=4",
                                    "task.progress=false",
                                    f"tuner.storage=sqlite:///{tmp_path}/s.db", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr
    assert 0 < peak_kib < 3 * 1024 * 1024  # KiB peak RSS of the tune
    rows = json.loads((tmp_path / "run" / "compare" / "comparison.json").read_text())
    kinds = {row["system"]: row.get("kind") for row in rows if row["status"] == "ok"}
    assert kinds and set(kinds.values()) == {"simulated"} and "cgopipe" in kinds
    assert {row["status"] for row in rows if row["system"] == "accelerate"} == {"skipped"}
    assert "simulated on profile t4" in r.stdout


def _edit_tokenizer(folder) -> None:
    """A tokenizer.json whose vocabulary differs by one piece: the same text gets other ids."""
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    piece = next(p for p in vocab if p.isalpha() and len(p) > 1)
    vocab[piece + "x"] = vocab.pop(piece)
    (folder / "tokenizer.json").write_text(json.dumps(tok))


def test_an_edited_tokenizer_is_another_study_for_a_prompts_file(tmp_path, tiny_path):
    """Text prompts are encoded by the folder's tokenizer: a study of a prompts file measured with the old
    tokenizer.json is not resumed under the edited one (the refusal names the file); synthetic prompts
    read no tokenizer, so their study does not change."""
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_path, folder)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": 0, "prompt": "hello world"}\n')
    texts = Workload(name="jsonl", path=str(prompts))
    cfg = cfg_for(tmp_path, name="T", model=ModelSpec(name="hf", path=str(folder)), workload=texts)
    synthetic = cfg_for(tmp_path, model=ModelSpec(name="hf", path=str(folder)))
    one_trial(cfg)
    before = study_identity(synthetic, spec_of(synthetic))
    _edit_tokenizer(folder)
    with pytest.raises(ConfigError) as exc:
        open_study(cfg, spec_of(cfg))
    assert "\n" not in str(exc.value) and "model.checkpoint_files.tokenizer.json: " in str(exc.value)
    assert study_identity(synthetic, spec_of(synthetic)) == before


def test_a_folder_without_tokenizer_files_keeps_its_fingerprint(tmp_path, tiny_path):
    """Only the tokenizer and generation files a folder has are fingerprinted: one without them (and with
    files of other kinds, a README) has the fields it had before these files were counted."""
    from moe_lightning.tuner.identity import checkpoint_files

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny_path / name).read_bytes())
    (bare / "README.md").write_text("a model card")
    assert checkpoint_files(bare) == {}
    assert set(checkpoint_files(tiny_path)) == {"tokenizer.json", "generation_config.json"}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": 0, "input_ids": [5, 6]}\n')
    cfg = cfg_for(tmp_path, model=ModelSpec(name="hf", path=str(bare)), workload=Workload(path=str(prompts)))
    fields = study_identity(cfg, spec_of(cfg))[1]
    assert "model.checkpoint_content" in fields and not any(k.startswith("model.checkpoint_files") for k in fields)


def test_a_renamed_checkpoint_folder_keeps_its_study_and_part_files(tmp_path, tiny_path):
    """Documents name a model=hf checkpoint after its folder, but its identity is its content: the same
    checkpoint under another folder name is the same study and the same run, stamped "hf" as before."""
    import shutil

    from moe_lightning.tasks.outputs import run_fields

    cfgs = []
    for name in ("Tiny-MoE-v0.1", "renamed"):
        shutil.copytree(tiny_path, tmp_path / name)
        cfgs.append(cfg_for(tmp_path, model=ModelSpec(name="hf", path=str(tmp_path / name))))
    (name_a, fields_a), (name_b, fields_b) = (study_identity(c, spec_of(c)) for c in cfgs)
    assert spec_of(cfgs[0]).name == "Tiny-MoE-v0.1"
    assert name_a == name_b and fields_a == fields_b and fields_a["model.name"] == "hf"
    runs = [run_fields(c, spec_of(c), "cpu") for c in cfgs]
    assert runs[0] == runs[1] and runs[0]["model.name"] == "hf"
