"""Hydra's own launcher plugins through the presets in conf/hydra/launcher: a multirun's jobs run in
joblib's worker processes (local_parallel) or submitit's local executor (local_submitit), each writing
its own run document."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml


@pytest.mark.parametrize("preset, plugin", [("local_parallel", "hydra_plugins.hydra_joblib_launcher"),
                                            ("local_submitit", "hydra_plugins.hydra_submitit_launcher")])
def test_a_launcher_preset_runs_every_sweep_point_as_a_job(tmp_path, preset, plugin):
    """In the default sweep folder (runs/multirun/<date>/<time>-<pid>): the pid is the command's, resolved
    once, not each worker process's, so every job lands under the folder Hydra announces."""
    pytest.importorskip(plugin, reason="the launchers extra is not installed")
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "-m", f"hydra/launcher={preset}",
                        "task=simulate", "task.use_plan=false", "policy.batch_size=4,8", "policy.micro_batch_size=2",
                        "workload.num_requests=8", "workload.gen_len=2"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sweeps = list((tmp_path / "runs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    sweep = sweeps[0]
    launcher = yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["launcher"]["_target_"]
    assert {"local_parallel": "joblib", "local_submitit": "submitit"}[preset] in launcher.lower()
    docs = [json.loads((sweep / str(n) / "run.json").read_text()) for n in (0, 1)]
    assert sorted(d["policy"]["batch_size"] for d in docs) == [4, 8]
