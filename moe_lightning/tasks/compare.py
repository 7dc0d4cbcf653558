"""task=compare: every listed system on the same model, hardware and workload, side by side.

Each system runs with its own policy (`policy_source=auto`: chosen the way its authors do, see
`moe_lightning.baselines.policies`) or with `cfg.policy` (`given`), through the same generation driver
(`run_generation`, warmed up, timed), each in a fresh spawned process (`isolate`) so that a crash or an
out-of-memory kills one system's run, not the comparison, and peak CPU memory is per system. Writes
`<run_dir>/<system>.json` (one run document per system), then, derived from those documents only,
`comparison.md`, `comparison.csv`, `comparison.json` (also to `cfg.out`, when given) and a bar chart
`comparison.png`. A system that
fails (its policy does not fit, a missing dependency, ...) gets a row with the reason.
`cfg.system` is not used: each listed system runs its default config, with `task.policy_source`. A
`policy.*` field the user set that a listed system never reads (reference and accelerate read the batch
size only) is refused before any system runs, naming it, rather than ignored for that system's row.

Measured (`mode=measure`): each system warms up, then runs the workload `repeats` times; the table shows
the median with its spread. With `interleave` (the default) the systems take turns: all are loaded and
warmed up (one at a time, untimed), then each round times one repeat of each system, in an order that
rotates by round, while the comparison holds the measurement lock. A host whose speed drifts (a shared
VM's can step by 30-50% for seconds) then slows every system alike: each ratio is the geometric mean of
the per-round ratios, flagged as within this machine's noise when its 95% interval holds 1.
When the systems cannot all be resident (host memory, or the GPU's budgets together), they run one after
another, and a ratio is flagged when the two runs' ranges (min..max) overlap. Simulated
(`mode=simulate`, for hardware that is not here): each system's own task graphs timed by the simulator
on the hardware profile; nothing is allocated.
Every row says its kind.

`task=bench system=a,b` would be a Hydra multirun (one process per system, no table); hence the list
here: `task=compare 'task.systems=[cgopipe,flexgen]'`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import multiprocessing
import statistics
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_lightning.config import (
    GB,
    HOST_WAIT_S,
    Policy,
    check_repeats,
    check_warmup,
    refuse_ignored_fields,
    set_policy_fields,
)
from moe_lightning.errors import ConfigError, MoELightningError
from moe_lightning.files import atomic_open, atomic_write, json_text
from moe_lightning.report import RunReport, Spread

if TYPE_CHECKING:
    from moe_lightning.run_config import RunConfig  # type hints only: it sits above the tasks

log = logging.getLogger("moe_lightning.compare")
GiB = 1 << 30
HOST_SHARE = 0.7    # of the available host memory, for every system's weights at once (interleaved)
GPU_SHARE = 0.9     # of the device's memory, for every system's GPU budget at once (interleaved)

DEFAULT_SYSTEMS = ("cgopipe", "flexgen", "flexgen_c", "deepspeed", "fastdecode", "accelerate")
OURS = "cgopipe"
CHOSEN_BY = {"cgopipe": "HRM optimizer", "flexgen": "FlexGen cost model + LP (attention on GPU)",
             "flexgen_c": "FlexGen cost model + LP (attention on CPU)",
             "deepspeed": "largest single batch that fits", "fastdecode": "HRM optimizer, CPU attention, unpaged",
             "accelerate": "largest batch whose KV cache fits beside device_map"}


@dataclass
class CompareTask:
    name: str = "compare"
    systems: list[str] = field(default_factory=lambda: list(DEFAULT_SYSTEMS))
    mode: str = "measure"           # measure: run each system here; simulate: time its graphs on the profile
    warmup_tokens: int = 2
    repeats: int = 5                # timed passes over the workload per system (median and spread)
    max_cv: float = 0.10            # a system whose throughput varies more is marked noisy
    min_repeat_s: float = 0.5       # a shorter workload is run several times per repeat (pyperf's loops)
    host_wait_s: float = HOST_WAIT_S   # per system: waiting out, and re-timing in, a slowed host, at most
    progress: bool = True
    policy_source: str = "auto"     # auto: each system picks its own; given: cfg.policy for every system
    isolate: bool = True            # one spawned process per system
    interleave: bool = True         # the systems take turns, one timed repeat each per round (all resident)

    def __post_init__(self) -> None:
        if self.policy_source not in ("auto", "given"):
            raise ConfigError(f"task.policy_source: got {self.policy_source!r}; accepted: auto, given")
        if self.mode not in ("measure", "simulate"):
            raise ConfigError(f"task.mode: got {self.mode!r}; accepted: measure, simulate")
        check_repeats(self.repeats, self.max_cv, "task", self.min_repeat_s, self.host_wait_s)
        check_warmup(self.warmup_tokens, "task")
        listed = f"task.systems=[{','.join(map(str, self.systems))}]"
        twice = [s for s in dict.fromkeys(self.systems) if self.systems.count(s) > 1]
        if twice:
            raise ConfigError(f"{listed}: {twice[0]} is listed twice; list each system once")
        if len(self.systems) < 2:   # the table's ratios would be of a system to itself
            raise ConfigError(f"{listed}: task=compare needs at least two distinct systems, e.g. "
                              "'task.systems=[cgopipe,flexgen]' (task=bench system=NAME measures one)")

    def run(self, cfg: RunConfig, given: dict[str, Policy] | None = None) -> RunReport:
        """Compare the systems; those named in `given` run that policy (task=tune: the tuned one)."""
        from moe_lightning.systems import SYSTEM_CONFIGS

        given = given or {}
        systems = list(self.systems)
        if self.policy_source == "auto" and any(s not in given for s in systems):
            refuse_ignored_fields(cfg.policy, "with task.policy_source=auto each system chooses its own batching "
                                  "and placement",
                                  "set task.policy_source=given to run the given policy on every system")
        unknown = [s for s in systems if s not in SYSTEM_CONFIGS]
        if unknown or not systems:
            raise ConfigError(f"task.systems: unknown {', '.join(unknown) or '(empty list)'}; accepted: "
                              f"{', '.join(SYSTEM_CONFIGS)}")
        if self.mode == "measure":
            refuse_unread_by_systems(cfg.policy, [s for s in systems if s not in given], systems)
        if self.mode == "measure":   # a model this host cannot hold: the line task=generate gives, once
            from moe_lightning.hostload import check_fits_host
            from moe_lightning.systems import resolve_device
            from moe_lightning.tasks.simulate import planning_model

            check_fits_host(planning_model(cfg.model), cfg.hardware, resolve_device(cfg.device),
                            ranks=cfg.parallel.world_size)
        run_dir = Path(cfg.run_dir or "runs/latest")
        run_dir.mkdir(parents=True, exist_ok=True)
        runs = {name: (dataclasses.replace(cfg, policy=given[name]) if name in given else cfg,
                       "given" if name in given else self.policy_source, run_dir / f"{name}.json")
                for name in systems}
        errors = None
        if self.mode == "measure" and self.isolate and self.interleave and len(systems) > 1:
            why_not = _not_resident_together(cfg, len(systems))
            if why_not is None:
                errors = self._run_interleaved(runs)
            else:
                log.warning("the systems run one after another, not interleaved: %s", why_not)
        rows = []
        for name in systems:
            sys_cfg, source, out = runs[name]
            if errors is not None:
                error = errors[name]
            else:
                print(f"[compare] {name} ...", flush=True)
                if self.mode == "simulate":
                    error = self._simulate(sys_cfg, name, out, source, given.get(name))
                elif self.isolate:
                    error = self._run_isolated(sys_cfg, name, out, source)
                else:
                    error = self._run_here(sys_cfg, name, out, source)
            rows.append(_row(name, out if error is None else None, error))
            row = rows[-1]
            shown = (f"{row['throughput_shown']} tok/s {row['kind']}" if error is None
                     else f"{row['status'].upper()}: {row['error']}")
            print(f"[compare] {name}: {shown}", flush=True)
        _add_ratios(rows)
        title = _title(rows, cfg)
        table = markdown_table(rows, title)
        atomic_write(run_dir / "comparison.md", table + "\n")
        write_csv(run_dir / "comparison.csv", rows)
        document = json_text(rows, indent=2) + "\n"
        atomic_write(run_dir / "comparison.json", document)
        if cfg.out:   # the comparison document, as comparison.json
            atomic_write(cfg.out, document)
        png = write_bar_chart(run_dir / "comparison.png", rows, title)
        print(table)
        print(f"run documents: {run_dir}/<system>.json; table: {run_dir / 'comparison.md'}, "
              f"{run_dir / 'comparison.csv'}; chart: {png}" + (f"; comparison: {cfg.out}" if cfg.out else ""))
        ok = [r for r in rows if r["status"] == "ok"]
        if not ok:
            first = rows[0]
            raise MoELightningError(f"task=compare: every system failed; {first['system']}: {first['error']} "
                                    f"(each system's reason in {run_dir / 'comparison.md'})")
        best = RunReport.from_json(max(ok, key=lambda r: r["throughput_tok_s"])["run_document"])
        best.extra["comparison"] = rows
        return best

    def _measure_args(self) -> tuple:
        return self.warmup_tokens, self.repeats, self.max_cv, self.min_repeat_s, self.progress, self.host_wait_s

    def _simulate(self, cfg: RunConfig, name: str, out: Path, source: str, given: Policy | None) -> str | None:
        from moe_lightning.tasks.simulate import SIMULATED_SCHEDULES, simulate_system

        if name not in SIMULATED_SCHEDULES:
            return f"skipped: {name} is a real library, measured only (no schedule of ours to simulate)"
        if SIMULATED_SCHEDULES[name] != name:   # task=simulate stands CGOPipe's schedule in for it
            return (f"skipped: {name} keeps every weight on one device and has no schedule of its own to simulate "
                    f"(its row would be {SIMULATED_SCHEDULES[name]}'s schedule under another name); measured only")
        try:
            report, _, _ = simulate_system(system_run_config(cfg, name, source), given=given)
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            log.debug("%s failed:\n%s", name, traceback.format_exc())
            return _reason(exc)
        report.task = cfg.task.name   # a comparison's document, as a measured one is (task=report groups by it)
        report.extra["policy_source"] = source
        if source == "auto":
            report.extra["policy_chosen_by"] = CHOSEN_BY.get(name, name)
        report.to_json(out)
        return None

    def _run_here(self, cfg: RunConfig, name: str, out: Path, source: str) -> str | None:
        try:
            run_system(cfg, name, str(out), source, *self._measure_args())
            return None
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            log.debug("%s failed:\n%s", name, traceback.format_exc())
            return _reason(exc)

    def _run_interleaved(self, runs: dict[str, tuple]) -> dict[str, str | None]:
        """Every system in its own spawned process, all resident; they take turns, one timed repeat each
        per round. Returns each system's error (None: its run document is written)."""
        from moe_lightning.hostload import measurement_lock
        from moe_lightning.interrupt import quiet_semaphore_warnings

        ctx = multiprocessing.get_context("spawn")
        errors: dict[str, str | None] = {}
        workers: dict[str, _TurnWorker] = {}
        names = list(runs)
        interleaved = {"rounds": self.repeats, "systems": names}
        try:
            with measurement_lock() as waited, quiet_semaphore_warnings():
                if waited > 1.0:
                    log.info("waited %.1f s for another measurement on this host to finish", waited)
                for name in names:   # loaded and warmed up one at a time (untimed, but not side by side)
                    print(f"[compare] {name}: loading and warming up ...", flush=True)
                    cfg, source, out = runs[name]
                    args = (cfg, name, str(out), source, self.warmup_tokens, self.repeats, self.max_cv,
                            self.min_repeat_s, False, self.host_wait_s, interleaved)
                    workers[name] = _TurnWorker(ctx, args)
                    errors[name] = workers[name].wait()
                for r in range(self.repeats):
                    alive = [n for n in names if errors[n] is None]
                    order = alive[r % len(alive):] + alive[:r % len(alive)] if alive else []
                    for name in order:
                        errors[name] = workers[name].take_turn()
                    print(f"[compare] round {r + 1}/{self.repeats}: " + ", ".join(
                        f"{n} {workers[n].timed[-1]:.2f}" if errors[n] is None else f"{n} failed" for n in order)
                        + " tok/s", flush=True)
                for name in names:   # each writes its run document in turn
                    if errors[name] is None:
                        errors[name] = workers[name].finish()
        finally:
            for worker in workers.values():
                worker.close()
        return errors

    def _run_isolated(self, cfg: RunConfig, name: str, out: Path, source: str) -> str | None:
        ctx = multiprocessing.get_context("spawn")
        try:
            with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                pool.submit(run_system, cfg, name, str(out), source, *self._measure_args()).result()
            return None
        except BrokenProcessPool:
            return "the process died (out of memory?)"
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            return _reason(exc)


