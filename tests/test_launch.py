"""Several ranks from the console script: `parallel.tensor` / `parallel.expert` start gloo ranks through
torch.distributed's elastic launcher, on a checkpoint folder given as `model=hf model.path=...`; rank 0
writes transformers' own tokens and one run document with every rank's timings. Bad splits: one line,
exit 2, before anything is loaded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PARITY_NEW_TOKENS
from tests.test_cli import cli


@pytest.mark.slow
@pytest.mark.parametrize("tensor, expert, system", [(2, 1, "reference"), (1, 2, "cgopipe"), (2, 2, "cgopipe")])
def test_ranks_started_by_the_cli_give_transformers_tokens(tmp_path, tiny_path, prompts, hf_outputs, tensor, expert,
                                                           system):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": i, "input_ids": p}) + "\n" for i, p in enumerate(prompts)))
    out, outputs = tmp_path / "run.json", tmp_path / "out.jsonl"
    r = cli("task=generate", f"system={system}", "model=hf", f"model.path={tiny_path}", "model.dtype=float32",
            "workload=jsonl", f"workload.path={path}", f"workload.gen_len={PARITY_NEW_TOKENS}",
            f"parallel.tensor={tensor}", f"parallel.expert={expert}", f"out={out}", f"outputs={outputs}",
            *(["parallel.chunks=2"] if expert > 1 else []),   # chunks pipeline expert parallelism's all-to-all
            "task.progress=false", "task.warmup_tokens=0", f"hydra.run.dir={tmp_path / 'h'}")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in outputs.read_text().splitlines()]
    assert [row["output_ids"] for row in rows] == hf_outputs
    doc = json.loads(out.read_text())["extra"]["parallel"]
    assert (doc["tensor"], doc["expert"], doc["backend"]) == (tensor, expert, "gloo")
    assert [(r["rank"], r["tensor_rank"], r["expert_rank"]) for r in doc["ranks"]] == [
        (e * tensor + t, t, e) for e in range(expert) for t in range(tensor)]
    assert all(r["throughput_tok_s"] > 0 for r in doc["ranks"])
    assert r.stdout.count("run document:") == 1   # rank 0 alone reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h", "out.jsonl", "p.jsonl", "run.json"]


@pytest.mark.parametrize("args, message", [
    (["parallel.tensor=3"], "parallel.tensor=3 does not divide model.num_heads"),
    (["parallel.expert=3"], "parallel.expert=3 does not divide model.num_experts"),
    (["system=flexgen", "parallel.expert=2"], "system=flexgen runs on one rank"),
    (["task=calibrate", "parallel.tensor=2"], "task=calibrate runs in one process"),
    (["hardware=2xt4", "parallel.expert=1"], "hardware=2xt4 has 2 GPUs, but this run has 1 rank"),
    (["hardware=4xt4", "parallel.expert=2"], "hardware=4xt4 has 4 GPUs but parallel.tensor=1 x parallel.expert=2"),
    (["parallel.backend=nccl", "parallel.expert=2"], "parallel.backend=nccl needs device=cuda"),
    (["parallel.tensor=0"], "parallel.tensor: must be an integer >= 1"),
    (["system=cgopipe", "parallel.expert=2", "policy.batch_size=6", "policy.micro_batch_size=3"],
     "must be multiples of parallel.expert=2"),
    (["system=cgopipe", "system.policy_source=auto", "parallel.expert=2"],
     "but hardware=cpu has 1 GPU (one rank per GPU"),
])
def test_a_bad_split_is_one_line_and_exit_2(tmp_path, args, message):
    r = cli("task=generate", "system=reference", *args, "workload.num_requests=2", "workload.gen_len=2",
            f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    # (a first run in a fresh cache writes the tiny checkpoint first, with transformers' progress bar)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_a_refusal_inside_the_ranks_is_one_line_with_its_exit_code(tmp_path):
    """What only a rank finds out (here: the policy does not fit its GPU budget) comes back as the rank
    said it, once: the launcher's own reports of the failed ranks are not shown."""
    r = cli("task=generate", "system=cgopipe", "parallel.expert=2", "hardware.gpu.memory_gib=0.0001",
            "workload.num_requests=2", "workload.gen_len=2", f"hydra.run.dir={tmp_path / 'h'}", cwd=tmp_path)
    assert r.returncode == 3, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "INFO" not in line and "it/s]" not in line]
    assert len(lines) == 1 and "policy does not fit the memory budget" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


RANKS_RUN = ("task=generate", "system=cgopipe", "parallel.expert=2", "workload.num_requests=240", "workload.gen_len=6",
             "policy.batch_size=4", "policy.micro_batch_size=2", "task.progress=false", "outputs=out.jsonl")


