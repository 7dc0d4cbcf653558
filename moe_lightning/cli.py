"""The `moe-lightning` console script: a Hydra app whose `task=` group picks the job.

Overrides are checked against the config schema before Hydra composes them (moe_lightning.cli_checks),
so that an unknown key or option gets a one-line message naming the accepted values; errors from the run
itself (bad files, impossible policies, out of memory) are printed as one line with a non-zero exit, never
a traceback.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from moe_lightning import command_line, pipes  # stdlib only (Hydra on use): imported before the signal handlers
from moe_lightning.cli_checks import (
    check_composes,
    check_container_interpolations,
    check_modes,
    check_overrides,
    check_reused_run_dir,
    check_run_folder,
    check_self_referring_overrides,
    check_sweep_only_interpolations,
    check_sweep_outputs,
)

if TYPE_CHECKING:
    from moe_lightning.files import OutputLock

log = logging.getLogger("moe_lightning")


def fail(message: str, code: int = 2) -> None:
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:   # a torchrun rank: the line once, not per rank
        from moe_lightning.launch import fail_once

        fail_once(f"moe-lightning: error: {message}", code)
    print(f"moe-lightning: error: {message}", file=sys.stderr)
    sys.exit(code)


def exit_interrupted(message: str, code: int) -> None:
    """After SIGINT/SIGTERM: the one line, then exit without the interpreter's shutdown. Everything the
    run keeps is already closed and fsynced (the part file, atomic documents) when the interrupt reaches
    here; the shutdown itself is what can fail: it stops the engine's daemon worker threads wherever
    they are, and one caught inside a torch op aborts the process ("terminate called without an active
    exception", exit -6) instead of exiting 130/143."""
    if "WORLD_SIZE" not in os.environ or _says_interrupted():
        print(f"moe-lightning: error: {message}", file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _says_interrupted() -> bool:
    from moe_lightning.launch import interrupted_is_said_here

    return interrupted_is_said_here()


# Tasks that read `parallel` as a plan's input instead of starting ranks.
PLANNING_TASKS = ("plan", "simulate", "report", "tune")


# A sweep run by Hydra's basic launcher runs its jobs in this process: a job that is refused or fails
# is recorded, the sweep goes on, and the command exits with the worst job's code after the last job.
_MAIN_PID: int | None = None
_sweep_jobs: list[tuple[str, int]] = []   # (the job's overrides, its exit code), in the order run


def _run(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode != RunMode.MULTIRUN or os.getpid() != _MAIN_PID:
        return _run_job(cfg)
    try:
        _run_job(cfg)
        code = 0
    except SystemExit as exc:   # fail(): its line is printed; interrupts end the whole sweep (os._exit)
        code = exc.code if isinstance(exc.code, int) else 1
    _sweep_jobs.append((" ".join(task_overrides()), code))


def finish_sweep() -> None:
    """After a sweep in this process: one line naming the jobs that failed, and the worst exit code."""
    failed = [(job, code) for job, code in _sweep_jobs if code]
    if failed:
        named = "; ".join(f"{job} (exit {code})" for job, code in failed[:3]) + ("; ..." if len(failed) > 3 else "")
        fail(f"{len(failed)} of {len(_sweep_jobs)} sweep jobs failed (the others ran and kept their run "
             f"documents): {named}", max(code for _, code in failed))


def _run_job(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from moe_lightning.config import mark_given
    from moe_lightning.errors import MoELightningError

    logging.captureWarnings(True)   # warnings.warn: to the log file too (conf/hydra/job_logging), on stderr
    try:
        run_cfg = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, MoELightningError) else exc
        fail(str(cause).splitlines()[0])
    except MoELightningError as exc:
        fail(str(exc))
    overrides = task_overrides()
    try:
        given = list(dict.fromkeys([*given_policy_fields(overrides),
                                    *config_policy_fields(HydraConfig.get().job.config_name, overrides)]))
        mark_given(run_cfg.policy, given)
        check_ignored_overrides(run_cfg, overrides, given)
    except MoELightningError as exc:
        fail(str(exc))
    if run_cfg.run_dir is None:
        run_cfg.run_dir = HydraConfig.get().runtime.output_dir
    from moe_lightning import __version__

    # The log file's first line, whatever the task logs after it (plan and simulate log nothing else).
    log.info("moe-lightning %s: task=%s %s (run folder %s)", __version__, run_cfg.task.name,
             " ".join(overrides), run_cfg.run_dir)
    from moe_lightning.interrupt import install

    install()   # SIGINT/SIGTERM: the task keeps what it has done, then one line and exit 130/143
    before: dict[Path, tuple[int, int]] = {}
    try:
        before = documents_state(run_cfg)
        locks = check_outputs(run_cfg)
        try:
            if run_cfg.task.name not in ("plan", "simulate", "report"):   # tasks that run on the device
                from moe_lightning.systems import resolve_device

                resolve_device(run_cfg.device)
            import torch

            try:
                start_logger(run_cfg)
                try:
                    check_torchrun_world(run_cfg)
                    if run_cfg.parallel.world_size > 1 and run_cfg.task.name not in PLANNING_TASKS:
                        from moe_lightning.launch import run_ranks

                        finish_logger(run_cfg, run_ranks(run_cfg))   # T x E ranks (moe_lightning.launch)
                    else:
                        finish_logger(run_cfg, run_cfg.task.run(run_cfg))
                    log.info("task=%s done", run_cfg.task.name)
                finally:
                    run_cfg.logger.finish()   # a failed or interrupted task's run is closed too
            except torch.OutOfMemoryError as exc:
                fail(f"out of memory: {str(exc).splitlines()[0]} (lower policy.batch_size or "
                     "policy.micro_batch_size, or run task=plan for a policy that fits)", 3)
        finally:
            for lock in locks:   # after the documents' final rename, or the part file's last row
                lock.release()
    except MoELightningError as exc:
        fail(str(exc), exc.exit_code)
    except KeyboardInterrupt as exc:   # errors.Interrupted says what was kept
        exit_interrupted(said_what_was_kept(str(exc) or "interrupted", run_cfg, before),
                         getattr(exc, "exit_code", 130))
    except Exception:
        from moe_lightning.launch import another_rank_failed

        if another_rank_failed():   # torchrun: a collective broke as that rank exited; its line is shown
            logging.shutdown()
            os._exit(1)
        raise


def documents_state(cfg) -> dict[Path, tuple[int, int]]:
    """(mtime_ns, size) of each document the run can write: its run folder's files (Hydra's record and
    the log aside) and out=, outputs=; compared after an interrupt to say what the run kept."""
    files = [Path(p) for p in (cfg.out, cfg.outputs) if p]
    if cfg.task.name == "calibrate":   # the profile it writes
        files.append(Path(cfg.task.yaml_path(cfg)))
    if cfg.run_dir and Path(cfg.run_dir).is_dir():
        # two levels (the documents, and compare's under a tune): a run folder given as `.` is no full walk
        files += [p for pattern in ("*", "*/*") for p in Path(cfg.run_dir).glob(pattern)
                  if ".hydra" not in p.relative_to(cfg.run_dir).parts and p.name != "moe-lightning.log"]
    state = {}
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and not path.name.endswith((".lock", ".tmp")):
            state[path] = (st.st_mtime_ns, st.st_size)
    return state


def said_what_was_kept(message: str, cfg, before: dict[Path, tuple[int, int]]) -> str:
    """An interrupt's line says what the run kept: a task that keeps partial work (generate's part file, a
    tune's study) says it itself; for the others, the bare "interrupted by SIGTERM" is followed by the
    documents this run wrote before the signal (each is whole: writes are atomic), or by "nothing written"."""
    return said_of_sweep(_said_in_job(message, cfg, before))


def said_of_sweep(message: str) -> str:
    """A sweep's earlier jobs (run in this process), which the interrupted job's own line does not name."""
    if not _sweep_jobs:
        return message
    ok = sum(1 for _, code in _sweep_jobs if not code)
    return (f"{message}; of this sweep's earlier jobs {ok} of {len(_sweep_jobs)} finished and kept their run "
            "documents, the later ones did not run")


def _said_in_job(message: str, cfg, before: dict[Path, tuple[int, int]]) -> str:
    if message != "interrupted" and not re.fullmatch(r"interrupted by SIG[A-Z]+", message):
        return message
    written = sorted(str(p) for p, state in documents_state(cfg).items() if before.get(p) != state)
    if not written:
        return (f"{message}: task={cfg.task.name} wrote nothing (earlier files are untouched); run the same "
                "command again to start over")
    named = ", ".join(written[:3]) + (f" and {len(written) - 3} more" if len(written) > 3 else "")
    again = ("its study keeps every finished trial, and the same command (with overwrite=true, for these files) "
             "resumes it" if cfg.task.name == "tune" else
             "run the same command with overwrite=true to start over")
    return (f"{message}: task={cfg.task.name} stopped before it finished; written whole before the signal: "
            f"{named}; {again}")


def task_overrides() -> list[str]:
    """This job's overrides as given: iterating Hydra's list would resolve the interpolations in them
    (out=${hydra:job.override_dirname}.json read as out=task=plan.json, which is no override)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    return list(OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False))


def given_policy_fields(overrides) -> list[str]:
    """The policy fields the command line sets (`policy.micro_batch_size=4`, `+policy.x=...`; not a
    deletion): a rule that would replace one refuses it even at its default value (`config.mark_given`)."""
    keys = [o.split("=", 1)[0].lstrip("+") for o in overrides if "=" in o and not o.startswith("~")]
    return [k.split(".", 1)[1] for k in keys if k.startswith("policy.")]


def config_policy_fields(config_name: str | None, overrides) -> list[str]:
    """The policy fields the composed config sets, whatever their values: a config file's (a user's
    primary config, `--config-dir DIR --config-name NAME`, or a file of theirs that sets the root with
    `# @package _global_`), and the command line's. Comparing values with the defaults cannot see a field
    set to its default, and merged values keep no record of their source: so the config is composed again,
    with the app's own search path and overrides, over a root whose policy fields are all unset, and the
    fields set afterwards are the ones some source set. The package's conf sets none."""
    from hydra import compose
    from omegaconf import OmegaConf

    from moe_lightning.conf.store import register

    register(policy_probe=True)
    try:
        policy = compose(config_name=config_name, overrides=list(overrides)).policy
    finally:
        register()
    return [key for key in policy if not OmegaConf.is_missing(policy, key)]


def check_ignored_overrides(cfg, overrides, given: list[str] | None = None) -> None:
    """Overrides the task would ignore, refused: another model.* field beside model=hf (the folder's
    config.json decides it), a policy field given (`given`: the config files' and the command line's; by
    default the command line's) that the system's runner does not read (system=reference, accelerate), and
    the one-system settings beside task=compare (it runs task.systems)."""
    from moe_lightning.errors import ConfigError

    if cfg.task.name in ("generate", "bench"):   # the tasks that run cfg.system's own runner
        from moe_lightning.systems import refuse_unread_policy_fields

        refuse_unread_policy_fields(cfg.system.name, given_policy_fields(overrides) if given is None else given)
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if cfg.model.name == "hf" and key.startswith("model.") and key.split(".")[1] not in ("path", "dtype"):
            raise ConfigError(f"{key}: model=hf takes it from the folder's config.json, so it would be ignored; "
                              "drop it (model=hf accepts model.path and model.dtype)")
        if cfg.task.name == "compare" and (key == "system" or key.startswith("system.")):
            refuse_unlisted_system(cfg, key, override)
        if cfg.task.name == "compare" and key == "trace" and cfg.trace:
            raise ConfigError("trace=true: task=compare does not trace its systems' runs; trace one with "
                              "task=generate system=<name> trace=true")
        refuse_unread_group(cfg, key, override)


def refuse_unlisted_system(cfg, key: str, override: str) -> None:
    """task=compare runs cfg.system's settings for that system when task.systems lists it
    (`compare.system_run_config`), the others at their defaults: a setting for a system it does not list,
    or the policy source that task.policy_source sets for every system, would be ignored."""
    from moe_lightning.errors import ConfigError

    name, listed = cfg.system.name, list(cfg.task.systems)
    if key == "system.policy_source":
        raise ConfigError(f"{override}: task=compare sets every system's policy source with task.policy_source "
                          "(auto: each its own rule; given: cfg.policy), so it would be ignored; drop it")
    if name not in listed:
        raise ConfigError(f"{override}: task.systems=[{','.join(listed)}] does not list system={name}, whose "
                          f"setting this is, so it would be ignored; list {name} there, or name a listed system "
                          "(system=NAME) before its settings")


# What only a measurement reads: how often and how long it times, and how it is isolated.
MEASURING_SETTINGS = {
    "compare": tuple(f"task.{k}" for k in ("warmup_tokens", "repeats", "max_cv", "min_repeat_s", "isolate",
                                           "interleave", "host_wait_s")),
    "tune": tuple(f"tuner.{k}" for k in ("repeats", "max_cv", "remeasure", "min_repeat_s", "trial_timeout_s",
                                         "trial_memory_gib", "host_wait_s")),
}


def refuse_unread_group(cfg, key: str, override: str) -> None:
    """A setting whose group the task never reads, refused rather than recorded as if it had run: tuner.*
    beside any task but tune; sampling.* where no token is sampled (a plan, a simulation, a simulated tune:
    every request runs to its budget); threads.* where the hardware profile, not this host, is timed;
    what only a measurement reads (repeats, noise, timeouts) beside a simulated comparison or tune; the
    reference's expert kernel beside a plan or simulation (they stand CGOPipe's schedule in for it);
    parallel.chunks with no expert parallelism to pipeline."""
    from moe_lightning.errors import ConfigError

    task, group = cfg.task.name, key.split(".", 1)[0]
    if group == "tuner" and task != "tune":
        raise ConfigError(f"{override}: only task=tune reads tuner.*, so task={task} would ignore it; drop it"
                          + (" (this task's own settings are task.*)" if task in ("bench", "compare") else ""))
    simulated = (task in ("plan", "simulate") or (task == "tune" and cfg.tuner.objective == "simulate")
                 or (task == "compare" and cfg.task.mode == "simulate"))
    what = {"tune": "tuner.objective=simulate", "compare": "task.mode=simulate"}.get(task, f"task={task}")
    measuring = MEASURING_SETTINGS.get(task, ())
    if simulated and key in measuring:   # a simulation is deterministic: nothing is timed or repeated
        raise ConfigError(f"{override}: {what} times nothing on this host (the simulator is deterministic), so "
                          "this measurement setting would be ignored; drop it, or measure: "
                          + ("tuner.objective=measure" if task == "tune" else "task.mode=measure"))
    # sampling.ignore_eos=true says what a simulation runs (every request to its budget): a command line shared
    # with a measured run (benchmarks/gpu_suite.sh's workload) keeps it
    if group == "sampling" and simulated and not (key == "sampling.ignore_eos" and cfg.sampling.ignore_eos):
        raise ConfigError(f"{override}: {what} samples no tokens (every request runs to its budget, as "
                          "sampling.ignore_eos=true), so it would be ignored; drop it, or sample with task=generate"
                          + {"tune": " or tuner.objective=measure", "compare": " or task.mode=measure"}.get(task, ""))
    if group == "threads" and simulated and task != "tune":   # a tune's workers take their threads from it
        raise ConfigError(f"{override}: {what} prices the hardware profile hardware={cfg.hardware.name}, not "
                          "this host's threads, so it would be ignored; drop it, or measure that thread layout "
                          "with task=bench")
    if key == "system.expert_kernel" and cfg.system.name == "reference" and task in ("plan", "simulate"):
        raise ConfigError(f"{override}: system=reference has no offloading schedule; task={task} plans and times "
                          "CGOPipe's, with the engine's own kernel choice per call, so it would be ignored; drop it, "
                          "or measure that kernel with task=bench system=reference")
    p = cfg.parallel
    searched = task in PLANNING_TASKS and cfg.hardware.gpu.count > 1 and p.world_size == 1  # the plan's layout
    if key == "parallel.chunks" and p.chunks and p.expert == 1 and not searched:
        raise ConfigError(f"{override}: the chunks pipeline the all-to-all of expert parallelism, and "
                          "parallel.expert=1 has none, so it would be ignored; drop it, or set parallel.expert > 1")


def check_torchrun_world(cfg) -> None:
    """Under torchrun every process runs this command: unless they are the T x E ranks of one generate or
    bench, each would run the whole job and write the same files."""
    from moe_lightning.errors import ConfigError
    from moe_lightning.launch import RANK_TASKS, under_torchrun

    if not under_torchrun() or os.environ["WORLD_SIZE"] == "1":
        return
    world, p = int(os.environ["WORLD_SIZE"]), cfg.parallel
    if cfg.task.name not in RANK_TASKS:
        raise ConfigError(f"torchrun started {world} processes, but task={cfg.task.name} runs in one: run it "
                          "without torchrun")
    if p.world_size != world:
        ranks = f"{p.world_size} rank{'s' if p.world_size > 1 else ''}"
        raise ConfigError(f"torchrun started {world} processes, but parallel.tensor={p.tensor} x parallel.expert="
                          f"{p.expert} = {ranks}: set T x E = {world}, or start {p.world_size} (torchrun "
                          "--nproc-per-node x --nnodes must equal T x E)")


def start_logger(cfg) -> None:
    """One logger run per task; the jobs of a multirun in one group, named by the sweep folder."""
    import dataclasses

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    group = Path(hc.sweep.dir).name if multirun else None
    name = f"{cfg.task.name}-{hc.job.num}" if multirun else f"{cfg.task.name}-{Path(cfg.run_dir).name}"
    config = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in vars(cfg).items()}
    cfg.logger.start(name, config, cfg.run_dir, group=group, job_type=cfg.task.name)


def finish_logger(cfg, report) -> None:
    """The policy the task ran (a plan's or a system's rule, not the config's default) in place of the
    config's, the run document's numbers as the run's summary, and the plots the task wrote (the caller
    closes the run)."""
    from moe_lightning.report import flatten_numbers

    if report is not None and report.policy:   # a report of reports ran none
        ran = {"policy": report.policy}
        if report.extra.get("policy_source"):
            ran["policy_source"] = report.extra["policy_source"]
        cfg.logger.log_config(ran)
    if report is not None:
        cfg.logger.log_summary(flatten_numbers({"metrics": report.metrics, "prediction": report.prediction,
                                                "policy": report.policy}))
    for png in sorted(Path(cfg.run_dir).glob("*.png")):
        cfg.logger.log_image(png.stem, png)


def check_outputs(cfg) -> list[OutputLock]:
    """Before any work: `out=` and `outputs=` must be writable files that are not inputs of the run and
    do not exist yet (unless overwrite=true), nor written by an earlier job of this sweep; an interrupted
    run's part file is resumed or replaced only when asked. -> the locks on `outputs=` and `out=`
    (files.OutputLock), taken first: a second run writing the same file is refused before it reads or
    writes any of it, and cannot replace this run's document as it finishes."""
    from moe_lightning.errors import ConfigError
    from moe_lightning.files import lock_output, lock_run_folder
    from moe_lightning.tasks.report import REPORT_SUFFIXES

    if cfg.resume and cfg.task.name != "generate":
        raise ConfigError(f"resume=true applies to task=generate (task={cfg.task.name} resumes by itself or not "
                          "at all)")
    if cfg.resume and not cfg.outputs:
        raise ConfigError("resume=true needs outputs=PATH, the outputs file of the run to resume")
    if cfg.outputs and cfg.task.name != "generate":
        raise ConfigError(f"outputs={cfg.outputs}: task={cfg.task.name} writes no outputs (outputs= belongs to "
                          "task=generate); drop it, or give out= for the task's document")
    if cfg.out and cfg.task.name == "report" and Path(cfg.out).suffix not in REPORT_SUFFIXES:
        raise ConfigError(f"out={cfg.out}: task=report writes its table as markdown or CSV; give a path ending "
                          f"in {' or '.join(REPORT_SUFFIXES)}")
    # Of a torchrun job's ranks, rank 0 writes the outputs and the document (the others would find its locks).
    rank0 = os.environ.get("RANK", "0") == "0"
    if cfg.out and cfg.outputs and Path(cfg.out).resolve() == Path(cfg.outputs).resolve():
        raise ConfigError(f"out and outputs name the same file ({cfg.out}); give two paths")
    named = {"outputs": cfg.outputs if cfg.task.name == "generate" else None, "out": cfg.out}
    if cfg.task.name == "calibrate":   # the profile it writes: checked and locked as out= is, before measuring
        named["task.out_yaml"] = str(cfg.task.yaml_path(cfg))
        if cfg.out and Path(named["task.out_yaml"]).resolve() == Path(cfg.out).resolve():
            raise ConfigError(f"out and task.out_yaml name the same file ({cfg.out}); give two paths")
    written = {key: Path(value).resolve() for key, value in named.items() if value and rank0}
    locks: list[OutputLock] = []
    try:
        if cfg.run_dir and rank0:   # its documents (run.json, comparison.*, trials.*): one run at a time
            locks.append(lock_run_folder(cfg.run_dir))
        for key, path in written.items():
            if path in _sweep_written:
                raise ConfigError(f"{key}={named[key]}: an earlier job of this sweep wrote it; give each job its "
                                  "own path (one with ${hydra:job.num} in it, say)")
            locks.append(lock_output(named[key], key=key))
        _check_output_paths(cfg)
        if cfg.out and cfg.task.name != "report" and Path(cfg.out).suffix != ".json":
            raise ConfigError(f"out={cfg.out}: task={cfg.task.name} writes a JSON document there; give a path "
                              "ending in .json")
        if cfg.out and cfg.task.name == "compare" and cfg.run_dir:   # its systems' documents: lost, then a crash
            out = Path(cfg.out).resolve()
            clash = [s for s in cfg.task.systems if (Path(cfg.run_dir) / f"{s}.json").resolve() == out]
            if clash:
                raise ConfigError(f"out={cfg.out}: task=compare writes {clash[0]}'s run document there (in its run "
                                  "folder); give another path for the comparison")
        cfg.logger.check()   # logger.dir: written once the task is done, so checked before it starts
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    _sweep_written.update(written.values())
    return locks


# The files out= and outputs= name for the jobs this process ran so far: a sweep's jobs each write their own.
_sweep_written: set[Path] = set()


def _check_output_paths(cfg) -> None:
    from moe_lightning.errors import ConfigError
    from moe_lightning.files import check_output_path
    from moe_lightning.tasks.outputs import part_path

    if cfg.outputs and cfg.task.name == "generate":
        part = part_path(cfg.outputs)
        if part.is_dir() or (part.exists() and not part.is_file()):
            raise ConfigError(f"{part} exists and is not a regular file; remove it or choose another outputs=")
        if part.is_file() and not (cfg.resume or cfg.overwrite):
            raise ConfigError(f"{part} holds the outputs of an interrupted run; pass resume=true to finish it, or "
                              "overwrite=true to start over")
        if cfg.resume and not part.exists() and Path(cfg.outputs).is_file():
            raise ConfigError(f"outputs={cfg.outputs} is complete (no {part.name} to resume); nothing to do")
    named = {key: getattr(cfg, key) for key in ("out", "outputs") if getattr(cfg, key)}
    if cfg.task.name == "calibrate":
        named["task.out_yaml"] = str(cfg.task.yaml_path(cfg))
    for key, value in named.items():
        check_output_path(value, key=key, overwrite=cfg.overwrite, inputs=(cfg.workload.path,))
    check_run_folder(cfg.run_dir, cfg)


def main() -> None:
    # First of all: a SIGINT or SIGTERM while Hydra and the config load (seconds) is the same one line and
    # exit 130 / 143 as one during the run, not a traceback through whatever was importing.
    from moe_lightning.interrupt import install

    install()
    try:
        pipes.install()   # stdout's reader gone (| head): the run finishes its documents, then exits 141
        _main()
    except KeyboardInterrupt as exc:   # errors.Interrupted; a task's own says what was kept
        exit_interrupted(said_of_sweep(str(exc) or "interrupted"), getattr(exc, "exit_code", 130))
    finally:
        sys.stdout.flush()   # what is still buffered, while a closed pipe is still caught here
    pipes.exit_if_broken()


def _main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if "--version" in sys.argv[1:]:
        return _print_version()
    try:
        import hydra
    except ImportError:
        fail("the CLI needs hydra-core: pip install 'moe-lightning[cli]'")
    from moe_lightning.conf.store import register
    from moe_lightning.errors import ConfigError

    # Flags anywhere among the overrides: Hydra gets the overrides, then the flags (moe_lightning.command_line).
    command = command_line.read(sys.argv[1:])
    if command.has("--version"):   # abbreviated (--vers): argparse would print Hydra's version
        return _print_version()
    try:
        command_line.check(command)
    except ConfigError as exc:
        fail(str(exc))
    sys.argv[1:] = command.argv()
    try:
        check_modes(sys.argv[1:])
        if command.has("--shell-completion"):   # its install=bash / query=... are not config overrides
            return hydra.main(config_path="conf", config_name="config", version_base="1.3")(_run)()
        check_overrides(sys.argv[1:])
        register()
        check_self_referring_overrides(sys.argv[1:])
        check_container_interpolations(sys.argv[1:])
        check_composes(sys.argv[1:])
        check_sweep_outputs(sys.argv[1:])
        check_sweep_only_interpolations(sys.argv[1:])
        check_reused_run_dir(sys.argv[1:])
    except ConfigError as exc:
        fail(str(exc))
    from omegaconf import OmegaConf

    # Run folders carry the process id beside the time: two runs started in the same second never share one.
    # Cached, as Hydra's ${now:} is: a sweep's jobs in launcher worker processes get the command's pid from
    # the sweep config's cache, so they all land under the sweep folder Hydra announced.
    OmegaConf.register_new_resolver("pid", lambda: str(os.getpid()), replace=True, use_cache=True)
    if os.environ.get("RANK", "0") != "0" and "WORLD_SIZE" in os.environ:
        # A torchrun rank other than 0 writes nothing: no run folder of its own, no log file.
        import tempfile

        sys.argv[1:] = command.argv("hydra.output_subdir=null", "hydra/job_logging=disabled",
                                    "hydra/hydra_logging=disabled", f"hydra.run.dir={tempfile.gettempdir()}")
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    app = hydra.main(config_path="conf", config_name="config", version_base="1.3")(_run)
    app()
    finish_sweep()


def _print_version() -> None:
    from moe_lightning import __version__

    print(f"moe-lightning {__version__}")


if __name__ == "__main__":
    main()
