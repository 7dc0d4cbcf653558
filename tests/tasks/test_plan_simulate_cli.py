"""task=plan and task=simulate through the console script: run documents with a policy and a
prediction, the roofline PNG, and one-line errors for combinations that cannot be planned."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

COMMON = ("hardware=t4", "model=mixtral-8x7b", "workload=mtbench")


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_lightning.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def test_plan_writes_policy_and_prediction(tmp_path):
    out = tmp_path / "plan.json"
    r = cli("task=plan", *COMMON, f"out={out}", f"hydra.run.dir={tmp_path / 'h'}")
    assert r.returncode == 0, r.stderr
    assert "HRM plan" in r.stdout and "bottleneck" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["task"] == "plan" and doc["policy"]["batch_size"] >= 1
    assert doc["prediction"]["hrm_tok_s"] > 0
    # one batch of N, as the HRM prices it: its tokens after each first (the prefill's) over its 127 decode
    # steps are the decode rate, as the engine defines it
    m, n = doc["metrics"], doc["policy"]["batch_size"]
    assert m["kind"] == "predicted" and m["generated_tokens"] == n * 128   # mtbench
    assert (m["generated_tokens"] - n) / m["decode_s"] == pytest.approx(m["decode_tok_s"])
    assert m["decode_step_median_s"] * 127 == pytest.approx(m["decode_s"])
    assert doc["extra"]["bottleneck"] in ("link", "cpu", "gpu")
    assert doc["extra"]["memory"]["gpu_total_bytes"] <= doc["extra"]["memory"]["gpu_budget_bytes"]


def test_plan_plot_writes_the_roofline_png(tmp_path):
    out = tmp_path / "plan.json"
    r = cli("task=plan", "task.plot=true", *COMMON, f"out={out}", f"hydra.run.dir={tmp_path / 'h'}")
    assert r.returncode == 0, r.stderr
    png = tmp_path / "plan.roofline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out.read_text())["extra"]["roofline_png"] == str(png)


def test_simulate_writes_metrics_and_both_predictions(tmp_path):
    out = tmp_path / "sim.json"
    r = cli("task=simulate", "system=cgopipe", *COMMON, "workload.num_requests=64", "workload.gen_len=16",
            f"out={out}", f"hydra.run.dir={tmp_path / 'h'}")
    assert r.returncode == 0, r.stderr
    assert "simulated cgopipe" in r.stdout and "utilisation" in r.stdout
    doc = json.loads(out.read_text())
    assert doc["task"] == "simulate" and doc["policy"]["ffn_on_gpu"] is True
    assert doc["prediction"]["hrm_tok_s"] > 0 and doc["prediction"]["sim_tok_s"] > 0
    m = doc["metrics"]
    assert m["throughput_tok_s"] == pytest.approx(doc["prediction"]["sim_tok_s"])
    assert m["generated_tokens"] == 64 * 16 and m["prefill_s"] > 0 and m["decode_s"] > 0
    assert set(m["utilisation"]) == {"gpu", "cpu", "h2d", "d2h", "copy", "link"}
    # cgopipe's policy is HRM's plan, not the config's default policy
    assert doc["extra"]["policy_source"] == "hrm plan" and doc["policy"]["batch_size"] != 8


def test_simulate_plot_with_own_policy(tmp_path):
    out = tmp_path / "sim.json"
    r = cli("task=simulate", "task.plot=true", "task.use_plan=false", "model=mid-mixtral",
            "policy.batch_size=8", "policy.micro_batch_size=4", "workload.num_requests=8",
            "workload.gen_len=4", f"out={out}", f"hydra.run.dir={tmp_path / 'h'}")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sim.gantt.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(out.read_text())["policy"]["batch_size"] == 8


@pytest.mark.parametrize("args, expect", [
    (["task=plan", "model=hf"], "model=hf takes its shapes"),
    (["task=simulate", "workload=jsonl"], "workload.path"),
    (["task=simulate", "task.use_plan=false", "policy.ffn_on_gpu=false"], "ffn_on_gpu"),
])
def test_bad_combinations_give_one_line(tmp_path, args, expect):
    r = cli(*args, f"out={tmp_path / 'x.json'}", f"hydra.run.dir={tmp_path / 'h'}")
    assert r.returncode != 0
    assert r.stderr.startswith("moe-lightning: error:") and expect in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_system_without_a_schedule_is_refused(tmp_path):
    from dataclasses import dataclass

    from moe_lightning.errors import ConfigError
    from moe_lightning.run_config import RunConfig
    from moe_lightning.tasks.simulate import SimulateTask

    @dataclass
    class Other:
        name: str = "accelerate"  # a real peer: no task graph to time

    cfg = RunConfig(task=SimulateTask(), system=Other(), out=str(tmp_path / "x.json"))
    with pytest.raises(ConfigError, match="system accelerate has no schedule to simulate"):
        cfg.task.run(cfg)


# DBRX's 263 GB of bf16 weights do not fit one T4's host (task=plan says so in one line); the paper runs it
# on several T4s.
@pytest.mark.parametrize("model, hardware", [("qwen3-30b-a3b", "t4"), ("qwen1.5-moe-a2.7b", "t4"),
                                             ("olmoe-1b-7b", "t4"), ("dbrx", "2xt4"), ("deepseek-v2-lite", "t4")])
def test_plan_runs_on_every_family_preset(tmp_path, model, hardware):
    out = tmp_path / "plan.json"
    r = cli("task=plan", f"hardware={hardware}", f"model={model}", "workload=mtbench", f"out={out}",
            f"hydra.run.dir={tmp_path / 'h'}")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["policy"]["batch_size"] >= 1 and doc["prediction"]["hrm_tok_s"] > 0
    assert doc["extra"]["memory"]["gpu_total_bytes"] <= doc["extra"]["memory"]["gpu_budget_bytes"]
    # Several GPUs are T x E ranks, each planned against one GPU's budget: the plan gives the split.
    assert ("parallel (T x E)" in r.stdout) == (hardware == "2xt4")
    if hardware == "2xt4":
        par = doc["extra"]["parallel"]
        assert par["tensor"] * par["expert"] == 2 and f"parallel.tensor={par['tensor']}" in r.stdout


def test_deepseek_v3_does_not_fit_and_says_why_in_one_line(tmp_path):
    """DeepSeek-V3's non-expert weights alone (MLA projections of 61 layers, 3 dense MLPs, shared experts,
    embeddings: 34 GB in bf16) exceed a T4, and its 1.3 TB of weights any profile's host."""
    r = cli("task=plan", "hardware=t4", "model=deepseek-v3", "workload=mtbench", f"hydra.run.dir={tmp_path / 'h'}")
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "no policy fits deepseek-v3 on t4" in r.stderr
    assert "non_expert_weights 31.9" in r.stderr   # GiB: 34 GB


