"""task=tune: the HRM plan, an Optuna study seeded with it whose trials run the engine (or the
simulator), and the best policy measured beside the baselines.

The trials run in an ask-and-tell loop (`run_trials`), in this process and in `tuner.workers - 1` spawned
worker processes that share the study:
- `tuner.n_trials` counts every trial started (running, complete, pruned or failed; queued seeds do not
  count until asked for), over all workers, and is exact: asking for a trial happens under the study's
  gate (`processes.trial_gate`), after counting.
- A trial its process lost (interrupted, or the process died: SIGKILL, a machine down) is queued again with
  the same parameters and seed label, under the same gate, and its retry runs before the other queued
  trials; the lost trial no longer counts (`trial_states.requeue_lost_trials`).
- A trial that fails in an expected way (out of memory, timeout, crash, infeasible) is told FAIL with its
  reason in the trial's `reason` attribute and one printed line; no exception reaches Optuna, so it
  logs no traceback. A bug in the objective fails the trial with its reason, then goes on as a traceback.
- Workers and trial processes die with their parent, SIGKILL included (`processes.tie_to_parent`). SIGINT
  and SIGTERM (`moe_lightning.interrupt`) fail the running trials with the reason "interrupted by SIG...",
  stop the workers, and exit 128 + the signal's number; a worker that dies is named in its trial's reason.
- A tune that ends with no completed trial exits non-zero (`NoTrialCompleted`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from moe_lightning.config import refuse_ignored_fields
from moe_lightning.errors import ConfigError, Interrupted, MemoryBudgetError, MoELightningError
from moe_lightning.interrupt import deferred, install
from moe_lightning.report import Metrics, RunReport, Spread, as_dict, environment
from moe_lightning.tasks.plan import planning_inputs
from moe_lightning.tasks.tune_progress import TrialProgress

if TYPE_CHECKING:
    from moe_lightning.run_config import RunConfig  # type hints only: it sits above the tasks

log = logging.getLogger("moe_lightning.tune")


class NoTrialCompleted(MoELightningError):
    """Every trial of the study failed or was infeasible: there is no result to report."""

    exit_code = 1


def run_trials(study, cfg: RunConfig, spec, on_trial: Callable[[dict], None] | None = None,
               say: Callable[[str], None] = print, lengths: Sequence[int] | None = None,
               gen_lens: Sequence[int] | None = None) -> None:
    """Ask for, run and tell trials until the study holds `tuner.n_trials` started trials (all processes).
    `lengths`: a prompts file's prompt lengths (`planning_inputs`), which simulated trials run and every
    memory plan is made for; `gen_lens`: its rows' own budgets, at which simulated trials stop each request.

    SIGINT/SIGTERM (`moe_lightning.interrupt`) are held while a trial is asked for or told, so that none
    is left half asked or half told; one that interrupts a running trial fails it with the reason
    "interrupted by SIG..." before going on."""
    import optuna
    from optuna.trial import TrialState

    from moe_lightning.tuner.processes import trial_gate
    from moe_lightning.tuner.search import TrialFailed, objective, storage_url
    from moe_lightning.tuner.trial_states import ask_trial, fail_orphaned_trials, requeue_lost_trials, started_trials

    run = objective(cfg, spec, on_trial, lengths, gen_lens)
    url = storage_url(cfg, study.study_name)
    while True:
        trial, state, values, reason = None, TrialState.FAIL, None, None
        try:
            with deferred(), trial_gate(url, study.study_name):
                fail_orphaned_trials(study, grace_s=3 * cfg.tuner.heartbeat_s)
                requeue_lost_trials(study)   # e.g. the trials of another host's tune that was stopped
                if started_trials(study) >= cfg.tuner.n_trials:
                    break
                with warnings.catch_warnings():  # "heartbeat is meant for optimize": _heartbeat beats for us
                    warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                    trial = ask_trial(study)
                storage = study._storage
                if getattr(storage, "get_heartbeat_interval", lambda: None)():
                    storage.record_heartbeat(trial._trial_id)   # its first beat, before it names its process
                trial.set_user_attr("host", socket.gethostname())
                trial.set_user_attr("pid", os.getpid())  # names the process whose death fails this trial
            with _heartbeat(study, trial._trial_id):
                values = run(trial)
            state = TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except TrialFailed as exc:
            reason = str(exc)
        except BaseException as exc:  # interrupted, or a bug: the trial fails with its reason, then it goes on
            if trial is not None:
                reason = ((str(exc) or "interrupted") if isinstance(exc, KeyboardInterrupt)
                          else f"{type(exc).__name__}: {exc}")
                with deferred():
                    _tell(study, trial, TrialState.FAIL, None, reason)
            raise
        with deferred():
            _tell(study, trial, state, values, reason)
        if reason:
            say(f"trial {trial.number} failed: {shown_reason(reason)}")


def _tell(study, trial, state, values, reason: str | None) -> None:
    if reason:   # whole: the summary shows its first line, trials.jsonl and the study keep all of it
        trial.set_user_attr("reason", reason)
    study.tell(trial, values, state=state, skip_if_finished=True)


def shown_reason(reason: str) -> str:
    """A reason as one printed line: its first line whole (the actionable part, such as a memory plan's
    "[OVER]", sits at its end), and how many lines more trials.jsonl holds. Reasons are one line but an
    unexpected exception's (a bug in the objective), which may carry several."""
    lines = reason.strip().splitlines() or [""]
    more = len(lines) - 1
    return lines[0] + (f" (+{more} more line{'s' if more > 1 else ''} in trials.jsonl)" if more else "")


