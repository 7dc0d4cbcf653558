"""Command lines of the scripts under `benchmarks/`: bad input is refused in one line, before any work.

argparse prints its usage block and then the error, and a value it accepts by type (`--repeats 0`, a
negative thread count, an unknown dtype) reached the measurement and ended in a traceback minutes
later, or after the lost work. `Parser` prints `<script>: <what is wrong>` alone and exits 2 (the
project's exit code for config errors); the `type=` helpers check ranges at parse time; `guard` turns
the package's own errors (a policy that does not validate, a write that fails) into the same one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from moe_lightning.errors import MoELightningError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit 2 (no usage block: `--help` has it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (--help lists the options)\n")


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], got {text}")
    return value


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of whole numbers >= 1 (`--contexts 512,4096`)."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be whole numbers >= 1 separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be whole numbers >= 1 separated by commas, got {text!r}")
    return values


def _number(text: str, kind: type) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a {'whole number' if kind is int else 'number'}, got {text!r}") from None


def check_out_file(parser: argparse.ArgumentParser, path: str | os.PathLike, option: str) -> Path:
    """Refuse, before the measurement, an output file that cannot be written (a folder, a folder that
    cannot be created or written); its folder is created. An explicit path may replace a file."""
    from moe_lightning.files import check_output_path

    try:
        return check_output_path(path, key=option, overwrite=True)
    except MoELightningError as exc:
        parser.error(str(exc))


def guard(main: Callable[[], int | None], prog: str | None = None) -> int:
    """Run a script's `main`; the package's errors (a config that does not validate, a write that fails)
    end it with their one line and their exit code, not a traceback."""
    try:
        return main() or 0
    except MoELightningError as exc:
        print(f"{prog or Path(sys.argv[0]).name}: {exc}", file=sys.stderr)
        return exc.exit_code


def busy_warning(loads: list[dict]) -> str | None:
    """One line when other processes were busy during any measured run (each run's `host_load`, as the
    run report records it), else None: the ratios of such a run compare the host's moods, not systems."""
    busy = [h.get("others_busy_cores") or 0.0 for h in loads if h.get("busy")]
    if not busy:
        return None
    return (f"warning: other processes kept up to {max(busy):.2f} cores busy during {len(busy)} of {len(loads)} "
            "measured runs: read the spreads before trusting the ratios")
