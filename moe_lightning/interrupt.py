"""SIGINT and SIGTERM as an exception in the main thread, held back while a critical write is under way.

`install()` (the CLI calls it) makes either signal raise `Interrupted` in the main thread, so a job can
keep what it has done and exit 130 or 143 with one line. Inside `deferred()` a signal is only noted,
and raised when the block ends: a batch of outputs is written whole or not at all. (Blocking the
signal with pthread_sigmask would not do: the kernel may hand it to an engine worker thread, and Python
then runs the handler in the main thread at once.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

from moe_lightning.errors import Interrupted

_depth = 0
_pending: int | None = None


def interrupted(signum: int) -> Interrupted:
    return Interrupted(f"interrupted by {signal.Signals(signum).name}", 128 + signum)


def _handler(signum: int, frame) -> None:
    global _pending
    if _depth:
        _pending = signum
        return
    raise interrupted(signum)


def install() -> None:
    """Route SIGINT and SIGTERM to `Interrupted` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then raise `Interrupted` if one came."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending is not None:
            signum, _pending = _pending, None
            raise interrupted(signum)


@contextlib.contextmanager
def quiet_semaphore_warnings() -> Iterator[None]:
    """Child processes started in this block (and multiprocessing's resource tracker, if it starts here)
    do not warn about leaked semaphores: a child stopped by a signal exits at once and leaves the
    semaphores tqdm's lock holds in it to the tracker, which would warn when the parent exits."""
    warnings = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (warnings, "ignore:resource_tracker:UserWarning")))
    try:
        yield
    finally:
        if warnings is None:
            os.environ.pop("PYTHONWARNINGS", None)
        else:
            os.environ["PYTHONWARNINGS"] = warnings