class _TurnWorker:
    """One system's process in an interleaved comparison, and the parent's end of its pipe: the system
    times a repeat only when `take_turn` lets it (`run_generation`'s `turn`)."""

    def __init__(self, ctx, args: tuple) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_turn_worker_main, args=(child, *args), daemon=True)
        self.process.start()
        child.close()
        self.timed: list[float] = []

    def _receive(self) -> tuple[str, Any]:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            return "error", f"the process died (exit code {self.process.exitcode}; out of memory?)"

    def wait(self) -> str | None:
        """Until the system is ready to time (loaded, warmed up, or its last repeat timed)."""
        kind, value = self._receive()
        if kind == "error":
            return value
        if value is not None:
            self.timed.append(value)
        return None

    def take_turn(self) -> str | None:
        self.conn.send("go")
        return self.wait()

    def finish(self) -> str | None:
        self.conn.send("go")
        kind, value = self._receive()
        self.process.join()
        return value if kind == "error" else None

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


def _turn_worker_main(conn, cfg: RunConfig, name: str, out: str, source: str, *measure_args) -> None:
    def turn(previous) -> None:
        conn.send(("ready", None if previous is None else previous.throughput_tok_s))
        conn.recv()   # "go"

    try:
        run_system(cfg, name, out, source, *measure_args, turn=turn)
        conn.send(("done", out))
    except Exception as exc:  # noqa: BLE001 - recorded in the table
        log.debug("%s failed:\n%s", name, traceback.format_exc())
        conn.send(("error", _reason(exc)))