@pytest.mark.parametrize("args, expect", [
    (["task=plan", "hardware=4xt4", "model=mixtral-8x22b", "parallel.tensor=3", "parallel.expert=1"],
     "parallel.tensor=3 does not divide model.num_kv_heads=8"),
    (["task=tune", "hardware=2xt4"], "measured several-rank CGOPipe runs are not built yet"),
])
def test_bad_parallel_layouts_exit_2_in_one_line(tmp_path, args, expect):
    r = cli(*args, f"out={tmp_path / 'x.json'}", f"hydra.run.dir={tmp_path / 'h'}")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("moe-lightning: error:") and expect in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_simulating_several_gpus_needs_a_layout_or_the_plan(tmp_path):
    """The same refusals through the API (the CLI prints any ConfigError as one line, exit 2, above)."""
    from moe_lightning.errors import ConfigError
    from moe_lightning.run_config import RunConfig
    from moe_lightning.tasks.simulate import SimulateTask
    from moe_lightning.tuner.presets import load_preset

    two = load_preset("hardware", "2xt4")
    cfg = RunConfig(task=SimulateTask(use_plan=False), hardware=two, out=str(tmp_path / "x.json"))
    with pytest.raises(ConfigError, match="give parallel.tensor and parallel.expert"):
        cfg.task.run(cfg)
    eight = RunConfig(task=SimulateTask(), hardware=load_preset("hardware", "8xh100"),
                      model=load_preset("model", "qwen1.5-moe-a2.7b"), out=str(tmp_path / "x.json"))
    eight.parallel.expert = 8
    with pytest.raises(ConfigError, match="parallel.expert=8 does not divide model.num_experts=60"):
        eight.task.run(eight)


