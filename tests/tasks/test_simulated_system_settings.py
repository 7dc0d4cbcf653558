"""A simulation runs the system as configured: task=simulate and a simulated tune's trials time cfg.system's
own schedule with its KV settings (system.refill, kv_cache_tokens, kv_block_size), so a tuned policy's
simulated figure is the one task=simulate gives it, and a setting that changes the run is never ignored."""

from __future__ import annotations

import dataclasses
import json

import pytest

from moe_lightning.baselines import FlexGenSystem
from moe_lightning.config import Policy, TunerConfig, Workload
from moe_lightning.errors import ConfigError
from moe_lightning.run_config import RunConfig
from moe_lightning.systems import CGOPipeSystem
from moe_lightning.tasks.simulate import SimulateTask, simulate_system
from moe_lightning.tuner.presets import load_preset

# Short and long budgets side by side: a short request's blocks free early, and refill admits a waiting one
BUDGETS = [2, 30] * 6
POLICY = Policy(batch_size=4, micro_batch_size=2)


@pytest.fixture
def mixed_budgets(tmp_path) -> Workload:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": [5] * (20 + i), "max_new_tokens": g}) + "\n"
                               for i, g in enumerate(BUDGETS)))
    return Workload(name="jsonl", prompt_len_avg=1, prompt_len_max=1, num_requests=1, path=str(prompts), gen_len=32)


def run_config(workload: Workload, system, **tuner) -> RunConfig:
    return RunConfig(task=SimulateTask(), system=system, policy=POLICY, model=load_preset("model", "mixtral-8x7b"),
                     hardware=load_preset("hardware", "t4"), workload=workload,
                     tuner=TunerConfig(objective="simulate", **tuner))


def test_task_simulate_runs_the_system_s_refill_setting(mixed_budgets):
    """Under a KV budget of two requests per micro-batch, refill admits a waiting request when a short one
    finishes; without it the next round waits for the longest: more decode steps. system.refill=false was
    simulated with refill."""
    budget = 2 * 2 * 64   # two micro-batches of two requests of up to 52 tokens, in blocks of 16
    refill, batches = (simulate_system(run_config(mixed_budgets, CGOPipeSystem(kv_cache_tokens=budget, refill=r)))[0]
                       for r in (True, False))
    steps = [d.extra["simulation"]["decode_steps_total"] for d in (refill, batches)]
    assert steps[0] < steps[1], steps
    assert refill.metrics.generated_tokens == batches.metrics.generated_tokens == sum(BUDGETS)


def test_a_simulated_trial_is_task_simulate_s_run_of_its_policy(mixed_budgets):
    """The trial's figure is task=simulate's for the same policy, system and settings: a baseline's trial
    times the baseline's schedule (it timed CGOPipe's under the baseline's name), and CGOPipe's trial its
    KV settings (they were the defaults')."""
    from moe_lightning.tasks.plan import planning_inputs, planning_model
    from moe_lightning.tuner.search import simulate_trial

    systems = {"flexgen": FlexGenSystem(policy_source="given"),
               "cgopipe, no refill": CGOPipeSystem(kv_cache_tokens=256, refill=False),
               "cgopipe, dense": CGOPipeSystem(kv_block_size=0)}
    figures = {}
    for label, system in systems.items():
        cfg = run_config(mixed_budgets, system)
        spec = planning_model(cfg.model)
        workload, lengths, gen_lens, _ = planning_inputs(cfg.workload, spec)
        trial = simulate_trial(dataclasses.replace(cfg, workload=workload), spec, None, lengths, gen_lens)
        task = simulate_system(cfg, given=POLICY)[0]
        assert trial.throughput_tok_s == pytest.approx(task.metrics.throughput_tok_s, rel=1e-9), label
        assert trial.decode_steps_total == task.extra["simulation"]["decode_steps_total"], label
        figures[label] = trial.throughput_tok_s
    default = simulate_system(run_config(mixed_budgets, CGOPipeSystem()), given=POLICY)[0].metrics.throughput_tok_s
    assert all(f != pytest.approx(default, rel=1e-6) for f in figures.values()), (figures, default)