def _not_resident_together(cfg: RunConfig, systems: int) -> str | None:
    """Why `systems` runs of cfg's model cannot all be held at once here (None: they can): their weights
    in host memory, and on a GPU their memory budgets."""
    from moe_lightning.hostload import available_host_bytes
    from moe_lightning.systems import resolve_device
    from moe_lightning.tasks.simulate import planning_model

    spec = planning_model(cfg.model)
    need = systems * spec.total_params * spec.dtype_bytes   # as the reference engine and accelerate hold them
    avail = available_host_bytes()
    if avail is not None and need > HOST_SHARE * avail:
        return (f"{systems} copies of {spec.name}'s weights need {need / GiB:.1f} GiB of host memory, "
                f"{HOST_SHARE:.0%} of the {avail / GiB:.1f} GiB available is {HOST_SHARE * avail / GiB:.1f} GiB")
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        import torch

        total = torch.cuda.get_device_properties(device).total_memory
        budget = systems * cfg.hardware.gpu.memory_gib * GiB * cfg.hardware.gpu.usable_fraction
        if budget > GPU_SHARE * total:
            return (f"{systems} GPU budgets of {cfg.hardware.gpu.memory_gib:g} GiB exceed {GPU_SHARE:.0%} of "
                    f"{torch.cuda.get_device_name(device)}'s {total / GiB:.1f} GiB")
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if isinstance(exc, MoELightningError) else f"{type(exc).__name__}: {text}"


