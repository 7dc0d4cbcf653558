"""The tune's progress bar: one step per trial of this command that ended (complete, pruned or failed),
whichever of its processes ran it.

A worker process's trials reach no callback of the main process, so the bar counts them in the study:
the ended trials that one of this command's processes asked for (`pid` and `host`, which `run_trials`
records on each trial it asks for), but a lost trial queued again (its retry counts instead, as in
`trial_states.started_trials`). It is read every `poll_s` seconds and as the tune ends. Its total is the
trials this command starts: `tuner.n_trials` less those the study already counts (a resumed study's,
another command's running ones).
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable


class TrialProgress:
    def __init__(self, study, total: int, kind: str, enabled: bool, pids: Callable[[], set[int]],
                 poll_s: float = 0.5) -> None:
        from tqdm import tqdm

        self.study, self.total, self.kind, self.pids, self.poll_s = study, total, kind, pids, poll_s
        self.host = socket.gethostname()
        self.bar = tqdm(total=total, desc="tune", unit="trial", disable=not enabled, file=sys.stderr)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def ours(self) -> list:
        """The ended trials of this command, in the order they ended."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials}
        pids = self.pids()
        ended = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
                 and t.user_attrs.get("host") == self.host and t.user_attrs.get("pid") in pids
                 and t.number not in retried]
        return sorted(ended, key=lambda t: (t.datetime_complete is None, t.datetime_complete, t.number))

    def refresh(self) -> None:
        if self.bar.disable:
            return
        with self._lock:
            try:
                ended = self.ours()
            except Exception:  # noqa: BLE001 - a busy database: the next poll will do
                return
            n = min(len(ended), self.total)
            if n != self.bar.n:
                self.bar.update(n - self.bar.n)
            if ended:
                last = ended[-1]
                value = f" {last.values[0]:.1f} tok/s {self.kind}" if last.values else ""
                self.bar.set_postfix_str(f"#{last.number} {last.state.name.lower()}{value}")

    def start(self) -> None:
        if self.bar.disable:
            return

        def poll() -> None:
            while not self._done.wait(self.poll_s):
                self.refresh()

        self._thread = threading.Thread(target=poll, name="tune-progress", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(5)
        self.refresh()
        self.bar.close()
