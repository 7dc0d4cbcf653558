"""Safe writes: every artefact goes to a temporary file in its own folder, is flushed and fsynced, then
renamed into place, so a full disk, a crash or a kill leaves the previous file whole (never a
half-written one); and output paths are checked before any work, so a bad path costs nothing."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from moe_lightning.errors import ConfigError, MoELightningError


class WriteError(MoELightningError):
    """An artefact could not be written (disk full, permissions); the previous file is untouched."""


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary_beside(path: Path) -> tuple[int, str]:
    """Create a new temporary file beside `path` (O_EXCL, as mkstemp), with the mode the artefact is to
    have: the replaced file's, else 0o666 less the umask. mkstemp's 0600 would stick to the artefact."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)   # the kernel applies the umask (and a default ACL)
        except FileExistsError:
            continue
        try:
            os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass   # a new file: the umask decided
        except OSError:
            os.close(fd)
            os.unlink(tmp)
            raise
        return fd, tmp
    raise FileExistsError(f"no free temporary name beside {path}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; on success it replaces `path` atomically, with
    the replaced file's mode (a new file: 0o666 less the umask)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temporary_beside(path)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise WriteError(f"cannot write {path}: {exc.strerror or exc} (the previous file, if any, is unchanged)") \
            from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes, encoding: str = "utf-8") -> Path:
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w",
                     **({} if isinstance(data, bytes) else {"encoding": encoding})) as f:
        f.write(data)
    return Path(path)


def json_text(obj: object, **kwargs) -> str:
    """json.dumps for an artefact: strict JSON. Python would write NaN and Infinity as bare `NaN` /
    `Infinity`, which most JSON readers (jq, JavaScript, Go, Rust's serde) refuse; a value that has no
    number (a ratio over zero, the stdev of one value) is None upstream, with its reason. One that slips
    through is refused here, by name, before anything is written."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError:
        where = _non_finite(obj)
        if where is None:
            raise
        raise WriteError(f"cannot write a JSON document: {where[0] or 'the value'} is {where[1]}, which JSON has no "
                         "number for (a bug: it should be null, with the reason beside it)") from None


def write_json(path: str | os.PathLike, obj: object, **kwargs) -> Path:
    """One JSON artefact, strict (`json_text`: a NaN or infinity is refused by name, nothing written) and
    atomic (`atomic_write`: a failed write leaves the previous file whole); `kwargs` go to json.dumps."""
    return atomic_write(path, json_text(obj, **kwargs) + "\n")


def _non_finite(value: object, path: str = "") -> tuple[str, float] | None:
    """(the dotted path, the value) of the first NaN or infinity in a JSON-able tree."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _non_finite(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def check_output_path(path: str | os.PathLike, *, key: str, overwrite: bool,
                      inputs: tuple[str | os.PathLike | None, ...] = ()) -> Path:
    """Refuse, before any work, an output path that cannot or must not be written: a folder, not a
    regular file, an input of the run, an existing file (unless `overwrite`), an unwritable folder."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{key}={path}: is a folder; give a file path")
    if path.exists() or path.is_symlink():
        if not path.is_file():
            raise ConfigError(f"{key}={path}: exists and is not a regular file")
        for source in inputs:
            if source and Path(source).exists() and os.path.samefile(path, source):
                raise ConfigError(f"{key}={path}: is an input of this run ({source}); write elsewhere")
        if not overwrite:
            raise ConfigError(f"{key}={path}: exists; pass overwrite=true to replace it, or choose another path")
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}={path}: cannot create its folder ({exc.strerror or exc})") from None
    try:   # a real probe: os.access says yes to root on a read-only file system
        fd, probe = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{key}={path}: folder {folder} is not writable ({exc.strerror or exc})") from None
    return path


class OutputLock:
    """An exclusive flock on `<path>.lock`, held by the one run that writes `path` (and its part file)
    from its checks to its final rename. The kernel drops a dead process's flock, so a killed run's lock
    file, left behind, takes no one out: resume=true takes it over."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):   # removed while held: a run that opened it finds it gone, retries
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


def lock_output(path: str | os.PathLike, *, key: str, lock: Path | None = None, held_by: str | None = None) \
        -> OutputLock:
    """Take `path`'s lock (`lock`, by default `<path>.lock`) without waiting, or refuse: another run is
    writing the same output. `held_by` replaces the refusal's text after the holder's pid."""
    path = Path(path)
    lock = path.with_name(path.name + ".lock") if lock is None else lock
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{key}={path}: cannot create its folder ({exc.strerror or exc})") from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise ConfigError(f"{key}={path}: folder {lock.parent} is not writable ({exc.strerror or exc})") \
                from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise ConfigError(f"{key}={path}: another run{pid} "
                              + (held_by or f"is writing it; wait for it to finish, or choose another {key}=")) \
                from None
        except OSError as exc:
            os.close(fd)
            raise ConfigError(f"{key}={path}: cannot lock {lock} ({exc.strerror or exc})") from None
        try:
            held = os.path.samestat(os.fstat(fd), os.stat(lock))
        except OSError:
            held = False
        if held:
            break
        os.close(fd)   # its holder finished and removed it as we opened it: lock the file there now
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return OutputLock(lock, fd)


RUN_FOLDER_LOCK = ".moe-lightning.lock"


def lock_run_folder(folder: str | os.PathLike, *, key: str = "hydra.run.dir") -> OutputLock:
    """Take the run folder's lock (`<folder>/.moe-lightning.lock`), or refuse: two runs in one folder at once
    (the same hydra.run.dir, or two sweeps over one hydra.sweep.dir) would each write run.json and its
    siblings there, the last rename silently replacing the other run's document while both report it."""
    folder = Path(folder)
    return lock_output(folder, key=key, lock=folder / RUN_FOLDER_LOCK,
                       held_by="is running in this folder; wait for it to finish, or give another hydra.run.dir "
                               "(hydra.sweep.dir)")
