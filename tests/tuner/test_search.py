"""The Optuna search: HRM seeds first, infeasible points pruned unrun, failures recorded while the
study goes on, resumable after SIGKILL, several workers on one study."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from moe_lightning.config import CpuSpec, GpuSpec, HardwareSpec, LinkSpec, TunerConfig
from moe_lightning.run_config import RunConfig
from moe_lightning.systems import CGOPipeSystem
from moe_lightning.tuner.search import TrialFailed, objective, open_study, policy_params, seed_policies, seed_study


def make_cfg(tmp_path, name: str, **tuner) -> RunConfig:
    t = TunerConfig(storage=f"sqlite:///{tmp_path / name}.db", study_name=name, **tuner)
    return RunConfig(system=CGOPipeSystem(), tuner=t, device="cpu", run_dir=str(tmp_path / "run"))


def spec_of(cfg):
    from moe_lightning.engine.weights import resolve_model

    return resolve_model(cfg.model)[0]


def run_study(cfg, n: int):
    spec = spec_of(cfg)
    study = open_study(cfg, spec)
    if cfg.tuner.seed_with_hrm:
        seed_study(study, cfg, spec)
    study.optimize(objective(cfg, spec), n_trials=n, catch=(TrialFailed,))
    return study


def test_first_trial_is_the_hrm_policy(tmp_path, tiny_path):
    cfg = make_cfg(tmp_path, "seeded", objective="simulate")
    study = run_study(cfg, 3)
    hrm = seed_policies(cfg, spec_of(cfg))[0]
    first = study.trials[0]
    assert first.user_attrs["seed"] == "hrm"
    assert first.params == policy_params(hrm, spec_of(cfg), measured=False)
    assert first.state == TrialState.COMPLETE and first.values[0] > 0


def test_infeasible_points_are_pruned_without_running(tmp_path, tiny_path):
    tiny_gpu = HardwareSpec(name="tiny-gpu", gpu=GpuSpec(memory_gib=1e-5, usable_fraction=1.0), cpu=CpuSpec(),
                            link=LinkSpec())
    cfg = dataclasses.replace(make_cfg(tmp_path, "pruned", objective="measure", seed_with_hrm=False),
                              hardware=tiny_gpu)
    t0 = time.perf_counter()
    study = run_study(cfg, 4)
    assert time.perf_counter() - t0 < 10  # no engine process was started
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 4
    assert all("does not fit" in t.user_attrs["reason"] and "run" not in t.user_attrs for t in study.trials)


def test_crashing_trials_fail_and_the_study_goes_on(tmp_path, tiny_path):
    # An address-space cap the child cannot live with: every measured run dies of memory.
    cfg = make_cfg(tmp_path, "crash", objective="measure", trial_memory_gib=0.4, seed_with_hrm=False)
    study = run_study(cfg, 2)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all(t.user_attrs["reason"].startswith("out of memory under the trial's memory cap of 0.4 GiB")
               for t in study.trials)  # not "ImportError: failed to map segment"
    # ... and a trial that overruns its timeout is killed and failed the same way.
    cfg = make_cfg(tmp_path, "timeout", objective="measure", trial_timeout_s=0.5, seed_with_hrm=False)
    study = run_study(cfg, 1)
    assert study.trials[0].state == TrialState.FAIL and "timeout" in study.trials[0].user_attrs["reason"]


def _states(db) -> dict[int, tuple[str, float | None]]:
    con = sqlite3.connect(db)
    try:
        rows = con.execute("select t.number, t.state, v.value from trials t left join trial_values v "
                           "on v.trial_id = t.trial_id").fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()
    return {n: (s, v) for n, s, v in rows}


@pytest.mark.slow
def test_sigkill_mid_trial_resumes_keeping_completed_trials(tmp_path, tiny_path):
    db = tmp_path / "killed.db"
    args = [sys.executable, "-m", "moe_lightning.cli", "task=tune", "system=cgopipe", "task.compare=false",
            "task.progress=false", "tuner.n_trials=6", "tuner.heartbeat_s=1", f"tuner.storage=sqlite:///{db}",
            "tuner.study_name=killed", f"hydra.run.dir={tmp_path / 'h'}",
            # measured trials, each timed once: what is judged is the study, not the timing
            "tuner.repeats=1", "tuner.remeasure=0", "tuner.min_repeat_s=0"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        states = _states(db)
        if sum(s == "COMPLETE" for s, _ in states.values()) >= 2 and any(s == "RUNNING" for s, _ in states.values()):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and its trial process, mid-trial
    proc.wait()
    before = {n: v for n, (s, v) in _states(db).items() if s == "COMPLETE"}
    assert len(before) >= 2
    time.sleep(3.5)  # three heartbeats: the killed trial is now stale
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "finished trials kept" in r.stdout
    after = _states(db)
    assert all(after[n] == ("COMPLETE", v) for n, v in before.items())  # every completed trial kept
    assert sum(s in ("COMPLETE", "FAIL", "PRUNED") for s, _ in after.values()) >= 6
    assert "RUNNING" not in {s for s, _ in after.values()}


def test_two_workers_share_one_study(tmp_path, tiny_path):
    db = tmp_path / "shared.db"
    args = [sys.executable, "-m", "moe_lightning.cli", "task=tune", "system=cgopipe", "task.compare=false",
            "task.progress=false", "tuner.objective=simulate", "tuner.n_trials=10", "tuner.workers=2",
            f"tuner.storage=sqlite:///{db}", "tuner.study_name=shared", f"hydra.run.dir={tmp_path / 'h'}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{db}")
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == len(study.trials) == 10  # exact over the workers
    seeded = [tuple(sorted(t.params.items())) for t in study.trials if t.user_attrs.get("seed")]
    assert len(seeded) == len(set(seeded)) >= 2  # every queued seed ran exactly once
    assert {t.system_attrs.get("fixed_params") is not None for t in study.trials if t.user_attrs.get("seed")} == {True}


def test_each_worker_of_a_tune_samples_from_its_own_seed(tmp_path, tiny_path):
    """Workers open the study with tuner.seed + their index: with one seed for all, a tune's workers drew
    the same random start-up trials (seen: both trials of a two-worker measured tune were one policy)."""
    from moe_lightning.tuner.search import suggest

    cfg = make_cfg(tmp_path, "seeds", objective="simulate", seed_with_hrm=False)
    spec = spec_of(cfg)
    firsts = []
    for worker in (0, 1):
        study = open_study(cfg, spec, worker=worker)
        firsts.append(suggest(study.ask(), cfg, spec))
    assert firsts[0] != firsts[1]


def test_two_tune_commands_on_one_new_study_sample_apart(tmp_path, tiny_path):
    """Two commands opening one study (two machines on a shared PostgreSQL study, both worker 0 of their
    own tune, before either has a trial) draw different start-up trials: each opening claims its own
    number under the study's gate. With `tuner.seed` alone both measured the same random policies."""
    from moe_lightning.tuner.search import suggest

    cfg = make_cfg(tmp_path, "two-commands", objective="simulate", seed_with_hrm=False)
    spec = spec_of(cfg)
    first, second = open_study(cfg, spec), open_study(cfg, spec)
    assert first.user_attrs["openings"] == 2
    a = [suggest(first.ask(), cfg, spec) for _ in range(3)]
    b = [suggest(second.ask(), cfg, spec) for _ in range(3)]
    assert a != b, a


