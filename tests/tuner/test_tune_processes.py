"""Tuner processes tied to their parent: workers and trial processes die with the tune (SIGKILL included),
SIGTERM fails the running trials with a reason, the trial count is exact over all workers, a tune with no
completed trial exits non-zero with one line, and an out-of-memory trial says so."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from moe_lightning.config import ModelSpec, TunerConfig
from moe_lightning.errors import ConfigError
from moe_lightning.run_config import RunConfig
from moe_lightning.systems import CGOPipeSystem
from moe_lightning.tuner.search import open_study
from moe_lightning.tuner.trial_process import out_of_memory
from moe_lightning.tuner.trial_states import fail_orphaned_trials, trial_reason


def tune_args(tmp_path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "moe_lightning.cli", "task=tune", "system=cgopipe", "task.compare=false",
            "task.progress=false", f"tuner.storage=sqlite:///{tmp_path / 's.db'}", f"tuner.study_name={name}",
            f"hydra.run.dir={tmp_path / 'h'}", *extra]


def cli_env(tmp_path) -> dict[str, str]:
    # The host-wide measurement lock in a folder of our own: another test run on this host cannot hold us up.
    return {**os.environ, "MOE_LIGHTNING_LOCK_DIR": str(tmp_path)}


def load(tmp_path, name: str):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 's.db'}")


def running(tmp_path) -> int:
    con = sqlite3.connect(tmp_path / "s.db")
    try:
        return con.execute("select count(*) from trials where state = 'RUNNING'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


# ---- processes, read from /proc (Linux: where the parent-death signal is tested) ------------------

linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")  # a zombie has ended


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(pid: int) -> list[int]:
    parents = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None:
            parents[int(d.name)] = st[1]
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [c for c, pp in parents.items() if pp == parent]
        out += kids
        todo += kids
    return out


def spawned(proc: subprocess.Popen) -> list[int]:
    """The tune's spawned processes (workers and trial processes), however deep."""
    return [p for p in descendants(proc.pid) if "spawn_main" in cmdline(p)]


