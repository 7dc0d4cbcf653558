"""A checkpoint's generation_config.json, as transformers' generate takes it: its eos ids (a list stops a
sequence on any of them, overriding config.json's) and its repetition penalty give transformers' own
greedy tokens through every system; the fields that would change the tokens and are not implemented are
refused in one line naming the field and its value; sampling settings are named, not applied."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from moe_lightning.config import HardwareSpec, ModelSpec, Policy, Sampling, Workload
from moe_lightning.engine.cgopipe import CGOPipeRunner
from moe_lightning.engine.generation import generate
from moe_lightning.engine.hf_config import shown
from moe_lightning.engine.reference import ReferenceRunner
from moe_lightning.engine.weights import resolve_model
from moe_lightning.errors import CheckpointError
from moe_lightning.tasks.generate import decoding_note, generation_params
from tests.conftest import PARITY_NEW_TOKENS, prompt_workload
from tests.models.test_families import BASELINES

PENALTY = 1.3


def write_generation_config(folder, **fields) -> None:
    (folder / "generation_config.json").write_text(json.dumps(fields))


def load(folder) -> ModelSpec:
    return resolve_model(ModelSpec(name="hf", path=str(folder), dtype="float32"))[0]


def hf_generate(model, prompt: list[int], **kwargs) -> list[int]:
    """transformers' generate with the model's own generation config (from its folder), greedy."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=PARITY_NEW_TOKENS, do_sample=False, **kwargs)
    return out[0, len(prompt):].tolist()


# ---- what is read ----

def test_without_the_file_config_json_eos_ids_stop_generation(ckpt):
    (ckpt / "generation_config.json").unlink()
    spec = load(ckpt)
    assert spec.stop_token_ids == (2,) and spec.eos_token_ids is None and spec.repetition_penalty == 1.0
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(cfg | {"eos_token_id": [2, 7, 2]}))
    spec = load(ckpt)
    assert spec.eos_token_id == 2 and spec.stop_token_ids == (2, 7)


def test_the_file_overrides_config_json(ckpt):
    write_generation_config(ckpt, eos_token_id=[9, 4], repetition_penalty=1.05, bos_token_id=1, pad_token_id=0,
                            max_length=4096, use_cache=True, transformers_version="4.40.0", custom_key="kept")
    spec = load(ckpt)
    assert spec.eos_token_id == 2 and spec.stop_token_ids == (9, 4) and spec.repetition_penalty == 1.05
    write_generation_config(ckpt, eos_token_id=5)
    assert load(ckpt).stop_token_ids == (5,)
    # A file without eos_token_id: transformers' generate then never stops early (it does not fall back).
    write_generation_config(ckpt, bos_token_id=1)
    assert load(ckpt).stop_token_ids == ()
    write_generation_config(ckpt, eos_token_id=2)   # what save_pretrained writes: the same as config.json
    assert load(ckpt).eos_token_ids is None


def test_sampling_overrides_the_penalty_and_ignore_eos_drops_the_stop_ids(ckpt):
    write_generation_config(ckpt, eos_token_id=[9, 4], repetition_penalty=PENALTY)
    spec = load(ckpt)
    params = generation_params(Workload(gen_len=8), Sampling(), spec)
    assert params.eos_ids == (9, 4) and params.repetition_penalty == PENALTY and params.max_new_tokens == 8
    params = generation_params(Workload(), Sampling(repetition_penalty=1.0, ignore_eos=True), spec)
    assert params.eos_ids == () and params.repetition_penalty == 1.0


@pytest.mark.parametrize("field, value", [
    ("no_repeat_ngram_size", 3), ("bad_words_ids", [[5]]), ("forced_bos_token_id", 1), ("forced_eos_token_id", 2),
    ("suppress_tokens", [5]), ("begin_suppress_tokens", [5]), ("min_new_tokens", 4), ("min_length", 10),
    ("num_beams", 4), ("num_return_sequences", 2), ("sequence_bias", {"5": -1.0}), ("guidance_scale", 1.5),
    ("exponential_decay_length_penalty", [4, 1.1]), ("penalty_alpha", 0.6), ("dola_layers", "low"),
    ("stop_strings", ["\n"]), ("max_time", 1.0), ("token_healing", True), ("num_beams", True),
])
def test_fields_that_change_the_tokens_are_refused_in_one_line(ckpt, field, value):
    write_generation_config(ckpt, eos_token_id=2, **{field: value})
    with pytest.raises(CheckpointError) as exc:
        load(ckpt)
    msg = str(exc.value)
    assert "\n" not in msg and "generation_config.json: " in msg
    assert f"{field}={shown(value)} changes the generated tokens and is not implemented" in msg


@pytest.mark.parametrize("fields, fragment", [
    ({"eos_token_id": 512}, "eos_token_id must be a token id in [0, vocab_size=512)"),
    ({"eos_token_id": []}, "got []"),
    ({"repetition_penalty": 0}, "repetition_penalty must be a positive number or null, got 0"),
    ({"repetition_penalty": "1.1"}, "repetition_penalty must be a positive number"),
    ({"do_sample": "yes"}, "do_sample must be true, false or null"),
])
def test_bad_values_are_refused(ckpt, fields, fragment):
    write_generation_config(ckpt, **fields)
    with pytest.raises(CheckpointError, match="generation_config.json: ") as exc:
        load(ckpt)
    assert fragment in str(exc.value)


