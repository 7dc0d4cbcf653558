"""Every planning entry point plans a prompts file's run at the file's real lengths in tokens (workload=jsonl's
own lengths, 1 request of 1 token, are placeholders): task=plan, task=bench task.plan=true and task=tune's
HRM seed give one plan, and the tune searches and simulates the file's requests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.tuner.test_tune_processes import cli_env, tune_args

PLANNED = ("batch_size", "micro_batch_size", "attn_on_gpu", "ffn_on_gpu", "expert_gpu_fraction", "kv_gpu_fraction",
           "prefetch_depth")
LENGTHS = [300 + 20 * i for i in range(12)]   # far from the placeholders and from the synthetic defaults


@pytest.fixture(scope="module")
def planned(tmp_path_factory, tiny_path) -> tuple[tuple[str, ...], dict]:
    """(the workload overrides, task=plan's run document) for a prompts file of LENGTHS."""
    folder = tmp_path_factory.mktemp("plan")
    prompts = folder / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": [5 + i % 7] * n}) + "\n" for i, n in enumerate(LENGTHS)))
    workload = ("workload=jsonl", f"workload.path={prompts}", "workload.gen_len=2")
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "task=plan", *workload,
                        f"hydra.run.dir={folder / 'h'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plan = json.loads((folder / "h" / "run.json").read_text())
    assert plan["workload"]["num_requests"] == 12 and plan["policy"]["batch_size"] > 1   # not the placeholder's
    return workload, plan


def test_bench_runs_task_plans_plan_for_a_prompts_file(tmp_path, planned):
    workload, plan = planned
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "task=bench", "system=cgopipe", "task.plan=true",
                        "task.repeats=1", "task.warmup_tokens=1", "task.min_repeat_s=0", "task.progress=false",
                        *workload, f"hydra.run.dir={tmp_path / 'h'}"], capture_output=True, text=True, timeout=300,
                       env=cli_env(tmp_path))
    assert r.returncode == 0, r.stderr
    bench = json.loads((tmp_path / "h" / "run.json").read_text())
    assert {k: bench["policy"][k] for k in PLANNED} == {k: plan["policy"][k] for k in PLANNED}
    assert bench["prediction"]["hrm_tok_s"] == plan["prediction"]["hrm_tok_s"]   # predicted for the file too


