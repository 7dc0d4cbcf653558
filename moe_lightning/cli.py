"""The `moe-lightning` console script: a Hydra app whose `task=` group picks the job.

Overrides are checked against the config schema before Hydra composes them, so that an unknown key or
option gets a one-line message naming the accepted values; errors from the run itself (bad files,
impossible policies, out of memory) are printed as one line with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moe_lightning import command_line, pipes  # stdlib only (Hydra on use): imported before the signal handlers

if TYPE_CHECKING:
    from moe_lightning.files import OutputLock

CONF_DIR = Path(__file__).resolve().parent / "conf"
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


def group_options(group: str, extra_dirs: tuple[Path, ...] = ()) -> list[str]:
    from hydra.core.config_store import ConfigStore

    from moe_lightning.conf.store import register

    register()
    stored = ConfigStore.instance().repo.get(group, {})
    names = {Path(p).stem for p in stored}
    for folder in (CONF_DIR, *extra_dirs):
        names |= {p.stem for p in (folder / group).glob("*.yaml")}
    return sorted(names)


def split_args(args: list[str]) -> tuple[list[str], tuple[Path, ...]]:
    """-> (the overrides, the folders given with --config-dir) from Hydra's command line."""
    command = command_line.read(args)
    dirs = [f.value for f in command.flags if f.option == "--config-dir" and f.value is not None]
    return list(command.overrides), tuple(Path(d) for d in dirs)


def config_name(args: list[str]) -> str:
    """--config-name / -cn, else config."""
    return command_line.read(args).value("--config-name") or "config"