def refuse_unread_by_systems(policy: Policy, running: list[str], systems: list[str]) -> None:
    """One policy for every system: a field the user set (`config.set_policy_fields`, at its default too)
    that one of the `running` systems never reads (reference and accelerate read the batch size only)
    would be ignored for it, its row recorded as if it had run it: refused, naming the system. Measured
    runs only: simulated, the reference runs CGOPipe's schedule on the whole policy, accelerate none."""
    from moe_lightning.config import field_names
    from moe_lightning.systems import refuse_unread_policy_fields

    set_here = list(set_policy_fields(policy, tuple(field_names(Policy))))
    for name in running:
        rest = [s for s in systems if s != name]
        listed = f" ('task.systems=[{','.join(rest)}]')" if len(rest) > 1 else ""
        refuse_unread_policy_fields(name, set_here, f"drop {name} from task.systems{listed}")


def system_run_config(cfg: RunConfig, name: str, policy_source: str) -> RunConfig:
    """cfg for one system with `policy_source`: `run_generation` then resolves the policy it runs
    (its own rule for the prompts actually given, or cfg.policy). The system cfg.system names keeps its
    settings (system.kv_block_size, kv_cache_tokens, refill ...: task=tune compares the tuned policy under
    the settings it was tuned with); the others run their defaults."""
    from moe_lightning.systems import SYSTEM_CONFIGS

    cls = SYSTEM_CONFIGS[name]
    base = cfg.system if cfg.system.name == name else cls()
    if "policy_source" in {f.name for f in dataclasses.fields(cls)}:
        base = dataclasses.replace(base, policy_source=policy_source)
    return dataclasses.replace(cfg, system=base)