def survivors(pids: list[int], timeout_s: float) -> list[str]:
    """The processes still alive after `timeout_s` (with their command lines)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [f"{p}: {cmdline(p)[-90:]}" for p in pids if alive(p)]


def kill_all(pids: list[int]) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


# A measured tune whose trials each take half a minute: the kill finds two trials running, one in this
# process and one in the worker, each in its own trial process.
LONG_TRIALS = ("tuner.objective=measure", "tuner.workers=2", "tuner.n_trials=2", "tuner.repeats=1",
               "tuner.remeasure=0", "tuner.min_repeat_s=30", "tuner.heartbeat_s=1", "tuner.seed_with_hrm=false")


def start_long_tune(tmp_path, name: str, args: tuple[str, ...] = LONG_TRIALS):
    # Output to files, not pipes: a pipe would stay open as long as any process of the tune lives.
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(tune_args(tmp_path, name, *args), stdout=out, stderr=err, text=True,
                                env=cli_env(tmp_path), start_new_session=True)  # a process group, as in a shell
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        tree = spawned(proc)
        if len(tree) >= 3 and running(tmp_path) >= 2:  # the worker, and a trial process under each
            # every process of the tune, its resource trackers too, taken while the parent lives
            return proc, descendants(proc.pid)
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    pytest.fail(f"the tune never had two trials running: rc={proc.returncode} {(tmp_path / 'stderr').read_text()}")


@linux_only
@pytest.mark.slow
def test_sigkill_of_the_tune_leaves_no_process_and_no_new_trial(tmp_path, tiny_path):
    proc, tree = start_long_tune(tmp_path, "orphans")
    try:
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)  # the parent only: its children must follow by themselves
        proc.wait()
        assert survivors(tree, 5) == []
    finally:
        kill_all(tree)
    count = len(load(tmp_path, "orphans").trials)
    time.sleep(4.2)  # three heartbeats and the database clock's second: the killed trials are stale
    study = load(tmp_path, "orphans")
    assert len(study.trials) == count  # nothing goes on adding trials
    assert all(t.datetime_start is None or t.datetime_start.timestamp() <= killed_at + 0.5 for t in study.trials)
    assert sum(t.state == TrialState.RUNNING for t in study.trials) == 2

    # The same study resumed, its trials timed shorter (not part of the study's identity)
    r = subprocess.run(tune_args(tmp_path, "orphans", *LONG_TRIALS, "tuner.min_repeat_s=0"), capture_output=True,
                       text=True, timeout=300, env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "2 lost to an interrupt or a dead process queued again (trial 0, 1), 2 to go" in r.stdout, r.stdout
    trials = load(tmp_path, "orphans").trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2 + [TrialState.COMPLETE] * 2   # none counted, both re-run
    assert all("heartbeat" in trial_reason(t) for t in trials[:2])   # failed by Optuna's heartbeat check
    assert {t.user_attrs["retry_of"]: t.params for t in trials[2:]} == {0: trials[0].params, 1: trials[1].params}


@linux_only
@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_sigterm_or_ctrl_c_fails_the_running_trials_and_stops_every_process(tmp_path, tiny_path, how):
    proc, tree = start_long_tune(tmp_path, "stopped")
    try:
        if how == "sigterm":
            proc.send_signal(signal.SIGTERM)  # the tune only: it stops its workers
        else:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches every process of the foreground group
        proc.wait(timeout=30)
        assert survivors(tree, 5) == []
    finally:
        kill_all(tree)
    err = (tmp_path / "stderr").read_text()
    signum = signal.SIGTERM if how == "sigterm" else signal.SIGINT
    assert proc.returncode == 128 + signum, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"interrupted by {signum.name}" in err and "the same command resumes it" in err
    study = load(tmp_path, "stopped")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    reasons = {t.user_attrs["pid"]: t.user_attrs["reason"] for t in study.trials}
    assert reasons[proc.pid] == f"interrupted by {signum.name}"
    assert [r for pid, r in reasons.items() if pid != proc.pid] == ["interrupted by SIGTERM"]  # the worker's


@linux_only
@pytest.mark.slow
def test_a_resumed_tune_runs_its_interrupted_hrm_seed_again(tmp_path, tiny_path):
    """Ctrl-C fails the HRM seed and a neighbour as interrupted; the same command then runs both again with
    the same parameters and seed labels, and the study ends with exactly n_trials counted trials."""
    seeded = tuple(a for a in LONG_TRIALS if a != "tuner.seed_with_hrm=false" and not a.startswith("tuner.n_trials"))
    proc, tree = start_long_tune(tmp_path, "again", (*seeded, "tuner.n_trials=3"))
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
        assert survivors(tree, 5) == []
    finally:
        kill_all(tree)
    assert proc.returncode == 130, (tmp_path / "stderr").read_text()
    lost = {t.user_attrs["seed"]: t for t in load(tmp_path, "again").trials if t.state == TrialState.FAIL}
    assert set(lost) == {"hrm", "hrm-neighbour"} and all("interrupted" in trial_reason(t) for t in lost.values())

    r = subprocess.run(tune_args(tmp_path, "again", *seeded, "tuner.n_trials=3", "tuner.min_repeat_s=0"),
                       capture_output=True, text=True, timeout=300, env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "0 finished trials kept, 2 lost to an interrupt or a dead process queued again" in r.stdout, r.stdout
    trials = load(tmp_path, "again").trials
    retries = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    assert {lost[s].number for s in lost} == set(retries)
    for label, t in lost.items():
        retry = retries[t.number]
        assert retry.state == TrialState.COMPLETE and retry.params == t.params and retry.user_attrs["seed"] == label
    counted = [t for t in trials if t.state.is_finished() and t.number not in retries]
    assert len(counted) == 3 and all(t.state == TrialState.COMPLETE for t in counted)


@linux_only
@pytest.mark.slow
def test_a_killed_worker_is_the_reason_its_trial_failed(tmp_path, tiny_path):
    # Trials of a few seconds, and heartbeats too slow for the killed trial to go stale first.
    args = tuple(a.replace("min_repeat_s=30", "min_repeat_s=3").replace("heartbeat_s=1", "heartbeat_s=30")
                 for a in LONG_TRIALS)
    proc, tree = start_long_tune(tmp_path, "worker", args)
    pids = {t.user_attrs.get("pid") for t in load(tmp_path, "worker").trials if t.state == TrialState.RUNNING}
    worker = next(pid for pid in pids if pid not in (None, proc.pid))
    doomed = [worker, *descendants(worker)]
    try:
        os.kill(worker, signal.SIGKILL)
        assert survivors(doomed, 5) == []  # its trial process went with it
        proc.wait(timeout=120)
    finally:
        kill_all(tree)
    assert proc.returncode == 0, (tmp_path / "stderr").read_text()
    study = load(tmp_path, "worker")
    by_pid = {t.user_attrs["pid"]: t for t in study.trials}
    assert len(study.trials) == 2 and by_pid[proc.pid].state == TrialState.COMPLETE
    lost = by_pid[worker]
    assert lost.state == TrialState.FAIL
    assert lost.user_attrs["reason"] == f"its worker process (pid {worker}) was killed by signal 9"


@pytest.mark.slow
def test_sixteen_trials_over_two_workers_are_sixteen(tmp_path, tiny_path):
    r = subprocess.run(tune_args(tmp_path, "exact", "tuner.objective=simulate", "tuner.n_trials=16",
                                 "tuner.workers=2"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    study = load(tmp_path, "exact")
    assert len(study.trials) == 16 and all(t.state.is_finished() for t in study.trials)
    # ... and a second run of the same command has nothing left to do (its run folder is the first's: it
    # replaces the first's run document only when told to)
    r = subprocess.run(tune_args(tmp_path, "exact", "tuner.objective=simulate", "tuner.n_trials=16",
                                 "tuner.workers=2", "overwrite=true"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "16 finished trials kept, 0 to go" in r.stdout, r.stderr
    assert len(load(tmp_path, "exact").trials) == 16


def _race_cfg(storage: str, n: int) -> RunConfig:
    return RunConfig(system=CGOPipeSystem(), device="cpu",
                     tuner=TunerConfig(storage=storage, study_name="race", objective="simulate", n_trials=n,
                                       seed_with_hrm=False))


def _join_or_kill(procs) -> None:
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()


def _race(storage: str, rounds: tuple[int, ...], barrier) -> None:
    """One of several processes racing through the same study (a worker, without the CLI): each round
    starts with all of them at once and runs the study up to that round's n_trials."""
    from moe_lightning.engine.weights import resolve_model
    from moe_lightning.tasks.tune import run_trials

    spec, _ = resolve_model(ModelSpec())
    for n in rounds:
        cfg = _race_cfg(storage, n)
        study = open_study(cfg, spec)
        barrier.wait()  # all ask at once
        run_trials(study, cfg, spec, say=lambda line: None)
        barrier.wait()  # the round is over: the test counts


