"""task=tune: the HRM plan, an Optuna study seeded with it whose trials run the engine (or the
simulator), and the best policy measured beside the baselines."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import sys
from dataclasses import dataclass, field
from pathlib import Path

from moe_lightning.config import RunConfig
from moe_lightning.errors import MemoryBudgetError, MoELightningError
from moe_lightning.report import Metrics, RunReport, Spread, as_dict, environment

log = logging.getLogger("moe_lightning.tune")


def _worker(cfg: RunConfig) -> None:
    """An extra worker process: optimise the shared study until it holds n_trials."""
    import optuna

    from moe_lightning.engine.weights import resolve_model
    from moe_lightning.threads import set_thread_count, worker_process_threads
    from moe_lightning.tuner.search import TrialFailed, objective, open_study

    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Simulated trials run here, beside the other workers: share the cores. Measured trials run in child
    # processes that take the measurement lock one at a time and use the full layout.
    set_thread_count(worker_process_threads(cfg.tuner.workers, cfg.threads))
    spec, _ = resolve_model(cfg.model)
    study = open_study(cfg, spec)
    study.optimize(objective(cfg, spec), n_trials=cfg.tuner.n_trials, catch=(TrialFailed,),
                   callbacks=[_max_trials(cfg.tuner.n_trials)])


def _max_trials(n: int):
    import optuna
    from optuna.trial import TrialState

    return optuna.study.MaxTrialsCallback(n, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))


def trial_records(study) -> list[dict]:
    """One flat record per trial (sweeps write records, not logs)."""
    rows = []
    for t in study.trials:
        spread = (t.user_attrs.get("spread") or {}).get("throughput_tok_s") or {}
        rows.append({"number": t.number, "state": t.state.name,
                     "value": t.values[0] if t.values else None, "kind": t.user_attrs.get("kind"),
                     "where": t.user_attrs.get("where"), "stdev": spread.get("stdev"), "cv": spread.get("cv"),
                     "repeats": spread.get("n"), "noisy": t.user_attrs.get("noisy"),
                     "measurements": t.user_attrs.get("measurements"),
                     "peak_gpu_bytes": t.user_attrs.get("peak_gpu_bytes"),
                     "seed": t.user_attrs.get("seed", ""), "reason": t.user_attrs.get("reason", ""),
                     "duration_s": t.duration.total_seconds() if t.duration else None,
                     **{f"param.{k}": v for k, v in t.params.items()}})
    return rows


def best_trials(study, multi: bool):
    from optuna.trial import TrialState

    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not done:
        return []
    return study.best_trials if multi else [max(done, key=lambda t: t.values[0])]


@dataclass
class TuneTask:
    name: str = "tune"
    progress: bool = True
    compare: bool = True                 # measure the best policy beside the baselines
    baselines: list[str] = field(default_factory=lambda: ["flexgen", "flexgen_c", "deepspeed", "fastdecode",
                                                          "accelerate"])

    def run(self, cfg: RunConfig) -> RunReport:
        import optuna
        from tqdm import tqdm

        from moe_lightning.engine.weights import resolve_model
        from moe_lightning.tuner.search import (
            TrialFailed,
            fail_orphaned_trials,
            objective,
            open_study,
            seed_study,
            storage_url,
        )

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        run_dir = Path(cfg.run_dir or "runs/latest")
        spec, _ = resolve_model(cfg.model)
        study = open_study(cfg, spec)
        fail_orphaned_trials(study, grace_s=3 * cfg.tuner.heartbeat_s)
        finished = [t for t in study.trials if t.state.is_finished()]
        seeds = []
        if cfg.tuner.seed_with_hrm and not study.trials:
            try:
                seeds = seed_study(study, cfg, spec)
            except MemoryBudgetError as exc:
                print(f"HRM finds no feasible policy ({str(exc)[:200]}...): searching unseeded")
        if seeds:
            s = seeds[0]
            print(f"HRM plan: N={s.batch_size} mu={s.micro_batch_size} attn_on_gpu={s.attn_on_gpu} "
                  f"r_w={s.expert_gpu_fraction:.3f} r_c={s.kv_gpu_fraction:.3f} (+{len(seeds) - 1} neighbours queued)")
        remaining = max(0, cfg.tuner.n_trials - len(finished))
        if finished:
            print(f"resuming study {study.study_name} (same fingerprint): {len(finished)} finished trials kept, "
                  f"{remaining} to go")
        cfg.logger.start(f"tune-{study.study_name}", _config_dict(cfg), str(run_dir))
        bar = tqdm(total=remaining, desc="tune", unit="trial", disable=not self.progress, file=sys.stderr)

        def on_trial(event: dict) -> None:
            bar.update(1)
            value = event.get("value")
            kind = "simulated" if cfg.tuner.objective == "simulate" else "measured, median"
            shown = f"{value:.1f} tok/s {kind}" if isinstance(value, (int, float)) else ""
            bar.set_postfix_str(f"#{event['number']} {event['state']} {shown}")
            cfg.logger.log({"trial": event["number"], "throughput_tok_s": event.get("value"),
                            **{f"param/{k}": v for k, v in event["params"].items()}})

        workers = [mp.get_context("spawn").Process(target=_worker, args=(cfg,), daemon=False)
                   for _ in range(cfg.tuner.workers - 1)]
        for w in workers:
            w.start()
        study.optimize(objective(cfg, spec, on_trial), n_trials=remaining, catch=(TrialFailed,),
                       callbacks=[_max_trials(cfg.tuner.n_trials)])
        for w in workers:
            w.join()
        bar.close()
        return self._report(cfg, study, spec, run_dir, storage_url(cfg, study.study_name))

    def _report(self, cfg: RunConfig, study, spec, run_dir: Path, storage: str) -> RunReport:
        from moe_lightning.files import atomic_write
        from moe_lightning.tasks.report import plot_pareto, plot_tuning_progress
        from moe_lightning.tuner.search import policy_from_params

        rows = trial_records(study)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "trials.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        best = best_trials(study, cfg.tuner.multi_objective)
        states = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
        print(f"study {study.study_name}: {states['COMPLETE']} complete, {states['PRUNED']} pruned "
              f"(infeasible), {states['FAIL']} failed; storage {storage}")
        for r in rows:
            if r["state"] != "COMPLETE" and r["reason"]:
                print(f"  trial {r['number']} {r['state'].lower()}: {r['reason'][:140]}")
        progress_png = plot_tuning_progress(rows, run_dir / "tuning_progress.png")
        cfg.logger.log_image("tuning_progress", progress_png)
        if cfg.tuner.multi_objective:
            cfg.logger.log_image("pareto", plot_pareto(rows, run_dir / "pareto.png"))
        report = RunReport(system=cfg.system.name, task="tune", model=as_dict(spec),
                           hardware={"profile": as_dict(cfg.hardware)}, workload=as_dict(cfg.workload),
                           policy={}, environment=environment(),
                           extra={"study": study.study_name, "storage": storage, "trials": states,
                                  "objective": cfg.tuner.objective, "trials_file": str(run_dir / "trials.jsonl")})
        if not best:
            print("no trial completed: nothing to compare")
        else:
            top = best[0]
            policy = policy_from_params(top.params, spec, cfg.policy)
            report.policy = as_dict(policy)
            kind = "simulated" if cfg.tuner.objective == "simulate" else "measured"
            spread = {k: Spread.from_dict(v) for k, v in (top.user_attrs.get("spread") or {}).items()}
            report.metrics = Metrics(throughput_tok_s=top.values[0], kind=kind, spread=spread,
                                     repeats=spread["throughput_tok_s"].n if spread else 1,
                                     noisy=bool(top.user_attrs.get("noisy")), noise=top.user_attrs.get("noise") or [],
                                     peak_gpu_bytes=int(top.user_attrs.get("peak_gpu_bytes") or 0))
            report.extra["best_trial"] = top.number
            report.extra["pareto"] = [{"number": t.number, "values": t.values, "params": t.params} for t in best]
            shown = spread["throughput_tok_s"].show(".2f") if spread else f"{top.values[0]:.2f}"
            print(f"best: trial {top.number} ({top.user_attrs.get('seed') or 'sampled'}) "
                  f"{shown} tok/s {kind} on {top.user_attrs.get('where') or 'this host'} with N={policy.batch_size} "
                  f"mu={policy.micro_batch_size} attn_on_gpu={policy.attn_on_gpu} "
                  f"r_w={policy.expert_gpu_fraction:.3f} r_c={policy.kv_gpu_fraction:.3f} "
                  f"kernel={policy.expert_kernel}")
            if self.compare:
                table = compare_best(cfg, policy, self.baselines, run_dir)
                report.extra["comparison"] = table
                cfg.logger.log_table("comparison", table)
        out = Path(cfg.out) if cfg.out else run_dir / "run.json"
        report.to_json(out)
        cfg.logger.finish()
        print(f"trials: {run_dir / 'trials.jsonl'}\nrun document: {out}")
        return report


def compare_best(cfg: RunConfig, policy, baselines: list[str], run_dir: Path) -> list[dict]:
    """Measure the tuned policy beside each baseline (same model, hardware and workload, each baseline
    with its own policy rule, each system in its own process): task=compare's table."""
    from moe_lightning.tasks.compare import CompareTask

    systems = [cfg.system.name, *[b for b in baselines if b != cfg.system.name]]
    # A simulated tune is for hardware that may not be here: its comparison is simulated too.
    mode = "simulate" if cfg.tuner.objective == "simulate" else "measure"
    compare = CompareTask(systems=systems, mode=mode, max_cv=cfg.tuner.max_cv, progress=False)
    try:
        report = compare.run(dataclasses.replace(cfg, run_dir=str(run_dir / "compare")),
                             given={cfg.system.name: policy})
    except MoELightningError as exc:
        print(f"comparison failed: {exc}")
        return []
    return report.extra["comparison"]


def _config_dict(cfg: RunConfig) -> dict:
    return {k: as_dict(v) if dataclasses.is_dataclass(v) else v for k, v in vars(cfg).items()}