def run_system(cfg: RunConfig, name: str, out: str, policy_source: str, warmup_tokens: int, repeats: int,
               max_cv: float, min_repeat_s: float, progress: bool, host_wait_s: float | None = None,
               interleaved: dict | None = None, turn=None) -> str:
    """Run one system and write its run document (the body of each spawned process); `turn` and
    `interleaved` (the rounds and the systems taking turns): an interleaved comparison's."""
    from moe_lightning.tasks.generate import run_generation

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys_cfg = system_run_config(cfg, name, policy_source)
    sys_cfg = dataclasses.replace(sys_cfg, out=out, trace=False)
    gen = run_generation(sys_cfg, progress=progress, warmup_tokens=warmup_tokens, repeats=repeats, max_cv=max_cv,
                         min_repeat_s=min_repeat_s, turn=turn, host_wait_s=host_wait_s)
    if interleaved is not None:
        gen.report.extra["interleaved"] = interleaved
    gen.report.extra["policy_source"] = policy_source
    if policy_source == "auto":
        gen.report.extra["policy_chosen_by"] = CHOSEN_BY.get(name, name)
    gen.report.to_json(out)
    return out


# ---- the table, derived from the run documents only -------------------------------------------------

def _row(name: str, doc_path: Path | None, error: str | None) -> dict[str, Any]:
    from moe_lightning.baselines.policies import policy_summary

    if doc_path is None:
        skipped = error.startswith("skipped: ")
        return {"system": name, "status": "skipped" if skipped else "failed",
                "error": error.removeprefix("skipped: ")}
    rep = RunReport.from_json(doc_path)
    m = rep.metrics
    if m.throughput_tok_s is None:   # a run that timed nothing has no figure to rank (0 would rank it last)
        return {"system": name, "status": "failed", "error": f"{doc_path}: nothing was timed (no request ran)"}
    p = Policy(**rep.policy)
    tput = m.spread.get("throughput_tok_s")
    spread = tput if tput is not None and tput.n > 1 else None
    return {
        "system": name, "status": "ok", "error": None, "run_document": str(doc_path), "kind": m.kind,
        "where": _where(rep), "throughput_tok_s": m.throughput_tok_s,
        "throughput_shown": spread.show(".2f") if spread else f"{m.throughput_tok_s:.2f}",
        "repeats": m.repeats, "repeat_tok_s": rep.extra.get("repeat_throughput_tok_s"),
        "interleaved": rep.extra.get("interleaved"), "throughput_stdev": spread.stdev if spread else None,
        "throughput_min": spread.min if spread else None, "throughput_max": spread.max if spread else None,
        "throughput_cv": spread.cv if spread else None, "noisy": m.noisy, "noise": "; ".join(m.noise),
        "decode_tok_s": m.decode_tok_s,
        "prefill_s": m.prefill_s, "decode_s": m.decode_s, "generated_tokens": m.generated_tokens,
        "policy": policy_summary(p), "policy_source": rep.extra.get("policy_source"),
        "batch_size": p.batch_size, "micro_batch_size": p.micro_batch_size, "attn_on_gpu": p.attn_on_gpu,
        "expert_gpu_fraction": p.expert_gpu_fraction, "kv_gpu_fraction": p.kv_gpu_fraction,
        "pages_per_layer": p.num_pages,
        "peak_gpu_bytes": m.peak_gpu_bytes, "peak_cpu_bytes": m.peak_cpu_bytes,
        "link_h2d_bytes": m.link_bytes.get("h2d", 0), "link_d2h_bytes": m.link_bytes.get("d2h", 0),
        "link_bytes_estimated": bool(rep.extra.get("link_bytes_estimated", False)),
    }


def _where(rep: RunReport) -> str:
    """Where a figure comes from: the detected device (measured) or the hardware profile (simulated)."""
    from moe_lightning.report import where_of

    return where_of(rep)