def compose_each(args: list[str], override_lists: list[list[str]], hydra_config: bool = False) -> list:
    """Compose the config (--config-name, with --config-dir on the search path) once per override list,
    with Hydra's own compose API, as the app is about to; a composition error is one ConfigError line
    (Hydra's and OmegaConf's text, not their multi-line report)."""
    from hydra import compose, version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.core.global_hydra import GlobalHydra

    from moe_lightning.conf.store import register
    from moe_lightning.errors import ConfigError

    register()
    _, dirs = split_args(args)
    missing = [d for d in dirs if not d.is_dir()]
    if missing:
        raise ConfigError(f"--config-dir {missing[0]}: no such folder")
    GlobalHydra.instance().clear()
    try:
        # The search path hydra.main builds (as initialize_config_dir does, with --config-dir where the app
        # puts it: after the package's conf, before the schemas). Not hydra.searchpath: Hydra reads that
        # after the primary config, so a primary config of the user's (--config-name) would not be found.
        search_path = create_config_search_path(str(CONF_DIR))
        for d in dirs:
            search_path.prepend("command-line", f"file://{d.resolve()}", anchor=SearchPathQuery(provider="schema"))
        version.setbase("1.3")
        Hydra.create_main_hydra2(task_name="moe-lightning", config_search_path=search_path)
        return [compose(config_name=config_name(args), overrides=overrides, return_hydra_config=hydra_config)
                for overrides in override_lists]
    except Exception as exc:  # noqa: BLE001 - whatever Hydra raises, one line
        raise ConfigError(_one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()


def default_choices(args: list[str]) -> dict[str, str]:
    """The group options the config selects when the command line does not, as Hydra resolves them."""
    cfg = compose_each(args, [[]], hydra_config=True)[0]
    return {k: str(v) for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}


def _schema_for(path: list[str], choices: dict[str, str]):
    from moe_lightning.run_config import RunConfig
    from moe_lightning.systems import SYSTEM_CONFIGS
    from moe_lightning.tasks import TASK_CONFIGS

    head = path[0]
    if head == "task":
        return TASK_CONFIGS.get(choices["task"])
    if head == "system":
        return SYSTEM_CONFIGS.get(choices["system"])
    if head == "logger":
        from moe_lightning.loggers import LOGGER_CONFIGS

        return LOGGER_CONFIGS.get(choices["logger"])
    return {f.name: f for f in fields(RunConfig)}[head].default_factory  # type: ignore[misc]


def check_overrides(args: list[str]) -> None:
    """Raise ConfigError for an unknown key or group option (Hydra's own messages span many lines)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from moe_lightning.conf.store import GROUPS
    from moe_lightning.config import field_names
    from moe_lightning.errors import ConfigError
    from moe_lightning.run_config import RunConfig

    plain, extra_dirs = split_args(args)
    try:
        overrides = OverridesParser.create().parse_overrides(plain)
    except Exception as exc:  # Hydra's grammar errors
        raise ConfigError(str(exc).splitlines()[0]) from None
    choices = default_choices(args)
    ours = [o for o in overrides if not o.key_or_group.startswith("hydra")]
    for o in ours:
        if o.is_delete():
            raise ConfigError(f"~{o.key_or_group}: every entry of the config is needed; set a value instead of "
                              "deleting it")
    checked = ours

    def values_of(o) -> list:
        """The values an override takes, typed as Hydra parses them (4 is an int, 0.5 a float, true a
        bool), each point of a choice or range sweep; an interval sweep (for sweeper plugins) has no
        points to check here."""
        if not o.is_sweep_override():
            return [o.value()]
        if o.is_interval_sweep():
            return []
        return list(o.sweep_iterator())

    for o in checked:  # group choices first: a key is checked against the option finally chosen
        if o.key_or_group in GROUPS:
            options = group_options(o.key_or_group, extra_dirs)
            names = list(o.sweep_string_iterator()) if o.is_sweep_override() else [str(o.value())]
            for v in names:
                if v not in options:
                    raise ConfigError(f"unknown {o.key_or_group} {v!r}; accepted: {', '.join(options)}")
            choices[o.key_or_group] = names[-1]
    for o in checked:
        key, values = o.key_or_group, values_of(o)
        if key in GROUPS:
            if o.is_add():
                raise ConfigError(f"+{key}: {key} is always in the config; drop the '+'")
            continue
        parts = key.split(".")
        if parts[0] not in field_names(RunConfig):
            raise ConfigError(f"unknown key {key!r}; accepted top-level keys: {', '.join(field_names(RunConfig))}")
        schema = _schema_for(parts, choices)
        for depth, part in enumerate(parts[1:], start=1):
            names = field_names(schema) if is_dataclass(schema) else []
            if part not in names:
                where = ".".join(parts[:depth])
                raise ConfigError(f"unknown key {key!r}: {where} accepts {', '.join(names) or 'no sub-keys'}")
            schema = {f.name: f for f in fields(schema)}[part].type
            schema = _resolve_type(schema)
        for v in values:
            _check_list(o, schema, v)
            _check_scalar(key, schema, v)
        if o.is_add():   # '+' adds a key that is not there; every key the schema accepts already is
            raise ConfigError(f"+{key}: {key} is already in the config; drop the '+'")


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,)}


MAX_COMPOSED_POINTS = 64   # a sweep's values are each composed once; beyond this many, Hydra's jobs check them


def sweep_points(plain: list[str]) -> list[list[str]]:
    """The override lists to compose for a multirun: every value of every swept key once, the others at
    their first value (not the whole product: each value is checked, each combination is Hydra's job)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(plain)
    first, swept = [], []
    for o, text in zip(overrides, plain):
        if o.is_interval_sweep():   # a sweeper plugin's search space: no points to compose
            continue
        if o.is_sweep_override():
            values, prefix = list(o.sweep_string_iterator()), text.split("=", 1)[0] + "="
            first.append(prefix + values[0])
            swept.append((len(first) - 1, prefix, values[1:]))
        else:
            first.append(text)
    points = [first]
    for i, prefix, rest in swept:
        for v in rest[:MAX_COMPOSED_POINTS]:
            points.append([*first[:i], prefix + v, *first[i + 1:]])
    return points[:MAX_COMPOSED_POINTS]


def check_composes(args: list[str]) -> None:
    """Compose the config as the app is about to, so that an error in a config file (bad YAML under
    --config-dir, a value its schema refuses) is one line. A multirun is composed at each value of each
    swept key."""
    if any(a in ("--help", "-h", "--hydra-help") for a in args):
        return
    plain, dirs = split_args(args)
    multirun = any(a in ("-m", "--multirun") for a in args)
    points = sweep_points(plain) if multirun else [plain]
    for overrides, cfg in zip(points, compose_each(args, points, hydra_config=True)):
        check_prompts_file_settings(overrides, cfg)
        check_hardware_file(cfg.hydra.runtime.choices.hardware, dirs)


def check_hardware_file(name: str, dirs: tuple[Path, ...]) -> None:
    """A hardware profile file must give every number (config.REQUIRED_HARDWARE_FIELDS), or inherit a
    preset explicitly with Hydra's defaults list: the schema's defaults are the cpu preset's, which a
    partial profile would otherwise silently take."""
    import yaml

    from moe_lightning.config import missing_hardware_fields
    from moe_lightning.errors import ConfigError

    for folder in (CONF_DIR, *dirs):   # Hydra's search order: the package's presets, then --config-dir
        path = folder / "hardware" / f"{name}.yaml"
        if path.is_file():
            break
    else:
        return
    profile = yaml.safe_load(path.read_text()) or {}
    if not isinstance(profile, dict) or "defaults" in profile:
        return   # not a mapping: Hydra's own error; a defaults list: inherits what it names
    missing = missing_hardware_fields(profile)
    if missing:
        raise ConfigError(f"hardware={name} ({path}) does not give {', '.join(missing)}: a profile gives every "
                          "number (task=calibrate writes one), or inherits a preset's explicitly by starting "
                          "with `defaults: [t4, _self_]`")


# Workload fields only synthetic prompts read: a prompts file decides its requests and their lengths.
SYNTHETIC_ONLY = ("num_requests", "prompt_len_avg", "prompt_len_max", "seed")


def check_prompts_file_settings(overrides: list[str], cfg) -> None:
    """With a prompts file (workload.path), a synthetic-only workload field given on the command line
    would be silently ignored (its preset's placeholders aside: workload=jsonl's are 1): refused."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from moe_lightning.errors import ConfigError

    if not cfg.workload.path:
        return
    for o, text in zip(OverridesParser.create().parse_overrides(overrides), overrides):
        if o.key_or_group in {f"workload.{name}" for name in SYNTHETIC_ONLY}:
            raise ConfigError(f"{text.lstrip('+')}: the prompts file workload.path={cfg.workload.path} decides the "
                              "requests and their prompt lengths, so it would be ignored; drop it (to run fewer "
                              "requests, give a file of fewer lines)")


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for e in (exc, exc.__cause__) if e is not None for line in str(e).splitlines()]
    keep = [line for line in lines if line and not line.startswith(("reference_type", "object_type",
                                                                   "Set the environment variable"))]
    return " ".join(dict.fromkeys(keep))[:400] or type(exc).__name__


def _check_scalar(key: str, tp, value) -> None:
    from moe_lightning.errors import ConfigError

    name = tp if isinstance(tp, str) else getattr(tp, "__name__", "")
    accepted = _SCALARS.get(name)
    if accepted is None or value is None:
        return
    if not isinstance(value, accepted) or (name != "bool" and isinstance(value, bool)):
        wanted = {"float": "a number", "int": "an integer", "bool": "true or false"}[name]
        raise ConfigError(f"{key}: expected {wanted}, got {value!r}")


def _check_list(o, tp, value) -> None:
    """A list field given one plain value (task.inputs=a.json): OmegaConf's "str is not a ListConfig"
    would not say how to write a list on the command line."""
    from moe_lightning.errors import ConfigError

    name = tp if isinstance(tp, str) else str(tp)
    if name.startswith(("list", "tuple")) and value is not None and not isinstance(value, (list, tuple)):
        key = o.key_or_group
        raise ConfigError(f"{key}={value}: {key} is a list; write it in brackets, the whole override quoted for the "
                          f"shell: '{key}=[{value}]' (several: '{key}=[a,b]')")


def _resolve_type(tp):
    from moe_lightning import config

    return getattr(config, tp, tp) if isinstance(tp, str) else tp


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
    try:
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
        exit_interrupted(str(exc) or "interrupted", getattr(exc, "exit_code", 130))
    except Exception:
        from moe_lightning.launch import another_rank_failed

        if another_rank_failed():   # torchrun: a collective broke as that rank exited; its line is shown
            logging.shutdown()
            os._exit(1)
        raise


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
            raise ConfigError(f"{override}: task=compare runs the systems of task.systems with their own "
                              "settings, so it would be ignored; list them there: 'task.systems=[cgopipe,flexgen]'")
        if cfg.task.name == "compare" and key == "trace" and cfg.trace:
            raise ConfigError("trace=true: task=compare does not trace its systems' runs; trace one with "
                              "task=generate system=<name> trace=true")


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
    from moe_lightning.files import lock_output
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
        for key, path in written.items():
            if path in _sweep_written:
                raise ConfigError(f"{key}={named[key]}: an earlier job of this sweep wrote it; give each job its "
                                  "own path (one with ${hydra:job.num} in it, say)")
            locks.append(lock_output(named[key], key=key))
        _check_output_paths(cfg)
        if cfg.out and cfg.task.name != "report" and Path(cfg.out).suffix != ".json":
            raise ConfigError(f"out={cfg.out}: task={cfg.task.name} writes a JSON document there; give a path "
                              "ending in .json")
        cfg.logger.check()   # logger.dir: written once the task is done, so checked before it starts
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    _sweep_written.update(written.values())
    return locks


# The files out= and outputs= name for the jobs this process ran so far: a sweep's jobs each write their own.
_sweep_written: set[Path] = set()


def check_sweep_outputs(args: list[str]) -> None:
    """A multirun whose out= or outputs= is one fixed path: every job would write that file, each
    replacing the one before (or, without overwrite=true, every job after the first refused after the
    first one's work). Refused before any job runs; a path per job (an interpolation, a sweep) is not."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from moe_lightning.errors import ConfigError

    if not any(a in ("-m", "--multirun") for a in args):
        return
    plain, _ = split_args(args)
    for o, text in zip(OverridesParser.create().parse_overrides(plain), plain):
        if o.key_or_group in ("out", "outputs") and o.value() and not o.is_sweep_override() and "${" not in text:
            raise ConfigError(f"{text}: every job of this multirun would write it, each replacing the last; drop "
                              f"it (each job writes its documents in its own folder), or give each job its own "
                              f"path: {o.key_or_group}='runs/x-${{hydra:job.num}}{Path(str(o.value())).suffix}'")


# A multirun job's number and id: Hydra sets them for each job of a sweep and resolves them to None in a
# single run, so out=${hydra:job.num} would be out left at its default and out=x-${hydra:job.num}.json x-None.json.
SWEEP_ONLY = re.compile(r"\$\{\s*hydra:\s*(job\.(?:num|id))\s*\}")


def check_sweep_only_interpolations(args: list[str]) -> None:
    """An override of a single run that names a multirun job's number or id: one line before Hydra makes
    a run folder, not a document at a path the user did not ask for."""
    from moe_lightning.errors import ConfigError

    if any(a.partition("=")[0] in (*MODES, "--help", "-h", "--hydra-help") for a in args):
        return   # a multirun (each job has them), or a mode that runs nothing
    plain, _ = split_args(args)
    if any(a.partition("=")[0] == "hydra.mode" and a.partition("=")[2].strip().upper() == "MULTIRUN" for a in plain):
        return
    for text in plain:
        found = SWEEP_ONLY.search(text)
        if found:
            raise ConfigError(f"{text}: ${{hydra:{found.group(1)}}} resolves to nothing outside a multirun sweep; "
                              "give a plain value, or run the sweep with -m")


# ${hydra:job.override_dirname}: the job's overrides joined (key=value,...), less the keys of
# hydra.job.config.override_dirname.exclude_keys. An override whose value names it contains itself.
OVERRIDE_DIRNAME = re.compile(r"(?<!\\)\$\{\s*hydra:\s*job\.override_dirname\s*\}")


def check_self_referring_overrides(args: list[str]) -> None:
    """An override whose value interpolates ${hydra:job.override_dirname} while its key is part of it
    would resolve without end (OmegaConf's RecursionError): one line naming the override and the way out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from moe_lightning.errors import ConfigError

    plain, _ = split_args(args)
    parsed = OverridesParser.create().parse_overrides(plain)
    naming = [(o.key_or_group, text) for o, text in zip(parsed, plain)
              if OVERRIDE_DIRNAME.search(text) and not o.key_or_group.startswith("hydra")]   # hydra.* are not in it
    if not naming:
        return
    hydra_only = [text for o, text in zip(parsed, plain) if o.key_or_group.startswith("hydra")]
    hydra = compose_each(args, [hydra_only], hydra_config=True)[0].hydra
    excluded = set(hydra.job.config.override_dirname.exclude_keys)
    for key, text in naming:
        if key not in excluded:
            raise ConfigError(f"{text}: {key} would refer to itself without end, as ${{hydra:job.override_dirname}} "
                              f"joins this job's overrides, this one included; exclude {key} from it "
                              f"(hydra.job.config.override_dirname.exclude_keys=[{key}]) or give {key} a value "
                              "without it")


# ${hydra:KEY} for any KEY of Hydra's own config (the job, its overrides, the run's choices ...).
HYDRA_NODE = re.compile(r"(?<!\\)\$\{\s*hydra:\s*([\w.\[\]-]+)\s*\}")


def check_container_interpolations(args: list[str]) -> None:
    """An override whose value interpolates a list or a mapping of Hydra's config (${hydra:job},
    ${hydra:overrides.task}): OmegaConf refuses it as a whole value ("Cannot convert DictConfig to
    string") and writes its repr inside a longer one (out=${hydra:job}.json, a file named after a dict):
    one line naming the override and the single values to use instead. hydra.* overrides are left to
    Hydra (a list field of its own may take a list)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import DictConfig, ListConfig, OmegaConf

    from moe_lightning.errors import ConfigError

    plain, _ = split_args(args)
    parsed = OverridesParser.create().parse_overrides(plain)
    naming = [(text, HYDRA_NODE.findall(text)) for o, text in zip(parsed, plain)
              if not o.key_or_group.startswith("hydra")]
    naming = [(text, keys) for text, keys in naming if keys]
    if not naming:
        return
    hydra_only = [text for o, text in zip(parsed, plain) if o.key_or_group.startswith("hydra")]
    hydra = compose_each(args, [hydra_only], hydra_config=True)[0].hydra
    for text, keys in naming:
        for key in keys:
            node = OmegaConf.select(hydra, key, throw_on_missing=False, throw_on_resolution_failure=False)
            if isinstance(node, (DictConfig, ListConfig)):
                kind = "a list" if isinstance(node, ListConfig) else "a mapping"
                raise ConfigError(f"{text}: ${{hydra:{key}}} names {kind} of Hydra's config, not a string; "
                                  f"interpolate one value of it (for a file name: ${{hydra:job.override_dirname}} "
                                  "or ${hydra:job.name})")


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


# The documents a task writes into its run folder beside run.json (unless out= names another file).
RUN_FOLDER_DOCUMENTS = {"compare": ("comparison.json",), "report": ("report.md",), "tune": ("trials.jsonl",)}


def check_run_folder(folder, cfg) -> None:
    """A run folder that holds the documents this run would write there (a reused hydra.run.dir, or a
    multirun's job folder under a reused hydra.sweep.dir) is refused unless overwrite=true: the earlier
    run's would be replaced."""
    from moe_lightning.errors import ConfigError

    if cfg.overwrite or not folder or os.environ.get("RANK", "0") != "0":   # other ranks write nothing there
        return
    names = list(RUN_FOLDER_DOCUMENTS.get(cfg.task.name, ()))
    if not cfg.out and cfg.task.name not in ("compare", "report"):
        names.append("run.json")
    if cfg.task.name == "generate" and not cfg.outputs:
        names.append("outputs.jsonl")
    for name in names:
        if (Path(folder) / name).exists():
            raise ConfigError(f"{Path(folder) / name} exists: the run folder holds an earlier run; pass "
                              "overwrite=true to replace it, or give another hydra.run.dir (hydra.sweep.dir)")


def check_reused_run_dir(args: list[str]) -> None:
    """A single run's hydra.run.dir that holds an earlier run is refused before Hydra writes its own
    record (.hydra/, the log) into it; a multirun's job folders are checked as each job starts."""
    if any(a.partition("=")[0] in (*MODES, "--help", "-h", "--hydra-help") for a in args):
        return   # a multirun, or a mode that runs nothing
    plain, _ = split_args(args)
    given = [a.split("=", 1)[1] for a in plain if a.split("=", 1)[0].lstrip("+") == "hydra.run.dir"]
    if not given or "${" in given[-1]:
        return   # the default folder carries the time and the process id: always a new one
    from omegaconf.errors import InterpolationResolutionError

    try:
        check_run_folder(given[-1], compose_each(args, [plain])[0])
    except InterpolationResolutionError:   # out=...${hydra:...}: resolved in the job, which checks the folder
        return


MODES = {"-m": "--multirun", "--multirun": "--multirun", "--cfg": "--cfg", "-c": "--cfg", "--info": "--info",
         "-i": "--info", "--shell-completion": "--shell-completion", "-sc": "--shell-completion"}


def check_modes(args: list[str]) -> None:
    """Hydra runs one mode at a time; it says so with a traceback, this with one line."""
    from moe_lightning.errors import ConfigError

    modes = ("--run", "--multirun", "--cfg", "--info", "--shell-completion")
    given = list(dict.fromkeys(f.option for f in command_line.read(args).flags if f.option in modes))
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} cannot be combined: give one of {', '.join(modes)}")


def main() -> None:
    # First of all: a SIGINT or SIGTERM while Hydra and the config load (seconds) is the same one line and
    # exit 130 / 143 as one during the run, not a traceback through whatever was importing.
    from moe_lightning.interrupt import install

    install()
    try:
        pipes.install()   # stdout's reader gone (| head): the run finishes its documents, then exits 141
        _main()
    except KeyboardInterrupt as exc:   # errors.Interrupted; a task's own says what was kept
        exit_interrupted(str(exc) or "interrupted", getattr(exc, "exit_code", 130))
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
