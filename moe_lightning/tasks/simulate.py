"""task=simulate: time cfg.system's schedule on cfg.hardware with the simulator, no device needed.

The policy is the HRM plan's (`use_plan=true`, the FFN kept on the GPU as the CGOPipe schedule needs;
policy.* batching and placement given beside it are refused, not ignored) or cfg.policy. Several GPUs:
the layout is `parallel.tensor` x `parallel.expert` when given, else the plan's; one rank is simulated
with its collectives (`tuner.simulator.simulate_run`). Prints tokens/s, prefill and decode time and
per-resource utilisation beside the HRM prediction; writes the run
document and, with `plot=true`, a Gantt chart of the first graphs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moe_lightning.config import ruled_policy
from moe_lightning.errors import ConfigError, MemoryBudgetError
from moe_lightning.report import RunReport, as_dict, environment
from moe_lightning.tasks.plan import beside, budgets_note, out_path, planning_inputs, planning_model

if TYPE_CHECKING:
    from moe_lightning.run_config import RunConfig  # type hints only: it sits above the tasks


# System name -> the schedule the simulator times. `reference` has no offloading schedule of its own;
# it stands for the engine's, CGOPipe. The baselines time their own schedules with their own policies.
SIMULATED_SCHEDULES = {"cgopipe": "cgopipe", "reference": "cgopipe", "flexgen": "flexgen", "flexgen_c": "flexgen_c",
                       "deepspeed": "deepspeed", "fastdecode": "fastdecode"}


def schedule_of(name: str):
    if name == "cgopipe":
        from moe_lightning.engine.cgopipe import CGOPIPE

        return CGOPIPE
    from moe_lightning.baselines.schedules import SCHEDULES

    return SCHEDULES[name]


def refuse_given_kernel(kernel: str, instead: str = "drop it, or measure that kernel with task=bench") -> None:
    """The simulator (and the HRM) price the MoE FFN at the rate of the engine's own choice per call
    (`auto`; a calibrated profile measures that one, `tuner.costs`): a given kernel would be planned for
    memory but timed as another, so it is refused rather than recorded beside a figure it did not set."""
    if kernel != "auto":
        raise ConfigError(f"policy.expert_kernel={kernel}: the simulator prices the engine's own choice per call "
                          f"(auto), so {kernel}'s speed would be ignored; {instead}")


def simulate_policy(cfg: RunConfig, spec, workload, policy, lengths=None, gen_lens=None, layout=None):
    """The simulator's run of `policy` as cfg.system runs it (`SimResult`): the system's schedule and its KV
    settings (system.kv_block_size, kv_cache_tokens, refill; a baseline's dense cache), each request to its
    own budget (`gen_lens`), a long workload's decode steps capped as `default_max_decode_steps` says.
    task=simulate and a simulated tune's trials both time a policy through here, so a tuned policy's
    simulated figure is the one task=simulate gives it."""
    from moe_lightning.tuner.simulator import default_max_decode_steps, simulate_run

    system = cfg.system
    refuse_given_kernel(policy.expert_kernel)
    if system.name not in SIMULATED_SCHEDULES:
        raise ConfigError(f"system {system.name} has no schedule to simulate; measure it with task=compare "
                          f"(simulated: {', '.join(SIMULATED_SCHEDULES)})")
    return simulate_run(spec, cfg.hardware, workload, policy, lengths,
                        schedule=schedule_of(SIMULATED_SCHEDULES[system.name]),
                        max_decode_steps=default_max_decode_steps(workload, policy, spec),
                        kv_block_size=getattr(system, "kv_block_size", 0),
                        kv_tokens=getattr(system, "kv_cache_tokens", 0) or None,
                        refill=getattr(system, "refill", True), parallel=layout, gen_lens=gen_lens)


def simulate_system(cfg: RunConfig, *, given=None, use_plan: bool = False):
    """Time cfg.system's schedule on cfg.hardware: -> (run document, SimResult, HRM Prediction).

    The policy: `given` (e.g. a tuned one); else the system's own rule (`policy_source=auto`); else the
    HRM plan (`use_plan`); else cfg.policy. A rule or plan decides batching and placement (a given one
    is refused, not ignored) and keeps cfg.policy's expert kernel (auto: `refuse_given_kernel`). Nothing
    is allocated: no model weights, no device."""
    from moe_lightning.memory import memory_plan
    from moe_lightning.systems import paged_kv
    from moe_lightning.tuner.hrm import predict
    from moe_lightning.tuner.optimizer import FFN_ON_GPU, optimize

    system = cfg.system.name
    if system not in SIMULATED_SCHEDULES:
        raise ConfigError(f"system {system} has no schedule to simulate; measure it with task=compare (simulated: "
                          f"{', '.join(SIMULATED_SCHEDULES)})")
    schedule = SIMULATED_SCHEDULES[system]
    paged = paged_kv(cfg.system)
    spec = planning_model(cfg.model)
    workload, lengths, gen_lens, own = planning_inputs(cfg.workload, spec)
    hw, asked = cfg.hardware, cfg.parallel
    several = hw.gpu.count > 1 or asked.world_size > 1
    if several and schedule != "cgopipe":
        raise ConfigError(f"system={system} on hardware={hw.name}: the baselines' schedules run on one GPU; simulate "
                          "them on a one-GPU profile (several GPUs: system=cgopipe)")
    layout = asked if asked.world_size > 1 else None
    auto = getattr(cfg.system, "policy_source", "given") == "auto"
    if given is not None:
        policy, source = given, "given"
    elif auto and system != "cgopipe":  # the system's own rule (baselines)
        policy = cfg.system.resolve_policy(spec, hw, workload, cfg.policy)
        source = f"{system} policy rule"
    elif use_plan or auto:  # HRM's plan (CGOPipe's own rule; for a baseline with given: the paper's ablation)
        planned = optimize(spec, hw, workload, placements=FFN_ON_GPU, paged_kv=paged, lengths=lengths,
                           parallel=asked)
        rule, instead = (("system.policy_source=auto (the HRM plan)", "set system.policy_source=given")
                         if auto else ("task.use_plan=true (the HRM plan)", "set task.use_plan=false"))
        policy = ruled_policy(planned.policy, cfg.policy, rule, f"{instead} to simulate the given policy")
        source = "hrm plan"
        if several:
            layout = dataclasses.replace(asked, tensor=planned.parallel.tensor, expert=planned.parallel.expert)
    else:
        policy, source = cfg.policy, "cfg.policy"
    if several and layout is None:
        raise ConfigError(f"hardware={hw.name} has {hw.gpu.count} GPUs: give parallel.tensor and parallel.expert "
                          f"(T x E = {hw.gpu.count}) for this policy, or let the plan choose them (task.use_plan=true)")
    from moe_lightning.tuner.parallel import rank_view

    view = rank_view(spec, hw, layout)
    hrm = predict(spec, hw, workload, policy, paged_kv=paged, lengths=lengths, parallel=layout)
    plan = memory_plan(view.spec, view.policy(policy), view.workload(workload),
                       kv_tokens=getattr(cfg.system, "kv_cache_tokens", 0) or None, paged=paged,
                       lengths=view.lengths(workload, lengths))
    fits = plan.fits(view.hw)
    if not fits:   # as task=generate refuses it: a timing of a run that could not happen is no answer
        raise MemoryBudgetError(f"{plan.describe(view.hw)}; lower policy.batch_size or policy.micro_batch_size, "
                                "or simulate the plan's policy (task.use_plan=true)")
    sim = simulate_policy(cfg, spec, workload, policy, lengths, gen_lens, layout)
    batches = sim.num_batches
    metrics = sim.metrics()
    metrics.peak_gpu_bytes, metrics.peak_cpu_bytes = plan.gpu_total_bytes, plan.cpu_total_bytes  # as planned
    report = RunReport(
        system=schedule, task="simulate", model=as_dict(spec),
        hardware={"profile": as_dict(cfg.hardware), "detected": None}, workload=as_dict(workload) | (own or {}),
        policy=as_dict(policy), metrics=metrics, environment=environment(),
        # Predictions are HRM's (kind: predicted); hrm_* times are per batch, hrm_workload_* for the whole
        # workload (ceil(requests / N) batches), as the simulated metrics are.
        prediction={"kind": "predicted", "hrm_tok_s": hrm.e2e_tok_s, "sim_tok_s": sim.throughput_tok_s,
                    "hrm_decode_tok_s": hrm.decode_tok_s, "sim_decode_tok_s": sim.decode_tok_s,
                    "hrm_prefill_s": hrm.prefill_s, "hrm_decode_s": hrm.decode_s,
                    "hrm_workload_prefill_s": hrm.prefill_s * batches,
                    "hrm_workload_decode_s": hrm.decode_s * batches, "batches": batches,
                    "hrm_bottleneck": hrm.bottleneck},
        extra={"requested_system": system, "system": as_dict(cfg.system), "schedule": schedule,
               "policy_source": source, "memory_fits": fits,
               "simulation": sim.summary()})
    if several:   # the layout simulated; memory (peak_*_bytes, memory_fits) is one rank's
        report.extra["parallel"] = dataclasses.asdict(layout) | {"world_size": layout.world_size,
                                                                 "memory_per": "rank"}
        if hrm.parallel is not None:
            report.prediction["hrm_chunks"] = hrm.parallel.chunks
            report.prediction["hrm_t_comm_s"] = hrm.t_comm
    return report, sim, hrm


@dataclass
class SimulateTask:
    name: str = "simulate"
    plot: bool = False
    use_plan: bool = True

    def run(self, cfg: RunConfig) -> RunReport:
        report, sim, hrm = simulate_system(cfg, use_plan=self.use_plan)
        spec, policy, schedule = report.model, report.policy, report.system
        out = out_path(cfg)
        print(summary(report, sim, hrm))
        if cfg.trace:
            trace = sim.timeline.write_chrome_trace(beside(out, "trace.json"))
            report.extra["chrome_trace"] = str(trace)
            print(f"chrome trace: {trace}")
        if self.plot:
            png = sim.timeline.write_gantt(
                beside(out, "gantt.png"),
                title=f"simulated {schedule}: {spec['name']} on {cfg.hardware.name}, N={policy['batch_size']}, "
                      f"mu={policy['micro_batch_size']} (prefill + first decode steps)", max_graphs=3)
            report.extra["gantt_png"] = str(png)
            print(f"gantt: {png}")
        report.to_json(out)
        print(f"run document: {out}")
        return report


def summary(report: RunReport, sim, hrm) -> str:
    p, m = report.policy, report.metrics
    b = sim.num_batches
    note = "" if report.extra["requested_system"] == report.system else \
        f" (system={report.extra['requested_system']} has no offloading schedule; simulated {report.system})"
    util = "  ".join(f"{k} {v:.0%}" for k, v in sim.utilisation.items()) or "- (no decode step)"
    pre_util = "  ".join(f"{k} {v:.0%}" for k, v in sim.prefill_utilisation.items())
    profile = report.hardware["profile"]["name"]
    head = f"  {'':26}{'simulated':>12}{'predicted (HRM)':>17}"
    # None: no decode step (gen_len 1), shown "-" as task=compare does, never as a rate of 0
    decode = "".join(f"{'-' if v is None else f'{v:.2f}':>{w}}"
                     for v, w in ((m.decode_tok_s, 12), (hrm.decode_tok_s, 17)))
    decode += "  (no decode step)" if m.decode_tok_s is None else ""
    par = report.extra.get("parallel")
    lines = [f"parallel: tensor={par['tensor']} x expert={par['expert']} ({par['world_size']} ranks; one rank of each "
             f"expert group simulated with its all-reduces and EPS-pipelined all-to-alls, the groups in lockstep; "
             f"memory per rank)"] if par else []
    lines += [
        f"simulated {report.system}{note}: {report.model['name']} on profile {profile} (no device used), "
        f"workload {report.workload['name']} ({sim.num_requests} requests = {b} batch{'es' if b != 1 else ''} of "
        f"N={p['batch_size']}, gen {report.workload['gen_len']})",
        f"  policy        N={p['batch_size']} mu={p['micro_batch_size']} attn_on_gpu={p['attn_on_gpu']} "
        f"r_w={p['expert_gpu_fraction']:.3g} r_c={p['kv_gpu_fraction']:.3g} ({report.extra['policy_source']})",
        head,
        f"  {'tokens/s':<26}{m.throughput_tok_s:>12.2f}{hrm.e2e_tok_s:>17.2f}",
        f"  {'decode tok/s':<26}{decode}",
        f"  {'prefill s, whole workload':<26}{m.prefill_s:>12.3f}{hrm.prefill_s * b:>17.3f}",
        f"  {'decode s, whole workload':<26}{m.decode_s:>12.3f}{hrm.decode_s * b:>17.3f}",
        f"  {'prefill s, per batch':<26}{m.prefill_s / b:>12.3f}{hrm.prefill_s:>17.3f}",
        f"  {'decode s, per batch':<26}{m.decode_s / b:>12.3f}{hrm.decode_s:>17.3f}",
        f"  simulated decode utilisation   {util}",
        f"  simulated prefill utilisation  {pre_util}",
        f"  HRM bottleneck: {hrm.bottleneck}; simulated {sim.tasks_simulated} tasks in {sim.sim_wall_s:.2f} s",
    ]
    lines += [f"  note: {n}" for n in sim.notes]
    note = budgets_note({"max_new_tokens": report.workload["max_new_tokens"]} if "max_new_tokens" in report.workload
                        else None, simulated=True)
    lines += [f"  {note}"] if note else []
    if p["batch_size"] > sim.num_requests:
        lines.append(f"  note: N={p['batch_size']} exceeds the workload's {sim.num_requests} requests: the HRM "
                     f"column prices the steps of a full batch of N, the simulator runs the {sim.num_requests}; "
                     f"give workload.num_requests >= N to compare them")
    return "\n".join(lines)
