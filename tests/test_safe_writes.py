"""Nothing lost: artefacts are replaced atomically, output paths are checked before any work, an existing
file is kept unless overwrite=true, a corrupt cache is rebuilt, and two runs never share a folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_lightning.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello there"}\n{"prompt": "general kenobi"}\n')
    return path


def test_outputs_onto_the_prompts_file_is_refused_and_the_prompts_survive(tmp_path, prompts, tiny_path):
    before = prompts.read_bytes()
    r = cli("task=generate", "workload=jsonl", f"workload.path={prompts}", f"outputs={prompts}", "overwrite=true",
            f"hydra.run.dir={tmp_path / 'h'}")
    assert "is an input of this run" in one_line_error(r)
    assert prompts.read_bytes() == before


def test_an_existing_out_file_is_kept_unless_overwrite(tmp_path, prompts, tiny_path):
    out, outputs = tmp_path / "run.json", tmp_path / "out.jsonl"
    out.write_text("my earlier results\n")
    args = ("task=generate", "workload=jsonl", f"workload.path={prompts}", f"out={out}", f"outputs={outputs}",
            "task.progress=false", f"hydra.run.dir={tmp_path / 'h'}")
    assert "exists; pass overwrite=true" in one_line_error(cli(*args))
    assert out.read_text() == "my earlier results\n" and not outputs.exists()  # refused before any work
    r = cli(*args, "overwrite=true")
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["task"] == "generate" and len(outputs.read_text().splitlines()) == 2
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left beside them


@pytest.mark.parametrize("target, message", [("folder", "is a folder"), ("/dev/full", "not a regular file")])
def test_unwritable_output_paths_are_refused_before_the_run(tmp_path, prompts, target, message):
    path = tmp_path if target == "folder" else Path(target)
    r = cli("task=plan", f"out={path}", "overwrite=true", f"hydra.run.dir={tmp_path / 'h'}")
    assert message in one_line_error(r)
    assert not (tmp_path / "h" / "run.json").exists()


def test_a_full_disk_keeps_the_previous_file_whole(tmp_path):
    """A write that fails half-way (the file size limit plays the full disk) leaves the old document
    byte-identical, no temporary file behind, and says so in one line."""
    target = tmp_path / "run.json"
    target.write_text("previous document\n")
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
              "from moe_lightning.files import atomic_write, WriteError\n"
              "try:\n"
              f"    atomic_write({str(target)!r}, 'x' * 100000)\n"
              "except WriteError as exc:\n"
              "    print(exc); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and "cannot write" in r.stdout and "unchanged" in r.stdout, r.stdout + r.stderr
    assert target.read_text() == "previous document\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_corrupt_kernel_table_cache_is_rebuilt(tmp_path, monkeypatch, caplog):
    import torch

    from moe_lightning.config import ModelSpec
    from moe_lightning.engine import kernel_table

    monkeypatch.setenv("MOE_LIGHTNING_CACHE", str(tmp_path))
    spec = ModelSpec()
    first = kernel_table.cached_profile(spec, torch.float32, torch.device("cpu"))
    [cache] = list((tmp_path / "kernel-tables").glob("*.json"))
    cache.write_text('{"1": {"loop": ')  # truncated by a crash
    with caplog.at_level("WARNING"):
        again = kernel_table.cached_profile(spec, torch.float32, torch.device("cpu"))
    assert set(again) == set(first) and "unreadable" in caplog.text
    assert json.loads(cache.read_text())  # rewritten whole


def test_two_runs_started_together_get_two_folders(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "moe_lightning.cli", "task=plan"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    docs = list(tmp_path.glob("runs/*/*/run.json"))
    assert len(docs) == 2 and docs[0].parent != docs[1].parent


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_a_new_artefact_gets_the_umasks_mode(tmp_path, umask, mode):
    import os

    from moe_lightning.files import atomic_write

    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "run.json", "{}\n")
    finally:
        os.umask(old)
    assert (tmp_path / "run.json").stat().st_mode & 0o777 == mode


def test_a_replaced_artefact_keeps_its_mode(tmp_path):
    import os

    from moe_lightning.files import atomic_write

    target = tmp_path / "outputs.jsonl"
    target.write_text("earlier\n")
    target.chmod(0o640)
    old = os.umask(0o022)
    try:
        atomic_write(target, "later\n")
    finally:
        os.umask(old)
    assert target.read_text() == "later\n" and target.stat().st_mode & 0o777 == 0o640


def test_the_cli_writes_its_documents_with_the_umasks_mode(tmp_path):
    out = tmp_path / "plan.json"
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "task=plan", f"out={out}",
                        f"hydra.run.dir={tmp_path / 'h'}"], capture_output=True, text=True, timeout=300, umask=0o027)
    assert r.returncode == 0, r.stderr
    assert out.stat().st_mode & 0o777 == 0o640


def test_a_second_run_writing_the_same_outputs_is_refused_and_touches_nothing(tmp_path, prompts, tiny_path):
    """Another process holds outputs='s lock (as a running generate does from its checks to its final
    rename): the CLI, even with overwrite=true or resume=true, refuses in one line and leaves the
    outputs, the part file and the lock as they were."""
    import os

    from moe_lightning.files import lock_output

    outputs = tmp_path / "out.jsonl"
    outputs.write_text('{"id": 0, "output_ids": [1]}\n')
    part = tmp_path / "out.jsonl.part"
    part.write_text("the running run's rows\n")
    lock = lock_output(outputs, key="outputs")
    try:
        for flag, folder in (("overwrite=true", "o"), ("resume=true", "r")):
            r = cli("task=generate", "workload=jsonl", f"workload.path={prompts}", f"outputs={outputs}", flag,
                    "task.progress=false", f"hydra.run.dir={tmp_path / folder}")
            assert f"another run (pid {os.getpid()}) is writing it" in one_line_error(r)
            assert outputs.read_text() == '{"id": 0, "output_ids": [1]}\n'
            assert part.read_text() == "the running run's rows\n"
            assert (tmp_path / "out.jsonl.lock").read_text() == f"{os.getpid()}\n"
            assert not (tmp_path / folder / "run.json").exists()
    finally:
        lock.release()
    assert not (tmp_path / "out.jsonl.lock").exists()


def test_a_killed_runs_lock_file_takes_no_one_out(tmp_path, prompts, tiny_path):
    """A lock file left by a dead process holds no flock: the next run takes it, and removes it when done."""
    outputs = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.lock").write_text("999999\n")
    r = cli("task=generate", "workload=jsonl", f"workload.path={prompts}", f"outputs={outputs}",
            "task.progress=false", f"hydra.run.dir={tmp_path / 'h'}")
    assert r.returncode == 0, r.stderr
    assert len(outputs.read_text().splitlines()) == 2 and not (tmp_path / "out.jsonl.lock").exists()


def test_the_lock_is_exclusive_between_processes(tmp_path):
    """Two processes: the second is refused while the first holds the lock, and takes it once released."""
    from moe_lightning.errors import ConfigError
    from moe_lightning.files import lock_output

    script = ("import sys\nfrom moe_lightning.files import lock_output\n"
              f"lock = lock_output({str(tmp_path / 'o.jsonl')!r}, key='outputs')\n"
              "print('held', flush=True)\nsys.stdin.readline()\nlock.release()\n")
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError, match=f"another run \\(pid {holder.pid}\\)"):
            lock_output(tmp_path / "o.jsonl", key="outputs")
    finally:
        holder.communicate("\n", timeout=60)
    lock_output(tmp_path / "o.jsonl", key="outputs").release()


def test_a_reused_run_folder_is_refused_unless_overwrite(tmp_path):
    """hydra.run.dir naming an earlier run's folder: refused in one line before Hydra writes its record
    there, the earlier run document kept; overwrite=true replaces it."""
    folder = tmp_path / "run"
    assert cli("task=plan", f"hydra.run.dir={folder}").returncode == 0
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert folder / "run.json" in before and folder / ".hydra" / "config.yaml" in before
    r = cli("task=plan", "workload.gen_len=7", f"hydra.run.dir={folder}")
    assert "run.json exists: the run folder holds an earlier run" in one_line_error(r)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    r = cli("task=plan", "workload.gen_len=7", f"hydra.run.dir={folder}", "overwrite=true")
    assert r.returncode == 0, r.stderr
    assert json.loads((folder / "run.json").read_text())["workload"]["gen_len"] == 7


def test_a_reused_sweep_folder_keeps_its_jobs_documents(tmp_path):
    sweep = tmp_path / "sweep"
    assert cli("-m", "task=plan", "workload.gen_len=5,6", f"hydra.sweep.dir={sweep}").returncode == 0
    before = {p: p.read_bytes() for p in sweep.glob("*/run.json")}
    assert len(before) == 2
    r = cli("-m", "task=plan", "workload.gen_len=7,8", f"hydra.sweep.dir={sweep}")
    # each job is refused in its own line, the sweep goes on, and it ends naming the failed jobs (exit 2)
    errors = [line for line in r.stderr.splitlines() if line.startswith("moe-lightning: error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "0/run.json exists: the run folder holds an earlier run" in errors[0]
    assert "1/run.json exists" in errors[1] and "2 of 2 sweep jobs failed" in errors[2]
    assert {p: p.read_bytes() for p in sweep.glob("*/run.json")} == before


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _report(**metrics):
    from moe_lightning.report import Metrics, RunReport, Spread

    return RunReport(system="cgopipe", task="bench", model={}, hardware={}, workload={}, policy={},
                     metrics=Metrics(spread={"throughput_tok_s": Spread.of([812.5]), "decode_step_s": Spread.of([])},
                                     decode_step_median_s=None, **metrics), git_commit=None)


def test_a_document_without_numbers_for_a_spread_is_strict_json_and_reads_back(tmp_path):
    """A spread of one repeat (no stdev) and an empty one (no decode step) are null in the document, which
    any strict JSON reader takes, and read back as None, not 0."""
    from moe_lightning.report import RunReport

    _report().to_json(tmp_path / "run.json")
    doc = json.loads((tmp_path / "run.json").read_text(), parse_constant=_refuse_constant)
    one, empty = doc["metrics"]["spread"]["throughput_tok_s"], doc["metrics"]["spread"]["decode_step_s"]
    assert (one["n"], one["median"], one["stdev"], one["cv"]) == (1, 812.5, None, None)
    assert empty["n"] == 0 and empty["median"] is None and doc["metrics"]["decode_step_median_s"] is None
    back = RunReport.from_json(tmp_path / "run.json").metrics
    assert back.spread["throughput_tok_s"].stdev is None and back.spread["throughput_tok_s"].cv is None
    assert back.spread["decode_step_s"].median is None


def test_a_non_finite_number_is_refused_by_name_and_writes_nothing(tmp_path):
    """NaN or Infinity would be written as bare `NaN`/`Infinity` tokens (not JSON): the writer refuses,
    naming the field, and the earlier document stays whole."""
    from moe_lightning.files import WriteError

    (tmp_path / "run.json").write_text('{"earlier": "run document"}\n')
    with pytest.raises(WriteError, match=r"metrics\.utilisation\.gpu is nan"):
        _report(utilisation={"gpu": float("nan")}).to_json(tmp_path / "run.json")
    with pytest.raises(WriteError, match=r"metrics\.throughput_tok_s is inf"):
        _report(throughput_tok_s=float("inf")).to_json()
    assert (tmp_path / "run.json").read_text() == '{"earlier": "run document"}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_sweep_jobs_never_replace_each_others_document(tmp_path):
    """out= resolving to one file for every job of a sweep (an interpolation that does not name the job):
    the second job is refused before its work, even with overwrite=true, and the first's document kept."""
    r = cli("-m", "task=plan", "out=${task.name}.json", "overwrite=true", "workload.gen_len=5,6",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    errors = [line for line in r.stderr.splitlines() if line.startswith("moe-lightning: error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "plan.json: an earlier job of this sweep wrote it" in errors[0] and "1 of 2 sweep jobs failed" in errors[1]
    assert json.loads((tmp_path / "plan.json").read_text())["workload"]["gen_len"] == 5
    assert not (tmp_path / "sweep" / "1" / "run.json").exists()


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until `text` is in the file `path` (a run's log), or fail: a loaded host takes its time to start."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {text!r}: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {text!r} in {path} after {timeout} s")


def test_a_second_run_in_a_busy_run_folder_is_refused(tmp_path, tiny_path):
    """Two runs with the same hydra.run.dir at once both passed the folder check (neither had written
    run.json yet), both said `run document: <folder>/run.json` and exited 0, and the last rename silently
    replaced the other's document. The run folder is now locked from the checks to the documents' rename,
    and a second run is refused before Hydra rewrites the first's .hydra/ record."""
    import signal

    folder = tmp_path / "h"
    first = subprocess.Popen([sys.executable, "-m", "moe_lightning.cli", "task=generate", "system=cgopipe",
                              "workload.num_requests=256", "workload.gen_len=128", "task.progress=false",
                              f"hydra.run.dir={folder}"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(folder / "moe-lightning.log", "streamed experts per layer", first)   # past its checks
        record = (folder / ".hydra" / "overrides.yaml").read_text()
        second = cli("task=plan", f"hydra.run.dir={folder}", cwd=tmp_path)
        assert f"another run (pid {first.pid}) is running in this folder" in one_line_error(second)
        assert not (folder / "run.json").exists()
        assert (folder / ".hydra" / "overrides.yaml").read_text() == record   # refused before Hydra's set-up
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == 143


def test_an_interrupted_bench_says_it_wrote_nothing_and_keeps_the_earlier_document(tmp_path, tiny_path):
    """SIGTERM mid-bench said only `interrupted by SIGTERM`: not whether out= (here an earlier document,
    overwrite=true) was replaced or half-written. It now says what the run wrote (nothing), exit 143."""
    import signal

    out = tmp_path / "bench.json"
    out.write_text('{"earlier": true}\n')
    folder = tmp_path / "h"
    p = subprocess.Popen([sys.executable, "-m", "moe_lightning.cli", "task=bench", "system=cgopipe",
                          "workload.num_requests=32", "workload.gen_len=64", "task.progress=false", f"out={out}",
                          "overwrite=true", f"hydra.run.dir={folder}"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    _wait_for(folder / "moe-lightning.log", "streamed experts per layer", p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 143, err
    assert err.strip().splitlines() == ["moe-lightning: error: interrupted by SIGTERM: task=bench wrote nothing "
                                        "(earlier files are untouched); run the same command again to start over"]
    assert out.read_text() == '{"earlier": true}\n'
    assert sorted(p.name for p in folder.iterdir()) == [".hydra", "moe-lightning.log"]


def test_an_interrupted_sweep_says_which_jobs_kept_their_documents(tmp_path):
    """SIGINT between a sweep's jobs said only `interrupted by SIGINT`, though job 0 had finished and kept
    its run document and the later jobs never ran."""
    import re
    import signal

    p = subprocess.Popen([sys.executable, "-m", "moe_lightning.cli", "-m", "task=simulate",
                          "workload.gen_len=8,16,32,64", f"hydra.sweep.dir={tmp_path / 's'}"], cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in p.stderr:   # Hydra announces each job on stderr: interrupt as job 1 starts
        lines.append(line)
        if "#1 :" in line:
            p.send_signal(signal.SIGINT)
            break
    _, rest = p.communicate(timeout=300)
    err = "".join(lines) + rest
    assert p.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("moe-lightning: error: interrupted by SIGINT"), err
    assert re.search(r"of this sweep's earlier jobs (\d) of \1 finished and kept their run documents", last), last
    assert (tmp_path / "s" / "0" / "run.json").is_file() and not (tmp_path / "s" / "3").exists()


def test_an_interrupted_calibration_names_the_profile_it_wrote(tmp_path):
    """A calibration interrupted after writing its profile (task.out_yaml) named only run.json as kept."""
    from types import SimpleNamespace

    from moe_lightning.cli import documents_state, said_what_was_kept

    yaml = tmp_path / "mine.yaml"
    task = SimpleNamespace(name="calibrate", yaml_path=lambda cfg: yaml)
    cfg = SimpleNamespace(task=task, out=None, outputs=None, run_dir=str(tmp_path / "h"))
    before = documents_state(cfg)
    yaml.write_text("name: mine\n")
    line = said_what_was_kept("interrupted by SIGINT", cfg, before)
    assert f"written whole before the signal: {yaml};" in line, line
