"""Optuna's JournalStorage on a file (`tuner.storage=journal:PATH`), for hosts that share a file system but
no database server: workers share one study exactly, and, with no heartbeat, a trial whose process died
is failed on resume by the host that ran it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import optuna
from optuna.trial import TrialState

from moe_lightning.config import TunerConfig
from moe_lightning.run_config import RunConfig
from moe_lightning.systems import CGOPipeSystem
from moe_lightning.tuner.search import journal_storage, open_study
from moe_lightning.tuner.trial_states import fail_orphaned_trials


def test_two_workers_share_a_journal_study_exactly(tmp_path, tiny_path):
    journal = tmp_path / "shared" / "study.log"     # its folder is created
    args = [sys.executable, "-m", "moe_lightning.cli", "task=tune", "system=cgopipe", "task.compare=false",
            "task.progress=false", "tuner.objective=simulate", "tuner.n_trials=5", "tuner.workers=2",
            f"tuner.storage=journal:{journal}", "tuner.study_name=shared", f"hydra.run.dir={tmp_path / 'h'}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    study = optuna.load_study(study_name="shared", storage=journal_storage(f"journal:{journal}"))
    assert sorted(t.number for t in study.trials) == list(range(5))
    assert all(t.state.is_finished() for t in study.trials)
    assert {t.user_attrs.get("host") for t in study.trials} == {socket.gethostname()}


def test_a_dead_trial_of_this_host_is_failed_and_another_hosts_is_left(tmp_path, tiny_path):
    from moe_lightning.engine.weights import resolve_model

    cfg = RunConfig(system=CGOPipeSystem(), device="cpu", run_dir=str(tmp_path / "run"),
                    tuner=TunerConfig(storage=f"journal:{tmp_path / 'j.log'}", study_name="j", objective="simulate"))
    study = open_study(cfg, resolve_model(cfg.model)[0])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()                                              # a pid that no longer runs
    dead, elsewhere, alive = study.ask(), study.ask(), study.ask()
    for trial, host, pid in ((dead, socket.gethostname(), gone.pid), (elsewhere, "another-host", gone.pid),
                             (alive, socket.gethostname(), os.getpid())):
        trial.set_user_attr("host", host)
        trial.set_user_attr("pid", pid)
    assert fail_orphaned_trials(study, grace_s=60) == [dead.number]
    states = {t.number: t.state for t in study.trials}
    assert states == {dead.number: TrialState.FAIL, elsewhere.number: TrialState.RUNNING,
                      alive.number: TrialState.RUNNING}
    assert "process died" in study.trials[dead.number].user_attrs["reason"]
