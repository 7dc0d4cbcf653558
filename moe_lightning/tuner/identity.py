"""A study's identity: a fingerprint of everything its objective depends on.

A study resumes only when the fingerprint stored on it equals the one of the run that opens it; reusing
a study name with another fingerprint is refused with one line naming the fields that differ. The
default study name ends with the fingerprint, so a changed config starts a study of its own.

What is fingerprinted:
- the system's config, the objective kind (measure / simulate) and single or multi-objective;
- the model spec as resolved (shapes, dtype, weights kind and seed) and, for a checkpoint, its content:
  config.json, and each safetensors file's size, header (names, shapes, dtypes, offsets) and three 1 MiB
  samples of its data (start, middle, end). Reading every byte of a 90 GB checkpoint to open a study is
  not worth it; a rewritten tensor of the same shape outside the samples goes unnoticed;
- with a prompts file, the sha256 of each of the checkpoint's tokenizer and generation files that it has
  (`checkpoint_files`): the tokenizer turns the file's text prompts into the lengths measured. Left out
  for synthetic prompts (random ids: no tokenizer is read) and absent from a folder without such files,
  so that those studies keep the fingerprint they had before these files were counted;
- the workload's lengths, gen_len, request count, padding, seed and the prompt file's content (sha256);
  not its name or the file's path;
- the hardware profile's values;
- the search space (batch and micro-batch bounds, kernels searched, the tensor degrees of a searched
  split), the policy fields that are not searched, and the sampling settings;
- on several GPUs (or a given split), the T x E split (`parallel.tensor` and `parallel.expert`, or
  "searched" where the study searches it: the user's 1 x 1 then asks for the search, it fixes nothing)
  and `parallel.chunks`, the EPS-MoE chunk count the simulator and HRM price; not `parallel.backend`,
  which no simulated figure depends on (a measured tune runs one rank);
- for measured studies, the device asked for and the thread settings, which change what is measured.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_lightning.config import ModelSpec
from moe_lightning.errors import ConfigError

if TYPE_CHECKING:
    from moe_lightning.run_config import RunConfig  # type hints only: it sits above the tasks

SAMPLE_BYTES = 1 << 20
SEARCHED = ("batch_size", "micro_batch_size", "attn_on_gpu", "expert_gpu_fraction", "kv_gpu_fraction",
            "prefetch_depth", "expert_kernel")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# A checkpoint's files besides config.json and the weights that the tokens of a run depend on: those
# transformers' AutoTokenizer reads to encode text prompts (the tokenizer's class, its vocabulary, merges and
# special tokens; tokenizer.json also decodes the outputs) and generation_config.json (the stop ids and the
# repetition penalty). Chat templates are not: no task applies one (one inside tokenizer_config.json counts
# with that file).
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "*.model", "*.tiktoken", "generation_config.json")


def checkpoint_files(folder: str | Path) -> dict[str, str]:
    """{file name: sha256} of the folder's tokenizer and generation files (TOKENIZER_PATTERNS) that exist;
    {} for a folder that has none, which adds no field to a fingerprint."""
    folder = Path(folder)
    found = {f for pattern in TOKENIZER_PATTERNS for f in folder.glob(pattern) if f.is_file()}
    return {f.name: file_sha256(f) for f in sorted(found)}


def checkpoint_fingerprint(folder: str | Path) -> str:
    """config.json plus each safetensors file's size, header and sampled data (see module docstring)."""
    folder = Path(folder)
    h = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        h.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            head = f.read(8)
            h.update(head)
            if len(head) == 8:
                h.update(f.read(min(int.from_bytes(head, "little"), 100 << 20)))
            for offset in (0, size // 2, max(0, size - SAMPLE_BYTES)):
                f.seek(offset)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


# Fields added after fingerprints were first stored: left out while at their defaults (which mean what
# running without them meant), so that a study or an interrupted run's outputs from before them resume.
LATER_DEFAULTS = {"model.eos_token_ids": None, "model.repetition_penalty": 1.0, "sampling.repetition_penalty": None}


def drop_later_defaults(flat: dict[str, Any]) -> dict[str, Any]:
    for key, default in LATER_DEFAULTS.items():
        if key in flat and flat[key] == default:
            del flat[key]
    return flat


def configured_name(cfg: RunConfig, spec: ModelSpec) -> str:
    """The model's name as configured ("hf" for model=hf, whose resolved spec is named after its folder):
    a checkpoint's identity is its content, so a renamed folder (or a version that names it) changes
    no fingerprint, and the studies and part files stamped with "hf" resume."""
    return "hf" if cfg.model.name == "hf" else spec.name


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def study_fields(cfg: RunConfig, spec: ModelSpec, search_space: dict[str, Any]) -> dict[str, Any]:
    """The flat {field: value} the objective depends on (JSON values)."""
    as_dict = dataclasses.asdict
    model = {k: v for k, v in as_dict(spec).items() if k != "path"}
    model["name"] = configured_name(cfg, spec)
    if spec.weights == "checkpoint" and spec.path:
        model["checkpoint_content"] = checkpoint_fingerprint(spec.path)
        if cfg.workload.path:   # text prompts are encoded by the folder's tokenizer (module docstring)
            model["checkpoint_files"] = checkpoint_files(spec.path)
    w = cfg.workload
    workload = {"prompt_len_avg": w.prompt_len_avg, "prompt_len_max": w.prompt_len_max, "gen_len": w.gen_len,
                "num_requests": w.num_requests, "padding": w.padding, "seed": w.seed,
                "prompts_sha256": file_sha256(w.path) if w.path and Path(w.path).is_file() else None}
    measured = cfg.tuner.objective == "measure"
    p = cfg.parallel
    parallel = None   # one GPU, no split: the objective never reads `parallel` (and older studies resume)
    if cfg.hardware.gpu.count > 1 or p.world_size > 1:
        searched = "tensor" in search_space   # search.searched_tensor: T is a trial parameter, E = GPUs / T
        parallel = {"tensor": "searched" if searched else p.tensor, "expert": "searched" if searched else p.expert,
                    "chunks": p.chunks}
    tree = {
        "system": as_dict(cfg.system),
        "objective": cfg.tuner.objective,
        "multi_objective": cfg.tuner.multi_objective,
        "model": model,
        "workload": workload,
        "hardware": as_dict(cfg.hardware),
        "search_space": search_space,
        **({"parallel": parallel} if parallel else {}),
        "policy": {k: v for k, v in as_dict(cfg.policy).items() if k not in SEARCHED},
        "sampling": as_dict(cfg.sampling),
        "measurement": {"device": cfg.device, "threads": as_dict(cfg.threads)} if measured else None,
    }
    flat: dict[str, Any] = {}
    flatten("", json.loads(json.dumps(tree, default=str)), flat)
    return drop_later_defaults(flat)


def digest(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


_MISSING = object()


def differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`field: stored -> current` for each field that differs, top-level fields first; the subfields of a
    block that is null on one side are not listed one by one."""
    nulls = {k for d in (stored, current) for k, v in d.items() if v is None}
    keys = sorted(set(stored) | set(current), key=lambda k: (k.count("."), k))
    keys = [k for k in keys if not any(k.startswith(n + ".") for n in nulls)]
    out = []
    for k in keys:
        a, b = stored.get(k, _MISSING), current.get(k, _MISSING)
        if a != b:
            out.append(f"{k}: {_show(k, a, stored)} -> {_show(k, b, current)}")
    return out


def _show(key: str, value: Any, fields: dict[str, Any]) -> str:
    if value is not _MISSING:
        return json.dumps(value)[:40]
    return "{...}" if any(f.startswith(key + ".") for f in fields) else "(absent)"  # a block: its fields


def check_identity(study, fields: dict[str, Any]) -> None:
    """Stamp a new study with `fields`, or refuse (one line) to resume one whose fingerprint differs."""
    stored = study.user_attrs.get("fingerprint_fields")
    if stored is None:
        if study.trials:
            raise ConfigError(f"study {study.study_name!r} holds {len(study.trials)} trials but no fingerprint (made "
                              f"by an older version): its results cannot be matched to this config; choose another "
                              f"tuner.study_name")
        study.set_user_attr("fingerprint", digest(fields))
        study.set_user_attr("fingerprint_fields", fields)
        return
    if stored == fields:
        return
    diff = differences(stored, fields)
    shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
    raise ConfigError(f"study {study.study_name!r} was made for another config ({shown}): its trials would not "
                      f"measure this one; choose another tuner.study_name, or drop tuner.study_name for one "
                      f"named after this config")
