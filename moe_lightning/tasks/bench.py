"""task=bench: a warmed-up, timed generation run of one system, with what was achieved printed beside
what the hardware allows (HRM prediction, link bound) and the run document written."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moe_lightning.config import GB, HOST_WAIT_S, check_repeats, check_warmup
from moe_lightning.report import RunReport
from moe_lightning.tasks.generate import run_generation, summary_line, write_trace

if TYPE_CHECKING:
    from moe_lightning.run_config import RunConfig  # type hints only: it sits above the tasks

log = logging.getLogger("moe_lightning.bench")


def link_bound_tok_s(cfg: RunConfig, spec, gen_len: int) -> float | None:
    """Decode tokens/s if the link did nothing but stream experts: N * B_link / (L * streamed bytes).
    `gen_len`: the longest generation budget the run ran (`workload_io.longest_budget`: a prompts file's
    rows set their own max_new_tokens), not workload.gen_len."""
    from moe_lightning.memory import resident_experts_per_layer

    if gen_len <= 1:   # no decode step to bound (the measured decode_tok_s is None then too)
        return None
    n_str = spec.num_experts - resident_experts_per_layer(spec, cfg.policy.expert_gpu_fraction)
    streamed = n_str * spec.expert_stream_bytes
    if streamed == 0:
        return None
    return cfg.policy.batch_size * cfg.hardware.link.h2d_gbps * GB / (spec.num_moe_layers * streamed)


def _split(cfg: RunConfig):
    """The run's T x E ranks for the HRM, or None for one rank."""
    return cfg.parallel if cfg.parallel.world_size > 1 else None


def planned_workload(cfg: RunConfig, spec):
    """(workload, prompt lengths) the HRM plans and predicts this run for: a prompts file's real lengths in
    tokens (`planning_workload`, as task=plan plans; workload=jsonl's own lengths are placeholders)."""
    from moe_lightning.tasks.plan import planning_workload

    return planning_workload(cfg.workload, spec)


def with_planned_policy(cfg: RunConfig) -> RunConfig:
    """`cfg` with the HRM-optimal batching and placement (the expert kernel kept from cfg.policy), among
    the placements the engine runs, for the prompts the run generates: task=plan's plan."""
    import dataclasses

    from moe_lightning.config import ruled_policy
    from moe_lightning.engine.weights import resolve_model
    from moe_lightning.systems import paged_kv
    from moe_lightning.tuner.optimizer import FFN_ON_GPU, optimize

    spec, _ = resolve_model(cfg.model)
    workload, lengths = planned_workload(cfg, spec)
    planned = optimize(spec, cfg.hardware, workload, placements=FFN_ON_GPU, paged_kv=paged_kv(cfg.system),
                       lengths=lengths, parallel=_split(cfg)).policy
    policy = ruled_policy(planned, cfg.policy, "task.plan=true (the HRM plan)",
                          "drop task.plan to run the given policy")
    print(f"HRM plan: N={policy.batch_size} mu={policy.micro_batch_size} attn_on_gpu={policy.attn_on_gpu} "
          f"r_w={policy.expert_gpu_fraction:.3f} r_c={policy.kv_gpu_fraction:.3f}")
    return dataclasses.replace(cfg, policy=policy)