@pytest.fixture(scope="module")
def uninterrupted_ranks_run(tmp_path_factory, tiny_path) -> Path:
    """The outputs file of RANKS_RUN run to the end (one run for both signals' tests)."""
    whole = tmp_path_factory.mktemp("whole")
    done = subprocess.run([sys.executable, "-m", "moe_lightning", *RANKS_RUN], cwd=whole, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return whole / "out.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_several_rank_run_keeps_its_outputs_and_resumes(tmp_path, uninterrupted_ranks_run, sig, code):
    """SIGTERM/SIGINT to the launcher reach the ranks: rank 0 keeps its group's finished outputs and says so
    in one line (no agent logs, no traceback, no rank left running); `resume=true` then skips them on
    every rank (each expert group runs its share of the rest) and ends with an uninterrupted run's file."""
    from tests.tasks.test_streamed_outputs import interrupt_after, rows_in

    part = tmp_path / "out.jsonl.part"
    proc = subprocess.Popen([sys.executable, "-m", "moe_lightning", *RANKS_RUN], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    r = interrupt_after(proc, part, 8, sig)
    assert r.returncode == code, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip() and "INFO" not in line and "it/s]" not in line]
    assert len(lines) == 1 and f"of 240 outputs are kept in {part.name}" in lines[0], r.stderr
    kept = rows_in(part)
    assert 8 <= kept < 240
    resumed = subprocess.run([sys.executable, "-m", "moe_lightning", *RANKS_RUN, "resume=true"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "out.jsonl").read_bytes() == uninterrupted_ranks_run.read_bytes()
    doc = json.loads(next((tmp_path / "runs").rglob("run.json")).read_text())
    assert doc["extra"]["resumed_outputs"] == kept
    groups = doc["extra"]["batching"]["data_parallel_attention"]["groups"]
    assert sum(g["requests"] for g in groups) == 240 - kept


@pytest.mark.parametrize("args, message", [
    (["task=generate", "outputs=o.jsonl"],
     "torchrun started 2 processes, but parallel.tensor=1 x parallel.expert=1 = 1 rank:"),
    (["task=simulate"], "torchrun started 2 processes, but task=simulate runs in one"),
])
def test_torchrun_starting_other_than_t_x_e_processes_is_refused(tmp_path, args, message):
    """Under torchrun each process runs the command: with T x E = 1 each would run the whole job and write
    the same outputs. torchrun's environment for rank 0 of 2 (what each process sees) is refused."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}
    out = tmp_path / "o.jsonl"
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", *args, "workload.num_requests=2",
                        "workload.gen_len=2", f"hydra.run.dir={tmp_path / 'h'}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not out.exists() and not out.with_name("o.jsonl.part").exists()


def corrupt_rank_1_expert(tmp_path: Path, tiny_path: Path) -> tuple[Path, str]:
    """A copy of the tiny checkpoint whose expert 7 (rank 1's under parallel.expert=2) holds an Inf:
    (the folder, the tensor's name)."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_path, ckpt)
    name = "model.layers.0.block_sparse_moe.experts.7.w1.weight"
    tensors = load_file(ckpt / "model.safetensors")
    tensors[name][0, 0] = float("inf")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    return ckpt, name


def test_a_corrupt_expert_only_another_rank_loads_is_its_line_and_leaves_no_part_file(tmp_path, tiny_path):
    """Expert 7 is rank 1's under parallel.expert=2: its NaN/Inf refusal is what the run says (not rank
    0's being stopped), and rank 0 opens no part file before every rank has its weights."""
    ckpt, name = corrupt_rank_1_expert(tmp_path, tiny_path)
    out = tmp_path / "o.jsonl"
    r = cli("task=generate", "system=cgopipe", "parallel.expert=2", "model=hf", f"model.path={ckpt}",
            "workload.num_requests=2", "workload.gen_len=2", f"outputs={out}", f"hydra.run.dir={tmp_path / 'h'}",
            cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.startswith("moe-lightning: error:")]
    assert len(lines) == 1 and f"'{name}' holds NaN or Inf" in lines[0], r.stderr
    assert not out.exists() and not out.with_name("o.jsonl.part").exists()


def torchrun(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "moe_lightning", *args, "workload.num_requests=2", "workload.gen_len=2",
                           f"hydra.run.dir={tmp_path / 'h'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


def errors_in(r: subprocess.CompletedProcess) -> list[str]:
    """Our lines; torchrun's agent then reports the failed ranks its own way (its W/E lines, its summary)."""
    return [line for line in r.stderr.splitlines() if line.startswith("moe-lightning: error:")]


@pytest.mark.parametrize("args, message", [
    (["task=generate", "policy.nope=1"], "unknown key 'policy.nope'"),   # refused before Hydra, in each process
    pytest.param(["task=generate", "system=cgopipe", "parallel.expert=2", "hardware.gpu.memory_gib=0.0001"],
                 "policy does not fit the memory budget", marks=pytest.mark.slow),   # refused in each rank's task
])
def test_a_refusal_every_torchrun_rank_hits_is_said_once(tmp_path, args, message):
    r = torchrun(tmp_path, *args)
    assert r.returncode != 0
    lines = errors_in(r)
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Error executing job" not in r.stderr


@pytest.mark.slow
def test_under_torchrun_a_rank_s_own_error_is_the_line_shown(tmp_path, tiny_path):
    """Expert 7 is rank 1's: its refusal is the line; rank 0, whose collective breaks as rank 1 exits,
    adds neither a line nor a traceback."""
    ckpt, name = corrupt_rank_1_expert(tmp_path, tiny_path)
    r = torchrun(tmp_path, "task=generate", "system=cgopipe", "parallel.expert=2", "model=hf", f"model.path={ckpt}")
    lines = errors_in(r)
    assert r.returncode != 0 and len(lines) == 1 and f"'{name}' holds NaN or Inf" in lines[0], r.stderr
    assert "Error executing job" not in r.stderr
