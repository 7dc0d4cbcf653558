"""The engine, the planner and the simulator run without Hydra, OmegaConf, Optuna and wandb (the GPU
machine has none of them)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('hydra', 'omegaconf', 'optuna', 'wandb', 'sqlalchemy'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
from moe_lightning.config import Policy, RunConfig, Workload
from moe_lightning.systems import CGOPipeSystem
from moe_lightning.tasks.generate import run_generation
from moe_lightning.tuner.optimizer import optimize
from moe_lightning.tuner.simulator import simulate_run
import moe_lightning.baselines.schedules
cfg = RunConfig(system=CGOPipeSystem(), policy=Policy(batch_size=4, micro_batch_size=2),
                workload=Workload(num_requests=4, gen_len=3), device='cpu')
print(run_generation(cfg, progress=False).report.metrics.generated_tokens)
"""


def test_engine_runs_without_the_harness_dependencies(tiny_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip().splitlines()[-1]) > 0