@pytest.mark.slow
def test_processes_racing_for_trials_start_exactly_n(tmp_path, tiny_path):
    """Three processes: first all asking at once for a study of 2 trials (each sees 0 started), then
    racing for the last trials of 12 (each sees the others' trials running)."""
    from moe_lightning.engine.weights import resolve_model

    storage = f"sqlite:///{tmp_path / 's.db'}"
    open_study(_race_cfg(storage, 2), resolve_model(ModelSpec())[0])  # the tables, made once
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4, timeout=120)
        procs = [ctx.Process(target=_race, args=(storage, (2, 12), barrier)) for _ in range(3)]
        for p in procs:
            p.start()
        try:
            counts = []
            for _ in (2, 12):
                barrier.wait()  # go
                barrier.wait()  # done
                counts.append(len(optuna.load_study(study_name="race", storage=storage).trials))
        finally:
            _join_or_kill(procs)
        assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counts == [2, 12]
    study = optuna.load_study(study_name="race", storage=storage)
    assert all(t.state.is_finished() for t in study.trials)
    assert len(Counter(t.user_attrs["pid"] for t in study.trials)) >= 2  # they did race


@pytest.mark.slow
def test_processes_racing_for_a_study_with_lost_trials_run_each_again_once(tmp_path, tiny_path):
    """Three processes asking at once, the study holding three trials lost to interrupts: each is queued
    again exactly once (under the study's gate), and the study ends with exactly n_trials counted."""
    from moe_lightning.engine.weights import resolve_model
    from moe_lightning.tuner.search import suggest

    storage = f"sqlite:///{tmp_path / 's.db'}"
    spec = resolve_model(ModelSpec())[0]
    cfg = _race_cfg(storage, 6)
    study = open_study(cfg, spec)
    for _ in range(3):
        trial = study.ask()
        suggest(trial, cfg, spec)
        trial.set_user_attr("reason", "interrupted by SIGTERM")
        study.tell(trial, state=TrialState.FAIL)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4, timeout=120)
        procs = [ctx.Process(target=_race, args=(storage, (6,), barrier)) for _ in range(3)]
        for p in procs:
            p.start()
        try:
            barrier.wait()  # go
            barrier.wait()  # done
        finally:
            _join_or_kill(procs)
        assert [p.exitcode for p in procs] == [0, 0, 0]
    trials = optuna.load_study(study_name="race", storage=storage).trials
    retries = [t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs]
    assert sorted(retries) == [0, 1, 2]
    assert all(t.params == trials[t.user_attrs["retry_of"]].params for t in trials if "retry_of" in t.user_attrs)
    assert len(trials) == 9 and all(t.state.is_finished() for t in trials)   # 3 lost, 6 counted


