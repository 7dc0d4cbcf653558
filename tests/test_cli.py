"""The console script end to end: a run writes outputs and a run document; bad input gives one line
on stderr, a non-zero exit and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moe_lightning.report import RunReport


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_lightning.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_generate_writes_outputs_and_run_document(tmp_path, tiny_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "q1", "prompt": "Question: what is two plus two?"}\n'
                       '{"input_ids": [1, 40, 41, 42, 43, 44, 45]}\n{"id": 7, "prompt": "Once upon a time"}\n')
    out, outputs = tmp_path / "run.json", tmp_path / "out.jsonl"
    r = cli("task=generate", "system=reference", "workload=jsonl", f"workload.path={prompts}", "workload.gen_len=6",
            f"out={out}", f"outputs={outputs}", "task.progress=false", f"hydra.run.dir={tmp_path / 'hydra'}")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stdout
    rows = [json.loads(line) for line in outputs.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["q1", 1, 7]
    assert all(1 <= len(row["output_ids"]) <= 6 and isinstance(row["text"], str) for row in rows)
    doc = json.loads(out.read_text())
    for key in ("schema_version", "run_id", "created_at", "git_commit", "system", "model", "hardware",
                "workload", "policy", "metrics", "prediction", "environment"):
        assert key in doc
    report = RunReport.from_json(out)
    assert report.metrics.generated_tokens == sum(len(row["output_ids"]) for row in rows)
    assert report.metrics.throughput_tok_s > 0 and report.system == "reference"


def test_a_model_hf_run_document_names_its_checkpoint(tmp_path, tiny_path):
    """model=hf's documents name the checkpoint that ran (its folder's name, as a Hugging Face repo's is),
    not the config group, and keep its path: a measured run's and a plan's alike."""
    import shutil

    folder = tmp_path / "Tiny-MoE-v0.1"
    shutil.copytree(tiny_path, folder)
    run, plan = tmp_path / "run.json", tmp_path / "plan.json"
    r = cli("task=generate", "model=hf", f"model.path={folder}", "workload.num_requests=2", "workload.gen_len=3",
            f"out={run}", "task.progress=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cli("task=plan", "model=hf", f"model.path={folder}/", f"out={plan}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for doc in (json.loads(run.read_text()), json.loads(plan.read_text())):
        assert doc["model"]["name"] == "Tiny-MoE-v0.1" and doc["model"]["path"].rstrip("/") == str(folder)


def test_a_hugging_face_cache_snapshot_is_named_by_its_repo(tmp_path):
    from moe_lightning.engine.hf_config import checkpoint_name

    snapshot = tmp_path / "hub" / "models--mistralai--Mixtral-8x7B-v0.1" / "snapshots" / "0123abcd"
    assert checkpoint_name(snapshot) == "mistralai/Mixtral-8x7B-v0.1"
    assert checkpoint_name(tmp_path / "Mixtral-8x7B-v0.1" / ".") == "Mixtral-8x7B-v0.1"


def test_default_run_goes_to_a_run_folder(tmp_path, tiny_path):
    r = cli("task=generate", "task.progress=false", "workload.num_requests=2", "workload.gen_len=3",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "runs").rglob("run.json"))) == 1
    assert len(list((tmp_path / "runs").rglob("outputs.jsonl"))) == 1


def _bad_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [4]}\n{oops\n')
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return empty, bad, ckpt


@pytest.mark.parametrize("args, expect", [
    (["workload=jsonl", "workload.path=/no/such/prompts.jsonl"], "prompts file not found"),
    (["workload=jsonl", "workload.path={empty}"], "empty"),
    (["workload=jsonl", "workload.path={bad}"], "bad.jsonl:2:"),
    (["model=hf", "model.path={ckpt}"], "unsupported model_type 'llama'"),
    (["policy.batch_size=2", "policy.micro_batch_size=4"], "policy.micro_batch_size"),
    (["policy.nope=1"], "unknown key 'policy.nope'"),
    (["hardware=t5"], "unknown hardware 't5'"),
    (["policy.batch_size=many"], "expected an integer"),
    (["policy.expert_gpu_fraction=2"], "must be in [0, 1]"),
])
def test_bad_input_is_one_line_without_traceback(tmp_path, tiny_path, args, expect):
    empty, bad, ckpt = _bad_files(tmp_path)
    args = [a.format(empty=empty, bad=bad, ckpt=ckpt) for a in args]
    r = cli("task=generate", *args, "task.progress=false", cwd=tmp_path)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("moe-lightning: error:")]
    assert len(lines) == 1 and expect in lines[0], r.stderr


def test_a_user_hardware_profile_from_config_dir(tmp_path):
    """A calibrated profile kept outside the package is selectable with --config-dir."""
    (tmp_path / "conf" / "hardware").mkdir(parents=True)
    (tmp_path / "conf" / "hardware" / "mybox.yaml").write_text(
        "name: mybox\ngpu: {name: x, count: 1, memory_gib: 16, bandwidth_gbps: 300, peak_tflops: 65}\n"
        "cpu: {name: y, cores: 8, memory_gib: 256, bandwidth_gbps: 50, peak_tflops: 0.5}\n"
        "link: {h2d_gbps: 12, d2h_gbps: 12}\n")
    out = tmp_path / "plan.json"
    r = cli("--config-dir", str(tmp_path / "conf"), "task=plan", "hardware=mybox", "model=mixtral-8x7b",
            "workload=mtbench", f"out={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["hardware"]["profile"]["name"] == "mybox"


def test_a_user_primary_config_from_config_dir(tmp_path):
    """`--config-dir DIR --config-name NAME` with NAME.yaml in DIR (inheriting the package's root config):
    the checks before the run find it where the app does (they looked for it in the package's conf only)."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mine.yaml").write_text("defaults: [config, _self_]\nworkload: {gen_len: 7}\n")
    out = tmp_path / "plan.json"
    r = cli("--config-dir", str(tmp_path / "conf"), "--config-name", "mine", "task=plan", f"out={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["workload"]["gen_len"] == 7


def test_a_user_profile_inherits_a_preset_only_when_it_says_so(tmp_path):
    """`defaults: [t4, _self_]` takes t4's numbers and replaces the ones given; without it, a profile that
    leaves numbers out is refused, naming them (the schema's defaults are the cpu preset's)."""
    (tmp_path / "conf" / "hardware").mkdir(parents=True)
    (tmp_path / "conf" / "hardware" / "big.yaml").write_text("defaults: [t4, _self_]\nname: big\n"
                                                             "gpu: {memory_gib: 40}\n")
    (tmp_path / "conf" / "hardware" / "part.yaml").write_text("name: part\ngpu: {memory_gib: 40}\n")
    out = tmp_path / "plan.json"
    common = ("--config-dir", str(tmp_path / "conf"), "task=plan", "model=mixtral-8x7b", "workload=mtbench")
    r = cli(*common, "hardware=big", f"out={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    profile = json.loads(out.read_text())["hardware"]["profile"]
    assert profile["gpu"]["memory_gib"] == 40 and profile["gpu"]["name"] == "Tesla T4" and profile["cpu"]["cores"] == 24
    r = cli(*common, "hardware=part", cwd=tmp_path)
    assert r.returncode == 2 and "does not give gpu.name, gpu.count" in r.stderr, r.stderr


def test_every_shipped_hardware_preset_gives_every_number():
    import yaml

    from moe_lightning.cli_checks import CONF_DIR
    from moe_lightning.config import missing_hardware_fields
    from moe_lightning.tuner.calibrate import load_hardware_yaml

    for path in sorted((CONF_DIR / "hardware").glob("*.yaml")):
        assert missing_hardware_fields(yaml.safe_load(path.read_text())) == [], path
        load_hardware_yaml(path)


def _damaged_checkpoint(tiny_path, folder, damage: str):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_path, folder)
    f = folder / "model.safetensors"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[:-4096])
        return "model.safetensors"
    tensors = load_file(f)
    if damage == "missing":
        del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
        save_file(tensors, f)
        return "experts.2.w3.weight"
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(tensors, f)
    return "k_proj"


@pytest.mark.parametrize("damage", ["truncated", "missing", "shape"])
def test_a_damaged_checkpoint_is_one_line_from_the_cli(tmp_path, tiny_path, damage):
    expect = _damaged_checkpoint(tiny_path, tmp_path / "ckpt", damage)
    r = cli("task=generate", "model=hf", f"model.path={tmp_path / 'ckpt'}", "task.progress=false", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("moe-lightning: error:")]
    assert len(lines) == 1 and expect in lines[0], r.stderr


def test_hydra_flags_pass_through(tmp_path):
    r = cli("--cfg", "job", "task=plan", "hardware=t4", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "name: plan" in r.stdout and "name: t4" in r.stdout


def test_flags_stand_anywhere_among_the_overrides(tmp_path):
    """Hydra's argparse takes the overrides as one list: a flag between two overrides left the ones after it
    "unrecognized", with a usage dump. A flag keeps its value wherever it stands; an abbreviated one too."""
    (tmp_path / "conf" / "hardware").mkdir(parents=True)
    (tmp_path / "conf" / "hardware" / "mybox.yaml").write_text("defaults: [t4, _self_]\nname: mybox\n")
    r = cli("task=plan", "--config-dir", "conf", "hardware=mybox", "model=mixtral-8x7b", "workload=mtbench",
            "out=plan.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "plan.json").read_text())["hardware"]["profile"]["name"] == "mybox"
    for flag in ("-m", "--multi"):
        r = cli("task=plan", flag, "workload.gen_len=2,4", f"hydra.sweep.dir={tmp_path / flag}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        docs = [json.loads(p.read_text()) for p in (tmp_path / flag).glob("*/run.json")]
        assert sorted(d["workload"]["gen_len"] for d in docs) == [2, 4]


def test_an_override_may_name_the_override_dirname_when_its_key_is_excluded(tmp_path):
    """The refusal of out=${hydra:job.override_dirname} (the catalogue) says to exclude out from it; so
    excluded, the job reads its overrides as given, not resolved (out=task=plan.json is no override)."""
    r = cli("task=plan", "out=${hydra:job.override_dirname}.json",
            "hydra.job.config.override_dirname.exclude_keys=[out]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "task=plan.json").read_text())["task"] == "plan"


def _sweep_docs(tmp_path, *overrides: str) -> list[dict]:
    r = cli("-m", "task=simulate", "task.use_plan=false", "workload.num_requests=8", "workload.gen_len=2",
            *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/run.json"))]


def test_multirun_sweeps_ints_floats_and_bools(tmp_path):
    """Hydra parses a sweep's values with their types: one run document per point of the product."""
    docs = _sweep_docs(tmp_path, "policy.micro_batch_size=2", "policy.batch_size=4,8",
                       "policy.expert_gpu_fraction=0.25,0.5", "policy.attn_on_gpu=true,false")
    points = {(d["policy"]["batch_size"], d["policy"]["expert_gpu_fraction"], d["policy"]["attn_on_gpu"])
              for d in docs}
    assert len(docs) == 8
    assert points == {(n, f, a) for n in (4, 8) for f in (0.25, 0.5) for a in (True, False)}


def test_multirun_sweeps_a_range(tmp_path):
    docs = _sweep_docs(tmp_path, "policy.micro_batch_size=4", "policy.batch_size=range(4,9,4)")
    assert sorted(d["policy"]["batch_size"] for d in docs) == [4, 8]


def test_a_sweep_names_each_job_s_out_by_its_number(tmp_path):
    """${hydra:job.num} is refused in a single run (the catalogue), and is each job's own number in a sweep."""
    _sweep_docs(tmp_path, "policy.batch_size=4,8", "policy.micro_batch_size=4",
                f"out={tmp_path}/x-${{hydra:job.num}}.json")
    assert sorted(json.loads((tmp_path / f"x-{n}.json").read_text())["policy"]["batch_size"] for n in (0, 1)) == [4, 8]


def test_a_sweep_goes_on_past_a_refused_job_and_exits_with_its_code(tmp_path):
    """A sweep's refused point is its own line; the other points run and keep their documents, and the
    command ends with one line naming the failed jobs and the worst job's exit code."""
    r = cli("-m", "task=simulate", "task.use_plan=false", "workload.num_requests=8", "workload.gen_len=2",
            "policy.batch_size=4", "policy.micro_batch_size=8,2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("moe-lightning: error:")]
    assert len(errors) == 2 and "policy.micro_batch_size" in errors[0]
    assert "1 of 2 sweep jobs failed" in errors[1] and "policy.micro_batch_size=8 (exit 2)" in errors[1]
    assert not (tmp_path / "sweep" / "0" / "run.json").exists()
    assert json.loads((tmp_path / "sweep" / "1" / "run.json").read_text())["policy"]["micro_batch_size"] == 2


@pytest.mark.parametrize("args, expect", [
    (["-m", "task=simulate", "policy.batch_size=4,abc"], "policy.batch_size: expected an integer, got 'abc'"),
    (["-m", "task=simulate", "policy.attn_on_gpu=true,2"], "policy.attn_on_gpu: expected true or false, got 2"),
    (["-m", "task=plan", "--cfg", "job"], "--multirun and --cfg cannot be combined"),
    (["+policy.fooo=1"], "unknown key 'policy.fooo'"),
    (["++workload.gen_lenn=4"], "unknown key 'workload.gen_lenn'"),
])
def test_bad_sweeps_and_typos_are_one_line(tmp_path, args, expect):
    r = cli(*args, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert expect in lines[0]
    assert not (tmp_path / "runs").exists()


def test_help_names_every_task_and_group_option(tmp_path):
    from moe_lightning.tasks import TASK_CONFIGS

    r = cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    assert "powered by Hydra" not in r.stdout and "qwen3-30b-a3b" in r.stdout
    for task in TASK_CONFIGS:
        assert task in r.stdout
    assert len(r.stdout.splitlines()) < 60


def test_version_is_the_packages(tmp_path):
    from moe_lightning import __version__

    r = cli("--version", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.strip() == f"moe-lightning {__version__}"


@pytest.mark.parametrize("setting", ["workload.num_requests=2", "workload.prompt_len_avg=100",
                                     "workload.prompt_len_max=8", "workload.seed=3"])
def test_a_synthetic_only_setting_beside_a_prompts_file_is_refused(tmp_path, setting):
    """The file decides the requests and their lengths: num_requests=2 ran all 3 lines, prompt_len_avg=100
    failed against workload=jsonl's placeholder max of 1."""
    from moe_lightning.cli import check_composes
    from moe_lightning.errors import ConfigError

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"input_ids": [4]}\n{"input_ids": [5]}\n{"input_ids": [6]}\n')
    given = ["workload=jsonl", f"workload.path={prompts}"]
    check_composes([*given, "workload.gen_len=3"])
    with pytest.raises(ConfigError, match=rf"^{setting}: the prompts file workload.path={prompts} decides the "
                                          "requests and their prompt lengths, so it would be ignored"):
        check_composes([*given, setting])
    check_composes(["workload=synthetic", setting])   # synthetic prompts read it
    with pytest.raises(ConfigError, match=rf"^{setting}: the prompts file"):
        check_composes(["-m", *given, f"{setting},{setting.split('=')[1]}"])   # a sweep too


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (Linux: /proc's SigCgt mask)."""
    with open(f"/proc/{pid}/status") as f:
        mask = next(line.split()[1] for line in f if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (signum - 1) & 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_during_start_up_is_one_line(tmp_path, signame, code):
    """Ctrl-C while Hydra and the config load (before any task) gave an 83-line traceback. The signal
    is sent as soon as the process catches SIGTERM (Python alone leaves it to the default action): the
    CLI's handlers are in, and the imports and the config checks still have seconds to go."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "moe_lightning.cli", "task=generate", "workload.num_requests=2",
                          "workload.gen_len=2", "task.progress=false"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _catches(p.pid, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.002)
    p.send_signal(getattr(signal, signame))
    _, err = p.communicate(timeout=300)
    assert p.returncode == code, err
    assert err.strip() == f"moe-lightning: error: interrupted by {signame}", err
    assert not (tmp_path / "runs").exists()   # before Hydra made the run folder: during start-up


def test_results_go_to_stdout_and_log_lines_and_warnings_to_stderr_and_the_log(tmp_path, tiny_path):
    """A user pipes stdout: it holds the results only. The job's warnings, logged or Python's, are on
    stderr and in the run folder's moe-lightning.log; INFO lines in the log only (a refusal after them is
    still one line on stderr)."""
    script = ("import logging, sys, warnings\nfrom moe_lightning.tasks.generate import GenerateTask\n"
              "run = GenerateTask.run\n"
              "def warned(self, cfg):\n    warnings.warn('a warning from the job')\n"
              "    logging.getLogger('moe_lightning.generate').warning('a logged warning')\n"
              "    return run(self, cfg)\n"
              "GenerateTask.run = warned\nfrom moe_lightning.cli import main\nsys.argv[0] = 'moe-lightning'\nmain()\n")
    folder = tmp_path / "h"
    r = subprocess.run([sys.executable, "-c", script, "task=generate", "system=cgopipe", "workload.num_requests=2",
                        "workload.gen_len=2", "task.progress=false", f"hydra.run.dir={folder}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-2:] == [f"outputs: {folder / 'outputs.jsonl'}",
                                          f"run document: {folder / 'run.json'}"]
    assert "[INFO]" not in r.stdout + r.stderr and "WARNING" not in r.stdout and "warning" not in r.stdout, r.stdout
    log = (folder / "moe-lightning.log").read_text()
    for said in ("a logged warning", "a warning from the job"):
        assert said in r.stderr and said in log, (said, r.stderr, log)
    assert "[moe_lightning.cgopipe][INFO] - cgopipe: 0 resident" in log


@pytest.mark.parametrize("task", ["plan", "simulate"])
def test_stdout_into_a_closed_pipe_finishes_the_run_quietly(tmp_path, task):
    """`... | head -1`: the reader is gone before the first print. The run still writes its document, says
    nothing on stderr (no BrokenPipeError traceback) and exits 141, as a CLI that SIGPIPE ended."""
    import os

    read, write = os.pipe()
    os.close(read)   # the reader left before anything was printed: every write fails
    try:
        r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", f"task={task}", "hardware=t4",
                            "model=mixtral-8x7b", "workload=mtbench", f"hydra.run.dir={tmp_path / 'run'}"],
                           stdout=write, stderr=subprocess.PIPE, text=True, timeout=300, cwd=tmp_path)
    finally:
        os.close(write)
    assert r.returncode == 141, r.stderr
    assert r.stderr == ""
    assert RunReport.from_json(tmp_path / "run" / "run.json").task == task


def test_the_log_file_says_what_ran_for_every_task(tmp_path):
    """plan logs nothing of its own: the run folder's moe-lightning.log still names the command and its end."""
    folder = tmp_path / "h"
    r = cli("task=plan", "hardware=t4", "model=mixtral-8x7b", "workload=mtbench", f"hydra.run.dir={folder}",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    log = (folder / "moe-lightning.log").read_text()
    assert "task=plan hardware=t4 model=mixtral-8x7b workload=mtbench" in log and "task=plan done" in log, log
    assert "[INFO]" not in r.stderr   # the console still shows warnings only


@pytest.mark.slow   # builds the tiny checkpoint and its tokenizer afresh
def test_a_first_run_building_the_tiny_model_prints_only_its_own_lines(tmp_path):
    """The tiny checkpoint is built on a fresh cache's first run: transformers' "Writing model shards" bar
    had printed between the run's lines, under task.progress=false too."""
    env = {**os.environ, "MOE_LIGHTNING_CACHE": str(tmp_path / "fresh-cache")}
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "task=generate", "workload.num_requests=2",
                        "workload.gen_len=2", "task.progress=false", f"hydra.run.dir={tmp_path / 'h'}"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "fresh-cache").is_dir()   # built here, not found in the shared cache
    assert "Writing" not in r.stdout + r.stderr and "it/s]" not in r.stdout + r.stderr, r.stdout + r.stderr
