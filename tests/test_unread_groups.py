"""Settings of a group the task reads are accepted (`cli.refuse_unread_group`); the refusals themselves are
catalogue cases (tests/test_catalogue.py)."""

from __future__ import annotations

import pytest

from moe_lightning.cli import refuse_unread_group
from moe_lightning.config import GpuSpec, HardwareSpec, ParallelConfig, Sampling, TunerConfig
from moe_lightning.errors import ConfigError
from moe_lightning.run_config import RunConfig
from moe_lightning.tasks import TASK_CONFIGS


def config(task: str, **kw) -> RunConfig:
    return RunConfig(task=TASK_CONFIGS[task](), **kw)


@pytest.mark.parametrize("cfg, override", [
    (config("tune"), "tuner.n_trials=2"),
    (config("generate", sampling=Sampling(temperature=0.7)), "sampling.temperature=0.7"),
    (config("tune", sampling=Sampling(temperature=0.7)), "sampling.temperature=0.7"),   # measured trials sample
    # what a simulation runs: every request to its budget (benchmarks/gpu_suite.sh's workload has it)
    (config("simulate", sampling=Sampling(ignore_eos=True)), "sampling.ignore_eos=true"),
    (config("plan", sampling=Sampling(ignore_eos=True)), "sampling.ignore_eos=true"),
    (config("generate"), "threads.serial=true"),
    # what a measurement reads, beside one (a measured comparison, a measured tune)
    (config("compare"), "task.repeats=9"),
    (config("tune"), "tuner.trial_timeout_s=60"),
    (config("compare"), "threads.serial=true"),
    (config("generate", parallel=ParallelConfig(expert=2, chunks=3)), "parallel.chunks=3"),
    # a several-GPU plan chooses its layout, expert parallelism included, and pipelines it in these chunks
    (config("simulate", hardware=HardwareSpec(gpu=GpuSpec(count=2)), parallel=ParallelConfig(chunks=3)),
     "parallel.chunks=3"),
])
def test_a_setting_the_task_reads_is_accepted(cfg: RunConfig, override: str) -> None:
    refuse_unread_group(cfg, override.split("=")[0], override)


@pytest.mark.parametrize("cfg, override, message", [
    (config("tune", tuner=TunerConfig(objective="simulate")), "sampling.top_p=0.5", "samples no tokens"),
    (config("simulate", hardware=HardwareSpec(gpu=GpuSpec(count=2)), parallel=ParallelConfig(tensor=2, chunks=3)),
     "parallel.chunks=3", "parallel.expert=1 has none"),   # a given layout without expert parallelism
])
def test_a_setting_the_task_never_reads_is_refused(cfg: RunConfig, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        refuse_unread_group(cfg, override.split("=")[0], override)