@pytest.mark.slow
def test_a_tune_whose_every_trial_fails_exits_1_with_one_line(tmp_path, tiny_path):
    # An address-space cap no trial process can live with: each runs out of memory importing torch.
    r = subprocess.run(tune_args(tmp_path, "capped", "tuner.objective=measure", "tuner.trial_memory_gib=0.4",
                                 "tuner.n_trials=3", "tuner.seed_with_hrm=false"),
                       capture_output=True, text=True, timeout=300, env=cli_env(tmp_path))
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("moe-lightning: error: no trial of study capped completed (3 failed, 0 infeasible; "
                               "reason of "), r.stderr
    # Torch's import runs out of address space as an ImportError (a library that cannot be mapped), or, on a
    # loaded host now and then, in C code that dies from a signal: both are read as the cap's doing.
    capped = re.compile(r"(out of memory|trial process died from signal (6|7|9|11) \(killed: out of memory) under "
                        r"the trial's memory cap of 0\.4 GiB")
    assert capped.search(r.stderr), r.stderr
    study = load(tmp_path, "capped")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3
    assert all(capped.match(t.user_attrs["reason"]) for t in study.trials), [t.user_attrs for t in study.trials]
    printed = [line for line in r.stdout.splitlines() if line.startswith("trial ")]
    assert len(printed) == 3 and all(" failed: " in line and capped.search(line) for line in printed), printed


def test_memory_errors_under_a_cap_read_as_out_of_memory():
    segment = ImportError("libtorch_cpu.so: failed to map segment from shared object")
    assert out_of_memory(segment, 0.4).startswith("out of memory under the trial's memory cap of 0.4 GiB")
    assert out_of_memory(OSError(12, "Cannot allocate memory"), 2).startswith("out of memory under")
    assert out_of_memory(MemoryError(), 0).startswith("out of memory")
    assert out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried"), 0)
    assert out_of_memory(ImportError("No module named 'foo'"), 0.4) is None
    assert out_of_memory(ValueError("failed to map segment"), 0.4) is None  # not a memory error's type


@linux_only
def test_tie_to_parent_kills_a_child_whose_parent_is_sigkilled(tmp_path):
    """A parent starts a child that ties itself to it and writes its pid; the parent is SIGKILLed."""
    pid_file = tmp_path / "child.pid"
    code = ("import os, sys, time; from moe_lightning.tuner.processes import tie_to_parent; "
            "tie_to_parent(int(sys.argv[1])); open(sys.argv[2], 'w').write(str(os.getpid())); time.sleep(60)")
    parent = ("import os, subprocess, sys, time; "
              f"subprocess.Popen([sys.executable, '-c', {code!r}, str(os.getpid()), {str(pid_file)!r}]); "
              "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    try:
        proc.kill()
        proc.wait()
        assert survivors([child], 3) == []
    finally:
        kill_all([child])


def test_a_child_whose_parent_is_already_gone_exits_at_once():
    r = subprocess.run([sys.executable, "-c", "from moe_lightning.tuner.processes import tie_to_parent; "
                        "tie_to_parent(1 << 22); print('survived')"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "survived" not in r.stdout


@pytest.mark.slow
def test_a_stale_trial_is_failed_with_its_reason(tmp_path, tiny_path):
    from moe_lightning.engine.weights import resolve_model

    cfg = RunConfig(system=CGOPipeSystem(), device="cpu",
                    tuner=TunerConfig(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="stale",
                                      objective="simulate", heartbeat_s=1))
    study = open_study(cfg, resolve_model(cfg.model)[0])
    trial = study.ask()
    study._storage.record_heartbeat(trial._trial_id)  # it beat once, then its process died
    assert fail_orphaned_trials(study, grace_s=3) == []
    time.sleep(4.2)  # the database clock counts whole seconds
    assert fail_orphaned_trials(study, grace_s=3) == [trial.number]
    frozen = study.trials[0]
    assert frozen.state == TrialState.FAIL and "stopped sending heartbeats" in trial_reason(frozen)


def test_single_then_multi_objective_under_one_name_is_refused(tmp_path, tiny_path):
    from moe_lightning.engine.weights import resolve_model

    cfg = RunConfig(system=CGOPipeSystem(), device="cpu",
                    tuner=TunerConfig(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="kinds",
                                      objective="simulate"))
    spec = resolve_model(cfg.model)[0]
    open_study(cfg, spec)
    multi = dataclasses.replace(cfg, tuner=dataclasses.replace(cfg.tuner, multi_objective=True))
    with pytest.raises(ConfigError, match="multi_objective: false -> true") as exc:
        open_study(multi, spec)
    assert "\n" not in str(exc.value)
