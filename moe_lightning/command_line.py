"""Hydra's command line read with Hydra's own parser (`hydra._internal.utils.get_args_parser`): the
overrides, and the flags with their values.

Hydra's argparse takes the overrides as one positional list, so a flag between two overrides
(`task=generate --config-dir conf system=reference`, `task=plan -m workload.gen_len=2,4`) leaves the
overrides after it "unrecognized", with a usage dump. A flag means the same wherever it stands, so the
command line is read token by token against the parser's own actions, each flag kept with its value, and
handed to Hydra as the overrides in their order, then the flags in theirs. Abbreviated long flags
(`--multi`, which argparse accepts) are written out, so that every check reads one spelling.

One difference from argparse: `--info`'s value is optional, and argparse takes whatever follows it as
that value (`--info task=plan` is "invalid choice: 'task=plan'"); here the next token is its value only
when it is one of the choices, so an override after `--info` stays an override.
"""

from __future__ import annotations

import argparse
import functools
import re
from dataclasses import dataclass

from moe_lightning.errors import ConfigError


@dataclass(frozen=True)
class Flag:
    option: str           # the long option string (--config-dir), or the token as given when no flag has it
    value: str | None     # None: given without a value

    @property
    def tokens(self) -> list[str]:
        return [self.option] if self.value is None else [self.option, self.value]


@dataclass(frozen=True)
class CommandLine:
    overrides: tuple[str, ...]
    flags: tuple[Flag, ...]

    def argv(self, *more_overrides: str) -> list[str]:
        """Hydra's argv: the overrides (and `more_overrides` after them), then the flags."""
        return [*self.overrides, *more_overrides, *(t for f in self.flags for t in f.tokens)]

    def value(self, option: str) -> str | None:
        """The value of the last `option` (its long form) given, else None."""
        given = [f.value for f in self.flags if f.option == option]
        return given[-1] if given else None

    def has(self, option: str) -> bool:
        return any(f.option == option for f in self.flags)


@functools.cache
def _parser() -> argparse.ArgumentParser:
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


@functools.cache
def _actions() -> dict[str, argparse.Action]:
    """{option string: action} of every Hydra flag, short and long."""
    return {s: a for a in _parser()._actions for s in a.option_strings}


def _long(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def _action(flag: str) -> argparse.Action | None:
    """The action of a flag as given, or of the one long flag it abbreviates (argparse's allow_abbrev)."""
    actions = _actions()
    if flag in actions:
        return actions[flag]
    if flag.startswith("--"):
        matches = {id(a): a for s, a in actions.items() if s.startswith("--") and s.startswith(flag)}
        if len(matches) == 1:
            return next(iter(matches.values()))
    return None   # unknown or ambiguous: argparse says which


NUMBER = re.compile(r"-\d+|-\d*\.\d+")   # a value, not a flag (Hydra has no flag like it, so argparse agrees)


def _is_flag(token: str) -> bool:
    return token.startswith("-") and token != "-" and not NUMBER.fullmatch(token)


def _takes(action: argparse.Action, token: str) -> bool:
    """Whether the token after a flag given without `=` is its value: always for a flag that needs one
    (unless it is another flag: argparse says the value is missing), for --info only one of its choices."""
    if action.nargs is None:
        return not _is_flag(token)
    return action.nargs == "?" and token in (action.choices or ())


def read(args: list[str]) -> CommandLine:
    """Split `args` into overrides and flags; after `--` every token is an override."""
    overrides: list[str] = []
    flags: list[Flag] = []
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            overrides += args[i:]
            break
        if not _is_flag(token):
            overrides.append(token)
            continue
        name, eq, given = token.partition("=")
        action = _action(name) if eq else _action(token)
        if action is None:
            flags.append(Flag(token, None))
            continue
        if eq and action.nargs == 0:   # --multirun=x: not a form of the flag; argparse says so
            flags.append(Flag(token, None))
            continue
        value: str | None = given if eq else None
        if not eq and i < len(args) and _takes(action, args[i]):
            value, i = args[i], i + 1
        flags.append(Flag(_long(action), value))
    return CommandLine(tuple(overrides), tuple(flags))


def check(command: CommandLine) -> None:
    """Hydra's parser over the command line as Hydra will get it: its error as one ConfigError line (an
    unknown flag, a flag without its value, a value not among its choices), not a usage dump."""
    parser = _parser()

    def error(message: str) -> None:
        if message.startswith("unrecognized arguments"):
            known = ", ".join(_long(a) for a in parser._actions if a.option_strings)
            message += f"; Hydra's flags are {known} (anywhere among the overrides; --hydra-help describes them)"
        raise ConfigError(message)

    parser.error = error   # type: ignore[method-assign]  # argparse's own: usage on stderr, then exit 2
    parser.parse_args(command.argv())
