"""task=compare: one run document per system, the table (markdown, CSV) and the chart, and a failing
system recorded with its reason instead of a crash."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from moe_lightning.config import Policy, Workload
from moe_lightning.run_config import RunConfig
from moe_lightning.tasks.compare import CompareTask


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_lightning.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_compare_cli_writes_documents_table_and_chart(tmp_path, tiny_path):
    r = cli("task=compare", "task.systems=[cgopipe,flexgen]", "model=tiny-mixtral", "workload.num_requests=6",
            "workload.gen_len=4", "task.progress=false", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert "| cgopipe |" in r.stdout and "| flexgen |" in r.stdout and "vs best baseline" in r.stdout
    for name in ("cgopipe", "flexgen"):
        doc = json.loads((tmp_path / f"{name}.json").read_text())
        assert doc["system"] == name and doc["task"] == "compare" and doc["metrics"]["throughput_tok_s"] > 0
        assert doc["extra"]["policy_source"] == "auto"
    flexgen = json.loads((tmp_path / "flexgen.json").read_text())
    assert flexgen["policy"]["attn_on_gpu"] is True and flexgen["policy"]["pages_per_layer"] == 1
    rows = list(csv.DictReader((tmp_path / "comparison.csv").open()))
    assert [r["system"] for r in rows] == ["cgopipe", "flexgen"] and all(r["status"] == "ok" for r in rows)
    assert float(rows[1]["ratio_to_best_baseline"]) == 1.0
    assert rows[0]["generated_tokens"] == rows[1]["generated_tokens"]  # same greedy outputs, same stops
    assert "| cgopipe |" in (tmp_path / "comparison.md").read_text()
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_system_is_a_row_with_its_reason(tmp_path, tiny_path):
    """Given a CPU-attention policy, DeepSpeed (GPU attention only) fails; the comparison goes on."""
    cfg = RunConfig(task=CompareTask(systems=["cgopipe", "deepspeed"], isolate=False, policy_source="given",
                                     progress=False, warmup_tokens=0),
                    workload=Workload(num_requests=4, gen_len=3),
                    policy=Policy(batch_size=4, micro_batch_size=2), run_dir=str(tmp_path))
    report = cfg.task.run(cfg)
    rows = {r["system"]: r for r in report.extra["comparison"]}
    assert rows["cgopipe"]["status"] == "ok" and rows["deepspeed"]["status"] == "failed"
    assert "attention on the GPU" in rows["deepspeed"]["error"]
    assert rows["cgopipe"]["ratio_to_best_baseline"] is None  # no baseline succeeded
    assert "failed" in (tmp_path / "comparison.md").read_text()
    assert not (tmp_path / "deepspeed.json").exists()
