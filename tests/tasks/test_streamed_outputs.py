"""Generate survives interruption: batches are streamed to a part file, SIGINT/SIGTERM keep them and
exit 130/143 with one line, and after a SIGKILL `resume=true` finishes with outputs identical to an
uninterrupted run (sampled, so that the per-request seeds are exercised too)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RUN = ("task=generate", "system=cgopipe", "workload.num_requests=240", "workload.gen_len=6", "policy.batch_size=4",
       "policy.micro_batch_size=2", "sampling.temperature=0.8", "sampling.top_p=0.9", "task.progress=false")


def start(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moe_lightning", *RUN, *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_lightning", *RUN, *args], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300)


def rows_in(part: Path) -> int:
    return max(0, part.read_bytes().count(b"\n") - 1) if part.exists() else 0


def interrupt_after(proc: subprocess.Popen, part: Path, rows: int, sig: int) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + 120
    while rows_in(part) < rows:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no batch was written in time"
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_path) -> bytes:
    folder = tmp_path_factory.mktemp("whole")
    r = run(folder, "outputs=whole.jsonl")
    assert r.returncode == 0, r.stderr
    return (folder / "whole.jsonl").read_bytes()


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_outputs_of_an_uninterrupted_run(tmp_path, uninterrupted):
    part = tmp_path / "out.jsonl.part"
    killed = interrupt_after(start(tmp_path, "outputs=out.jsonl"), part, 12, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    kept = rows_in(part)
    assert 12 <= kept < 240 and not (tmp_path / "out.jsonl").exists()
    # A kill in the middle of a write leaves a row cut short: resume drops it and runs that request again.
    with part.open("ab") as f:
        f.write(b'{"id": 999, "output_ids": [1, 2')
    refused = run(tmp_path, "outputs=out.jsonl")       # without resume=true the part file is not touched
    assert refused.returncode == 2 and "resume=true" in refused.stderr
    resumed = run(tmp_path, "outputs=out.jsonl", "resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed:" in resumed.stdout
    assert (tmp_path / "out.jsonl").read_bytes() == uninterrupted
    assert not part.exists() and not (tmp_path / "out.jsonl.lock").exists()   # the dead run's lock, taken over
    doc = json.loads(next((tmp_path / "runs").rglob("run.json")).read_text())
    assert doc["extra"]["resumed_outputs"] == kept   # admission mode: every whole row is kept


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
@pytest.mark.parametrize("padded", [False, True], ids=["admission", "static-batches"])
def test_sigterm_and_sigint_keep_the_finished_outputs(tmp_path, tiny_path, sig, code, padded):
    """Admission mode keeps each finished request (in the order they finished); static batches (the
    padded mode, as the baselines) keep whole batches in input order."""
    part = tmp_path / "out.jsonl.part"
    extra = ("workload.padding=true",) if padded else ()
    r = interrupt_after(start(tmp_path, "outputs=out.jsonl", *extra), part, 8, sig)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out.jsonl.lock").exists()      # released on the way out
    lines = part.read_text().splitlines()
    rows = [json.loads(line) for line in lines[1:]]          # every kept row is whole
    assert f"{len(rows)} of 240 outputs are kept in" in r.stderr
    ids = [row["id"] for row in rows]
    if padded:
        assert len(rows) % 4 == 0 and ids == list(range(len(rows)))
    else:
        assert len(rows) >= 8 and len(set(ids)) == len(ids) and set(ids) <= set(range(240))


def test_a_part_file_of_another_run_is_refused_and_left_alone(tmp_path, tiny_path):
    part = tmp_path / "out.jsonl.part"
    header = {"format": "moe-lightning partial outputs", "version": 1, "batch_size": 4, "num_requests": 240,
              "run": {"gen_len": 99}}
    part.write_text(json.dumps(header) + "\n" + '{"id": 0, "output_ids": [5]}\n')
    before = part.read_bytes()
    r = run(tmp_path, "outputs=out.jsonl", "resume=true")
    assert r.returncode == 2 and "written by another run" in r.stderr and "gen_len: 99 -> 6" in r.stderr, r.stderr
    assert part.read_bytes() == before and not (tmp_path / "out.jsonl").exists()


def test_resume_needs_an_outputs_path(tmp_path, tiny_path):
    r = run(tmp_path, "resume=true")
    assert r.returncode == 2 and "resume=true needs outputs=PATH" in r.stderr


def test_outputs_of_another_tokenizer_are_not_resumed(tmp_path, tiny_path):
    """A part file written before the checkpoint's tokenizer.json changed (its outputs' text decoded, its
    text prompts encoded with the old one) is refused on resume, naming the file; unchanged, it resumes."""
    import shutil

    from moe_lightning.config import ModelSpec
    from moe_lightning.engine.weights import resolve_model
    from moe_lightning.errors import ConfigError
    from moe_lightning.run_config import RunConfig
    from moe_lightning.tasks.outputs import StreamedOutputs, run_fields
    from moe_lightning.workload_io import Request

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_path, folder)
    cfg = RunConfig(model=ModelSpec(name="hf", path=str(folder)))
    requests = [Request(i, [5, 6]) for i in range(4)]

    def begin(resume: bool) -> list[int]:
        out = StreamedOutputs(tmp_path / "out.jsonl", resume=resume)
        try:
            done = out.begin(run_fields(cfg, resolve_model(cfg.model)[0], "cpu"), requests, None, None)
            if not resume:
                out.write_finished([(0, [7, 8])])
            return done
        finally:
            out.close()

    begin(resume=False)
    assert begin(resume=True) == [0]
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<unknown>"
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(ConfigError, match=r"written by another run \(run.model.checkpoint_files.tokenizer.json: "):
        begin(resume=True)


def test_a_resume_whose_part_file_holds_every_output_times_nothing_and_says_so(tmp_path, tiny_path, capsys):
    """A resumed generate whose part file already holds every output (a run killed after its last row)
    runs no request: its throughput is null, not 0 tokens/s (nothing measured is no figure), its line
    says nothing was timed, and the outputs are finished from the part file."""
    from moe_lightning.config import Policy, Workload
    from moe_lightning.run_config import RunConfig
    from moe_lightning.systems import CGOPipeSystem
    from moe_lightning.tasks.generate import GenerateTask, run_generation
    from moe_lightning.tasks.outputs import StreamedOutputs

    cfg = RunConfig(task=GenerateTask(progress=False), system=CGOPipeSystem(), device="cpu",
                    workload=Workload(num_requests=4, gen_len=3), policy=Policy(batch_size=2, micro_batch_size=1),
                    outputs=str(tmp_path / "out.jsonl"), out=str(tmp_path / "run.json"), resume=True)
    first = StreamedOutputs(tmp_path / "out.jsonl", resume=False)
    try:
        run_generation(cfg, progress=False, streamed=first)   # every row written, the outputs never finished
    finally:
        first.close()
    assert rows_in(tmp_path / "out.jsonl.part") == 4 and not (tmp_path / "out.jsonl").exists()
    capsys.readouterr()
    cfg.task.run(cfg)
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["extra"]["resumed_outputs"] == 4
    assert doc["metrics"]["throughput_tok_s"] is None and doc["metrics"]["spread"]["throughput_tok_s"]["n"] == 0
    assert "nothing was timed" in out and "tok/s" not in out.split("\n")[0]
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4
    # Its readers: task=report shows no figure, task=compare ranks it nowhere, a logger's summary leaves it out.
    from moe_lightning.report import RunReport, flatten_numbers
    from moe_lightning.tasks.compare import _row
    from moe_lightning.tasks.report import row_of

    report = RunReport.from_json(tmp_path / "run.json")
    assert row_of(tmp_path / "run.json", report)["tok_s"] is None
    row = _row("cgopipe", tmp_path / "run.json", None)
    assert row["status"] == "failed" and "nothing was timed" in row["error"]
    assert "metrics.throughput_tok_s" not in flatten_numbers({"metrics": report.metrics})
