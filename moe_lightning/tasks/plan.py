"""task=plan: the HRM policy optimizer for cfg.model on cfg.hardware for cfg.workload.

Prints the plan table, writes the run document (policy, HRM prediction, the plan with its bottleneck
and memory per pool in `extra`) and, with `plot=true`, the roofline figure beside it. Several GPUs: the
plan is for `parallel.tensor` x `parallel.expert` when given (refused in one line if it cannot run),
else for the best split the optimizer finds; the table and `extra.parallel` give T, E and the overrides.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moe_lightning.config import ModelSpec, Policy, Workload, field_names, refuse_ignored_fields
from moe_lightning.errors import ConfigError
from moe_lightning.report import Metrics, RunReport, as_dict, environment

if TYPE_CHECKING:
    from moe_lightning.run_config import RunConfig  # type hints only: it sits above the tasks


def planning_model(model: ModelSpec) -> ModelSpec:
    """The shapes to plan for: the preset's own, or a checkpoint folder's config.json for model=hf."""
    if model.weights == "checkpoint" and model.path:
        from moe_lightning.engine.weights import spec_from_hf_config

        found = spec_from_hf_config(model.path, name=model.name, run_dtype=model.dtype)
        if model.name != "hf":
            found.num_layers = min(found.num_layers, model.num_layers)
        if model.dtype != "auto":
            found.dtype = model.dtype
        return found
    if model.name == "hf":
        raise ConfigError("model=hf takes its shapes from a checkpoint's config.json: give "
                          "model.path=<folder>, or plan a preset such as model=mixtral-8x7b")
    return model


def planning_workload(workload: Workload, spec: ModelSpec) -> tuple[Workload, list[int] | None]:
    """The workload to plan for and, for a prompts file, its real prompt lengths (else None): see
    `planning_inputs`."""
    planned, lengths, _, _ = planning_inputs(workload, spec)
    return planned, lengths


def planning_inputs(workload: Workload, spec: ModelSpec) -> tuple[Workload, list[int] | None, list[int] | None,
                                                                  dict | None]:
    """(The workload to plan for, a prompts file's real prompt lengths, each request's own generation budget,
    a summary of those budgets (`workload_io.budgets`)); None where the workload is synthetic or gives no
    budgets. A prompts file is planned at its own lengths and its longest budget
    (`workload_io.longest_budget`), which is what task=generate sizes the KV cache for. The HRM plans every
    request at that budget (its memory plan holds it); the simulator, given the budgets, stops each request
    at its own as the engine does. Refused as task=generate refuses it (`workload_io.check_requests`): a
    plan or a simulation of a run that could not happen is no answer."""
    if not workload.path:
        if workload.name == "jsonl":
            raise ConfigError("workload=jsonl takes its prompt lengths from a prompts file: give "
                              "workload.path=<file.jsonl>, or plan a preset such as workload=mtbench")
        from moe_lightning.memory import prompt_lengths
        from moe_lightning.workload_io import check_context

        check_context(max(prompt_lengths(workload)), workload, spec)   # the synthetic prompts generate draws
        return workload, None, None, None
    from moe_lightning.tokenizer import tokenizer_for
    from moe_lightning.workload_io import budgets, load_requests, longest_budget

    tokenizer = tokenizer_for(spec)
    requests = load_requests(workload, spec, tokenizer)
    lengths = [len(r.input_ids) for r in requests]
    planned = dataclasses.replace(workload, prompt_len_avg=math.ceil(sum(lengths) / len(lengths)),
                                  prompt_len_max=max(lengths), num_requests=len(lengths),
                                  gen_len=longest_budget(requests, workload))
    own = budgets(requests, workload)
    return planned, lengths, [r.max_new_tokens or workload.gen_len for r in requests] if own else None, own


def budgets_note(own: dict | None, simulated: bool = False) -> str | None:
    """One line saying how a prompts file's own budgets were planned, and with `simulated` how the simulator
    ran them (None: it gives none)."""
    if not own:
        return None
    b = own["max_new_tokens"]
    rest = f", workload.gen_len={b['workload_gen_len']} the others'" if b["rows_with_own"] < b["rows"] else ""
    head = (f"note: the prompts file's budgets run {b['shortest']}-{b['longest']} new tokens ({b['rows_with_own']} of "
            f"{b['rows']} rows give max_new_tokens{rest}): ")
    hrm = f"the HRM plans every request at gen_len={b['longest']}, the longest (the KV cache holds it)"
    if simulated:
        return (head + "simulated with each request stopping at its own budget, as the engine runs it; " + hrm)
    return (head + hrm + "; the engine stops each request at its own budget, so a run generates fewer tokens "
            "than planned (task=simulate times the run with each request's own budget)")


def refuse_other_system(name: str) -> None:
    """task=plan gives CGOPipe's HRM plan, and its document says cgopipe: `reference` (which has no
    offloading policy) stands for the engine, as under task=simulate; a baseline is refused, since its
    name on CGOPipe's plan would mislabel the plan and its prediction (task=report's rows included)."""
    if name in ("cgopipe", "reference"):
        return
    from moe_lightning.tasks.simulate import SIMULATED_SCHEDULES

    own = (f"for {name}'s own policy and its HRM prediction run task=simulate system={name}, or"
           if name in SIMULATED_SCHEDULES else "")
    raise ConfigError(f"system={name}: task=plan gives CGOPipe's HRM plan, not {name}'s policy; {own} plan with "
                      "system=cgopipe")


def refuse_unplanned_kv(system) -> bool:
    """Whether the plan holds CGOPipe's paged KV cache: system=cgopipe's as system.kv_block_size says (0: a
    dense cache, planned at the longest prompt), the engine's default for `reference`. A cache of a given
    size (system.kv_cache_tokens) is refused: the plan sizes the cache for the batch it chooses."""
    from moe_lightning.systems import paged_kv

    if getattr(system, "kv_cache_tokens", 0):
        raise ConfigError(f"system.kv_cache_tokens={system.kv_cache_tokens}: task=plan sizes the KV cache for the "
                          "batch it chooses, so it would be ignored; drop it, or time a policy with that cache: "
                          "task=simulate task.use_plan=false")
    return paged_kv(system) if system.name == "cgopipe" else True


def out_path(cfg: RunConfig) -> Path:
    return Path(cfg.out) if cfg.out else Path(cfg.run_dir or "runs/latest") / "run.json"


def beside(out: Path, suffix: str) -> Path:
    """A file next to the run document: run.json -> run.<suffix> (as task=generate names its trace)."""
    return out.with_name(f"{out.stem}.{suffix}")


@dataclass
class PlanTask:
    name: str = "plan"
    plot: bool = False
    last_batch: str = "full"   # the objective's charge for a last partial batch: full | prorated (hrm.throughput)
    kernel_rates: str = "peak"   # peak (the paper's HRM) | calibrated (the profile's measured curves, task=calibrate)
    # engine: the placements the CGOPipe engine runs (the MoE FFN on the GPU, attention on either side);
    # all: the paper's four (A_g, F_g), FFN on the CPU included, which is planned but not run
    placements: str = "engine"

    def __post_init__(self) -> None:
        from moe_lightning.tuner.hrm import LAST_BATCH

        if self.last_batch not in LAST_BATCH:
            raise ConfigError(f"task.last_batch={self.last_batch}: expected one of {', '.join(LAST_BATCH)}")
        if self.kernel_rates not in ("peak", "calibrated"):
            raise ConfigError(f"task.kernel_rates={self.kernel_rates}: expected one of peak, calibrated")
        if self.placements not in ("engine", "all"):
            raise ConfigError(f"task.placements={self.placements}: expected one of engine, all")

    def run(self, cfg: RunConfig) -> RunReport:
        from moe_lightning.tuner.optimizer import ALL_PLACEMENTS, FFN_ON_GPU, optimize, plan_document, plan_table

        refuse_other_system(cfg.system.name)
        # The plan is the whole policy, the expert kernel and the MXFP4 scratch included (the memory plan
        # charges their workspaces): a field given beside it would be silently replaced, as under
        # task=simulate's task.use_plan=true, and is refused likewise.
        refuse_ignored_fields(cfg.policy, "task=plan chooses the whole policy (the HRM plan)",
                              "to predict a given policy run task=simulate task.use_plan=false with it",
                              tuple(field_names(Policy)))
        paged = refuse_unplanned_kv(cfg.system)
        spec = planning_model(cfg.model)
        workload, lengths, _, own = planning_inputs(cfg.workload, spec)
        plan = optimize(spec, cfg.hardware, workload, lengths=lengths, last_batch=self.last_batch, paged_kv=paged,
                        calibrated=self.kernel_rates == "calibrated", parallel=cfg.parallel,
                        placements=FFN_ON_GPU if self.placements == "engine" else ALL_PLACEMENTS)
        doc = plan_document(plan) | {"last_batch": self.last_batch, "kernel_rates": self.kernel_rates,
                                     "placements": self.placements, "runnable": plan.policy.ffn_on_gpu}
        pred = plan.prediction
        out = out_path(cfg)
        report = RunReport(
            system="cgopipe", task=self.name, model=as_dict(spec),
            hardware={"profile": as_dict(cfg.hardware)}, workload=as_dict(workload) | (own or {}),
            policy=as_dict(plan.policy), environment=environment(),
            # tokens/s over the whole workload; times, tokens and the step of one batch of N (as HRM prices it)
            metrics=Metrics(kind="predicted", throughput_tok_s=pred.e2e_tok_s, decode_tok_s=pred.decode_tok_s,
                            prefill_s=pred.prefill_s, decode_s=pred.decode_s,
                            generated_tokens=plan.policy.batch_size * workload.gen_len,
                            decode_step_median_s=pred.decode_step_s,   # None: no decode step (gen_len 1)
                            peak_gpu_bytes=plan.prediction.memory.gpu_total_bytes,
                            peak_cpu_bytes=plan.prediction.memory.cpu_total_bytes),
            prediction={"hrm_tok_s": pred.e2e_tok_s, "hrm_decode_tok_s": pred.decode_tok_s,
                        "hrm_prefill_s": pred.prefill_s, "hrm_decode_s": pred.decode_s,
                        "bottleneck": pred.bottleneck},
            extra=doc)
        print(plan_table(plan))
        if budgets_note(own):
            print(budgets_note(own))
        print(f"kernel rates: {self.kernel_rates}" + (" (profile peaks, as the paper's HRM; task.kernel_rates="
                                                       "calibrated uses the profile's measured curves)"
                                                       if self.kernel_rates == "peak" else
                                                       " (the profile's measured curves, where it has them)"))
        if self.plot:
            from moe_lightning.tuner.parallel import rank_view
            from moe_lightning.tuner.roofline_plot import plot_roofline

            view = rank_view(spec, cfg.hardware, plan.parallel)   # several GPUs: one rank's roofline
            png = plot_roofline(view.spec, view.hw, view.workload(workload), view.policy(plan.policy),
                                beside(out, "roofline.png"))
            report.extra["roofline_png"] = str(png)
            print(f"roofline: {png}")
        report.to_json(out)
        print(f"run document: {out}")
        return report
