"""The bad-input catalogue: the console script, in a subprocess, over bad overrides, config files, output
paths, prompt files, checkpoints, reports and tunes. Each case must exit non-zero with exactly one line
on stderr (`moe-lightning: error: ...`, naming what is wrong), no traceback, and leave every file that
was there before byte-identical, with no new file beside them (Hydra's run folders aside)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

BASE = ("task.progress=false", "workload.num_requests=2", "workload.gen_len=2")
FILE_BASE = ("task.progress=false", "workload.gen_len=2")   # a prompts file decides the number of requests


@dataclass
class Case:
    id: str
    args: tuple[str, ...]
    expect: str                                   # a fragment of the one error line
    setup: Callable[[Path, Path], None] | None = None   # (folder, tiny checkpoint) -> files the case needs
    code: int = 2
    task: str = "generate"
    base: tuple[str, ...] = BASE
    marks: tuple = ()

    def __post_init__(self) -> None:
        if self.base is BASE and "workload=jsonl" in self.args:
            self.base = FILE_BASE


# --------------------------------------------------------------------------------------------------
# Files the cases read


def write(name: str, data: str | bytes) -> Callable[[Path, Path], None]:
    def setup(folder: Path, tiny: Path) -> None:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return setup


def prompts(data: str | bytes) -> Callable[[Path, Path], None]:
    return write("p.jsonl", data)


def both(*setups) -> Callable[[Path, Path], None]:
    def setup(folder: Path, tiny: Path) -> None:
        for s in setups:
            s(folder, tiny)
    return setup


def config_dir(name: str, text: str) -> Callable[[Path, Path], None]:
    def setup(folder: Path, tiny: Path) -> None:
        (folder / "conf" / "hardware").mkdir(parents=True)
        (folder / "conf" / "hardware" / name).write_text(text)
    return setup


PART_HEADER = {"format": "moe-lightning partial outputs", "version": 1, "batch_size": 2, "num_requests": 2,
               "run": {"gen_len": 99}}


HELD: list = []   # locks this process holds for a case, as a run writing the same outputs would


def held_lock(outputs: str) -> Callable[[Path, Path], None]:
    def setup(folder: Path, tiny: Path) -> None:
        from moe_lightning.files import lock_output

        HELD.append(lock_output(folder / outputs, key="outputs"))
    return setup


def held_run_folder(folder_name: str) -> Callable[[Path, Path], None]:
    def setup(folder: Path, tiny: Path) -> None:
        from moe_lightning.files import lock_run_folder

        HELD.append(lock_run_folder(folder / folder_name))
    return setup


def checkpoint(edit: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    def setup(folder: Path, tiny: Path) -> None:
        shutil.copytree(tiny, folder / "ckpt")
        edit(folder / "ckpt")
    return setup


def edit_config(**changes) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        cfg = json.loads((ckpt / "config.json").read_text())
        for k, v in changes.items():
            if v is DELETE:
                del cfg[k]
            else:
                cfg[k] = v
        (ckpt / "config.json").write_text(json.dumps(cfg))
    return edit


DELETE = object()


def config_text(text: str | bytes) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        (ckpt / "config.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return edit


def file_text(name: str, text: str) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        (ckpt / name).write_text(text)
    return edit


def edit_tensors(change: Callable[[dict], None], file: str = "model.safetensors") -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(ckpt / "model.safetensors")
        change(tensors)
        save_file(tensors, ckpt / file)
    return edit


def set_nan(t: dict) -> None:
    t["model.layers.1.block_sparse_moe.experts.3.w2.weight"][0, 0] = float("nan")


def add_scale(t: dict) -> None:
    t["model.layers.0.block_sparse_moe.experts.0.w1.weight_scale"] = torch.ones(128)


def stray_shard(ckpt: Path) -> None:
    from safetensors.torch import save_file

    save_file({"model.layers.0.self_attn.q_proj.weight": torch.zeros(64, 64)}, ckpt / "model-fixed.safetensors")


def index(entries: Callable[[list[str]], dict]) -> Callable[[Path], None]:
    def edit(ckpt: Path) -> None:
        from safetensors import safe_open

        with safe_open(ckpt / "model.safetensors", "pt") as f:
            names = list(f.keys())
        (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": entries(names)}))
    return edit


def escaping(target: str) -> Callable[[list[str]], dict]:
    return lambda names: {n: (target if i == 0 else "model.safetensors") for i, n in enumerate(names)}


def truncate(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4096])


def family_checkpoint(arch: str, edit: Callable[[Path], None]) -> Callable[[Path, Path], None]:
    """The tiny sharded checkpoint of another family (tests/models/test_families.py), copied and edited."""
    def setup(folder: Path, tiny: Path) -> None:
        from moe_lightning.engine.tiny import ensure_tiny
        from tests.models.test_families import FAMILIES

        shutil.copytree(ensure_tiny(FAMILIES[arch], seed=11, max_shard_size="60KB", perturb=True), folder / "ckpt")
        edit(folder / "ckpt")
    return setup


def edit_shard_tensor(name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    """Tensor `name` of a sharded checkpoint replaced by change(it), in the shard the index lists it in."""
    def edit(ckpt: Path) -> None:
        from safetensors.torch import load_file, save_file

        shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]
        tensors = load_file(shard)
        tensors[name] = change(tensors[name])
        save_file(tensors, shard)
    return edit


def listed_shard(tensors: dict) -> Callable[[Path], None]:
    """A new shard holding `tensors`, listed in the index."""
    def edit(ckpt: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, ckpt / "model-extra.safetensors")
        index = json.loads((ckpt / "model.safetensors.index.json").read_text())
        index["weight_map"] |= dict.fromkeys(tensors, "model-extra.safetensors")
        (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return edit


def unlisted_copy(name: str) -> Callable[[Path], None]:
    """A stray shard beside the index holding a tensor another shard holds."""
    def edit(ckpt: Path) -> None:
        from safetensors.torch import save_file

        save_file({name: torch.zeros(8, 64)}, ckpt / "model-stray.safetensors")
    return edit


def run_document() -> Callable[[Path, Path], None]:
    def setup(folder: Path, tiny: Path) -> None:
        (folder / "docs").mkdir()
        (folder / "docs" / "a.json").write_text('{"schema_version": 2, "metrics": {"bogus": 1}}')
        (folder / "docs" / "b.json").write_text('{"schema_ver')
    return setup


TUNE = ("task.progress=false", "workload.num_requests=2", "workload.gen_len=2", "task.compare=false",
        "tuner.storage=sqlite:///runs/s.db")   # the study file lives where the snapshot does not look


def simulated_study(name: str, *args: str) -> Callable[[Path, Path], None]:
    def setup(folder: Path, tiny: Path) -> None:
        r = subprocess.run([sys.executable, "-m", "moe_lightning", "task=tune", *TUNE, "tuner.objective=simulate",
                            "tuner.n_trials=1", f"tuner.study_name={name}", *args], capture_output=True, text=True,
                           timeout=300, cwd=folder)
        assert r.returncode == 0, r.stderr
    return setup


# --------------------------------------------------------------------------------------------------
# The catalogue

JSONL = ("workload=jsonl", "workload.path=p.jsonl")
HF = ("model=hf", "model.path=ckpt")
ROOT = os.geteuid() == 0

CASES = [
    # Overrides and config files
    Case("unknown-key", ("policy.nope=1",), "unknown key 'policy.nope'"),
    Case("add-unknown-key", ("+policy.foo=1",), "unknown key 'policy.foo'"),
    Case("force-add-misspelt-key", ("++workload.gen_lenn=4",), "unknown key 'workload.gen_lenn'"),
    Case("add-existing-key", ("+workload.gen_len=3",), "drop the '+'"),
    Case("delete-group", ("~policy",), "instead of deleting it"),
    Case("unknown-group-option", ("hardware=t5",), "unknown hardware 't5'"),
    # Several GPUs: no parallelism yet, so a measured run would silently use one device with their pooled budget.
    Case("measure-on-several-gpus", ("hardware=2xt4",), "measure with a one-GPU profile"),
    Case("unknown-task", ("task=nope",), "unknown task 'nope'"),
    Case("word-for-integer", ("policy.batch_size=many",), "expected an integer"),
    Case("empty-integer", ("policy.batch_size=",), "expected an integer"),
    Case("override-grammar", ("policy.batch_size=[1",), "no viable alternative"),
    Case("fraction-above-one", ("policy.expert_gpu_fraction=2",), "must be in [0, 1]"),
    Case("micro-batch-above-batch", ("policy.batch_size=2", "policy.micro_batch_size=4"), "policy.micro_batch_size"),
    Case("zero-batch", ("policy.batch_size=0",), "policy.batch_size: must be > 0"),
    Case("kv-dtype-not-implemented", ("policy.kv_dtype=bfloat16",), "the KV cache in a dtype other than the model's "
         "is not implemented"),
    Case("zero-gen-len", ("workload.gen_len=0",), "workload.gen_len: must be > 0"),
    Case("zero-requests", ("workload.num_requests=0",), "workload.num_requests: must be > 0"),
    Case("top-p-above-one", ("sampling.top_p=1.5",), "sampling.top_p"),
    Case("negative-temperature", ("sampling.temperature=-1",), "sampling.temperature"),
    Case("negative-cores", ("threads.cores=-1",), "threads.cores"),
    # Infinity passes every "> 0" bound: each float of every group must be finite
    Case("infinite-temperature", ("sampling.temperature=inf",),
         "sampling.temperature: must be a finite number, got inf"),
    Case("bench-infinite-min-repeat", ("task.min_repeat_s=inf",), "task.min_repeat_s: must be a finite number",
         task="bench"),
    Case("bench-negative-host-wait", ("task.host_wait_s=-1",), "task.host_wait_s: must be >= 0", task="bench"),
    Case("generate-infinite-host-wait", ("task.host_wait_s=inf",), "task.host_wait_s: must be a finite number",
         task="generate"),
    Case("plan-infinite-gpu-memory", ("hardware=t4", "model=mixtral-8x7b", "workload=mtbench",
                                      "hardware.gpu.memory_gib=inf"),
         "hardware.gpu.memory_gib: must be a finite number", task="plan", base=()),
    Case("plan-infinite-link", ("hardware=t4", "model=mixtral-8x7b", "workload=mtbench", "hardware.link.h2d_gbps=inf"),
         "hardware.link.h2d_gbps: must be a finite number", task="plan", base=()),
    Case("negative-warmup", ("task.warmup_tokens=-1",), "task.warmup_tokens: must be an integer >= 0"),
    Case("team-bound-to-one-core", ("threads.pin=one", "threads.gpu=2"), "threads.pin: one with threads.gpu=2"),
    Case("unknown-pin", ("threads.pin=two",), "threads.pin: must be one of auto, one, none"),
    Case("unknown-device", ("device=tpu",), "accepted: auto, cpu, cuda"),
    Case("cuda-without-cuda", ("device=cuda",), "no CUDA device",
         marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="this host has CUDA"),)),
    Case("unknown-dtype", ("model.dtype=int8",), "model.dtype"),
    Case("config-dir-bad-yaml", ("--config-dir", "conf", "hardware=bad"), "bad.yaml",
         setup=config_dir("bad.yaml", "name: bad\ngpu: [\n"), task="plan", base=()),
    Case("config-dir-schema", ("--config-dir", "conf", "hardware=odd"), "hardware.gpu.count",
         setup=config_dir("odd.yaml", "name: odd\ngpu: {name: x, count: one}\n"), task="plan", base=()),
    # A partial profile would take the rest from the schema's defaults (the cpu preset's), silently
    Case("config-dir-partial-profile", ("--config-dir", "conf", "hardware=part"),
         "hardware=part (conf/hardware/part.yaml) does not give gpu.name, gpu.count, gpu.bandwidth_gbps",
         setup=config_dir("part.yaml", "name: part\ngpu: {memory_gib: 40}\n"), task="plan", base=()),
    Case("config-dir-missing", ("--config-dir", "nodir"), "no such folder", task="plan", base=()),
    # Hydra's flags stand anywhere among the overrides; a flag Hydra has not, or without its value, is one line
    Case("unknown-flag-among-overrides", ("--bogus", "workload.gen_len=2"),
         "unrecognized arguments: --bogus; Hydra's flags are --help", task="plan", base=()),
    Case("flag-without-its-value", ("workload.gen_len=2", "--config-name"),
         "argument --config-name/-cn: expected one argument", task="plan", base=()),
    Case("flag-value-not-a-choice", ("--cfg", "jobs", "workload.gen_len=2"), "invalid choice: 'jobs'", task="plan",
         base=()),
    # ${hydra:job.override_dirname} joins the overrides: in one's own value (its key not excluded), endless
    Case("override-refers-to-itself", ("out=${hydra:job.override_dirname}.json",),
         "out would refer to itself without end", task="plan", base=()),
    # A list or a mapping of Hydra's config in a value: OmegaConf's "Cannot convert DictConfig to string" as
    # the whole value, a file named after its repr inside a longer one
    Case("out-names-hydras-job-mapping", ("out=${hydra:job}.json",),
         "out=${hydra:job}.json: ${hydra:job} names a mapping of Hydra's config, not a string", task="plan", base=()),
    Case("outputs-names-hydras-override-list", ("outputs=${hydra:overrides.task}",),
         "${hydra:overrides.task} names a list of Hydra's config, not a string; interpolate one value of it"),
    Case("multirun-out-names-hydras-job-mapping", ("-m", "workload.gen_len=2,3", "out=x-${hydra:job}.json"),
         "(for a file name: ${hydra:job.override_dirname} or ${hydra:job.name})", task="plan", base=()),
    # A policy field a config file of the user's sets is theirs even at its default value, as on the command
    # line: a primary config of theirs (--config-name) for a system that does not read it ...
    Case("config-name-default-valued-field-for-reference",
         ("system=reference", "--config-dir", "conf", "--config-name", "mine"),
         "policy.micro_batch_size: system=reference does not read it",
         setup=write("conf/mine.yaml", "defaults: [config, _self_]\npolicy: {micro_batch_size: 4}\n")),
    # ... and a group file of theirs that sets the root (`# @package _global_`) beside a rule that chooses it
    Case("config-dir-global-default-valued-field-beside-plan", ("workload=mine", "--config-dir", "conf"),
         "policy.batch_size=8: task=plan chooses the whole policy",
         setup=write("conf/workload/mine.yaml", "# @package _global_\npolicy: {batch_size: 8}\n"), task="plan",
         base=()),
    # Output paths: refused before any work, earlier files untouched
    Case("outputs-is-a-folder", ("outputs=sub",), "is a folder", setup=lambda f, t: (f / "sub").mkdir()),
    Case("outputs-exists", ("outputs=old.jsonl",), "exists; pass overwrite=true"),
    Case("out-exists", ("out=old.json",), "exists; pass overwrite=true"),
    Case("outputs-is-the-prompts", (*JSONL, "outputs=p.jsonl", "overwrite=true"), "is an input of this run",
         setup=prompts('{"input_ids": [4, 5]}\n')),
    Case("out-not-a-regular-file", ("out=/dev/full",), "not a regular file"),
    Case("out-of-another-format", ("out=plan.csv",), "out=plan.csv: task=plan writes a JSON document there",
         task="plan", base=()),
    Case("out-and-outputs-same", ("out=x.json", "outputs=x.json"), "name the same file"),
    Case("reused-run-folder", ("hydra.run.dir=earlier",), "the run folder holds an earlier run", task="plan", base=(),
         setup=both(write("earlier/run.json", '{"earlier": "run document"}\n'),
                    write("earlier/.hydra/config.yaml", "task: plan\n"))),
    # Never a replaced document: a run writing the same out= now, and a sweep whose jobs would share one file
    Case("out-written-by-another-run", ("out=new.json",), "out=new.json: another run (pid", task="plan", base=(),
         setup=held_lock("new.json")),
    # Two runs in one hydra.run.dir at once: the last rename replaced the other's run.json, both exited 0
    Case("run-folder-in-use", ("hydra.run.dir=runs/busy",), "runs/busy: another run (pid",
         task="plan", base=(), setup=held_run_folder("runs/busy")),
    Case("multirun-one-out-for-every-job", ("-m", "workload.gen_len=2,3", "out=new.json"),
         "out=new.json: every job of this multirun would write it", task="plan", base=()),
    Case("multirun-one-outputs-for-every-job", ("-m", "sampling.seed=1,2", "outputs=new.jsonl", "overwrite=true"),
         "outputs=new.jsonl: every job of this multirun would write it"),
    # A multirun job's number or id in a single run: Hydra resolves it to None (x-None.json, or out= unset)
    Case("out-of-a-sweep-job-number", ("out=x-${hydra:job.num}.json",),
         "out=x-${hydra:job.num}.json: ${hydra:job.num} resolves to nothing outside a multirun sweep", task="plan",
         base=()),
    Case("outputs-of-a-sweep-job-id", ("outputs=${hydra:job.id}",),
         "outputs=${hydra:job.id}: ${hydra:job.id} resolves to nothing outside a multirun sweep"),
    Case("outputs-with-bench", ("outputs=new.jsonl",), "outputs= belongs to task=generate", task="bench"),
    Case("outputs-with-report", ("outputs=new.jsonl",), "outputs= belongs to task=generate", task="report",
         base=()),
    Case("report-out-of-no-table-format", ("task.inputs=[old.json]", "out=rep.json"), "ending in .md or .csv",
         task="report", base=()),
    Case("outputs-under-a-file", ("outputs=old.jsonl/x.jsonl",), "cannot create its folder"),
    Case("outputs-read-only-fs", ("outputs=/sys/out.jsonl",), "is not writable"),
    Case("resume-without-outputs", ("resume=true",), "needs outputs=PATH"),
    Case("resume-other-task", ("resume=true",), "applies to task=generate", task="plan", base=()),
    Case("part-without-resume", ("outputs=new.jsonl",), "interrupted run",
         setup=write("new.jsonl.part", json.dumps(PART_HEADER) + "\n")),
    Case("resume-complete", ("outputs=old.jsonl", "resume=true"), "is complete"),
    Case("resume-another-run", ("outputs=new.jsonl", "resume=true"), "written by another run",
         setup=write("new.jsonl.part", json.dumps(PART_HEADER) + "\n")),
    Case("resume-foreign-part", ("outputs=new.jsonl", "resume=true"), "not a moe-lightning part file",
         setup=write("new.jsonl.part", "hello\n")),
    Case("outputs-written-by-another-run", ("outputs=new.jsonl", "overwrite=true"), "another run (pid",
         setup=both(write("new.jsonl.part", json.dumps(PART_HEADER) + "\n"), held_lock("new.jsonl"))),
    # Prompt files: the file and line are named
    Case("prompts-missing", (*JSONL,), "prompts file not found"),
    Case("prompts-folder", ("workload=jsonl", "workload.path=sub"), "is a folder",
         setup=lambda f, t: (f / "sub").mkdir()),
    Case("prompts-empty", JSONL, "the file is empty", setup=prompts("")),
    Case("prompts-bad-json", JSONL, "p.jsonl:2: not valid JSON", setup=prompts('{"input_ids": [4]}\n{oops\n')),
    Case("prompts-bool-ids", JSONL, "p.jsonl:1:", setup=prompts('{"input_ids": [true, false]}\n')),
    Case("prompts-not-utf8", JSONL, "p.jsonl:2: not UTF-8",
         setup=prompts(b'{"input_ids": [4]}\n{"prompt": "caf\xe9"}\n')),
    Case("prompts-lone-surrogate", JSONL, "lone surrogate", setup=prompts('{"prompt": "a\\ud800b"}\n')),
    Case("prompts-deep-nesting", JSONL, "nested too deeply", setup=prompts("[" * 100_000 + "\n")),
    Case("prompts-duplicate-ids", JSONL, "ids must be unique",
         setup=prompts('{"id": "a", "input_ids": [4]}\n{"id": "a", "input_ids": [5]}\n')),
    Case("prompts-nan-id", JSONL, "NaN is not a JSON value", setup=prompts('{"id": NaN, "input_ids": [4]}\n')),
    Case("prompts-default-id-clash", JSONL, "its position",
         setup=prompts('{"input_ids": [4]}\n{"id": 0, "input_ids": [5]}\n')),
    Case("prompts-bad-max-new-tokens", JSONL, '"max_new_tokens" must be a positive integer',
         setup=prompts('{"input_ids": [4], "max_new_tokens": -2}\n')),
    Case("prompts-max-new-tokens-over-gen-len", (*JSONL, "workload.gen_len=2"), "raise workload.gen_len",
         setup=prompts('{"input_ids": [4], "max_new_tokens": 5}\n')),
    Case("prompts-misspelt-key", JSONL, 'p.jsonl:1: unknown key "max_new_token"; did you mean "max_new_tokens"?',
         setup=prompts('{"prompt": "a", "max_new_token": 1}\n')),
    Case("prompts-unknown-key", JSONL, 'p.jsonl:2: unknown key "extra"',
         setup=prompts('{"input_ids": [4]}\n{"input_ids": [4], "extra": 1}\n')),
    Case("prompts-duplicate-key", JSONL, 'p.jsonl:1: key "prompt" is given twice',
         setup=prompts('{"prompt": "a", "prompt": "b"}\n')),
    # A prompts file decides the requests: the synthetic prompts' settings beside it would be ignored
    Case("prompts-file-with-num-requests", (*JSONL, "workload.num_requests=2"),
         "workload.num_requests=2: the prompts file workload.path=p.jsonl decides the requests",
         setup=prompts('{"input_ids": [4]}\n{"input_ids": [5]}\n{"input_ids": [6]}\n')),
    Case("prompts-file-with-prompt-len", (*JSONL, "workload.prompt_len_avg=100"),
         "workload.prompt_len_avg=100: the prompts file", setup=prompts('{"input_ids": [4]}\n'), task="plan",
         base=()),
    # The KV budget in tokens
    Case("negative-kv-budget", ("system=cgopipe", "system.kv_cache_tokens=-1"), "system.kv_cache_tokens: must be >= 0"),
    Case("kv-budget-below-a-request", ("system=cgopipe", "system.kv_cache_tokens=8"),
         "must hold the longest request"),
    Case("prompts-list-id", JSONL, '"id" must be a string or an integer',
         setup=prompts('{"id": [1], "input_ids": [4]}\n')),
    Case("prompts-id-out-of-vocab", JSONL, '"input_ids" must be a non-empty list',
         setup=prompts('{"input_ids": [4, 99999999]}\n')),
    Case("prompts-empty-ids", JSONL, '"input_ids" must be a non-empty list', setup=prompts('{"input_ids": []}\n')),
    Case("prompts-both-fields", JSONL, "exactly one of", setup=prompts('{"prompt": "a", "input_ids": [4]}\n')),
    Case("prompts-array-row", JSONL, "expected an object", setup=prompts("[1, 2]\n")),
    Case("prompts-empty-text", JSONL, '"prompt" must be a non-empty string', setup=prompts('{"prompt": ""}\n')),
    Case("prompts-too-long", (*JSONL, "workload.gen_len=4"), "p.jsonl:2: request 'long': a prompt of 5000 tokens "
         "plus workload.gen_len=4 exceeds model.max_position_embeddings",
         setup=prompts('{"input_ids": [4]}\n' + json.dumps({"id": "long", "input_ids": [4] * 5000}) + "\n")),
    # Every task that plans or simulates a workload refuses it as generate does
    Case("plan-beyond-the-model-s-positions", ("hardware=t4", "model=mixtral-8x7b", "workload=mtbench",
                                               "workload.gen_len=100000"),
         "a prompt of 418 tokens plus workload.gen_len=100000 exceeds model.max_position_embeddings=32768",
         task="plan", base=()),
    Case("simulate-prompts-beyond-the-model-s-positions", (*JSONL, "workload.gen_len=4095"),
         "a prompt of 2 tokens plus workload.gen_len=4095 exceeds model.max_position_embeddings=4096",
         setup=prompts('{"input_ids": [4, 5]}\n'), task="simulate", base=()),
    Case("tune-beyond-the-model-s-positions", ("tuner.objective=simulate", "workload.gen_len=5000"),
         "exceeds model.max_position_embeddings=4096", task="tune", base=TUNE),
    # Checkpoints: the file and the field or tensor are named
    Case("ckpt-missing-folder", ("model=hf", "model.path=nockpt"), "nockpt"),
    Case("ckpt-field-beside-hf", (*HF, "model.rope_theta=5.0"),
         "model.rope_theta: model=hf takes it from the folder's config.json"),
    Case("ckpt-config-list", HF, "must be a JSON object", setup=checkpoint(config_text("[1, 2]"))),
    Case("ckpt-config-not-utf8", HF, "not UTF-8", setup=checkpoint(config_text(b"\xff\xfe{}"))),
    Case("ckpt-config-deep", HF, "nested too deeply", setup=checkpoint(config_text("[" * 100_000))),
    Case("ckpt-layers-float", HF, "num_hidden_layers must be a positive integer, got 2.5",
         setup=checkpoint(edit_config(num_hidden_layers=2.5))),
    Case("ckpt-hidden-string", HF, "hidden_size must be a positive integer",
         setup=checkpoint(edit_config(hidden_size="4096"))),
    Case("ckpt-experts-bool", HF, "num_local_experts must be a positive integer",
         setup=checkpoint(edit_config(num_local_experts=True))),
    Case("ckpt-zero-heads", HF, "num_attention_heads must be a positive integer, got 0",
         setup=checkpoint(edit_config(num_attention_heads=0))),
    Case("ckpt-heads-not-multiple", HF, "must be a multiple of num_key_value_heads",
         setup=checkpoint(edit_config(num_key_value_heads=3))),
    Case("ckpt-topk-above-experts", HF, "num_experts_per_tok=9 must be <=",
         setup=checkpoint(edit_config(num_experts_per_tok=9))),
    Case("ckpt-bos-out-of-vocab", HF, "bos_token_id", setup=checkpoint(edit_config(bos_token_id=10**6))),
    Case("ckpt-missing-vocab", HF, "missing key 'vocab_size'", setup=checkpoint(edit_config(vocab_size=DELETE))),
    Case("ckpt-wrong-model-type", HF, "model_type", setup=checkpoint(edit_config(model_type="llama"))),
    Case("ckpt-sliding-window", HF, "sliding_window=2", setup=checkpoint(edit_config(sliding_window=2))),
    Case("ckpt-gelu", HF, "hidden_act='gelu' is not implemented", setup=checkpoint(edit_config(hidden_act="gelu"))),
    Case("ckpt-rope-scaling", HF, "rope_scaling",
         setup=checkpoint(edit_config(rope_scaling={"type": "dynamic", "factor": 2.0}))),
    Case("ckpt-tied-embeddings", HF, "tie_word_embeddings", setup=checkpoint(edit_config(tie_word_embeddings=True))),
    # model.dtype=auto takes config.json's dtype: one the engine does not run is refused, not run as float32
    Case("ckpt-auto-dtype-float64", (*HF, "model.dtype=auto"), "dtype='float64' is not a dtype the engine runs",
         setup=checkpoint(edit_config(dtype="float64"))),
    Case("ckpt-auto-torch-dtype-not-a-string", (*HF, "model.dtype=auto"),
         "torch_dtype=5 is not a dtype the engine runs", setup=checkpoint(edit_config(torch_dtype=5, dtype=None))),
    Case("ckpt-quantized", HF, "quantization_config",
         setup=checkpoint(edit_config(quantization_config={"quant_method": "gptq"}))),
    Case("ckpt-nan-weight", HF, "experts.3.w2.weight' holds NaN or Inf", setup=checkpoint(edit_tensors(set_nan))),
    Case("ckpt-nan-weight-accelerate", (*HF, "system=accelerate"), "experts.down_proj' holds NaN or Inf",
         setup=checkpoint(edit_tensors(set_nan))),
    Case("ckpt-unknown-tensor", HF, "unexpected tensor 'model.layers.0.block_sparse_moe.experts.0.w1.weight_scale'",
         setup=checkpoint(edit_tensors(add_scale))),
    Case("ckpt-duplicate-shard", HF, "model-fixed.safetensors", setup=checkpoint(stray_shard)),
    Case("ckpt-index-absolute", HF, "must be a relative file name inside the checkpoint folder",
         setup=checkpoint(index(escaping("/etc/passwd")))),
    Case("ckpt-index-dotdot", HF, "must be a relative file name inside the checkpoint folder",
         setup=checkpoint(index(escaping("../outside.safetensors")))),
    Case("ckpt-index-not-json", HF, "model.safetensors.index.json: not valid JSON",
         setup=checkpoint(lambda c: (c / "model.safetensors.index.json").write_text("{not json"))),
    Case("ckpt-index-missing-shard", HF, "is missing",
         setup=checkpoint(index(escaping("model-00002-of-00002.safetensors")))),
    Case("ckpt-truncated", HF, "corrupt or truncated", setup=checkpoint(truncate)),
    Case("ckpt-missing-tensor", HF, "experts.2.w3.weight",
         setup=checkpoint(edit_tensors(lambda t: t.pop("model.layers.1.block_sparse_moe.experts.2.w3.weight")))),
    Case("ckpt-wrong-shape", HF, "k_proj",
         setup=checkpoint(edit_tensors(lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                                           torch.zeros(8, 64)})))),
    # generation_config.json: what generate would take from it, checked; what changes the tokens unimplemented, refused
    Case("ckpt-generation-no-repeat-ngram", HF, "generation_config.json: no_repeat_ngram_size=3 changes the generated "
         "tokens and is not implemented",
         setup=checkpoint(file_text("generation_config.json", '{"eos_token_id": 2, "no_repeat_ngram_size": 3}'))),
    Case("ckpt-generation-eos-out-of-vocab", HF, "generation_config.json: eos_token_id must be a token id in [0, "
         "vocab_size=512)", setup=checkpoint(file_text("generation_config.json", '{"eos_token_id": [2, 1000000]}'))),
    Case("ckpt-generation-not-json", HF, "generation_config.json: not valid JSON",
         setup=checkpoint(file_text("generation_config.json", "{oops"))),
    # Text prompts are encoded by transformers' tokenizer of the folder: one that does not load is one line
    Case("prompts-tokenizer-unloadable", (*JSONL, *HF), "transformers' AutoTokenizer cannot load its tokenizer",
         setup=both(prompts('{"prompt": "hello"}\n'),
                    checkpoint(file_text("tokenizer_config.json", "{oops")))),
    # Other model families: fields and layouts they do not implement
    Case("family-qwen2-dense-layer-without-mlp", HF, "missing tensor 'model.layers.0.mlp.gate_proj.weight'",
         setup=family_checkpoint("qwen2_moe", edit_config(mlp_only_layers=[0, 1]))),
    Case("family-qwen2-sparse-step-zero", HF, "decoder_sparse_step must be an integer >= 1, got 0",
         setup=family_checkpoint("qwen2_moe", edit_config(decoder_sparse_step=0))),
    Case("family-qwen2-dense-layers-not-a-list", HF, "mlp_only_layers must be a list of layer indices",
         setup=family_checkpoint("qwen2_moe", edit_config(mlp_only_layers="all"))),
    Case("family-dense-layers-not-in-mixtral", ("model.weights=random", "model.dense_layers=[0]",
                                                "model.dense_intermediate_size=64"),
         "model.dense_layers=[0]: the mixtral layer math has no dense layers"),
    Case("family-qwen2-bias-not-bool", HF, "qkv_bias must be true or false",
         setup=family_checkpoint("qwen2_moe", edit_config(qkv_bias="yes"))),
    Case("family-qwen3-sliding-window", HF, "sliding_window=4",
         setup=family_checkpoint("qwen3_moe", edit_config(use_sliding_window=True, sliding_window=4))),
    Case("family-qwen3-rope-yarn", HF, "rope_type='yarn' is not implemented by the Qwen3-MoE path",
         setup=family_checkpoint("qwen3_moe", edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}))),
    Case("family-qwen3-unknown-tensor", HF,
         "unexpected tensor 'model.layers.0.mlp.experts.0.gate_proj.weight_scale'",
         setup=family_checkpoint("qwen3_moe", listed_shard({"model.layers.0.mlp.experts.0.gate_proj.weight_scale":
                                                             torch.ones(32)}))),
    Case("family-qwen3-tensor-in-two-files", HF, "holds tensor 'model.layers.1.mlp.gate.weight'",
         setup=family_checkpoint("qwen3_moe", unlisted_copy("model.layers.1.mlp.gate.weight"))),
    Case("family-olmoe-clip-negative", HF, "clip_qkv must be a positive number",
         setup=family_checkpoint("olmoe", edit_config(clip_qkv=-1))),
    Case("family-olmoe-gelu", HF, "hidden_act='gelu' is not implemented by the OLMoE path",
         setup=family_checkpoint("olmoe", edit_config(hidden_act="gelu"))),
    Case("family-deepseek-v2-topk-method", HF, "topk_method='noaux_tc' is not implemented by the DeepSeek-V2 path",
         setup=family_checkpoint("deepseek_v2", edit_config(topk_method="noaux_tc"))),
    Case("family-deepseek-v2-norm-topk", HF, "norm_topk_prob=True: DeepSeek-V2's routing weights are not "
         "renormalised", setup=family_checkpoint("deepseek_v2", edit_config(norm_topk_prob=True))),
    Case("family-deepseek-v2-moe-layer-freq", HF, "moe_layer_freq=2 is not implemented",
         setup=family_checkpoint("deepseek_v2", edit_config(moe_layer_freq=2))),
    Case("family-deepseek-v3-softmax", HF, "the DeepSeek-V3 path implements sigmoid scoring with noaux_tc",
         setup=family_checkpoint("deepseek_v3", edit_config(scoring_func="softmax"))),
    Case("family-deepseek-v3-rope-dynamic", HF, "rope_type='dynamic' is not implemented by the DeepSeek-V3 path",
         setup=family_checkpoint("deepseek_v3", edit_config(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                             "rope_theta": 10000.0}))),
    Case("family-deepseek-v3-yarn-truncate-string", HF, "rope_parameters.truncate must be true or false, got 'no'",
         setup=family_checkpoint("deepseek_v3", edit_config(rope_parameters={
             "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0,
             "truncate": "no"}))),
    # transformers takes rope_scaling over rope_parameters: both set and different is refused, not one picked
    Case("family-deepseek-v3-rope-scaling-beside-rope-parameters", HF, "disagree (transformers reads rope_scaling and "
         "drops rope_parameters); keep one", setup=family_checkpoint("deepseek_v3", edit_config(rope_scaling={
             "type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}))),
    Case("family-gpt-oss-quant-method", HF, 'quantization_config={"quant_method": "fp8"} is not implemented by the '
         "gpt-oss path", setup=family_checkpoint("gpt_oss", edit_config(quantization_config={"quant_method": "fp8"}))),
    Case("family-gpt-oss-layer-types", HF, 'layer_types=["sliding_attention"] must list 3 entries',
         setup=family_checkpoint("gpt_oss", edit_config(layer_types=["sliding_attention"]))),
    Case("family-gpt-oss-mxfp4-without-blocks", HF, "missing tensor 'model.layers.0.mlp.experts.gate_up_proj_blocks'",
         setup=family_checkpoint("gpt_oss", edit_config(quantization_config={"quant_method": "mxfp4"}))),
    Case("family-gpt-oss-mxfp4-float-scales", HF, "'model.layers.1.mlp.experts.down_proj_scales' has dtype F32; "
         "accepted: U8", setup=family_checkpoint("gpt_oss_mxfp4", edit_shard_tensor(
             "model.layers.1.mlp.experts.down_proj_scales", lambda t: t.float()))),
    Case("family-gpt-oss-mxfp4-nan-scale", HF, "'model.layers.2.mlp.experts.gate_up_proj_scales': expert 0's scales "
         "make values beyond float32", setup=family_checkpoint("gpt_oss_mxfp4", edit_shard_tensor(
             "model.layers.2.mlp.experts.gate_up_proj_scales", lambda t: t.index_fill(2, torch.tensor([0]), 255)))),
    Case("family-deepseek-v3-dense-without-mlp", HF, "missing tensor 'model.layers.1.mlp.gate_proj.weight'",
         setup=family_checkpoint("deepseek_v3", edit_config(first_k_dense_replace=2))),
    Case("family-feature-not-in-mixtral", ("model.weights=random", "model.qk_norm=head"),
         "model.qk_norm=head: the mixtral layer math does not implement it"),
    Case("family-dbrx-activation", HF, "ffn_config.ffn_act_fn={\"name\": \"gelu\"} is not implemented",
         setup=family_checkpoint("dbrx", edit_config(ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 8,
                                                                 "moe_top_k": 2, "ffn_act_fn": {"name": "gelu"}}))),
    Case("family-dbrx-router-norm", HF, "ffn_config.moe_normalize_expert_weights=2 is not implemented",
         setup=family_checkpoint("dbrx", edit_config(ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 8,
                                                                 "moe_top_k": 2, "moe_normalize_expert_weights": 2}))),
    Case("family-dbrx-rope-disagrees", HF, "attn_config.rope_theta=500000.0 disagrees",
         setup=family_checkpoint("dbrx", edit_config(attn_config={"kv_n_heads": 2, "clip_qkv": 0.5,
                                                                  "rope_theta": 500000.0}))),
    # DBRX's published layout: the theta in attn_config only, which transformers >= 5 does not read
    Case("family-dbrx-rope-theta-only-in-attn-config", HF,
         "attn_config.rope_theta=500000.0 is not read by transformers >= 5",
         setup=family_checkpoint("dbrx", edit_config(rope_parameters=DELETE, attn_config={
             "kv_n_heads": 2, "clip_qkv": 0.5, "rope_theta": 500000.0}))),
    Case("family-qwen3-relabelled-gpt-oss", HF, "moe_intermediate_size=32 changes the math and is not implemented by "
         "the gpt-oss path", setup=family_checkpoint("qwen3_moe", edit_config(model_type="gpt_oss"))),
    # Tunes: no completed trial is a failure, with the commonest reason; a study is not reused across kinds
    Case("tune-every-trial-out-of-memory", ("tuner.objective=measure", "tuner.trial_memory_gib=0.4", "tuner.n_trials=2",
                                            "tuner.seed_with_hrm=false", "tuner.study_name=capped"),
         "out of memory under the trial's memory cap", code=1, task="tune", base=TUNE),
    Case("tune-every-trial-times-out", ("tuner.objective=measure", "tuner.trial_timeout_s=0.5", "tuner.n_trials=2",
                                        "tuner.seed_with_hrm=false", "tuner.study_name=slow"),
         "no result after 0.5 s", code=1, task="tune", base=TUNE),
    Case("tune-every-trial-infeasible", ("tuner.objective=simulate", "hardware.gpu.memory_gib=0.00001",
                                         "tuner.n_trials=2", "tuner.seed_with_hrm=false", "tuner.study_name=tiny"),
         "(0 failed, 2 infeasible", code=1, task="tune", base=TUNE),
    Case("tune-study-of-another-objective", ("tuner.objective=measure", "tuner.n_trials=1", "tuner.study_name=kinds"),
         'objective: "simulate" -> "measure"', setup=simulated_study("kinds"), task="tune", base=TUNE),
    Case("tune-study-single-to-multi", ("tuner.objective=simulate", "tuner.multi_objective=true", "tuner.n_trials=1",
                                        "tuner.study_name=kinds"),
         "multi_objective: false -> true", setup=simulated_study("kinds"), task="tune", base=TUNE),
    # The study searched the T x E split (no `parallel` given): a fixed split would mix layouts in one study
    Case("tune-study-of-another-split", ("tuner.objective=simulate", "tuner.n_trials=2", "tuner.study_name=split",
                                         "hardware=2xt4", "parallel.tensor=2", "parallel.expert=1"),
         'parallel.expert: "searched" -> 1; parallel.tensor: "searched" -> 2', task="tune", base=TUNE,
         setup=simulated_study("split", "hardware=2xt4")),
    Case("tune-negative-max-batch", ("tuner.objective=simulate", "tuner.max_batch_size=-5"),
         "tuner.max_batch_size: must be >= 0 (0: the workload's number of requests), got -5", task="tune", base=TUNE),
    Case("tune-negative-seed", ("tuner.objective=simulate", "tuner.seed=-3"), "tuner.seed: must be 0 to 2**32 - 1",
         task="tune", base=TUNE),
    # task=plan gives CGOPipe's plan: under another system's name it would be mislabelled
    Case("plan-under-a-baseline", ("system=flexgen",), "system=flexgen: task=plan gives CGOPipe's HRM plan, not "
         "flexgen's policy; for flexgen's own policy", task="plan", base=()),
    # A simulated policy that does not fit the budget is refused as task=generate refuses it
    Case("simulate-over-the-memory-budget", ("task.use_plan=false", "hardware=t4", "model=mixtral-8x7b",
                                            "workload=mtbench", "policy.batch_size=1024",
                                            "policy.micro_batch_size=200"),
         "policy does not fit the memory budget: GPU needs", code=3, task="simulate", base=()),
    Case("plan-unknown-placements", ("task.placements=gpu",), "task.placements=gpu: expected one of engine, all",
         task="plan", base=()),
    # A policy field that a rule or a search would replace is refused, not ignored
    Case("simulate-plan-beside-a-given-batch", ("policy.batch_size=16",), "policy.batch_size=16: task.use_plan=true",
         task="simulate", base=()),
    Case("plan-beside-a-given-batch", ("hardware=t4", "model=mixtral-8x7b", "workload=mtbench", "policy.batch_size=64"),
         "policy.batch_size=64: task=plan chooses the whole policy", task="plan", base=()),
    Case("plan-beside-a-given-kernel", ("policy.expert_kernel=loop",),
         "policy.expert_kernel=loop: task=plan chooses the whole policy", task="plan", base=()),
    # ... even when the value given is the field's default (the command line's overrides say it was given)
    Case("plan-beside-a-default-valued-micro-batch", ("policy.micro_batch_size=4",),
         "policy.micro_batch_size=4: task=plan chooses the whole policy", task="plan", base=()),
    Case("simulate-plan-beside-a-default-valued-batch", ("policy.batch_size=8",),
         "policy.batch_size=8: task.use_plan=true", task="simulate", base=()),
    Case("generate-own-rule-beside-a-default-valued-placement", ("system=flexgen", "policy.attn_on_gpu=false"),
         "policy.attn_on_gpu=false: system.policy_source=auto (flexgen's own rule)"),
    # ... and a policy field the system's runner never reads (it would be recorded as if it had run)
    Case("generate-reference-beside-a-placement", ("system=reference", "policy.expert_gpu_fraction=0.5",
                                                  "policy.attn_on_gpu=true"),
         "policy.expert_gpu_fraction, policy.attn_on_gpu: system=reference does not read them"),
    Case("bench-accelerate-beside-a-micro-batch", ("system=accelerate", "system.policy_source=given",
                                                  "policy.micro_batch_size=2"),
         "policy.micro_batch_size: system=accelerate does not read it", task="bench"),
    Case("generate-own-rule-beside-a-given-batch", ("system=flexgen", "policy.micro_batch_size=2"),
         "policy.micro_batch_size=2: system.policy_source=auto (flexgen's own rule)"),
    Case("bench-plan-beside-a-given-page-schedule", ("task.plan=true", "policy.prefetch_depth=3"),
         "policy.prefetch_depth=3: task.plan=true", task="bench"),
    Case("compare-own-rules-beside-a-given-batch", ("policy.batch_size=4",),
         "policy.batch_size=4: with task.policy_source=auto", task="compare"),
    # One policy for every system: a field a listed system does not read would be ignored for it
    Case("compare-given-policy-beside-accelerate",
         ("task.systems=[cgopipe,flexgen,accelerate]", "task.policy_source=given", "policy.micro_batch_size=4"),
         "policy.micro_batch_size: system=accelerate does not read it (it reads policy.batch_size), so it would "
         "be ignored; drop it, or drop accelerate from task.systems ('task.systems=[cgopipe,flexgen]')",
         task="compare"),
    Case("compare-kernel-beside-the-reference", ("task.systems=[reference,cgopipe]", "policy.expert_kernel=loop"),
         "policy.expert_kernel: system=reference does not read it", task="compare"),
    Case("compare-beside-a-system", ("system=flexgen", "task.systems=[cgopipe,deepspeed]"),
         "system=flexgen: task.systems=[cgopipe,deepspeed] does not list system=flexgen, whose setting this is",
         task="compare"),
    Case("compare-a-setting-of-an-unlisted-system", ("system.refill=false", "task.systems=[flexgen,deepspeed]"),
         "system.refill=false: task.systems=[flexgen,deepspeed] does not list system=cgopipe", task="compare"),
    Case("compare-a-system-s-policy-source", ("system=flexgen", "system.policy_source=given"),
         "system.policy_source=given: task=compare sets every system's policy source with task.policy_source",
         task="compare"),
    Case("compare-with-a-trace", ("trace=true",), "trace=true: task=compare does not trace", task="compare"),
    # The comparison over a system's own run document: that document lost, then a traceback reading it
    Case("compare-out-over-a-systems-document", ("task.mode=simulate", "task.systems=[cgopipe,flexgen]",
                                                 "hydra.run.dir=runs/c", "out=runs/c/flexgen.json"),
         "out=runs/c/flexgen.json: task=compare writes flexgen's run document there", task="compare"),
    # A comparison of one system is its ratio to itself: at least two, each listed once
    Case("compare-an-unknown-system", ("task.systems=[cgopipe,vllm]",), "task.systems: unknown vllm; accepted: "
         "reference, cgopipe, flexgen, flexgen_c, deepspeed, fastdecode, accelerate", task="compare"),
    Case("compare-one-system", ("task.systems=[reference]",), "task=compare needs at least two distinct systems",
         task="compare"),
    # A model this host cannot hold: refused once, before any system is tried, with task=generate's line
    Case("compare-model-beyond-the-host", ("model=deepseek-v3", "task.systems=[cgopipe,flexgen]"),
         "of host memory for its weights but this host has", code=3, task="compare"),
    Case("compare-a-system-twice", ("task.systems=[cgopipe,flexgen,flexgen]",), "flexgen is listed twice",
         task="compare"),
    Case("tune-beside-a-searched-field", ("tuner.objective=simulate", "policy.kv_gpu_fraction=0.5"),
         "policy.kv_gpu_fraction=0.5: task=tune searches it", task="tune", base=TUNE),
    # A trial's measurement is recorded beside its parameters: the system must run the trial's policy
    Case("tune-under-a-systems-own-rule", ("system=flexgen", "tuner.objective=simulate"),
         "system.policy_source=auto: flexgen's own rule chooses the policy's batching and placement, which "
         "task=tune searches", task="tune", base=TUNE),
    Case("tune-measures-the-reference", ("system=reference", "tuner.objective=measure"),
         "system=reference reads policy.batch_size only: a measured tune's trials would record placements it "
         "never ran", task="tune", base=TUNE),
    # A simulated tune's trials time cfg.system's own schedule (tasks.simulate.simulate_policy)
    Case("simulate-a-given-kernel", ("task.use_plan=false", "policy.expert_kernel=grouped"),
         "policy.expert_kernel=grouped: the simulator prices the engine's own choice per call (auto)", task="simulate",
         base=()),
    Case("simulate-the-reference-s-kernel", ("system=reference", "system.expert_kernel=grouped"),
         "system.expert_kernel=grouped: system=reference has no offloading schedule; task=simulate plans and times "
         "CGOPipe's", task="simulate", base=()),
    Case("tune-simulates-a-given-kernel", ("tuner.objective=simulate", "policy.expert_kernel=loop"),
         "policy.expert_kernel=loop: the simulator prices the engine's own choice per call (auto), so loop's speed "
         "would be ignored; drop it, or search the kernels with tuner.objective=measure", task="tune", base=TUNE),
    Case("tune-simulates-the-reference", ("system=reference", "tuner.objective=simulate"),
         "system=reference has no schedule of its own to simulate (task=simulate times CGOPipe's schedule for it)",
         task="tune", base=TUNE),
    Case("tune-simulates-accelerate", ("system=accelerate", "system.policy_source=given", "tuner.objective=simulate"),
         "system=accelerate has no schedule of its own to simulate (it is measured only)", task="tune", base=TUNE),
    Case("tune-simulates-a-baseline-on-several-gpus", ("system=flexgen", "system.policy_source=given",
                                                       "hardware=2xt4", "tuner.objective=simulate"),
         "system=flexgen on hardware=2xt4: the baselines' schedules run on one GPU", task="tune", base=TUNE),
    # A group the task never reads (cli.refuse_unread_group): refused, not recorded as if it had run
    Case("tuner-beside-plan", ("tuner.n_trials=2",), "tuner.n_trials=2: only task=tune reads tuner.*", task="plan",
         base=()),
    Case("tuner-beside-bench", ("tuner.repeats=9",), "tuner.repeats=9: only task=tune reads tuner.*, so task=bench "
         "would ignore it; drop it (this task's own settings are task.*)", task="bench"),
    Case("sampling-beside-simulate", ("sampling.temperature=0.7",), "sampling.temperature=0.7: task=simulate samples "
         "no tokens", task="simulate", base=()),
    Case("repeats-beside-a-simulated-comparison", ("task.mode=simulate", "task.repeats=9"),
         "task.repeats=9: task.mode=simulate times nothing on this host (the simulator is deterministic), so this "
         "measurement setting would be ignored; drop it, or measure: task.mode=measure", task="compare"),
    Case("timeout-beside-a-simulated-tune", ("tuner.objective=simulate", "tuner.trial_timeout_s=60"),
         "tuner.trial_timeout_s=60: tuner.objective=simulate times nothing on this host", task="tune", base=TUNE),
    Case("threads-beside-a-simulated-comparison", ("task.mode=simulate", "threads.serial=true"),
         "threads.serial=true: task.mode=simulate prices the hardware profile", task="compare"),
    Case("sampling-beside-a-simulated-tune", ("tuner.objective=simulate", "sampling.ignore_eos=false"),
         "sampling.ignore_eos=false: tuner.objective=simulate samples no tokens", task="tune", base=TUNE),
    Case("threads-beside-plan", ("threads.serial=true",), "threads.serial=true: task=plan prices the hardware "
         "profile hardware=cpu, not this host's threads", task="plan", base=()),
    Case("plan-with-a-kv-cache-of-a-given-size", ("system.kv_cache_tokens=1000",), "system.kv_cache_tokens=1000: "
         "task=plan sizes the KV cache for the batch it chooses", task="plan", base=()),
    Case("chunks-without-expert-parallelism", ("parallel.chunks=3",), "parallel.chunks=3: the chunks pipeline the "
         "all-to-all of expert parallelism, and parallel.expert=1 has none"),
    # Logger settings: refused before the task runs, not by wandb after it
    Case("logger-unknown-mode", ("logger=wandb", "logger.mode=bogus"),
         "logger.mode=bogus: expected one of offline, online, disabled", task="plan", base=()),
    Case("logger-dir-unwritable", ("logger=wandb", "logger.dir=/proc/x"),
         "logger.dir=/proc/x: not a folder this run can write in", task="plan", base=()),
    # A calibration's profile is checked as out= is, before the measuring
    Case("calibrate-profile-exists", ("task.out_yaml=old.json",), "task.out_yaml=old.json: exists; pass "
         "overwrite=true", task="calibrate", base=("task.quick=true",)),
    Case("calibrate-profile-is-a-folder", ("task.out_yaml=d",), "task.out_yaml=d: is a folder", task="calibrate",
         base=("task.quick=true",), setup=write("d/keep.txt", "x")),
    # Reports
    Case("report-no-match", ("task.inputs=[nothing/*.json]",), "no run documents", task="report", base=()),
    # A list field given one plain value: how to write the list, not OmegaConf's "str is not a ListConfig"
    Case("report-inputs-without-brackets", ("task.inputs=old.json",), "'task.inputs=[old.json]'", task="report",
         base=()),
    Case("report-only-damaged", ("task.inputs=[docs/*.json]",), "2 skipped", setup=run_document(), task="report",
         base=()),
    # A run document whose figure is of the wrong type: skipped, its field named (was a traceback)
    Case("report-malformed-figure", ("task.inputs=[docs/*.json]",), "metrics.throughput_tok_s is 'abc', not a "
         "number", setup=write("docs/a.json", json.dumps({"schema_version": 2, "system": "cgopipe", "task": "bench",
                                                          "model": {}, "hardware": {}, "workload": {}, "policy": {},
                                                          "metrics": {"throughput_tok_s": "abc"}})),
         task="report", base=()),
]


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file, Hydra's run folders aside."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).parts[0] != "runs"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_and_changes_no_file(tmp_path, tiny_path, case: Case):
    (tmp_path / "old.jsonl").write_text('{"id": 0, "output_ids": [1, 2]}\n')   # an earlier run's outputs
    (tmp_path / "old.json").write_text('{"earlier": "run document"}\n')
    if case.setup:
        case.setup(tmp_path, tiny_path)
    before = snapshot(tmp_path)
    try:
        r = subprocess.run([sys.executable, "-m", "moe_lightning", f"task={case.task}", *case.base, *case.args],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == case.code, r.stderr
        assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
        assert lines[0].startswith("moe-lightning: error: ") and case.expect in lines[0], lines[0]
        assert snapshot(tmp_path) == before
    finally:
        while HELD:
            HELD.pop().release()


def test_the_catalogue_is_at_least_sixty_cases():
    assert len(CASES) >= 60
