"""A developer's sweep, not a test: for each family, a tiny checkpoint written by transformers with one
config.json field at a non-default value (built with it, or edited into config.json after the save), then
transformers' fp32 greedy tokens against the CLI's `task=generate` through system=reference and
system=cgopipe. One line per variant: MATCH, REFUSED (exit code and the one line), MISMATCH (both token
lists), TRACEBACK (a failure that is not one line), or HF_FAIL / HF_BUILD_FAIL where transformers itself
cannot build or run the checkpoint; [differs] / [SAME-AS-BASE] says whether transformers' tokens moved
from the family's base checkpoint (a MATCH on SAME-AS-BASE shows nothing). GAIN=1 scales every family's
q/k projections and experts x4, as the MLA and gpt-oss fixtures are, for more sensitive tokens.

    MOE_LIGHTNING_CACHE=... PYTHONPATH=. python tests/models/family_field_sweep.py [family | family:variant ...]

About 5 s a variant on a 2-core host; SWEEP_DIR (default /tmp/family-field-sweep) holds the checkpoints."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from moe_lightning.config import ModelSpec
from moe_lightning.engine.tiny import MLA_GAIN, build_tokenizer, hf_classes
from moe_lightning.models import family
from tests.models.test_families import FAMILIES, SHAPES

DELETE = "__DELETE__"
ROOT = Path(os.environ.get("SWEEP_DIR", "/tmp/family-field-sweep"))
PY = sys.executable
NEW = 8
g = torch.Generator().manual_seed(7)
PROMPTS = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (5, 17, 11)]
SPECS = dict(FAMILIES)
SPECS["mixtral"] = ModelSpec(name="hf", architecture="mixtral", num_layers=2, **SHAPES)
SPECS.pop("gpt_oss_mxfp4")

LINEAR = {"rope_type": "linear", "factor": 4.0}
DYN = {"rope_type": "dynamic", "factor": 4.0}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
OLD_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}


def yarn(**changes) -> dict:
    """Build kwargs with YaRN RoPE (theta 1e4), `changes` on top."""
    return {"rope_parameters": YARN | {"rope_theta": 1e4} | changes}


COMMON = {
    "tie_word_embeddings": ({"tie_word_embeddings": True}, {}),
    "hidden_act_gelu": ({"hidden_act": "gelu"}, {}),
    "rms_eps_big": ({"rms_norm_eps": 0.5}, {}),
    "rope_theta_small": ({}, {"rope_theta": 50.0, "rope_parameters": DELETE}),
    "rope_linear": ({}, {"rope_parameters": LINEAR | {"rope_theta": 1e4}}),
    "rope_dynamic": ({}, {"rope_parameters": DYN | {"rope_theta": 1e4}}),
    "rope_llama3": ({}, {"rope_parameters": LLAMA3 | {"rope_theta": 1e4}}),
    "rope_yarn": ({}, {"rope_parameters": YARN | {"rope_theta": 1e4}}),
    "rope_scaling_old_linear": ({}, {"rope_scaling": LINEAR, "rope_parameters": DELETE}),
    "partial_rotary": ({}, {"partial_rotary_factor": 0.5}),
    "partial_rotary_nested": ({}, {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                       "partial_rotary_factor": 0.5}}),
    "mqa_kv1": ({"num_key_value_heads": 1}, {}),
    "kv_heads_absent": ({}, {"num_key_value_heads": DELETE}),
    "head_dim_wide": ({"head_dim": 32}, {}),
    "attention_bias": ({"attention_bias": True}, {}),
    "mlp_bias": ({}, {"mlp_bias": True}),
    "eos_list": ({}, {"eos_token_id": [2, 7]}),
    "sliding_window_4": ({}, {"sliding_window": 4}),
    "dtype_bf16_config": ({}, {"dtype": "bfloat16"}),
    "dtype_weird": ({}, {"dtype": "float8_e4m3fn"}),
    "pretraining_tp": ({}, {"pretraining_tp": 2}),
}
PER_FAMILY = {
    "mixtral": {
        "experts_alias": ({}, {"num_experts": 8, "num_local_experts": DELETE}),
        "sliding_window_small_build": ({"sliding_window": 4}, {}),
        "norm_topk_false": ({}, {"norm_topk_prob": False}),
        "router_jitter": ({"router_jitter_noise": 0.5}, {}),
    },
    "qwen2_moe": {
        "qkv_bias_false": ({"qkv_bias": False}, {}),
        "no_qkv_bias_key": ({}, {"qkv_bias": DELETE}),
        "norm_topk_true": ({"norm_topk_prob": True}, {}),
        "sparse_step_2": ({"decoder_sparse_step": 2, "mlp_only_layers": []}, {}),
        "shared_zero": ({"shared_expert_intermediate_size": 0}, {}),
        "use_sliding": ({"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}, {}),
        "use_sliding_cfg_only": ({}, {"use_sliding_window": True, "sliding_window": 4, "layer_types": DELETE}),
        "layer_types_sliding": ({}, {"layer_types": ["sliding_attention"] * 3, "sliding_window": 4}),
        "num_local_experts_key": ({}, {"num_local_experts": 8}),
    },
    "qwen3_moe": {
        "attention_bias_false": ({"attention_bias": False}, {}),
        "norm_topk_false": ({"norm_topk_prob": False}, {}),
        "sparse_step_2": ({"decoder_sparse_step": 2, "mlp_only_layers": []}, {}),
        "use_sliding": ({"use_sliding_window": True, "sliding_window": 4}, {}),
        "layer_types_sliding": ({}, {"layer_types": ["sliding_attention"] * 4, "sliding_window": 4,
                                     "use_sliding_window": True}),
        "head_dim_absent": ({}, {"head_dim": DELETE}),
    },
    "olmoe": {
        "head_dim_build": ({"head_dim": 8}, {}),
        "experts_alias": ({}, {"num_local_experts": 8, "num_experts": DELETE}),
        "clip_none": ({"clip_qkv": None}, {}),
        "norm_topk_true": ({"norm_topk_prob": True}, {}),
        "attention_bias_false": ({"attention_bias": False, "clip_qkv": None}, {}),
        "head_dim_cfg": ({}, {"head_dim": 8}),
    },
    "dbrx": {
        "clip_none": ({"attn_config": {"kv_n_heads": 2, "clip_qkv": None, "rope_theta": 1e4}}, {}),
        "kv1": ({"attn_config": {"kv_n_heads": 1, "clip_qkv": 0.5, "rope_theta": 1e4}}, {}),
        "norm_none": ({"ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2,
                                      "moe_normalize_expert_weights": None}}, {}),
        "rope_only_in_attn": ({}, {"rope_parameters": DELETE, "rope_theta": DELETE,
                                   "attn_config": {"kv_n_heads": 2, "clip_qkv": 0.5, "rope_theta": 50.0}}),
        "jitter": ({"ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2,
                                   "moe_jitter_eps": 0.5}}, {}),
        "head_dim_cfg": ({}, {"head_dim": 8}),
    },
    "deepseek_v2": {
        "greedy": ({"topk_method": "greedy"}, {}),
        "greedy_with_groups": ({"topk_method": "greedy", "n_group": 4, "topk_group": 1}, {}),
        "q_lora": ({"q_lora_rank": 24}, {}),
        "no_dense": ({"first_k_dense_replace": 0}, {}),
        "no_shared": ({"n_shared_experts": 0}, {}),
        "scale_1": ({"routed_scaling_factor": 1.0}, {}),
        "rope_default": ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, {}),
        "yarn_no_mscale": ({"rope_parameters": YARN | {"rope_theta": 1e4}}, {}),
        "yarn_factor_none": ({}, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4,
                                                      "original_max_position_embeddings": 64}}),
        "kv_heads_2": ({"num_key_value_heads": 2}, {}),
        "rope_interleave_false": ({}, {"rope_interleave": False}),
        "moe_layer_freq_2": ({}, {"moe_layer_freq": 2}),
        "head_dim_cfg": ({}, {"head_dim": 32}),
    },
    "deepseek_v3": {
        "routing_keys_absent": ({}, {"routed_scaling_factor": DELETE, "norm_topk_prob": DELETE}),
        "yarn_mscale_only_all": (yarn(mscale=0.0, mscale_all_dim=0.8), {}),
        "yarn_mscale_only": (yarn(mscale=1.0, mscale_all_dim=0.0), {}),
        "yarn_factor_1": (yarn(factor=1.0, mscale=1.0, mscale_all_dim=1.0), {}),
        "yarn_truncate_false": ({"rope_parameters": YARN | {"rope_theta": 1e4, "truncate": False}}, {}),
        "yarn_betas": ({"rope_parameters": YARN | {"rope_theta": 1e4, "beta_fast": 8.0, "beta_slow": 2.0}}, {}),
        "rope_scaling_old_yarn": ({}, {"rope_parameters": DELETE, "rope_theta": 1e4, "rope_scaling": OLD_YARN}),
        "both_rope_keys": ({}, {"rope_scaling": OLD_YARN | {"factor": 2.0}}),
        "rope_interleave_false": ({"rope_interleave": False}, {}),
        "norm_topk_false": ({"norm_topk_prob": False}, {}),
        "n_group_1": ({"n_group": 1, "topk_group": 1}, {}),
        "no_q_lora": ({"q_lora_rank": None}, {}),
        "rope_default": ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, {}),
        "yarn_no_mscale": ({"rope_parameters": YARN | {"rope_theta": 1e4}}, {}),
        "yarn_factor_none": ({}, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4,
                                                      "original_max_position_embeddings": 64}}),
        "topk_method_greedy": ({}, {"topk_method": "greedy"}),
        "scoring_softmax": ({}, {"scoring_func": "softmax"}),
        "n_group_none": ({}, {"n_group": None, "topk_group": None}),
        "num_mtp_0": ({}, {"num_mtp_layers": 0, "num_nextn_predict_layers": DELETE}),
    },
    "gpt_oss": {
        "yarn_mscale_pair": ({"rope_parameters": YARN | {"rope_theta": 1e4, "mscale": 1.0, "mscale_all_dim": 0.5}}, {}),
        "yarn_factor_1": ({"rope_parameters": YARN | {"rope_theta": 1e4, "factor": 1.0}}, {}),
        "yarn_betas": ({"rope_parameters": YARN | {"rope_theta": 1e4, "beta_fast": 8.0, "beta_slow": 2.0}}, {}),
        "rope_scaling_old_yarn": ({}, {"rope_parameters": DELETE, "rope_theta": 1e4,
                                        "rope_scaling": YARN | {"truncate": False}}),
        "window_big_all_sliding": ({"sliding_window": 5000, "layer_types": ["sliding_attention"] * 3}, {}),
        "no_rope_params": ({}, {"rope_parameters": DELETE}),
        "rope_default": ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}, {}),
        "yarn_truncate": ({"rope_parameters": YARN | {"rope_theta": 1e4, "truncate": True}}, {}),
        "layer_types_absent": ({}, {"layer_types": DELETE}),
        "window_null": ({"sliding_window": None}, {}),
        "attention_bias_false": ({"attention_bias": False}, {}),
        "swiglu_limit_big": ({"swiglu_limit": 100.0}, {}),
        "swiglu_alpha": ({"swiglu_alpha": 0.5}, {}),
        "head_dim_32": ({"head_dim": 32}, {}),
        "all_full": ({"layer_types": ["full_attention"] * 3}, {}),
    },
}


def perturb(model, spec) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.split(".")[-2]:
                p.normal_(1.0, 0.2)
            elif name.endswith((".bias", "_bias")):
                p.normal_(0.0, 0.05 if spec.attention_sinks else 0.2)
            elif name.endswith(".sinks"):
                p.normal_(0.0, 1.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.05)
        if spec.mla or spec.attention_sinks or os.environ.get("GAIN"):
            for name, p in model.named_parameters():
                if any(k in name for k in ("q_proj", "k_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
                                           "experts.")):
                    p.mul_(MLA_GAIN)


TOKENIZER = None


def build(fam: str, build_kw: dict, patch: dict, folder: Path) -> str | None:
    global TOKENIZER
    spec = SPECS[fam]
    config_cls, model_cls = hf_classes(spec)
    kwargs = family(spec).hf_config(spec) | build_kw
    torch.manual_seed(11)
    try:
        model = model_cls(config_cls(**kwargs)).eval()
    except Exception as exc:  # noqa: BLE001
        return f"transformers cannot build: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    perturb(model, spec)
    model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in patch.items():
        if v == DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    if TOKENIZER is None:
        TOKENIZER = ROOT / "tokenizer.json"
        build_tokenizer(512).save(str(TOKENIZER))
    shutil.copy(TOKENIZER, folder / "tokenizer.json")
    return None


def hf_tokens(fam: str, folder: Path) -> list[list[int]] | str:
    spec = SPECS[fam]
    _, model_cls = hf_classes(spec)
    try:
        model = model_cls.from_pretrained(folder, dtype=torch.float32).eval()
        out = []
        for p in PROMPTS:
            with torch.no_grad():
                o = model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
            out.append(o[0, len(p):].tolist())
        return out
    except Exception as exc:  # noqa: BLE001
        return f"transformers cannot run: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def cli(folder: Path, system: str, work: Path) -> tuple[str, object]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "p.jsonl").write_text("".join(json.dumps({"input_ids": p}) + "\n" for p in PROMPTS))
    out = work / f"o-{system}.jsonl"
    cmd = [PY, "-m", "moe_lightning.cli", "task=generate", f"system={system}", "model=hf",
           f"model.path={folder}", "model.dtype=float32", "workload=jsonl", f"workload.path={work / 'p.jsonl'}",
           f"workload.gen_len={NEW}", f"outputs={out}", "task.progress=false", "overwrite=true",
           f"hydra.run.dir={work / ('h-' + system)}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=work, timeout=600)
    err = r.stderr.strip().splitlines()
    if r.returncode != 0:
        tb = "Traceback" in r.stderr
        lines = [e for e in err if e.strip()]
        kind = "TRACEBACK" if tb or len(lines) != 1 else "REFUSED"
        return kind, f"rc={r.returncode} {lines[-1][:220] if lines else ''}"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    rows.sort(key=lambda r: r["id"])
    return "OK", [r["output_ids"] for r in rows]


def main() -> None:
    only = sys.argv[1:]
    ROOT.mkdir(parents=True, exist_ok=True)
    for fam in SPECS:
        if only and fam not in only and not any(o.startswith(fam + ":") for o in only):
            continue
        variants = {"base": ({}, {})} | COMMON | PER_FAMILY.get(fam, {})
        base_tokens = None
        for name, (build_kw, patch) in variants.items():
            if only and fam not in only and f"{fam}:{name}" not in only and name != "base":
                continue
            t0 = time.time()
            folder = ROOT / fam / name / "ckpt"
            shutil.rmtree(folder.parent, ignore_errors=True)
            folder.mkdir(parents=True)
            problem = build(fam, build_kw, patch, folder)
            if problem:
                print(f"{fam:12} {name:26} HF_BUILD_FAIL {problem}", flush=True)
                continue
            want = hf_tokens(fam, folder)
            if name == "base":
                base_tokens = want
            visible = "" if isinstance(want, str) or name == "base" else \
                ("differs" if want != base_tokens else "SAME-AS-BASE")
            results = []
            for system in ("reference", "cgopipe"):
                kind, got = cli(folder, system, folder.parent)
                if kind == "OK":
                    kind = "HF_FAIL" if isinstance(want, str) else ("MATCH" if got == want else "MISMATCH")
                    got = "" if kind == "MATCH" else (want if isinstance(want, str) else f"hf={want} ours={got}")
                results.append(f"{system}={kind} {got}".strip())
                if kind in ("REFUSED",):
                    break
            print(f"{fam:12} {name:26} [{visible}] {time.time() - t0:4.1f}s | " + " | ".join(results), flush=True)


if __name__ == "__main__":
    main()