def test_a_resumed_tune_does_not_sample_its_first_runs_trials_again(tmp_path, tiny_path):
    """A resumed study's sampler is seeded apart from the first run's: with the same seed its random
    start-up draws were the first run's again (TPE samples at random until 10 trials have finished)."""
    from moe_lightning.tuner.search import suggest

    cfg = make_cfg(tmp_path, "again", objective="simulate", seed_with_hrm=False)
    spec = spec_of(cfg)
    study = open_study(cfg, spec)
    first = []
    for value in (1.0, 2.0, 3.0):
        trial = study.ask()
        first.append(suggest(trial, cfg, spec))
        study.tell(trial, value)
    resumed = open_study(cfg, spec)
    again = [suggest(resumed.ask(), cfg, spec) for _ in range(3)]
    assert not [p for p in again if p in first], (first, again)


def test_a_trial_killed_before_its_first_heartbeat_is_failed_on_resume(tmp_path, tiny_path):
    from moe_lightning.tuner.trial_states import fail_orphaned_trials

    cfg = make_cfg(tmp_path, "orphan", objective="simulate", heartbeat_s=1)
    study = open_study(cfg, spec_of(cfg))
    orphan = study.ask()  # RUNNING, and its process "dies" before any heartbeat
    assert fail_orphaned_trials(study, grace_s=60) == []  # too young to call dead
    time.sleep(1.2)
    assert fail_orphaned_trials(study, grace_s=1) == [orphan.number]
    assert study.trials[0].state == TrialState.FAIL and "heartbeat" in study.trials[0].user_attrs["reason"]


def _lose(study, cfg, spec, reason: str | None, **attrs):
    """Ask for a trial, sample it, and fail it as `reason` says (None: as Optuna's heartbeat check does)."""
    from moe_lightning.tuner.search import suggest

    trial = study.ask()
    suggest(trial, cfg, spec)
    for k, v in ({"reason": reason} if reason else {}).items() | attrs.items():
        trial.set_user_attr(k, v)
    study.tell(trial, state=TrialState.FAIL)
    return trial.number


