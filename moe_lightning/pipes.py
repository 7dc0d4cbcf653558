"""stdout into a pipe its reader closed early (`moe-lightning task=plan ... | head -1`).

The CLI's prints carry results; the run's documents carry the same and more. When the reader goes away,
the run still finishes and writes its documents (each atomically, as always): what it prints after that
goes to /dev/null (the recipe of Python's `signal` docs, done once here instead of around every print),
and the command exits 141 (128 + SIGPIPE), the code a shell reports for a CLI that SIGPIPE ended."""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

BROKEN_PIPE_EXIT = 141


class PipeSafe:
    """sys.stdout, whose writes after the reader closed the pipe are dropped (the file descriptor now
    points at /dev/null, so the interpreter's final flush of what was buffered does not fail either)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def _drop(self) -> None:
        self.broken = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()
            self._stream.flush()   # what was buffered, now to /dev/null

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def install() -> PipeSafe:
    """Wrap sys.stdout once (a second call returns the wrapper in place)."""
    if not isinstance(sys.stdout, PipeSafe):
        sys.stdout = PipeSafe(sys.stdout)
    return sys.stdout


def exit_if_broken() -> None:
    """After the run: exit 141 if stdout's reader closed the pipe (nothing more is printed)."""
    out = sys.stdout
    if isinstance(out, PipeSafe):
        out.flush()
        if out.broken:
            sys.exit(BROKEN_PIPE_EXIT)