@pytest.mark.parametrize(("system", "hardware", "expect"), [
    ("reference", "t4", r"system=reference has no schedule of its own to simulate \(task=simulate times CGOPipe"),
    ("accelerate", "t4", r"system=accelerate has no schedule of its own to simulate \(it is measured only\)"),
    ("flexgen", "2xt4", r"system=flexgen on hardware=2xt4: the baselines' schedules run on one GPU"),
])
def test_a_simulated_tune_refuses_a_system_whose_trials_would_time_another(system, hardware, expect):
    from moe_lightning.systems import SYSTEM_CONFIGS
    from moe_lightning.tasks.tune import check_tuned_system

    cls = SYSTEM_CONFIGS[system]
    given = cls(policy_source="given") if "policy_source" in {f.name for f in dataclasses.fields(cls)} else cls()
    cfg = dataclasses.replace(run_config(Workload(), given), hardware=load_preset("hardware", hardware))
    with pytest.raises(ConfigError, match=expect):
        check_tuned_system(cfg)
    check_tuned_system(run_config(Workload(), CGOPipeSystem()))   # the engine's own is tuned


def test_task_plan_plans_the_system_s_kv_cache(tmp_path):
    """A dense cache (system.kv_block_size=0) holds every prompt at the longest, the paged pool at the
    average: the plan's KV cache grows. task=plan planned the paged pool whatever the system said."""
    from moe_lightning.tasks.plan import PlanTask

    workload = Workload(prompt_len_avg=8, prompt_len_max=64, gen_len=8, num_requests=64)

    def kv_bytes(system) -> int:
        cfg = dataclasses.replace(run_config(workload, system), task=PlanTask(), policy=Policy(),
                                  out=str(tmp_path / f"{system.kv_block_size}.json"))
        memory = cfg.task.run(cfg).extra["memory"]
        return memory["cpu"]["kv_cache"] + memory["gpu"].get("kv_cache", 0)   # wherever r_c puts it

    paged, dense = kv_bytes(CGOPipeSystem()), kv_bytes(CGOPipeSystem(kv_block_size=0))
    assert dense > paged, (paged, dense)


def test_task_plan_refuses_a_kv_cache_of_a_given_size(tmp_path):
    from moe_lightning.tasks.plan import PlanTask

    cfg = dataclasses.replace(run_config(Workload(), CGOPipeSystem(kv_cache_tokens=1000)), task=PlanTask(),
                              policy=Policy(), out=str(tmp_path / "run.json"))
    with pytest.raises(ConfigError, match="system.kv_cache_tokens=1000: task=plan sizes the KV cache"):
        cfg.task.run(cfg)


def test_a_comparison_runs_a_listed_system_s_settings(tmp_path, mixed_budgets):
    """task=compare system.refill=false system.kv_cache_tokens=256: CGOPipe's row is its run under those
    settings (they were refused: there was no way to compare a system's non-default settings), recorded in
    its run document; flexgen's row is unchanged."""
    import subprocess
    import sys

    def compare(name: str, *settings: str) -> dict:
        r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "task=compare", "task.mode=simulate",
                            "task.systems=[cgopipe,flexgen]", "model=mixtral-8x7b", "hardware=t4", "workload=jsonl",
                            f"workload.path={mixed_budgets.path}", "workload.gen_len=32", *settings,
                            f"hydra.run.dir={tmp_path / name}"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return {row["system"]: row for row in json.loads((tmp_path / name / "comparison.json").read_text())}

    default, settings = compare("default"), compare("settings", "system.refill=false", "system.kv_cache_tokens=256")
    assert settings["flexgen"]["throughput_tok_s"] == default["flexgen"]["throughput_tok_s"]
    assert settings["cgopipe"]["throughput_tok_s"] != default["cgopipe"]["throughput_tok_s"]
    doc = json.loads((tmp_path / "settings" / "cgopipe.json").read_text())
    assert doc["extra"]["system"] == dataclasses.asdict(CGOPipeSystem(policy_source="auto", refill=False,
                                                                     kv_cache_tokens=256))
