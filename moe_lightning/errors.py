"""User-facing errors: each carries a one-line, actionable message that the CLI prints without a
traceback before exiting non-zero."""


class MoELightningError(Exception):
    """Base class for errors caused by the user's input or machine, not by a bug."""

    exit_code = 2


class ConfigError(MoELightningError):
    """A config value is malformed, out of range, or names something that does not exist."""


class CheckpointError(MoELightningError):
    """A checkpoint folder is missing, corrupt, or does not match its config."""


class WorkloadError(MoELightningError):
    """A prompts file is missing, empty or malformed."""


class MemoryBudgetError(MoELightningError):
    """A policy does not fit the device memory budget."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the job stops where it is (a KeyboardInterrupt, so that no
    `except Exception` swallows it) and exits 128 + the signal number, with one line saying what was kept."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code