@dataclass
class BenchTask:
    name: str = "bench"
    warmup_tokens: int = 2
    repeats: int = 5            # timed passes over the whole workload after the warm-up (median, spread)
    max_cv: float = 0.10        # a throughput coefficient of variation above this marks the run noisy
    min_repeat_s: float = 0.5   # a shorter workload is run several times per repeat (pyperf's loops)
    host_wait_s: float = HOST_WAIT_S   # waiting out, and re-timing in, a slowed host: this long at most
    progress: bool = True
    plan: bool = False          # run the HRM optimizer's policy for this hardware, model and workload

    def __post_init__(self) -> None:
        check_repeats(self.repeats, self.max_cv, "task", self.min_repeat_s, self.host_wait_s)
        check_warmup(self.warmup_tokens, "task")

    def run(self, cfg: RunConfig) -> RunReport:
        if self.plan:
            cfg = with_planned_policy(cfg)
        gen = run_generation(cfg, progress=self.progress, warmup_tokens=self.warmup_tokens, repeats=self.repeats,
                             max_cv=self.max_cv, min_repeat_s=self.min_repeat_s, host_wait_s=self.host_wait_s)
        report = gen.report
        from moe_lightning.config import ModelSpec, Policy

        spec = ModelSpec(**report.model)
        # The prediction and the bound are the policy's that ran: a baseline's rule, or system.policy_source=auto,
        # replaces cfg.policy inside the run (the document records the one it ran).
        ran = dataclasses.replace(cfg, policy=Policy(**report.policy))
        try:
            from moe_lightning.systems import paged_kv
            from moe_lightning.tuner.hrm import predict

            workload, lengths = planned_workload(ran, spec)
            hrm = predict(spec, ran.hardware, workload, ran.policy, paged_kv=paged_kv(ran.system), lengths=lengths,
                          parallel=_split(ran))
            report.prediction.update(kind="predicted", hrm_tok_s=hrm.e2e_tok_s)
        except Exception as exc:  # noqa: BLE001 - a prediction is a bonus, never a failure
            log.info("no HRM prediction: %s", exc)
        bound = link_bound_tok_s(ran, spec, report.workload["actual"]["gen_len"])   # the budget the engine ran
        report.extra["link_bound_decode_tok_s"] = bound
        out = Path(cfg.out) if cfg.out else Path(cfg.run_dir or "runs/latest") / "run.json"
        if cfg.trace:
            write_trace(gen, out.parent, out.stem)
        report.to_json(out)
        print(format_bench(report))
        print(f"run document: {out}")
        return report


def format_bench(report: RunReport) -> str:
    m = report.metrics
    lines = [summary_line(report)]
    decode = "no decode step" if m.decode_tok_s is None else f"{m.decode_tok_s:.1f} tok/s"
    lines.append(f"  decode: {decode}; prefill {m.prefill_s:.3f} s, decode {m.decode_s:.3f} s")
    for key, label, scale, fmt in (("throughput_tok_s", "tokens/s", 1, ".2f"), ("prefill_s", "prefill ms", 1e3, ".1f"),
                                   ("decode_step_s", "decode step ms", 1e3, ".2f")):
        sp = m.spread.get(key)
        if sp and sp.n:
            stdev = "-" if sp.stdev is None else f"{sp.stdev * scale:{fmt}}"   # one value: no spread
            lines.append(f"  {label:<15} median {sp.median * scale:{fmt}}  mean {sp.mean * scale:{fmt}}  "
                         f"stdev {stdev}  min {sp.min * scale:{fmt}}  p90 {sp.p90 * scale:{fmt}}  "
                         f"(n {sp.n}, measured)")
    threads = report.environment.get("threads", {})
    host = report.environment.get("host_load", {})
    if threads:
        lines.append("  threads: " + ", ".join(f"{k} {v}" for k, v in threads.items() if k not in ("rule",))
                     + (f" [{threads['rule']}]" if "rule" in threads else ""))
    if host:
        others = host.get("others_busy_cores")
        idle, waits = report.environment.get("cpuidle") or {}, ""
        if idle.get("driver"):
            polls = idle.get("guest_halt_poll_ns")
            waits = f"; idle CPUs: {idle['driver']}"
            if polls is not None:
                waits += f", halt after polling {polls / 1e3:g} us"
        avg = host.get("loadavg_1m_start")
        lines.append(f"  host load: 1-min load average {'?' if avg is None else f'{avg:.2f}'}, other processes "
                     f"{'?' if others is None else f'{others:.2f}'} cores busy while timed{waits}")
    if m.utilisation:
        lines.append("  utilisation (decode): " + ", ".join(f"{k} {v:.0%}" for k, v in m.utilisation.items()))
    h2d, d2h = m.link_bytes.get("h2d", 0) / GB, m.link_bytes.get("d2h", 0) / GB
    lines.append(f"  link bytes: h2d {h2d:.3f} GB, d2h {d2h:.3f} GB (decimal); peak device memory "
                 f"{m.peak_gpu_bytes / 2**30:.3f} GiB")
    bound = report.extra.get("link_bound_decode_tok_s")
    hrm = report.prediction.get("hrm_tok_s")
    if bound:
        profile = report.hardware["profile"]["name"]
        lines.append(f"  predicted link bound (N*B_link/(L*streamed bytes), profile {profile}): "
                     f"{bound:.1f} decode tok/s")
    if hrm:
        profile = report.hardware["profile"]["name"]
        lines.append(f"  predicted (HRM, profile {profile}): {hrm:.1f} tok/s end to end for this policy")
    return "\n".join(lines)