def test_plan_for_a_given_split_records_it_and_prints_the_overrides(tmp_path):
    out = tmp_path / "plan.json"
    r = cli("task=plan", "hardware=4xt4", "model=dbrx", "workload=mtbench", "parallel.tensor=2", "parallel.expert=2",
            f"out={out}", f"hydra.run.dir={tmp_path / 'h'}")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    par, mem = doc["extra"]["parallel"], doc["extra"]["memory"]
    assert (par["tensor"], par["expert"], par["world_size"]) == (2, 2, 4) and par["chunks"] >= 1
    assert mem["per"] == "rank" and mem["gpu_total_bytes"] <= mem["gpu_budget_bytes"] < 15 * 2**30
    assert doc["policy"]["batch_size"] % 2 == 0 and doc["extra"]["prediction"]["t_comm_s"] > 0
    assert "parallel.tensor=2 parallel.expert=2" in r.stdout and "collectives" in r.stdout


def test_cgopipe_s_own_policy_rule_is_the_plan_for_the_run_s_layout(tmp_path):
    """`system.policy_source=auto` is the HRM plan: on several GPUs it is planned for the layout given (or
    the best one, recorded), not for one big GPU."""
    from moe_lightning.run_config import RunConfig
    from moe_lightning.systems import CGOPipeSystem
    from moe_lightning.tasks.simulate import SimulateTask, simulate_system
    from moe_lightning.tuner.presets import load_preset

    two = load_preset("hardware", "2xt4")
    planned, _, _ = simulate_system(RunConfig(task=SimulateTask(), hardware=two), use_plan=True)
    auto = RunConfig(task=SimulateTask(use_plan=False), hardware=two, system=CGOPipeSystem(policy_source="auto"))
    own, _, _ = simulate_system(auto)
    assert own.policy == planned.policy and own.extra["parallel"] == planned.extra["parallel"]
    auto.parallel.expert = 2
    split, _, _ = simulate_system(auto)
    assert split.extra["parallel"]["expert"] == 2 and split.extra["parallel"]["tensor"] == 1
    assert split.policy["batch_size"] % 2 == 0 and split.policy["micro_batch_size"] % 2 == 0


def test_a_simulated_plan_refuses_a_given_kernel_and_a_given_batch():
    """The HRM plan decides batching and placement; a given batch size, which the plan would replace, is
    refused rather than ignored, and so is a given expert kernel: the simulator prices the engine's own
    choice per call (auto), so the kernel's memory was planned and its speed ignored."""
    from moe_lightning.config import Policy
    from moe_lightning.errors import ConfigError
    from moe_lightning.run_config import RunConfig
    from moe_lightning.tasks.simulate import SimulateTask, simulate_system

    doc, _, _ = simulate_system(RunConfig(task=SimulateTask()), use_plan=True)
    assert doc.extra["policy_source"] == "hrm plan" and doc.policy["expert_kernel"] == "auto"
    for use_plan in (True, False):
        with pytest.raises(ConfigError, match=r"policy.expert_kernel=loop: the simulator prices the engine's own "):
            simulate_system(RunConfig(task=SimulateTask(), policy=Policy(expert_kernel="loop")), use_plan=use_plan)
    with pytest.raises(ConfigError, match=r"policy.batch_size=16: task.use_plan=true .* set task.use_plan=false"):
        simulate_system(RunConfig(task=SimulateTask(), policy=Policy(batch_size=16)), use_plan=True)
    given, _, _ = simulate_system(RunConfig(task=SimulateTask(), policy=Policy(batch_size=16, micro_batch_size=8)))
    assert (given.policy["batch_size"], given.policy["micro_batch_size"]) == (16, 8)
    assert given.extra["policy_source"] == "cfg.policy"