def _add_ratios(rows: list[dict]) -> None:
    """Each system's tokens/s over the best baseline's, and whether the difference is within this
    machine's noise. Interleaved: the geometric mean of the per-round ratios, within noise when its 95%
    interval holds 1; else the ratio of the medians, within noise when the two measured ranges overlap."""
    base = [r for r in rows if r["status"] == "ok" and r["system"] != OURS]
    best = max(base, key=lambda r: r["throughput_tok_s"]) if base else None
    for r in rows:
        ok = r["status"] == "ok" and best and best["throughput_tok_s"]
        r["ratio_to_best_baseline"] = r["throughput_tok_s"] / best["throughput_tok_s"] if ok else None
        r["best_baseline"] = best["system"] if best else None
        r["ratio_rounds"] = None
        paired = _paired_ratios(r, best) if ok and r is not best else None
        if paired:
            mean, lo, hi = paired_interval(paired)
            r["ratio_rounds"] = {**Spread.of(paired).to_dict(), "geometric_mean": mean,
                                 "ci95": [lo, hi] if len(paired) > 1 else None}   # one round: no interval
            r["ratio_to_best_baseline"] = mean
        # None: one repeat each, so this machine's noise is unknown (not: beyond it)
        r["ratio_within_noise"] = _within_noise(r, best) if ok and r is not best else False
    # The fastest system, and those this machine cannot tell from it: a comparison names a winner only
    # as far as its measurements can back one.
    ok = [r for r in rows if r["status"] == "ok"]
    fastest = max(ok, key=lambda r: r["throughput_tok_s"]) if ok else None
    for r in rows:
        r["fastest"] = r is fastest
        r["ties_fastest"] = _within_noise(r, fastest) if r in ok and r is not fastest else False


def _within_noise(a: dict, b: dict) -> bool | None:
    """Can this machine not tell a from b? Interleaved: the 95% interval of a's per-round ratio to b holds
    1; else their measured ranges overlap. None when it cannot say: a single repeat has no spread (a
    range of one point is not a steady run)."""
    paired = _paired_ratios(a, b)
    if paired and len(paired) > 1:
        _, lo, hi = paired_interval(paired)
        return lo <= 1.0 <= hi
    return _ranges_overlap(a, b)


