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
from moe_lightning.config import Policy, Workload
from moe_lightning.run_config import RunConfig
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


def _imports(path) -> set[str]:
    """Every moe_lightning module a file imports, at its top or inside a function."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_lightning"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("moe_lightning")}
    return found


def test_the_ground_floor_imports_nothing_above_it():
    """config.py (the specs) and errors.py import no task, system, logger or anything else of the package,
    not even lazily: no import cycle can pass through them."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "moe_lightning"
    assert _imports(package / "config.py") <= {"moe_lightning.errors"}
    assert _imports(package / "errors.py") == set()


def test_no_module_imports_below_its_definitions():
    """An import at the bottom of a module is how a cycle is dodged; there is none."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "moe_lightning"
    for path in package.rglob("*.py"):
        body = ast.parse(path.read_text()).body
        seen_def = False
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                seen_def = True
            elif seen_def and isinstance(node, (ast.Import, ast.ImportFrom)):
                raise AssertionError(f"{path.relative_to(package)}:{node.lineno}: import below a definition")