def test_trials_lost_by_their_process_run_again_first_and_do_not_count(tmp_path, tiny_path):
    """The HRM seed interrupted and a trial whose process died are queued again with their parameters (the
    seed label kept) and run before the queued neighbours; an out-of-memory trial counts and stays failed;
    the study ends with exactly n_trials counted trials."""
    from moe_lightning.tasks.tune import run_trials
    from moe_lightning.tuner.trial_states import started_trials

    cfg = make_cfg(tmp_path, "lost", objective="simulate", n_trials=4)
    spec = spec_of(cfg)
    study = open_study(cfg, spec)
    seeds = seed_study(study, cfg, spec)
    assert len(seeds) >= 3   # the HRM optimum and neighbours enough to run out of trials before them
    hrm = _lose(study, cfg, spec, "interrupted by SIGINT")
    oom = _lose(study, cfg, spec, "out of memory (MemoryError: )")
    died = _lose(study, cfg, spec, None)   # its heartbeat went stale: killed
    assert study.trials[hrm].user_attrs["seed"] == "hrm" and started_trials(study) == 3
    run_trials(study, cfg, spec, say=lambda line: None)

    trials = study.trials
    retries = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    assert set(retries) == {hrm, died}   # the out-of-memory trial is a result, not run again
    for lost, retry in retries.items():
        assert retry.state == TrialState.COMPLETE and retry.params == trials[lost].params
    assert retries[hrm].user_attrs["seed"] == "hrm" and retries[hrm].params == policy_params(seeds[0], spec, False)
    assert (retries[hrm].user_attrs["deaths"], retries[died].user_attrs["deaths"]) == (0, 1)
    counted = [t for t in trials if t.state.is_finished() and t.number not in retries]
    assert len(counted) == started_trials(study) == 4 and trials[oom] in counted
    # the retries went first: the one neighbour asked after them, the others still queued
    asked = sorted((t for t in counted if t.number != oom), key=lambda t: t.datetime_start)
    assert [t.user_attrs.get("retry_of") for t in asked] == [hrm, died, None]
    assert sum(t.state == TrialState.WAITING for t in trials) == len(seeds) - 4   # three lost above, one asked


def test_parameters_whose_process_died_three_times_stay_failed(tmp_path, tiny_path):
    from moe_lightning.tuner.trial_states import requeue_lost_trials, started_trials

    cfg = make_cfg(tmp_path, "deaths", objective="simulate", seed_with_hrm=False)
    spec = spec_of(cfg)
    study = open_study(cfg, spec)
    third = _lose(study, cfg, spec, "its process died before its first heartbeat", deaths=2, retry_of=7)
    interrupted = _lose(study, cfg, spec, "interrupted by SIGTERM", deaths=2)
    assert requeue_lost_trials(study) == [interrupted]   # an interrupt is never the parameters' doing
    assert requeue_lost_trials(study) == []              # queued once
    assert started_trials(study) == 1 and study.trials[third].state == TrialState.FAIL


def test_resident_experts_are_searched_only_as_far_as_the_gpu_can_ever_hold(tmp_path):
    """Mixtral-8x7B on a T4 cannot keep one expert a layer resident (a layer's expert is 0.33 GiB, 32 layers:
    10.5 GiB beside 1.5 GiB of other weights and the streaming buffers, of 12.9): the space stops at 0 and
    no trial samples more. On an H100 some, not all, fit. The bound is in the study's fingerprint."""
    from moe_lightning.tuner.presets import load_preset
    from moe_lightning.tuner.search import max_resident_experts, search_space, study_identity, suggest

    def cfg_on(hardware: str) -> RunConfig:
        return RunConfig(system=CGOPipeSystem(), model=load_preset("model", "mixtral-8x7b"),
                         hardware=load_preset("hardware", hardware), workload=load_preset("workload", "mtbench"),
                         tuner=TunerConfig(objective="simulate", storage=f"sqlite:///{tmp_path / 's.db'}",
                                           study_name=hardware, seed_with_hrm=False))

    t4, h100 = cfg_on("t4"), cfg_on("h100")
    assert search_space(t4, t4.model)["resident_experts"] == [0, 0]
    assert study_identity(t4, t4.model)[1]["search_space.resident_experts"] == [0, 0]
    assert 0 < max_resident_experts(h100, h100.model) < 8
    study = open_study(t4, t4.model)
    assert {suggest(study.ask(), t4, t4.model)["resident_experts"] for _ in range(20)} == {0}


def test_a_trial_is_planned_with_the_system_s_kv_cache_size(tmp_path):
    """system.kv_cache_tokens is the KV cache the engine allocates and task=simulate plans: a trial whose
    cache cannot be held is pruned as not fitting, as its run would be refused (it was planned at the
    default size, and simulated)."""
    from moe_lightning.tuner.presets import load_preset

    states = {}
    for tokens in (0, 10**8):   # the plan's own size; 10^8 tokens of Mixtral's K/V (12 TiB)
        t = TunerConfig(objective="simulate", storage=f"sqlite:///{tmp_path / f'{tokens}.db'}", study_name="kv")
        wl = dataclasses.replace(load_preset("workload", "mtbench"), num_requests=16)
        cfg = RunConfig(system=CGOPipeSystem(kv_cache_tokens=tokens), model=load_preset("model", "mixtral-8x7b"),
                        hardware=load_preset("hardware", "t4"), workload=wl, tuner=t)
        study = run_study(cfg, 1)
        states[tokens] = (study.trials[0].state, study.trials[0].user_attrs.get("reason", ""))
    assert states[0][0] == TrialState.COMPLETE
    assert states[10**8][0] == TrialState.PRUNED and "does not fit" in states[10**8][1]
