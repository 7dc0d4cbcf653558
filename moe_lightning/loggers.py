"""Experiment loggers: `logger=none` (default) or `logger=wandb` (offline by default: no account, no
network; `wandb sync <dir>` uploads later). wandb is imported only when used.

The CLI starts one run per task (`cli._run`): its config, the run document's metrics as the summary,
and the plots the task wrote; the jobs of a Hydra multirun share one wandb group (the sweep folder's
name). Tasks log what only they know (a tune: every trial of the study, from every worker)."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_lightning.errors import ConfigError

log = logging.getLogger("moe_lightning.loggers")


@dataclass
class NoLogger:
    name: str = "none"

    def start(self, run_name: str, config: dict[str, Any], run_dir: str, group: str | None = None,
              job_type: str | None = None) -> None:
        pass

    def check(self) -> None:
        """Before the run: refuse what would fail only once the task is done (an unwritable folder)."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_summary(self, metrics: dict[str, Any]) -> None:
        pass

    def log_config(self, config: dict[str, Any]) -> None:
        """Replace config entries once the task knows them (the policy it actually ran)."""

    def log_image(self, key: str, path: str | Path) -> None:
        pass

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        pass

    def finish(self) -> None:
        pass


WANDB_MODES = ("offline", "online", "disabled")   # wandb.init's modes this logger documents


@dataclass
class WandbLogger(NoLogger):
    name: str = "wandb"
    mode: str = "offline"                 # offline | online | disabled
    project: str = "moe-lightning"
    entity: str | None = None
    dir: str | None = None             # None: the run folder

    def __post_init__(self) -> None:
        self._run = None
        self._placed_cache = False   # WANDB_CACHE_DIR set by this logger (for its run), not by the user
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"logger.mode={self.mode}: expected one of {', '.join(WANDB_MODES)} (offline keeps the "
                              "run in its folder for `wandb sync`; disabled logs nothing)")

    def check(self) -> None:
        """logger.dir must be a folder this run can create and write in (probed, as out= is)."""
        if self.dir is None or self.mode == "disabled":
            return
        folder = Path(self.dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".moe-lightning.", suffix=".probe")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(f"logger.dir={self.dir}: not a folder this run can write in "
                              f"({exc.strerror or exc})") from None

    def __getstate__(self) -> dict:
        """A copy in another process (a tune's worker) does not hold this process's run."""
        return {**self.__dict__, "_run": None}

    def start(self, run_name: str, config: dict[str, Any], run_dir: str, group: str | None = None,
              job_type: str | None = None) -> None:
        try:
            import wandb
        except ImportError:
            log.warning("logger=wandb but wandb is not installed (pip install 'moe-lightning[wandb]'): not logging")
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")   # no error reports sent home (telemetry)
        if self.mode == "offline":   # wandb's own threads read the global mode, not the run's (a DNS probe)
            os.environ.setdefault("WANDB_MODE", "offline")
        folder = Path(self.dir or run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        # wandb-core writes its own debug log (core-debug-<time>.log) under $WANDB_CACHE_DIR/wandb/logs, else
        # under the user's cache folder (~/.cache/wandb/logs): unless the user chose a cache folder, the run's
        # folder is it, so the log lands beside the run's (<folder>/wandb/logs). The service reads the variable
        # once, when it starts: finish() stops it, so the next run of this process (a multirun's next job)
        # starts one that logs in its own folder.
        if "WANDB_CACHE_DIR" not in os.environ:
            os.environ["WANDB_CACHE_DIR"] = str(folder.resolve())
            self._placed_cache = True
        self._run = wandb.init(project=self.project, entity=self.entity, name=run_name, config=config,
                               group=group, job_type=job_type,
                               dir=str(folder), mode=self.mode, reinit="finish_previous",
                               settings=wandb.Settings(x_disable_stats=True, console="off"))

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def log_summary(self, metrics: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update(metrics)

    def log_config(self, config: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.config.update(config, allow_val_change=True)

    def log_image(self, key: str, path: str | Path) -> None:
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Image(str(path))})

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        if self._run is not None and rows:
            import wandb

            columns = sorted({k for r in rows for k in r})
            self._run.log({key: wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows])})

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
        if self._placed_cache:   # (a failed wandb.init too)
            import wandb

            wandb.teardown()   # the service logs into this run's folder: it ends with the run
            os.environ.pop("WANDB_CACHE_DIR", None)
            self._placed_cache = False


LOGGER_CONFIGS: dict[str, type] = {"none": NoLogger, "wandb": WandbLogger}