@contextlib.contextmanager
def _heartbeat(study, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every `tuner.heartbeat_s` while it runs (what Optuna's optimize loop
    does), so that a trial whose process dies is seen as stale and failed."""
    storage = study._storage
    interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
    if not interval:
        yield
        return
    done = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a busy database: the next beat will do
                storage.record_heartbeat(trial_id)
            if done.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)


def _worker(cfg: RunConfig, parent_pid: int, index: int, lengths: list[int] | None = None,
            gen_lens: list[int] | None = None) -> None:
    """An extra worker process: run trials of the shared study until it holds n_trials. Dies with the
    tune's main process."""
    from moe_lightning.tuner.processes import tie_to_parent

    tie_to_parent(parent_pid)
    import optuna

    from moe_lightning.engine.weights import resolve_model
    from moe_lightning.threads import set_thread_count, worker_process_threads
    from moe_lightning.tuner.search import open_study

    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    install()  # SIGTERM from the tune: fail the running trial, then exit
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the tune's to answer (it was ignored from the start)
    try:
        # Simulated trials run here, beside the other workers: share the cores. Measured trials run in child
        # processes that take the measurement lock one at a time and use the full layout.
        set_thread_count(worker_process_threads(cfg.tuner.workers, cfg.threads))
        spec, _ = resolve_model(cfg.model)
        study = open_study(cfg, spec, worker=index, lengths=lengths)
        run_trials(study, cfg, spec, say=lambda line: print(line, flush=True), lengths=lengths, gen_lens=gen_lens)
    except KeyboardInterrupt as exc:
        sys.exit(getattr(exc, "exit_code", 130))
    except MoELightningError as exc:
        print(f"moe-lightning: error: worker {os.getpid()}: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


def _end_workers(study, workers: list) -> None:
    """Stop the workers still running (SIGTERM: each fails its trial as interrupted), then fail, with the
    reason, the trials still RUNNING in a worker that died."""
    from moe_lightning.tuner.trial_states import fail_trials_of

    workers = [w for w in workers if w.pid is not None]  # those started
    for w in workers:
        if w.is_alive():
            w.terminate()
    for w in workers:
        w.join(15)
        if w.is_alive():
            w.kill()
            w.join(5)
    for w in workers:
        code = w.exitcode
        if code:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            fail_trials_of(study, w.pid, f"its worker process (pid {w.pid}) {how}")


def trial_records(study) -> list[dict]:
    """One flat record per trial (sweeps write records, not logs)."""
    from moe_lightning.tuner.trial_states import trial_reason

    rows = []
    for t in study.trials:
        spread = (t.user_attrs.get("spread") or {}).get("throughput_tok_s") or {}
        rows.append({"number": t.number, "state": t.state.name,
                     "value": t.values[0] if t.values else None, "kind": t.user_attrs.get("kind"),
                     "where": t.user_attrs.get("where"), "stdev": spread.get("stdev"), "cv": spread.get("cv"),
                     "repeats": spread.get("n"), "noisy": t.user_attrs.get("noisy"),
                     "measurements": t.user_attrs.get("measurements"),
                     "peak_gpu_bytes": t.user_attrs.get("peak_gpu_bytes"),
                     "seed": t.user_attrs.get("seed", ""), "retry_of": t.user_attrs.get("retry_of"),
                     "reason": trial_reason(t),
                     "duration_s": t.duration.total_seconds() if t.duration else None,
                     **{f"param.{k}": v for k, v in t.params.items()}})
    return rows


def study_plots(study, multi: bool, kind: str, run_dir: Path) -> dict[str, Path]:
    """Optuna's own matplotlib plots of the study: the optimization history, the Pareto front (two
    objectives) and the parameter importances (Optuna's default evaluator; it needs two completed trials
    with different parameters), each with a title saying what the numbers are."""
    import warnings

    import optuna.visualization.matplotlib as ovm
    from optuna.trial import TrialState

    from moe_lightning.plots import save

    tok_s = f"tokens/s ({kind})"
    throughput = {"target": (lambda t: t.values[0]), "target_name": tok_s} if multi else {"target_name": tok_s}
    plots = {"tuning_progress": (lambda: ovm.plot_optimization_history(study, **throughput),
                                 f"{study.study_name}: {tok_s} by trial")}
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if multi:   # memory in GiB, or MiB for a model that small (numbers that read naturally)
        unit, scale = ("GiB", 2**30) if max((t.values[1] for t in done), default=0) >= 2**30 else ("MiB", 2**20)
        plots["pareto"] = (lambda: ovm.plot_pareto_front(
            study, targets=lambda t: (t.values[1] / scale, t.values[0]),
            target_names=[f"peak GPU memory ({unit})", tok_s]), f"{study.study_name}: throughput against GPU memory")
    if len(done) >= 2 and len({tuple(sorted(t.params.items())) for t in done}) >= 2:
        # With a target, Optuna's evaluator ranks what makes it low: give it minus the throughput.
        higher = {"target": (lambda t: -t.values[0]), "target_name": tok_s} if multi else {"target_name": tok_s}
        plots["param_importances"] = (lambda: ovm.plot_param_importances(study, **higher),
                                      f"{study.study_name}: what moves {tok_s}")
    out = {}
    if not done:   # nothing to draw (Optuna would warn on stderr, beside the run's one-line error)
        return out
    for name, (draw, title) in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # experimental APIs; matplotlib's legend notes
            try:
                ax = draw()
            except (ValueError, RuntimeError) as exc:   # too few distinct trials for the plot
                log.warning("no %s plot: %s", name, exc)
                continue
        fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
        fig.set_size_inches(7, 4)
        fig.suptitle(title, fontsize=10)
        out[name] = save(fig, run_dir / f"{name}.png")
    return out


def best_trials(study, multi: bool):
    from optuna.trial import TrialState

    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if not done:
        return []
    from moe_lightning.tasks.tune_front import ranked_front

    return ranked_front(study.best_trials) if multi else [max(done, key=lambda t: t.values[0])]


@dataclass
class TuneTask:
    name: str = "tune"
    progress: bool = True
    compare: bool = True                 # measure the best policy beside the baselines
    baselines: list[str] = field(default_factory=lambda: ["flexgen", "flexgen_c", "deepspeed", "fastdecode",
                                                          "accelerate"])

    def run(self, cfg: RunConfig) -> RunReport:
        """Workers are spawned from the calling thread and die when it exits: call from the main thread."""
        import optuna
        from optuna.trial import TrialState
        from tqdm import tqdm

        from moe_lightning.engine.weights import resolve_model
        from moe_lightning.tuner.processes import sigint_ignored_by_children, trial_gate
        from moe_lightning.tuner.search import open_study, searched_policy_fields, seed_study, shown_url, storage_url
        from moe_lightning.tuner.trial_states import fail_orphaned_trials, requeue_lost_trials, started_trials

        check_tuned_system(cfg)
        several = cfg.hardware.gpu.count > 1 or cfg.parallel.world_size > 1
        if several and cfg.tuner.objective == "measure":
            raise ConfigError(f"tuner.objective=measure on hardware={cfg.hardware.name} ({cfg.hardware.gpu.count} "
                              f"GPUs, parallel {cfg.parallel.tensor}x{cfg.parallel.expert}): measured several-rank "
                              "CGOPipe runs are not built yet; tune with tuner.objective=simulate, or measure on a "
                              "one-GPU profile")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        run_dir = Path(cfg.run_dir or "runs/latest")
        spec, _ = resolve_model(cfg.model)
        # Refused as task=generate refuses it, before any trial. A prompts file's real lengths in tokens (its
        # workload=jsonl preset's lengths are placeholders): the HRM seeds, the search space, every memory plan
        # and every simulated trial are for the prompts the measured trials run, as task=plan plans them.
        workload, lengths, gen_lens, _ = planning_inputs(cfg.workload, spec)
        cfg = dataclasses.replace(cfg, workload=workload)
        refuse_ignored_fields(cfg.policy, "task=tune searches it", "bound the search with tuner.max_batch_size "
                              "or tuner.max_micro_batches, or run the policy with task=bench",
                              searched_policy_fields(cfg, spec))
        study = open_study(cfg, spec, lengths=lengths)
        seeds = []
        # Under the study's gate, as every count and ask: two commands opening a new study at once seed it
        # once, not twice (Optuna's skip_if_exists looks, then enqueues: not atomic across processes), and a
        # lost trial is queued again once.
        with trial_gate(storage_url(cfg, study.study_name), study.study_name):
            fail_orphaned_trials(study, grace_s=3 * cfg.tuner.heartbeat_s)
            requeue_lost_trials(study)
            if cfg.tuner.seed_with_hrm and not study.get_trials(deepcopy=False):
                try:
                    seeds = seed_study(study, cfg, spec, lengths)
                except MemoryBudgetError as exc:
                    print(f"HRM finds no feasible policy ({str(exc).strip().splitlines()[0]}): searching unseeded")
            started = started_trials(study)
            trials = study.get_trials(deepcopy=False)
        if seeds:
            s = seeds[0]
            print(f"HRM plan: N={s.batch_size} mu={s.micro_batch_size} attn_on_gpu={s.attn_on_gpu} "
                  f"r_w={s.expert_gpu_fraction:.3f} r_c={s.kv_gpu_fraction:.3f} (+{len(seeds) - 1} neighbours queued"
                  + (f"; tuner.n_trials={cfg.tuner.n_trials} runs the first {cfg.tuner.n_trials} of the "
                     f"{len(seeds)} seeds" if cfg.tuner.n_trials < len(seeds) else "") + ")")
        remaining = max(0, cfg.tuner.n_trials - started)
        if any(t.state != TrialState.WAITING for t in trials):
            print(f"resuming study {study.study_name} (same fingerprint): {_resumed(trials, started)}, "
                  f"{remaining} to go")
        # Spawned from this (the main) thread: PR_SET_PDEATHSIG fires when the spawning thread exits.
        spawn = mp.get_context("spawn")
        workers = [spawn.Process(target=_worker, args=(cfg, os.getpid(), k, lengths, gen_lens), daemon=False)
                   for k in range(1, cfg.tuner.workers)] if remaining else []
        kind = "simulated" if cfg.tuner.objective == "simulate" else "measured, median"
        progress = TrialProgress(study, remaining, kind, self.progress,
                                 pids=lambda: {os.getpid(), *(w.pid for w in workers if w.pid is not None)})

        def on_trial(event: dict) -> None:   # the bar counts every process's trials: TrialProgress
            cfg.logger.log({"trial": event["number"], "throughput_tok_s": event.get("value"),
                            **{f"param/{k}": v for k, v in event["params"].items()}})   # live, this worker's

        try:
            with sigint_ignored_by_children():
                for w in workers:
                    w.start()
            progress.start()
            run_trials(study, cfg, spec, on_trial, say=lambda line: tqdm.write(line, file=sys.stdout), lengths=lengths,
                       gen_lens=gen_lens)
            for w in workers:
                w.join()
        except Interrupted as exc:
            raise Interrupted(f"{exc}: the running trials failed as interrupted; study {study.study_name} keeps "
                              f"the others, and the same command resumes it", exc.exit_code) from None
        finally:
            with deferred():  # a second signal waits until every worker is stopped
                _end_workers(study, workers)
            progress.close()
        report = self._report(cfg, study, spec, run_dir, shown_url(storage_url(cfg, study.study_name)))
        if "best_trial" not in report.extra:
            raise NoTrialCompleted(_no_trial_completed(study, run_dir))
        return report

    def _report(self, cfg: RunConfig, study, spec, run_dir: Path, storage: str) -> RunReport:
        from moe_lightning.files import atomic_write, json_text
        from moe_lightning.tuner.search import policy_from_params

        rows = trial_records(study)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / "trials.jsonl", "".join(json_text(r) + "\n" for r in rows))
        best = best_trials(study, cfg.tuner.multi_objective)
        states = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
        print(f"study {study.study_name}: {states['COMPLETE']} complete, {states['PRUNED']} pruned "
              f"(infeasible), {states['FAIL']} failed; storage {storage}")
        retries = {r["retry_of"]: r["number"] for r in rows if r["retry_of"] is not None}
        for r in rows:
            if r["state"] != "COMPLETE" and r["reason"]:
                again = f" (run again as trial {retries[r['number']]})" if r["number"] in retries else ""
                print(f"  trial {r['number']} {r['state'].lower()}: {shown_reason(r['reason'])}{again}")
        study.trials_dataframe().to_csv(run_dir / "trials.csv", index=False)
        label = "simulated" if cfg.tuner.objective == "simulate" else "measured, median of repeats"
        study_plots(study, cfg.tuner.multi_objective, label, run_dir)   # logged with the run's other plots
        # Every trial of the study, from every worker, both objectives, each failure with its reason.
        cfg.logger.log_table("trials", rows)
        report = RunReport(system=cfg.system.name, task="tune", model=as_dict(spec),
                           hardware={"profile": as_dict(cfg.hardware), "detected": None},
                           workload=as_dict(cfg.workload), policy={}, environment=environment(),
                           extra={"study": study.study_name, "storage": storage, "trials": states,
                                  "objective": cfg.tuner.objective, "trials_file": str(run_dir / "trials.jsonl"),
                                  "trials_csv": str(run_dir / "trials.csv")})
        hrm = next((t for t in study.trials if t.user_attrs.get("seed") == "hrm"), None)
        if hrm is not None:   # the HRM plan the study was seeded with (task=plan's for this workload)
            params = {**hrm.system_attrs.get("fixed_params", {}), **hrm.params}   # a seed not yet run: queued
            report.extra["hrm_plan"] = {"trial": hrm.number,
                                        "policy": as_dict(policy_from_params(params, spec, cfg.policy))}
        if best:
            from moe_lightning.tasks.tune_front import (
                KINDS,
                front_entry,
                front_lines,
                objectives,
                policy_words,
                throughput_words,
                trial_policy,
            )

            top = best[0]   # the fastest (of the Pareto front, with two objectives)
            policy = trial_policy(top, spec, cfg.policy)
            layout = top.user_attrs.get("parallel")   # several GPUs: the study's T x E (search.study_layout)
            if layout:   # the trial's policy, in whole expert groups, under that layout
                from moe_lightning.config import ParallelConfig

                cfg = dataclasses.replace(cfg, parallel=ParallelConfig(**layout))
                report.extra["parallel"] = layout
            report.policy = as_dict(policy)
            kind = KINDS[cfg.tuner.objective][0]
            spread = {k: Spread.from_dict(v) for k, v in (top.user_attrs.get("spread") or {}).items()}
            # The trial's own metrics (prefill, decode, tokens, link bytes ...), as its run measured or simulated them
            report.metrics = dataclasses.replace(
                Metrics.from_dict(top.user_attrs.get("metrics") or {}), throughput_tok_s=top.values[0], kind=kind,
                spread=spread, repeats=spread["throughput_tok_s"].n if spread else 1,
                noisy=bool(top.user_attrs.get("noisy")), noise=top.user_attrs.get("noise") or [],
                peak_gpu_bytes=int(top.user_attrs.get("peak_gpu_bytes") or 0))
            report.hardware["detected"] = top.user_attrs.get("detected")   # the device the best trial ran on
            report.prediction = (top.user_attrs.get("run") or {}).get("prediction") or {}
            report.extra["best_trial"] = top.number
            report.extra["objectives"] = objectives(cfg.tuner.objective, cfg.tuner.multi_objective)
            report.extra["pareto"] = [front_entry(t, spec, cfg.policy, cfg.tuner.objective) for t in best]
            if cfg.tuner.multi_objective:
                print("\n".join(front_lines(best, spec, cfg.policy, cfg.tuner.objective)))
            print(f"best: trial {top.number} ({top.user_attrs.get('seed') or 'sampled'}) "
                  f"{throughput_words(top, cfg.tuner.objective)} on {top.user_attrs.get('where') or 'this host'} "
                  f"with {policy_words(policy, layout)}"
                  + (" (the fastest on the Pareto front" + (", compared with the baselines below)" if self.compare
                                                            else ")") if cfg.tuner.multi_objective else "")
                  + ("\n  NOISY: " + "; ".join(report.metrics.noise) if report.metrics.noisy else ""))
            if self.compare:
                table = compare_best(cfg, policy, self.baselines, run_dir)
                report.extra["comparison"] = table
                cfg.logger.log_table("comparison", table)
        out = Path(cfg.out) if cfg.out else run_dir / "run.json"
        report.to_json(out)
        print(f"trials: {run_dir / 'trials.jsonl'}\nrun document: {out}")
        return report


def check_tuned_system(cfg: RunConfig) -> None:
    """Every trial's policy must be the one its run ran: its measurement is recorded beside the trial's
    parameters, and the best of them is reported as the tuned policy. A system's own rule
    (system.policy_source=auto) would replace each trial's batching and placement inside the run (the
    trials fail on it, or, one at the default policy's values, silently run the rule's); the reference and
    accelerate read the batch size only, so a measured trial's placement would be a label."""
    from moe_lightning.systems import POLICY_FIELDS_READ

    name = cfg.system.name
    if getattr(cfg.system, "policy_source", "given") == "auto":
        raise ConfigError(f"system.policy_source=auto: {name}'s own rule chooses the policy's batching and "
                          "placement, which task=tune searches, so every trial's would be ignored; set "
                          f"system.policy_source=given to tune {name}'s policy")
    read = POLICY_FIELDS_READ.get(name)
    if read is not None and cfg.tuner.objective == "measure":
        raise ConfigError(f"system={name} reads policy.{', policy.'.join(read)} only: a measured tune's trials "
                          "would record placements it never ran; tune system=cgopipe, or measure batch sizes "
                          f"of {name} with task=bench")
    if cfg.tuner.objective == "simulate":   # trials time the system's own schedule (tasks.simulate.simulate_policy)
        from moe_lightning.tasks.simulate import SIMULATED_SCHEDULES, refuse_given_kernel

        refuse_given_kernel(cfg.policy.expert_kernel, "drop it, or search the kernels with tuner.objective=measure")

        own = SIMULATED_SCHEDULES.get(name)
        if own != name:   # the reference stands for CGOPipe's schedule there; accelerate has none of ours
            timed = "task=simulate times CGOPipe's schedule for it" if own else "it is measured only"
            raise ConfigError(f"system={name} has no schedule of its own to simulate ({timed}), so a simulated "
                              f"tune's trials would be another system's; tune system=cgopipe or a baseline "
                              f"({', '.join(n for n in SIMULATED_SCHEDULES if n != 'reference')})")
        if name != "cgopipe" and (cfg.hardware.gpu.count > 1 or cfg.parallel.world_size > 1):
            raise ConfigError(f"system={name} on hardware={cfg.hardware.name}: the baselines' schedules run on one "
                              "GPU; tune them on a one-GPU profile (several GPUs: system=cgopipe)")


def compare_best(cfg: RunConfig, policy, baselines: list[str], run_dir: Path) -> list[dict]:
    """Measure the tuned policy beside each baseline (same model, hardware and workload, each baseline
    with its own policy rule, each system in its own process): task=compare's table."""
    from moe_lightning.tasks.compare import CompareTask

    systems = list(dict.fromkeys([cfg.system.name, *baselines]))
    if len(systems) < 2:
        print(f"no comparison: task.baselines names no system other than {cfg.system.name}")
        return []
    # A simulated tune is for hardware that may not be here: its comparison is simulated too.
    mode = "simulate" if cfg.tuner.objective == "simulate" else "measure"
    compare = CompareTask(systems=systems, mode=mode, max_cv=cfg.tuner.max_cv, progress=False)
    try:
        report = compare.run(dataclasses.replace(cfg, run_dir=str(run_dir / "compare"), out=None),   # out= is tune's
                             given={cfg.system.name: policy})
    except MoELightningError as exc:
        print(f"comparison failed: {exc}")
        return []
    return report.extra["comparison"]


def _resumed(trials: list, started: int) -> str:
    """What a resumed study holds: the finished trials kept (complete or pruned), the failed ones that
    count, the running ones, and the lost trials whose retries are queued."""
    from optuna.trial import TrialState

    kept = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    again = sorted(t.user_attrs["retry_of"] for t in trials
                   if t.state == TrialState.WAITING and "retry_of" in t.user_attrs)
    parts = [f"{kept} finished trials kept"]
    if started - kept - running:
        parts.append(f"{started - kept - running} failed")
    if running:
        parts.append(f"{running} running")
    if again:
        parts.append(f"{len(again)} lost to an interrupt or a dead process queued again "
                     f"(trial {', '.join(map(str, again))})")
    return ", ".join(parts)


def _no_trial_completed(study, run_dir: Path) -> str:
    """One line: how the trials ended and the commonest reason."""
    from optuna.trial import TrialState

    from moe_lightning.tuner.trial_states import trial_reason

    ended = {s: [trial_reason(t) or "no reason recorded" for t in study.trials if t.state == s]
             for s in (TrialState.FAIL, TrialState.PRUNED)}
    failed, pruned = ended[TrialState.FAIL], ended[TrialState.PRUNED]
    if not failed and not pruned:
        return f"no trial of study {study.study_name} completed (none ran)"
    reason, count = Counter(failed or pruned).most_common(1)[0]
    return (f"no trial of study {study.study_name} completed ({len(failed)} failed, {len(pruned)} infeasible; "
            f"reason of {count} of {len(failed or pruned)}: {shown_reason(reason)}); every trial and its "
            f"reason: {run_dir / 'trials.jsonl'}")
