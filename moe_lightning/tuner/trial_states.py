"""The trials of a shared study and how they ended: why a trial did not complete (`trial_reason`), the
trials whose process is gone (`fail_orphaned_trials`, `fail_trials_of`), which trials count towards
`tuner.n_trials` (`started_trials`), and the trials lost by their process, not by their own doing, queued
again with their parameters and asked for first (`requeue_lost_trials`, `ask_trial`). Every function here
works on an Optuna study in any storage; the search (`tuner.search`) and the tune's workers
(`tasks.tune`) call them under the study's gate.
"""

from __future__ import annotations

import os
import socket

# What Optuna's heartbeat check leaves a trial it fails: no reason of its own, so this one is shown.
STALE_REASON = "its process stopped sending heartbeats (killed, or its machine went down)"


def trial_reason(trial) -> str:
    """Why a trial did not complete: its own `reason`, or, failed without one, Optuna's heartbeat check
    (every failure this package records carries a reason)."""
    from optuna.trial import TrialState

    return trial.user_attrs.get("reason") or (STALE_REASON if trial.state == TrialState.FAIL else "")


def fail_orphaned_trials(study, grace_s: float) -> list[int]:
    """Fail the RUNNING trials whose process is gone. Returns the failed trial numbers.

    Optuna's own `fail_stale_trials` fails the trials whose heartbeat went stale (their reason is then
    `STALE_REASON`). A trial records its first heartbeat as it starts, before it names its process
    (`pid`): one that has not named it after the grace period died before its first heartbeat, which
    Optuna cannot see (it has no heartbeat to go stale), and is failed here with that reason.
    """
    import datetime as dt

    import optuna
    from optuna.trial import TrialState

    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return []
    optuna.storages.fail_stale_trials(study)
    failed = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
              if t.number in running and "reason" not in t.user_attrs]
    if not getattr(study._storage, "get_heartbeat_interval", lambda: None)():
        # No heartbeat (JournalStorage): a trial of this host whose process is gone is failed here.
        host = socket.gethostname()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = t.user_attrs.get("pid")
            if (pid and t.user_attrs.get("host") == host and not _alive(pid)
                    and fail_trial(study, t.number, "its process died (no heartbeat storage: seen on its host)")):
                failed.append(t.number)
    now = dt.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if ("pid" not in t.user_attrs and t.datetime_start and (now - t.datetime_start).total_seconds() > grace_s
                and fail_trial(study, t.number, "its process died before its first heartbeat")):
            failed.append(t.number)
    return sorted(failed)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    return True


def fail_trial(study, number: int, reason: str) -> bool:
    """Record `reason` on a RUNNING trial and fail it; False if it finished meanwhile (another process)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        study._storage.set_trial_user_attr(trial_id, "reason", reason)
        return study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except UpdateFinishedTrialError:
        return False


def fail_trials_of(study, pid: int, reason: str) -> list[int]:
    """Fail the RUNNING trials that process `pid` asked for (a worker that died)."""
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [t.number for t in running if t.user_attrs.get("pid") == pid and fail_trial(study, t.number, reason)]


def started_trials(study) -> int:
    """The trials that count towards `tuner.n_trials`: every trial started (running or finished) but a
    lost one queued again (`requeue_lost_trials`: its retry counts instead); queued (WAITING) trials do
    not count until asked for."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    return sum(t.state != TrialState.WAITING and t.number not in retried for t in trials)


# A trial lost by its process, not by its own doing: the process was interrupted (SIGINT/SIGTERM, the
# reason `run_trials` records) or died (killed, its machine down: the reasons `fail_orphaned_trials`, Optuna's
# heartbeat check and `tasks.tune._end_workers` record). A failure on the trial's own merits (out of memory,
# a timeout, a crash of the trial process, infeasible) is a result, and stays.
INTERRUPTED_PREFIX = "interrupted"
DIED_PREFIXES = ("its process died", "its worker process ")
MAX_DEATHS = 3    # parameters whose process died this often may be what kills it (the kernel's OOM killer)
RETRIED_ATTRS = ("seed",)   # what a queued trial carries from the start (`seed_study`), given to its retry


def lost_by_its_process(trial) -> str | None:
    """"interrupted" or "died" for a failed trial whose process was interrupted or died, else None."""
    from optuna.trial import TrialState

    if trial.state != TrialState.FAIL:
        return None
    reason = trial_reason(trial)
    if reason.startswith(INTERRUPTED_PREFIX):
        return "interrupted"
    return "died" if reason == STALE_REASON or reason.startswith(DIED_PREFIXES) else None


def requeue_lost_trials(study) -> list[int]:
    """Queue again (`enqueue_trial`) the parameters of each trial its process lost (`lost_by_its_process`)
    and not yet queued again, with its seed label; the retry records `retry_of` (the lost trial's number)
    and `deaths` (how often these parameters' process died). Returns the lost trials' numbers.

    Call under the study's gate (`processes.trial_gate`), as every count and ask is: two processes then
    never queue one trial twice, and the lost trial stops counting towards n_trials as its retry is queued.
    Parameters whose process died `MAX_DEATHS` times are left failed (and count)."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    lost = []
    for t in trials:
        how = lost_by_its_process(t)
        if how is None or t.number in retried:
            continue
        deaths = int(t.user_attrs.get("deaths", 0)) + (how == "died")
        if deaths >= MAX_DEATHS:
            continue
        params = {**t.system_attrs.get("fixed_params", {}), **t.params}   # a queued trial lost before it sampled
        attrs = {k: t.user_attrs[k] for k in RETRIED_ATTRS if k in t.user_attrs}
        study.enqueue_trial(params, user_attrs={**attrs, "retry_of": t.number, "deaths": deaths})
        lost.append(t.number)
    return lost


def ask_trial(study):
    """`study.ask()`, but a lost trial's retry (`requeue_lost_trials`) before the other queued trials: Optuna
    asks the queue in trial order, and a study whose seeds outnumber the trials left would never run an
    interrupted HRM seed again. Call under the study's gate."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if "retry_of" not in t.user_attrs:
            continue
        try:   # what Study.ask does with the first queued trial: claim it by setting it RUNNING
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                continue
        except UpdateFinishedTrialError:
            continue
        study._thread_local.cached_all_trials = None   # as ask does: the sampler sees the storage anew
        return optuna.Trial(study, t._trial_id)
    return study.ask()