def test_tune_seeds_task_plans_plan_and_simulates_the_prompts_file(tmp_path, planned):
    workload, plan = planned
    r = subprocess.run(tune_args(tmp_path, "prompts", "tuner.objective=simulate", "tuner.n_trials=1", *workload),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    tune = json.loads((tmp_path / "h" / "run.json").read_text())
    assert tune["workload"]["num_requests"] == 12 and tune["workload"]["prompt_len_max"] == max(LENGTHS)
    # the simulated trial ran the file's 12 requests of 2 tokens each, not the placeholder's one
    assert tune["metrics"]["generated_tokens"] == 12 * 2
    assert {k: tune["extra"]["hrm_plan"]["policy"][k] for k in PLANNED} == {k: plan["policy"][k] for k in PLANNED}


def test_tunes_simulated_trials_stop_each_request_at_its_own_budget(tmp_path, tiny_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": [5] * n, "max_new_tokens": g}) + "\n"
                               for n, g in zip(LENGTHS[:4], (1, 3, 2, 3))))
    r = subprocess.run(tune_args(tmp_path, "budgets", "tuner.objective=simulate", "tuner.n_trials=1", "workload=jsonl",
                                 f"workload.path={prompts}", "workload.gen_len=3"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    tune = json.loads((tmp_path / "h" / "run.json").read_text())
    assert tune["metrics"]["generated_tokens"] == 1 + 3 + 2 + 3   # not 4 x 3, the longest



def test_the_engines_auto_policy_is_task_plans_plan_for_a_prompts_file(tmp_path):
    """system.policy_source=auto (what generate, bench and compare run for CGOPipe) plans a prompts file at
    its own lengths, as task=plan does. On Mixtral-8x7B and a T4 (planned only: no weights are loaded),
    300 prompts of 20-2000 tokens plan mu=6; planned at the file's average and longest prompt alone, mu=7."""
    import random

    from moe_lightning.config import Policy, Workload
    from moe_lightning.systems import CGOPipeSystem
    from moe_lightning.tasks.generate import requests_workload
    from moe_lightning.tuner.presets import load_preset

    rng = random.Random(0)
    lengths = [rng.randint(20, 2000) for _ in range(300)]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"input_ids": [5 + i % 7] * n}) + "\n" for i, n in enumerate(lengths)))
    r = subprocess.run([sys.executable, "-m", "moe_lightning.cli", "task=plan", "model=mixtral-8x7b", "hardware=t4",
                        "workload=jsonl", f"workload.path={prompts}", "workload.gen_len=32",
                        f"hydra.run.dir={tmp_path / 'h'}"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    plan = json.loads((tmp_path / "h" / "run.json").read_text())["policy"]

    # what task=generate resolves for the same file: its workload for these lengths, and CGOPipe's rule
    given = Workload(name="jsonl", prompt_len_avg=1, prompt_len_max=1, num_requests=1, path=str(prompts), gen_len=32)
    workload = requests_workload(given, lengths)
    spec, t4 = load_preset("model", "mixtral-8x7b"), load_preset("hardware", "t4")
    auto = CGOPipeSystem(policy_source="auto").resolve_policy(spec, t4, workload, Policy(), lengths=lengths)
    assert {k: getattr(auto, k) for k in PLANNED} == {k: plan[k] for k in PLANNED}


def test_a_prompts_file_s_own_budgets_are_planned_at_the_longest_as_the_engine_sizes_its_cache(tmp_path, capsys):
    """Rows with max_new_tokens 4 and 32 under workload.gen_len=128: no request generates more than 32, so
    the engine sizes its KV cache for 32 and task=plan plans gen_len=32, not 128, for both requests (the
    HRM runs one gen_len; task=simulate stops each at its own, as the engine); the plan's policy runs in
    the engine's memory plan with the 32-token request admitted, and the run document and the printed
    notes say what was planned and simulated."""
    from moe_lightning.config import Policy, Workload
    from moe_lightning.memory import engine_kv_tokens, memory_plan
    from moe_lightning.run_config import RunConfig
    from moe_lightning.schedule.batching import kv_budget, too_large
    from moe_lightning.tasks.generate import requests_workload
    from moe_lightning.tasks.plan import PlanTask
    from moe_lightning.tuner.presets import load_preset
    from moe_lightning.workload_io import load_requests, longest_budget

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"input_ids": [5, 6, 7], "max_new_tokens": 4}\n'
                       '{"input_ids": [5, 6, 7, 8, 9], "max_new_tokens": 32}\n')
    given = Workload(name="jsonl", prompt_len_avg=1, prompt_len_max=1, num_requests=1, path=str(prompts), gen_len=128)
    spec, t4 = load_preset("model", "mixtral-8x7b"), load_preset("hardware", "t4")
    report = PlanTask().run(RunConfig(task=PlanTask(), model=spec, hardware=t4, workload=given, run_dir=str(tmp_path)))
    out = capsys.readouterr().out
    assert report.workload["gen_len"] == 32 and report.metrics.generated_tokens == report.policy["batch_size"] * 32
    assert report.workload["max_new_tokens"] == {"workload_gen_len": 128, "longest": 32, "shortest": 4,
                                                 "rows_with_own": 2, "rows": 2}
    assert "the HRM plans every request at gen_len=32, the longest" in out

    # task=simulate runs each request to its own budget (the engine's 4 + 32 tokens), the HRM at the longest
    from moe_lightning.tasks.simulate import SimulateTask

    sim = SimulateTask().run(RunConfig(task=SimulateTask(), model=spec, hardware=t4, workload=given,
                                       run_dir=str(tmp_path / "sim")))
    out = capsys.readouterr().out
    assert sim.metrics.generated_tokens == 36 and sim.extra["simulation"]["decode_steps_total"] == 31
    assert "simulated with each request stopping at its own budget" in out

    # what task=generate builds for this file: its workload, and the engine's KV cache and memory plan
    requests = load_requests(given, spec)
    lengths = [len(r.input_ids) for r in requests]
    engine = requests_workload(given, lengths, longest_budget(requests, given))
    assert engine.gen_len == 32
    policy = Policy(**report.policy)
    tokens = engine_kv_tokens(spec, policy, engine, t4, 16, lengths)
    assert too_large(lengths, [4, 32], kv_budget(policy.batch_size, policy.micro_batch_size, tokens, 16)) is None
    assert memory_plan(spec, policy, engine, kv_tokens=tokens, paged=True, lengths=lengths, block_size=16).fits(t4)


def test_the_engine_sizes_its_run_for_the_longest_budget(tmp_path, tiny_path):
    """task=generate's workload for rows with max_new_tokens 2 and 3 under workload.gen_len=8 is planned at
    3 new tokens (the KV cache holds no more than a request generates), each row still stops at its own,
    and the run document says so."""
    from moe_lightning.config import Policy, Sampling, Workload
    from moe_lightning.run_config import RunConfig
    from moe_lightning.systems import CGOPipeSystem
    from moe_lightning.tasks.generate import run_generation

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"input_ids": [5, 6, 7], "max_new_tokens": 2}\n{"input_ids": [5, 6], "max_new_tokens": 3}\n')
    cfg = RunConfig(system=CGOPipeSystem(), workload=Workload(name="jsonl", path=str(prompts), gen_len=8),
                    policy=Policy(batch_size=2, micro_batch_size=1), sampling=Sampling(ignore_eos=True), device="cpu")
    gen = run_generation(cfg, progress=False)
    assert gen.runner.workload.gen_len == 3
    assert [len(o) for o in gen.output_ids] == [2, 3]
    actual = gen.report.workload["actual"]
    assert actual["gen_len"] == 3 and actual["max_new_tokens"]["longest"] == 3
