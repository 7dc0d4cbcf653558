"""The tune's progress bar counts every trial of the command, whichever of its processes ran it (a
worker's trials reach no callback of the main process), and only those."""

from __future__ import annotations

import os
import socket

import optuna
from optuna.trial import TrialState

from moe_lightning.tasks.tune_progress import TrialProgress

WORKER = os.getpid() + 1   # a worker process of this command (the bar is told its pid)


def _trial(study, state, pid: int, host: str | None = None, **attrs) -> int:
    trial = study.ask()
    trial.set_user_attr("host", host or socket.gethostname())
    trial.set_user_attr("pid", pid)
    for k, v in attrs.items():
        trial.set_user_attr(k, v)
    study.tell(trial, 1.0 if state == TrialState.COMPLETE else None, state=state)
    return trial.number


def test_the_bar_counts_the_workers_trials_and_no_one_elses(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    _trial(study, TrialState.COMPLETE, pid=12345, host="another-host")   # another command's, resumed
    progress = TrialProgress(study, total=4, kind="simulated", enabled=True, pids=lambda: {os.getpid(), WORKER})
    _trial(study, TrialState.COMPLETE, os.getpid())
    _trial(study, TrialState.COMPLETE, WORKER)
    _trial(study, TrialState.PRUNED, WORKER)
    lost = _trial(study, TrialState.FAIL, WORKER, reason="interrupted by SIGTERM")
    study.enqueue_trial({}, user_attrs={"retry_of": lost})   # the lost trial's retry counts instead
    _trial(study, TrialState.COMPLETE, 999_999)   # a process of another command on this host
    progress.refresh()
    assert progress.bar.n == 3
    progress.close()