def test_simulating_the_plan_of_an_mxfp4_model_keeps_its_scratch_and_fits():
    """gpt-oss-120b on a T4 fits only with the MXFP4 scratch the plan sized (`dequant_experts`): simulating
    the plan runs that policy, within the budget and at the plan's speed, not the whole-layer scratch's."""
    from moe_lightning.engine.weights import resolve_model
    from moe_lightning.run_config import RunConfig
    from moe_lightning.tasks.simulate import SimulateTask, simulate_system
    from moe_lightning.tuner.optimizer import optimize
    from moe_lightning.tuner.presets import load_preset

    cfg = RunConfig(task=SimulateTask(), hardware=load_preset("hardware", "t4"),
                    model=load_preset("model", "gpt-oss-120b"), workload=load_preset("workload", "mtbench"))
    planned = optimize(resolve_model(cfg.model)[0], cfg.hardware, cfg.workload).policy
    assert planned.dequant_experts > 0   # the case: the whole layer's scratch would not fit
    doc, _, _ = simulate_system(cfg, use_plan=True)
    assert doc.policy["dequant_experts"] == planned.dequant_experts
    assert doc.extra["memory_fits"] is True
    assert doc.metrics.throughput_tok_s == pytest.approx(doc.prediction["hrm_tok_s"], rel=0.1)


def test_plan_plans_what_the_engine_runs_and_the_paper_s_four_placements_on_request(tmp_path):
    """Qwen3-30B-A3B on an L4: over the paper's four placements the HRM's pick runs the MoE FFN on the
    CPU, which the engine does not run. task=plan plans what the engine runs by default (the policy
    task=simulate then times); task.placements=all gives the HRM's answer, with a note saying so."""
    args = ("task=plan", "hardware=l4", "model=qwen3-30b-a3b", "workload=mtbench", f"hydra.run.dir={tmp_path / 'h'}")
    engine = cli(*args, f"out={tmp_path / 'engine.json'}")
    paper = cli(*args, "task.placements=all", f"out={tmp_path / 'all.json'}")
    sim = cli("task=simulate", *args[1:], f"out={tmp_path / 'sim.json'}")
    assert engine.returncode == paper.returncode == sim.returncode == 0, (engine.stderr, paper.stderr, sim.stderr)
    engine_doc, paper_doc = (json.loads((tmp_path / f).read_text()) for f in ("engine.json", "all.json"))
    assert engine_doc["policy"]["ffn_on_gpu"] is True and engine_doc["extra"]["runnable"] is True
    assert engine_doc["policy"] == json.loads((tmp_path / "sim.json").read_text())["policy"]
    assert paper_doc["policy"]["ffn_on_gpu"] is False and paper_doc["extra"]["runnable"] is False
    assert "the engine does not run it" in paper.stdout and "does not run" not in engine.stdout


@pytest.mark.parametrize("batch_size, noted", [(16, True), (8, False)])
def test_a_batch_larger_than_the_workload_is_noted_beside_the_hrm_column(batch_size, noted):
    """The HRM prices a full batch of N; the simulator runs the workload's requests: when N exceeds them,
    the table says why the two columns' step times differ."""
    from moe_lightning.config import Policy, Workload
    from moe_lightning.run_config import RunConfig
    from moe_lightning.tasks.simulate import SimulateTask, simulate_system, summary

    cfg = RunConfig(task=SimulateTask(use_plan=False), workload=Workload(num_requests=8, gen_len=4),
                    policy=Policy(batch_size=batch_size, micro_batch_size=4))
    report, sim, hrm = simulate_system(cfg)
    assert ("N=16 exceeds the workload's 8 requests" in summary(report, sim, hrm)) is noted


