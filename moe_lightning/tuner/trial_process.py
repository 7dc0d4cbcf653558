"""A measured trial's process: the real engine runs one warmed-up generation in a spawned child with a
timeout and an optional memory cap (`tuner.trial_timeout_s`, `tuner.trial_memory_gib`), and sends its run
document back. A crash, an out-of-memory (in any of its guises under the cap) or a hang is one line of
reason in `TrialFailed`, which fails that trial and never the study (`search.objective`). The child dies
with its parent; interrupted, the parent stops it before the signal goes on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from moe_lightning.errors import MoELightningError
from moe_lightning.tuner.processes import sigint_ignored_by_children, tie_to_parent

if TYPE_CHECKING:
    from moe_lightning.run_config import RunConfig  # type hints only: it sits above the tasks


class TrialFailed(Exception):
    """A trial that ran and failed (crash, out of memory, timeout): recorded, the study goes on."""


def _trial_child(cfg: RunConfig, memory_gib: float, conn, parent_pid: int, stderr_path: str) -> None:
    """Runs in a spawned process: one warmed-up generation run, its report sent back. Its stderr goes to
    `stderr_path`, so that what a dying process prints (a C++ `terminate called ...` under a memory cap)
    reaches the user only as the parent's one-line reason."""
    import logging as _logging

    fd = os.open(stderr_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)
    os.close(fd)
    tie_to_parent(parent_pid)
    from tqdm import tqdm

    # tqdm's default lock is a multiprocessing semaphore: a trial process killed (timeout, interrupt) would
    # leave it to the resource tracker, whose "leaked semaphore" warning ends the tune. A thread lock will do.
    tqdm.set_lock(threading.RLock())
    _logging.basicConfig(level=_logging.WARNING)
    try:
        if memory_gib > 0:
            import resource

            limit = int(memory_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        from moe_lightning.tasks.generate import run_generation

        gen = run_generation(cfg, progress=False, warmup_tokens=1, repeats=cfg.tuner.repeats, max_cv=cfg.tuner.max_cv,
                             min_repeat_s=cfg.tuner.min_repeat_s, host_wait_s=cfg.tuner.host_wait_s)
        conn.send(("ok", gen.report.to_dict()))
    except MoELightningError as exc:
        conn.send(("error", str(exc)))
    except BaseException as exc:  # noqa: BLE001 - anything else is a failed trial, reported by name
        conn.send(("error", out_of_memory(exc, memory_gib) or f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


_OOM_WORDS = ("failed to map segment", "cannot allocate memory", "can't allocate memory", "out of memory",
              "std::bad_alloc")


def out_of_memory(exc: BaseException, memory_gib: float) -> str | None:
    """The one-line reason for an exception that means the trial ran out of memory, else None.

    Under an address-space cap memory runs out in many guises: a MemoryError, a torch allocator error, an
    OSError with ENOMEM, or an ImportError whose shared library could not be mapped (`failed to map
    segment`). Each is reported as what it is: out of memory under the cap."""
    import errno

    first = str(exc).splitlines()[0] if str(exc).strip() else ""
    detail = re.sub(r"(?<![\w.])/\S*/", "", f"{type(exc).__name__}: {first}").rstrip(": ")  # no folders
    text = str(exc).lower()
    oom = (isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__
           or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM)
           or (isinstance(exc, (ImportError, OSError, RuntimeError)) and any(w in text for w in _OOM_WORDS))
           or (memory_gib > 0 and isinstance(exc, (ImportError, OSError)) and "mmap" in text))
    if not oom:
        return None
    if memory_gib > 0:
        return f"out of memory under the trial's memory cap of {memory_gib:g} GiB (tuner.trial_memory_gib; {detail})"
    return f"out of memory ({detail})"


def run_trial_process(cfg: RunConfig, timeout_s: float, memory_gib: float = 0.0) -> dict:
    """Run one measured trial in a spawned child; -> its run document, or raise TrialFailed. The child
    dies with this process; interrupted here (SIGINT/SIGTERM), it is stopped before the signal goes on."""
    import tempfile

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    err_fd, err_path = tempfile.mkstemp(prefix="moe-lightning-trial-", suffix=".stderr")
    os.close(err_fd)
    proc = ctx.Process(target=_trial_child, args=(cfg, memory_gib, child, os.getpid(), err_path), daemon=True)
    with sigint_ignored_by_children():
        proc.start()
    child.close()
    try:
        return _trial_result(proc, parent, timeout_s, memory_gib, err_path)
    finally:
        Path(err_path).unlink(missing_ok=True)


def _trial_result(proc, parent, timeout_s: float, memory_gib: float, err_path: str) -> dict:
    try:
        if parent.poll(timeout_s):
            status, payload = parent.recv()
        else:
            status, payload = "timeout", f"timeout: no result after {timeout_s:g} s (tuner.trial_timeout_s)"
    except EOFError:  # the child died without a word
        status, payload = "died", None
    except BaseException:
        _stop(proc, 0.0)
        raise
    finally:
        parent.close()
    _stop(proc, 0.0 if status == "timeout" else 10.0)
    printed = Path(err_path).read_text(errors="replace")
    if status == "died":
        last = next((line.strip() for line in reversed(printed.splitlines()) if line.strip()), "")[:200]
        if any(w in last.lower() for w in _OOM_WORDS):   # e.g. a C++ std::bad_alloc that aborted it
            cap = (f" under the trial's memory cap of {memory_gib:g} GiB (tuner.trial_memory_gib;" if memory_gib
                   else " (")
            raise TrialFailed(f"out of memory{cap} the process aborted: {last})")
        raise TrialFailed(_death(proc, memory_gib) + (f"; it last printed: {last}" if last else ""))
    if printed:   # a trial that reported: its warnings and log lines, as it printed them
        sys.stderr.write(printed)
    if status != "ok":
        raise TrialFailed(payload.splitlines()[0] if payload else "failed")
    return payload


def _stop(proc, wait_s: float) -> None:
    """Let a child end by itself for `wait_s`, then SIGTERM it, then SIGKILL it."""
    proc.join(wait_s)
    for end in (proc.terminate, proc.kill):
        if proc.is_alive():
            end()
            proc.join(2)


def _death(proc, memory_gib: float = 0.0) -> str:
    proc.join(5)
    code = proc.exitcode
    if code is not None and code < 0:
        cap = f" under the trial's memory cap of {memory_gib:g} GiB" if memory_gib > 0 else ""
        hint = f" (killed: out of memory{cap}?)" if code == -9 or (cap and code in (-6, -7, -11)) else ""
        return f"trial process died from signal {-code}{hint}"
    return f"trial process exited with code {code} without a result"
