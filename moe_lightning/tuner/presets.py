"""Load the shipped YAML presets (conf/<group>/<name>.yaml) into config dataclasses, without Hydra.

`model/hf` and `workload/jsonl` need a path and are not plannable presets; loading them works but their
`???` placeholders are kept as strings.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from moe_lightning.config import HardwareSpec, ModelSpec, Workload
from moe_lightning.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("hardware", "model", "workload")
PLANNABLE_EXCLUDED = {"model": ("hf",), "workload": ("jsonl",)}


def preset_names(group: str, plannable: bool = True) -> list[str]:
    """Names of the presets of a group (sorted); `plannable` drops those that need a path."""
    names = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    if plannable:
        names = [n for n in names if n not in PLANNABLE_EXCLUDED.get(group, ())]
    return names


def load_preset(group: str, name: str) -> HardwareSpec | ModelSpec | Workload:
    """`load_preset("hardware", "t4")` -> HardwareSpec, likewise "model" and "workload"."""
    if group not in GROUPS:
        raise ConfigError(f"preset group: got {group!r}; accepted: {', '.join(GROUPS)}")
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        accepted = ", ".join(preset_names(group, False))
        raise ConfigError(f"{group}={name}: no such preset; accepted: {accepted}")
    d = yaml.safe_load(path.read_text())
    if group == "hardware":
        return HardwareSpec.from_dict(d)
    if group == "model":
        return ModelSpec(**d)
    return Workload(**d)