@pytest.mark.parametrize("gen_len", [1, 8])
def test_plan_and_simulate_charge_gen_len_minus_one_decode_steps(tmp_path, gen_len):
    """The prefill makes each request's first token, so a batch runs gen_len - 1 decode steps: with
    gen_len 1 task=plan predicts no decode time and no step, and task=simulate's HRM column shows the
    simulated 0.000 s; with 8, seven steps of the plan's median step."""
    from moe_lightning.config import Policy, Workload
    from moe_lightning.run_config import RunConfig
    from moe_lightning.tasks.plan import PlanTask
    from moe_lightning.tasks.simulate import SimulateTask, simulate_system, summary
    from moe_lightning.tuner.presets import load_preset

    parts = dict(model=load_preset("model", "mixtral-8x7b"), hardware=load_preset("hardware", "t4"),
                 workload=Workload(num_requests=8, gen_len=gen_len))
    plan = PlanTask().run(RunConfig(task=PlanTask(), run_dir=str(tmp_path), **parts))
    m, step = plan.metrics, plan.metrics.decode_step_median_s
    assert m.decode_s == pytest.approx(0 if gen_len == 1 else 7 * step)
    assert (step is None) == (gen_len == 1)
    report, sim, hrm = simulate_system(RunConfig(task=SimulateTask(use_plan=False), policy=Policy(
        batch_size=8, micro_batch_size=4), **parts))
    assert report.prediction["hrm_workload_decode_s"] == pytest.approx(sim.decode_s, rel=0.2, abs=1e-12)
    if gen_len == 1:
        row = next(line for line in summary(report, sim, hrm).splitlines() if "decode s, whole workload" in line)
        assert row.split()[-2:] == ["0.000", "0.000"]


@pytest.mark.parametrize("prompts, gen_len, ok", [(None, 4096 - 32, True), (None, 4096 - 31, False),
                                                  ([5, 3000], 1096, True), ([5, 3000], 1097, False)])
def test_plan_and_simulate_refuse_a_workload_beyond_the_model_s_positions(tmp_path, prompts, gen_len, ok):
    """The longest prompt plus gen_len must fit max_position_embeddings (tiny-mixtral: 4096), as task=generate
    requires: the synthetic prompts' longest (32 here, the seeded draw generate makes) or the file's."""
    from moe_lightning.config import ModelSpec, Workload
    from moe_lightning.errors import WorkloadError
    from moe_lightning.tasks.plan import planning_workload

    spec = ModelSpec()
    if prompts is None:
        workload = Workload(prompt_len_avg=24, prompt_len_max=32, num_requests=64, gen_len=gen_len)
    else:
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps({"input_ids": [4] * n}) + "\n" for n in prompts))
        workload = Workload(name="jsonl", path=str(path), gen_len=gen_len)
    if ok:
        planning_workload(workload, spec)
        return
    longest = 32 if prompts is None else 3000
    with pytest.raises(WorkloadError, match=rf"a prompt of {longest} tokens plus workload.gen_len={gen_len} exceeds "
                                            "model.max_position_embeddings=4096"):
        planning_workload(workload, spec)


@pytest.mark.parametrize("given", [{"batch_size": 64}, {"micro_batch_size": 2}, {"expert_gpu_fraction": 0.5},
                                   {"expert_kernel": "loop"}, {"dequant_experts": 2}])