def test_not_an_object_is_refused(ckpt):
    (ckpt / "generation_config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="generation_config.json: must be a JSON object"):
        load(ckpt)


def test_values_that_change_nothing_are_accepted(ckpt):
    write_generation_config(ckpt, eos_token_id=2, num_beams=1, no_repeat_ngram_size=0, suppress_tokens=[],
                            min_length=1, min_new_tokens=0, guidance_scale=1.0, num_return_sequences=1,
                            bad_words_ids=None, renormalize_logits=True, encoder_repetition_penalty=1.2,
                            max_new_tokens=512, prompt_lookup_num_tokens=3, cache_implementation="static")
    assert load(ckpt).stop_token_ids == (2,)


def test_a_file_asking_for_sampling_is_named_not_applied(ckpt, caplog):
    """Qwen1.5-MoE-A2.7B-Chat's generation_config.json, verbatim: decoding stays as sampling.* says."""
    write_generation_config(ckpt, bos_token_id=1, pad_token_id=1, do_sample=True, eos_token_id=[5, 2],
                            repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20,
                            transformers_version="4.37.0")
    spec = load(ckpt)
    params = generation_params(Workload(), Sampling(), spec)
    with caplog.at_level(logging.WARNING, logger="moe_lightning.generate"):
        note = decoding_note(params, spec, Sampling())
    assert note == {"mode": "greedy", "stop_token_ids": [5, 2], "repetition_penalty": 1.05,
                    "sampling_not_applied": {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8}}
    [line] = [r.getMessage() for r in caplog.records]
    assert "asks for sampling (do_sample=true, temperature=0.7, top_k=20, top_p=0.8), which is not applied" in line
    assert line.endswith("(greedy)")
    write_generation_config(ckpt, do_sample=False, temperature=0.7)
    assert "sampling_not_applied" not in decoding_note(params, load(ckpt), Sampling())


# ---- tokens: transformers' generate with the file, through every system ----

@pytest.fixture(scope="module")
def penalised(tiny_path, prompts, tmp_path_factory):
    """A copy of the tiny checkpoint whose generation_config.json has an eos list of two ids that each end
    some of transformers' outputs early (neither is config.json's eos) and repetition_penalty 1.3; its
    spec and weights, and transformers' greedy outputs with that file."""
    from transformers import MixtralForCausalLM

    folder = tmp_path_factory.mktemp("penalised") / "ckpt"
    shutil.copytree(tiny_path, folder)
    write_generation_config(folder, repetition_penalty=PENALTY, bos_token_id=1)   # no eos: never stops
    hf = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    free = [hf_generate(hf, p) for p in prompts]
    a = free[0][5]
    b = next(t for out in free[1:] for t in out[2:(out.index(a) if a in out else None)]
             if t != a and t not in free[0][:6])
    write_generation_config(folder, eos_token_id=[a, b], repetition_penalty=PENALTY, bos_token_id=1)
    hf = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    want = [hf_generate(hf, p) for p in prompts]
    plain = [hf_generate(hf, p, repetition_penalty=1.0) for p in prompts]
    spec, source = resolve_model(ModelSpec(name="hf", path=str(folder), dtype="float32"))
    return spec, source, want, plain, (a, b)


def test_the_parity_reference_is_not_vacuous(penalised):
    """transformers' outputs stop on each of the two ids, and the penalty changes them."""
    spec, _, want, plain, (a, b) = penalised
    assert spec.stop_token_ids == (a, b) and 2 not in (a, b)
    for eos in (a, b):
        assert any(len(o) < PARITY_NEW_TOKENS and o[-1] == eos for o in want)
    assert want != plain


SYSTEMS = ["reference", "cgopipe-admission", "cgopipe-static", *BASELINES]


@pytest.mark.parametrize("system", SYSTEMS)
def test_tokens_identical_to_transformers_with_the_file(penalised, prompts, system, device):
    spec, source, want, _, _ = penalised
    params = generation_params(Workload(gen_len=PARITY_NEW_TOKENS), Sampling(), spec)
    if system == "reference":
        runner, batch = ReferenceRunner(spec, source), 8
    elif system.startswith("cgopipe"):
        static = system == "cgopipe-static"
        policy = Policy(batch_size=10, micro_batch_size=3, expert_gpu_fraction=0.5, kv_gpu_fraction=0.4)
        runner = CGOPipeRunner(spec, source, HardwareSpec(), policy, prompt_workload(prompts, padding=static), device)
        assert runner.admits != static
        batch = runner.batch_size
    else:
        cls, policy = BASELINES[system]
        runner = cls(policy_source="given").build(spec, source, HardwareSpec(), policy, prompt_workload(prompts),
                                                  device)
        batch = policy.batch_size
    assert generate(runner, prompts, params, batch).output_ids == want


def test_sampling_repetition_penalty_overrides_the_files(penalised, prompts):
    spec, source, _, plain, _ = penalised
    params = generation_params(Workload(gen_len=PARITY_NEW_TOKENS), Sampling(repetition_penalty=1.0), spec)
    assert generate(ReferenceRunner(spec, source), prompts, params, 8).output_ids == plain