# Student's t, two-sided 95%, by degrees of freedom 1..30 (beyond: 2.0, a little over the normal's 1.96)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_interval(ratios: list[float]) -> tuple[float, float, float]:
    """The geometric mean of per-round ratios and its 95% confidence interval (a t interval on their logs:
    a ratio's noise is multiplicative). One ratio: no interval, (r, r, r)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), math.exp(mean), math.exp(mean)
    half = (T95[len(logs) - 2] if len(logs) - 1 <= len(T95) else 2.0) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def _paired_ratios(a: dict, b: dict) -> list[float] | None:
    """a's tokens/s over b's round by round, when both were timed in the same interleaved rounds."""
    if not a.get("interleaved") or a.get("interleaved") != b.get("interleaved"):
        return None
    x, y = a.get("repeat_tok_s") or [], b.get("repeat_tok_s") or []
    if len(x) != len(y) or not x:
        return None
    return [p / q for p, q in zip(x, y) if p is not None and q] or None   # None: a repeat that timed nothing


def _ranges_overlap(a: dict, b: dict) -> bool | None:
    if a.get("throughput_min") is None or b.get("throughput_min") is None:
        return None   # a system timed once (or simulated) has no range
    return a["throughput_min"] <= b["throughput_max"] and b["throughput_min"] <= a["throughput_max"]


def _title(rows: list[dict], cfg: RunConfig) -> str:
    from moe_lightning.engine.hf_config import model_label

    # "on t4" alone read as measured on a T4 when the runs were timed on this host under t4's budgets
    measured = sorted({r["where"] for r in rows if r["status"] == "ok" and r["kind"] == "measured"})
    where = (f"measured on {', '.join(measured)} under profile {cfg.hardware.name}'s budgets" if measured
             else f"on profile {cfg.hardware.name}")
    return (f"{model_label(cfg.model)} {where}, workload {cfg.workload.name} "
            f"({cfg.workload.num_requests} requests, gen {cfg.workload.gen_len})")


def markdown_table(rows: list[dict], title: str) -> str:
    lines = [f"### Throughput: {title}", "",
             "| system | kind | where | tokens/s | vs best baseline | decode tok/s | policy | peak GPU GiB "
             "| peak CPU GiB | link h2d / d2h GB |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['system']} | - | - | {r['status']} | - | - | {r['error']} | - | - | - |")
            continue
        ratio = f"{r['ratio_to_best_baseline']:.2f}x" if r["ratio_to_best_baseline"] else "-"
        if r["ratio_within_noise"]:
            ratio += " (within noise)"
        elif r["ratio_within_noise"] is None and r["kind"] == "measured":
            ratio += " (noise unknown)"
        shown = r["throughput_shown"] + (" NOISY" if r["noisy"] else "")
        est = " (est.)" if r["link_bytes_estimated"] else ""
        decode = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.2f}"
        lines.append(f"| {r['system']} | {r['kind']} | {r['where']} | {shown} | {ratio} | {decode} "
                     f"| {r['policy']} | {r['peak_gpu_bytes'] / GiB:.3f} | {r['peak_cpu_bytes'] / GiB:.3f} "
                     f"| {r['link_h2d_bytes'] / GB:.3f} / {r['link_d2h_bytes'] / GB:.3f}{est} |")
    kinds = sorted({r["kind"] for r in rows if r["status"] == "ok"})
    lines += ["", "tokens/s = generated tokens / (prefill + decode time)"   # a simulation has no warm-up
              + ("; measured: after warm-up, median ± stdev over the repeats (cv, n)" if "measured" in kinds else "")
              + ("; simulated: the simulator timing each system's own task graphs on the hardware profile "
                 "(no device used; peak memory as planned)" if "simulated" in kinds else "")
              + ". vs best baseline = tokens/s over the best system other than cgopipe"
              + ("" if "measured" not in kinds else
                 "; the systems took turns, one timed repeat each per round (interleaved): the ratio is the "
                 "geometric mean of the per-round ratios, (within noise) when its 95% interval holds 1"
                 if any(r.get("interleaved") for r in rows) else
                 "; the systems ran one after another: (within noise) when the two systems' measured ranges "
                 "(min..max) overlap")
              + ". Memory in GiB, link bytes in decimal GB."]
    fastest = next((r for r in rows if r.get("fastest")), None)
    if fastest is not None and fastest["kind"] == "measured":
        ties = [r["system"] for r in rows if r.get("ties_fastest")]
        unknown = [r["system"] for r in rows if r["status"] == "ok" and r.get("ties_fastest") is None]
        lines.append(f"Fastest here: {fastest['system']}" + (
            f"; {', '.join(ties)} within this machine's noise of it (no winner among them)" if ties else
            "" if unknown else ", beyond this machine's noise") + (
            f"; against {', '.join(unknown)} this machine's noise is unknown (one timed repeat: no spread; "
            "task.repeats=2 or more tells)" if unknown else ""))
    noisy = [r for r in rows if r.get("noisy")]
    for r in noisy:
        lines.append(f"NOISY {r['system']}: {r['noise']}")
    return "\n".join(lines)


CSV_FIELDS = ("system", "status", "kind", "where", "throughput_tok_s", "repeats", "throughput_stdev",
              "throughput_min", "throughput_max", "throughput_cv", "noisy", "noise", "ratio_to_best_baseline",
              "best_baseline", "ratio_within_noise", "fastest", "ties_fastest", "decode_tok_s", "prefill_s",
              "decode_s", "generated_tokens", "policy", "policy_source", "batch_size", "micro_batch_size",
              "attn_on_gpu", "expert_gpu_fraction", "kv_gpu_fraction", "pages_per_layer", "peak_gpu_bytes",
              "peak_cpu_bytes", "link_h2d_bytes", "link_d2h_bytes", "link_bytes_estimated", "run_document", "error")


def write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in CSV_FIELDS})


def write_bar_chart(path: Path, rows: list[dict], title: str) -> Path | None:
    from moe_lightning.plots import pyplot, save

    try:
        plt = pyplot()
    except ImportError:
        log.warning("matplotlib is not installed: no bar chart (pip install 'moe-lightning[plot]')")
        return None
    names = [r["system"] for r in rows]
    values = [r["throughput_tok_s"] if r["status"] == "ok" else 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4))
    colors = ["tab:red" if n == OURS else "tab:blue" for n in names]
    bars = ax.bar(names, values, color=colors)
    for bar, r in zip(bars, rows):
        label = r["status"] if r["status"] != "ok" else (
            f"{r['ratio_to_best_baseline']:.2f}x" if r["ratio_to_best_baseline"] else f"{r['throughput_tok_s']:.1f}")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    kinds = "/".join(sorted({r["kind"] for r in rows if r["status"] == "ok"}))
    ax.set_ylabel(f"tokens/s, end to end ({kinds})")
    ax.set_title(title, fontsize=9)
    return save(fig, path)