def test_a_plan_refuses_a_given_policy_field(tmp_path, given):
    """task=plan chooses every policy field: one given beside it would be replaced by the plan's and the
    document would not say so; it is refused, naming the field and the task that predicts a given policy."""
    from moe_lightning.config import Policy
    from moe_lightning.errors import ConfigError
    from moe_lightning.run_config import RunConfig
    from moe_lightning.tasks.plan import PlanTask

    (name, value), = given.items()
    cfg = RunConfig(task=PlanTask(), policy=Policy(**given), run_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=rf"^policy.{name}={value}: task=plan chooses the whole policy .* "
                                          "task=simulate task.use_plan=false"):
        cfg.task.run(cfg)
    assert not list(tmp_path.iterdir())
    PlanTask().run(RunConfig(task=PlanTask(), run_dir=str(tmp_path)))   # the defaults plan
    assert (tmp_path / "run.json").is_file()


def test_a_plan_is_cgopipe_s_and_says_so(tmp_path):
    """task=plan gives CGOPipe's HRM plan: its document says cgopipe (reference stands for the engine, as
    under task=simulate), and a baseline, whose name would mislabel the plan in task=report, is refused."""
    from moe_lightning.errors import ConfigError
    from moe_lightning.run_config import RunConfig
    from moe_lightning.systems import SYSTEM_CONFIGS
    from moe_lightning.tasks.plan import PlanTask

    doc = PlanTask().run(RunConfig(task=PlanTask(), run_dir=str(tmp_path)))   # RunConfig's default: reference
    assert doc.system == "cgopipe"
    for name in ("flexgen", "deepspeed", "accelerate"):
        cfg = RunConfig(task=PlanTask(), system=SYSTEM_CONFIGS[name](), out=str(tmp_path / f"{name}.json"))
        with pytest.raises(ConfigError, match=rf"^system={name}: task=plan gives CGOPipe's HRM plan"):
            cfg.task.run(cfg)
        assert not (tmp_path / f"{name}.json").exists()


def test_no_decode_step_is_null_in_simulate_and_plan_as_in_generate(tmp_path, tiny_path):
    """gen_len 1: the prefill makes every request's only token, so no decode step runs. The engine's run
    document says decode tok/s null (nothing to divide by); the simulator and the HRM say the same for
    the same workload, not 0.0, which would read as a measured zero, and their tables show no rate."""
    run = ("system=cgopipe", "workload.num_requests=4", "workload.gen_len=1", f"hydra.run.dir={tmp_path / 'h'}")
    given = ("policy.batch_size=4", "policy.micro_batch_size=2")
    gen = cli("task=generate", *run, *given, "task.progress=false", f"out={tmp_path / 'gen.json'}",
              f"outputs={tmp_path / 'out.jsonl'}")
    sim = cli("task=simulate", "task.use_plan=false", *run, *given, f"out={tmp_path / 'sim.json'}")
    plan = cli("task=plan", *run, f"out={tmp_path / 'plan.json'}")
    assert gen.returncode == sim.returncode == plan.returncode == 0, (gen.stderr, sim.stderr, plan.stderr)
    gen_doc, sim_doc, plan_doc = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("gen", "sim", "plan"))
    assert gen_doc["metrics"]["decode_tok_s"] is None   # the engine's answer, which the others must match
    assert sim_doc["metrics"]["decode_tok_s"] is None and sim_doc["metrics"]["decode_step_median_s"] is None
    assert sim_doc["prediction"]["sim_decode_tok_s"] is None and sim_doc["prediction"]["hrm_decode_tok_s"] is None
    assert sim_doc["extra"]["simulation"]["decode_tok_s"] is None
    assert plan_doc["metrics"]["decode_tok_s"] is None and plan_doc["prediction"]["hrm_decode_tok_s"] is None
    decode_row = next(line for line in sim.stdout.splitlines() if "decode tok/s" in line)
    assert decode_row.split()[2:4] == ["-", "-"] and "no decode step" in decode_row
    assert "no decode step" in next(line for line in plan.stdout.splitlines() if "decode tokens/s" in line)
