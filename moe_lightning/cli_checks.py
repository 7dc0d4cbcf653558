"""The checks of the command line made before Hydra runs the app (`cli._main`), each a one-line ConfigError:
the overrides against the config schema (an unknown key or group option, a value of the wrong type), the
config composed as the app is about to (a bad config file, a partial hardware profile, synthetic-only
workload fields beside a prompts file), ${hydra:...} interpolations that cannot work (a multirun job's
number in a single run, a self-referring job.override_dirname, a list or mapping of Hydra's config), a
multirun's fixed output path, a reused run folder, and modes given together. Also the Hydra helpers they
share (the command line split, the config composed with Hydra's compose API)."""

from __future__ import annotations

import os
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

from moe_lightning import command_line  # stdlib only (Hydra on use)

CONF_DIR = Path(__file__).resolve().parent / "conf"


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
    from moe_lightning.files import RUN_FOLDER_LOCK, lock_run_folder

    if (Path(given[-1]) / RUN_FOLDER_LOCK).exists():   # a run in it now: refused before Hydra rewrites its .hydra/
        lock_run_folder(given[-1]).release()   # (the job takes the lock for good, after Hydra's set-up)
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
