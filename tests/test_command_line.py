"""Hydra's command line read with Hydra's parser: flags anywhere, each with its value."""

from __future__ import annotations

import pytest

from moe_lightning.command_line import Flag, check, read
from moe_lightning.errors import ConfigError


def test_flags_keep_their_values_and_go_after_the_overrides():
    command = read(["task=plan", "--config-dir", "conf", "a=1", "-m", "-cn=mine", "--info", "b=2", "--cfg", "job"])
    assert command.overrides == ("task=plan", "a=1", "b=2")
    assert command.flags == (Flag("--config-dir", "conf"), Flag("--multirun", None), Flag("--config-name", "mine"),
                             Flag("--info", None), Flag("--cfg", "job"))
    assert command.argv() == ["task=plan", "a=1", "b=2", "--config-dir", "conf", "--multirun", "--config-name",
                              "mine", "--info", "--cfg", "job"]
    check(command)


def test_info_takes_only_one_of_its_choices_and_abbreviations_are_written_out():
    assert read(["--info", "defaults", "x=1"]).flags == (Flag("--info", "defaults"),)
    command = read(["--multi", "x=1,2", "--config-d", "d"])
    assert command.flags == (Flag("--multirun", None), Flag("--config-dir", "d"))
    assert command.overrides == ("x=1,2",)


@pytest.mark.parametrize("args, expect", [
    (["x=1", "--bogus", "y=2"], "unrecognized arguments: --bogus; Hydra's flags are --help"),
    (["x=1", "--config-dir"], "argument --config-dir/-cd: expected one argument"),
    (["--cfg", "nope", "x=1"], "invalid choice: 'nope'"),
    (["--config", "d"], "ambiguous option: --config could match"),
])
def test_a_malformed_command_line_is_one_line(args, expect):
    with pytest.raises(ConfigError, match=expect) as err:
        check(read(args))
    assert "\n" not in str(err.value)
