"""The tune's processes: tied to their parent, and serialised where they ask the study for a trial.

- A worker or trial process asks Linux for SIGKILL when its parent dies (`prctl(PR_SET_PDEATHSIG)`;
  elsewhere a thread watches the parent), so a `kill -9` of the tune leaves nothing running that could
  add a trial.
- `trial_gate` serialises "count the started trials, then ask for one", which makes `n_trials` exact:
  on PostgreSQL across every process and host sharing the study (a session advisory lock keyed by the
  study name, released by the server when its connection drops, so also when the holder is killed);
  with a journal file across the hosts sharing its file system (Optuna's symlink lock beside it);
  elsewhere across the processes of this host (an flock beside the SQLite file, or in the temp folder
  for another server URL). Processes on other hosts sharing a MySQL study are not serialised with
  these: each may start one trial too many as the count is reached.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

PR_SET_PDEATHSIG = 1


def tie_to_parent(parent_pid: int) -> None:
    """Die with the parent process, even when it is SIGKILLed. Called first thing in a spawned child.

    Linux delivers SIGKILL when the thread that spawned us exits (spawn from the main thread). A parent
    that died before the request is seen as a changed parent pid: then we exit at once. Elsewhere a daemon
    thread polls the parent pid."""
    import signal

    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)
    if not sys.platform.startswith("linux"):
        def watch() -> None:
            while os.getppid() == parent_pid:
                threading.Event().wait(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@contextlib.contextmanager
def sigint_ignored_by_children() -> Iterator[None]:
    """Start child processes with SIGINT ignored (an ignored signal stays ignored across exec, and Python
    keeps it so). Ctrl-C in a terminal reaches the whole foreground group, but only the tune's main
    process answers it, stopping the rest; a child caught at start-up would print a traceback."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def gate_path(url: str, name: str) -> Path:
    """The lock file that serialises asking for trials: beside a SQLite file, else in the temp folder."""
    import sqlalchemy

    db = sqlalchemy.engine.make_url(url).database if _backend(url) == "sqlite" else None
    if db and db != ":memory:" and os.access(Path(db).resolve().parent, os.W_OK):
        return Path(db).resolve().with_name(Path(db).name + ".lock")  # one gate for the file's studies
    digest_ = hashlib.sha256(f"{url}\0{name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"moe-lightning-study-{digest_}.lock"


def _backend(url: str) -> str:
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).get_backend_name()
    except Exception:  # noqa: BLE001 - open_study has already refused a URL it cannot use
        return ""


def advisory_key(name: str) -> int:
    """The study's advisory-lock key: a signed 64-bit integer (PostgreSQL's bigint) from its name."""
    return int.from_bytes(hashlib.sha256(f"moe-lightning-study\0{name}".encode()).digest()[:8], "big", signed=True)


_engines: dict[str, object] = {}


@contextlib.contextmanager
def _advisory_lock(url: str, name: str) -> Iterator[None]:
    """PostgreSQL's session advisory lock on the study's key, on a connection of this process's own."""
    import sqlalchemy

    engine = _engines.get(url)
    if engine is None:
        engine = _engines[url] = sqlalchemy.create_engine(url, pool_size=1, max_overflow=0)
    key = {"key": advisory_key(name)}
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), key)
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), key)
            conn.commit()


@contextlib.contextmanager
def _journal_lock(url: str) -> Iterator[None]:
    """Optuna's own symlink lock (NFSv2 and later) beside the journal file, so hosts sharing the file
    system are serialised too; a holder killed mid-ask is overridden after its grace period."""
    from optuna.storages.journal import JournalFileSymlinkLock

    from moe_lightning.tuner.search import journal_path

    lock = JournalFileSymlinkLock(str(journal_path(url)) + ".gate", grace_period=30)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def trial_gate(url: str, name: str) -> Iterator[None]:
    """Hold the study's gate: between counting the started trials and asking for one, no other process
    asks (PostgreSQL: on any host; otherwise: of this host). Released when the holder dies, even by
    SIGKILL (the server ends a dropped connection's locks; an flock dies with its process)."""
    if _backend(url) == "postgresql":
        with _advisory_lock(url, name):
            yield
        return
    if url.startswith("journal:"):
        with _journal_lock(url):
            yield
        return
    try:
        import fcntl

        f = open(gate_path(url, name), "a+")  # noqa: SIM115 - held for the whole block
    except (ImportError, OSError):  # no flock here, or an unwritable folder: the count may overshoot by one
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
