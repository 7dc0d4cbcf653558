"""Registers every config dataclass with Hydra's ConfigStore (the only module that does).

The schema of the root is `moe_lightning.run_config.RunConfig` itself; group options fill its fields.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from moe_lightning.loggers import LOGGER_CONFIGS
from moe_lightning.run_config import RunConfig
from moe_lightning.systems import SYSTEM_CONFIGS
from moe_lightning.tasks import TASK_CONFIGS

GROUPS = ("task", "system", "model", "hardware", "workload", "logger")


def register(policy_probe: bool = False) -> None:
    """`policy_probe`: the root's policy fields stored unset (`???`), so that a config composed from it
    sets only the policy fields some config file or override sets (`cli.config_policy_fields`); the
    app's own root is registered again at once after."""
    cs = ConfigStore.instance()
    # Policy is a frozen dataclass (a run's knobs never change once built); OmegaConf would carry that
    # into a read-only node that command-line overrides cannot set, so the schema node is unfrozen.
    base = OmegaConf.structured(RunConfig)
    OmegaConf.set_readonly(base.policy, False)
    if policy_probe:
        for key in base.policy:
            base.policy[key] = MISSING
    cs.store(name="base_config", node=base)
    for name, node in TASK_CONFIGS.items():
        cs.store(group="task", name=name, node=node)
    for name, node in SYSTEM_CONFIGS.items():
        cs.store(group="system", name=name, node=node)
    for name, node in LOGGER_CONFIGS.items():
        cs.store(group="logger", name=name, node=node)
