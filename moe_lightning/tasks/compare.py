"""task=compare: every listed system on the same model, hardware and workload, side by side.

Each system runs with its own policy (`policy_source=auto`: chosen the way its authors do, see
`moe_lightning.baselines.policies`) or with `cfg.policy` (`given`), through the same generation driver
(`run_generation`, warmed up, timed), each in a fresh spawned process (`isolate`) so that a crash or an
out-of-memory kills one system's run, not the comparison, and peak CPU memory is per system. Writes
`<run_dir>/<system>.json` (one run document per system), then, derived from those documents only,
`comparison.md`, `comparison.csv`, `comparison.json` and a bar chart `comparison.png`. A system that
fails (its policy does not fit, a missing dependency, ...) gets a row with the reason.
`cfg.system` is not used: each listed system runs its default config, with `task.policy_source`.

Measured (`mode=measure`): each system warms up, then runs the workload `repeats` times; the table shows
the median with its spread, and a ratio whose two runs' ranges (min..max) overlap is flagged: the
difference is within this machine's noise. Simulated (`mode=simulate`, for hardware that is not here):
each system's own task graphs timed by the simulator on the hardware profile; nothing is allocated.
Every row says its kind.

`task=bench system=a,b` would be a Hydra multirun (one process per system, no table); hence the list
here: `task=compare 'task.systems=[cgopipe,flexgen]'`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import multiprocessing
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_lightning.config import GB, Policy, check_repeats
from moe_lightning.errors import ConfigError, MoELightningError
from moe_lightning.files import atomic_open, atomic_write
from moe_lightning.report import RunReport

if TYPE_CHECKING:
    from moe_lightning.run_config import RunConfig  # type hints only: it sits above the tasks

log = logging.getLogger("moe_lightning.compare")
GiB = 1 << 30

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
    progress: bool = True
    policy_source: str = "auto"     # auto: each system picks its own; given: cfg.policy for every system
    isolate: bool = True            # one spawned process per system

    def __post_init__(self) -> None:
        if self.policy_source not in ("auto", "given"):
            raise ConfigError(f"task.policy_source: got {self.policy_source!r}; accepted: auto, given")
        if self.mode not in ("measure", "simulate"):
            raise ConfigError(f"task.mode: got {self.mode!r}; accepted: measure, simulate")
        check_repeats(self.repeats, self.max_cv, "task", self.min_repeat_s)

    def run(self, cfg: RunConfig, given: dict[str, Policy] | None = None) -> RunReport:
        """Compare the systems; those named in `given` run that policy (task=tune: the tuned one)."""
        from moe_lightning.systems import SYSTEM_CONFIGS

        given = given or {}
        systems = list(dict.fromkeys(self.systems))
        unknown = [s for s in systems if s not in SYSTEM_CONFIGS]
        if unknown or not systems:
            raise ConfigError(f"task.systems: unknown {', '.join(unknown) or '(empty list)'}; accepted: "
                              f"{', '.join(n for n in SYSTEM_CONFIGS if n != 'reference')}")
        run_dir = Path(cfg.run_dir or "runs/latest")
        run_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in systems:
            out = run_dir / f"{name}.json"
            print(f"[compare] {name} ...", flush=True)
            sys_cfg = dataclasses.replace(cfg, policy=given[name]) if name in given else cfg
            source = "given" if name in given else self.policy_source
            if self.mode == "simulate":
                error = self._simulate(sys_cfg, name, out, source, given.get(name))
            elif self.isolate:
                error = self._run_isolated(sys_cfg, name, out, source)
            else:
                error = self._run_here(sys_cfg, name, out, source)
            rows.append(_row(name, out if error is None else None, error))
            print(f"[compare] {name}: " + (f"{rows[-1]['throughput_shown']} tok/s {rows[-1]['kind']}"
                                            if error is None else f"{rows[-1]['status'].upper()}: {error}"), flush=True)
        _add_ratios(rows)
        title = _title(rows, cfg)
        table = markdown_table(rows, title)
        atomic_write(run_dir / "comparison.md", table + "\n")
        write_csv(run_dir / "comparison.csv", rows)
        atomic_write(run_dir / "comparison.json", json.dumps(rows, indent=2) + "\n")
        png = write_bar_chart(run_dir / "comparison.png", rows, title)
        print(table)
        print(f"run documents: {run_dir}/<system>.json; table: {run_dir / 'comparison.md'}, "
              f"{run_dir / 'comparison.csv'}; chart: {png}")
        ok = [r for r in rows if r["status"] == "ok"]
        if not ok:
            raise MoELightningError("task=compare: every system failed (reasons in comparison.md)")
        best = RunReport.from_json(max(ok, key=lambda r: r["throughput_tok_s"])["run_document"])
        best.extra["comparison"] = rows
        return best

    def _measure_args(self) -> tuple:
        return self.warmup_tokens, self.repeats, self.max_cv, self.min_repeat_s, self.progress

    def _simulate(self, cfg: RunConfig, name: str, out: Path, source: str, given: Policy | None) -> str | None:
        from moe_lightning.tasks.simulate import SIMULATED_SCHEDULES, simulate_system

        if name not in SIMULATED_SCHEDULES:
            return f"skipped: {name} is a real library, measured only (no schedule of ours to simulate)"
        try:
            report, _, _ = simulate_system(system_run_config(cfg, name, source), given=given)
        except Exception as exc:  # noqa: BLE001 - recorded in the table
            log.debug("%s failed:\n%s", name, traceback.format_exc())
            return _reason(exc)
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


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text if isinstance(exc, MoELightningError) else f"{type(exc).__name__}: {text}"


def system_run_config(cfg: RunConfig, name: str, policy_source: str) -> RunConfig:
    """cfg for one system with `policy_source`: `run_generation` then resolves the policy it runs
    (its own rule for the prompts actually given, or cfg.policy)."""
    from moe_lightning.systems import SYSTEM_CONFIGS

    cls = SYSTEM_CONFIGS[name]
    names = {f.name for f in dataclasses.fields(cls)}
    return dataclasses.replace(cfg, system=cls(policy_source=policy_source) if "policy_source" in names else cls())


def run_system(cfg: RunConfig, name: str, out: str, policy_source: str, warmup_tokens: int, repeats: int,
               max_cv: float, min_repeat_s: float, progress: bool) -> str:
    """Run one system and write its run document (the body of each spawned process)."""
    from moe_lightning.tasks.generate import run_generation

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys_cfg = system_run_config(cfg, name, policy_source)
    sys_cfg = dataclasses.replace(sys_cfg, out=out, trace=False)
    gen = run_generation(sys_cfg, progress=progress, warmup_tokens=warmup_tokens, repeats=repeats, max_cv=max_cv,
                         min_repeat_s=min_repeat_s)
    gen.report.extra["policy_source"] = policy_source
    if policy_source == "auto":
        gen.report.extra["policy_chosen_by"] = CHOSEN_BY.get(name, name)
    gen.report.to_json(out)
    return out


# ---- the table, derived from the run documents only -------------------------------------------------

def _row(name: str, doc_path: Path | None, error: str | None) -> dict[str, Any]:
    from moe_lightning.baselines.policies import policy_summary

    if doc_path is None:
        return {"system": name, "status": "skipped" if error.startswith("skipped:") else "failed", "error": error}
    rep = RunReport.from_json(doc_path)
    m = rep.metrics
    p = Policy(**rep.policy)
    tput = m.spread.get("throughput_tok_s")
    spread = tput if tput is not None and tput.n > 1 else None
    return {
        "system": name, "status": "ok", "error": None, "run_document": str(doc_path), "kind": m.kind,
        "where": _where(rep), "throughput_tok_s": m.throughput_tok_s,
        "throughput_shown": spread.show(".2f") if spread else f"{m.throughput_tok_s:.2f}",
        "repeats": m.repeats, "throughput_stdev": spread.stdev if spread else None,
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
    if rep.metrics.kind == "measured":
        detected = rep.hardware.get("detected") or {}
        return detected.get("gpu") or f"this host ({detected.get('device', 'cpu')})"
    return f"profile {rep.hardware['profile']['name']}"


def _add_ratios(rows: list[dict]) -> None:
    """Each system's tokens/s over the best baseline's, and whether their measured ranges overlap (the
    ratio is then within this machine's noise)."""
    base = [r for r in rows if r["status"] == "ok" and r["system"] != OURS]
    best = max(base, key=lambda r: r["throughput_tok_s"]) if base else None
    for r in rows:
        ok = r["status"] == "ok" and best and best["throughput_tok_s"]
        r["ratio_to_best_baseline"] = r["throughput_tok_s"] / best["throughput_tok_s"] if ok else None
        r["best_baseline"] = best["system"] if best else None
        r["ratio_within_noise"] = bool(ok and r is not best and _ranges_overlap(r, best))


def _ranges_overlap(a: dict, b: dict) -> bool:
    if a.get("throughput_min") is None or b.get("throughput_min") is None:
        return False
    return a["throughput_min"] <= b["throughput_max"] and b["throughput_min"] <= a["throughput_max"]


def _title(rows: list[dict], cfg: RunConfig) -> str:
    return (f"{cfg.model.name} on {cfg.hardware.name}, workload {cfg.workload.name} "
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
        shown = r["throughput_shown"] + (" NOISY" if r["noisy"] else "")
        est = " (est.)" if r["link_bytes_estimated"] else ""
        lines.append(f"| {r['system']} | {r['kind']} | {r['where']} | {shown} | {ratio} | {r['decode_tok_s']:.2f} "
                     f"| {r['policy']} | {r['peak_gpu_bytes'] / GiB:.3f} | {r['peak_cpu_bytes'] / GiB:.3f} "
                     f"| {r['link_h2d_bytes'] / GB:.3f} / {r['link_d2h_bytes'] / GB:.3f}{est} |")
    kinds = sorted({r["kind"] for r in rows if r["status"] == "ok"})
    lines += ["", "tokens/s = generated tokens / (prefill + decode time), after warm-up"
              + ("; measured: median ± stdev over the repeats (cv, n)" if "measured" in kinds else "")
              + ("; simulated: the simulator timing each system's own task graphs on the hardware profile "
                 "(no device used; peak memory as planned)" if "simulated" in kinds else "")
              + ". vs best baseline = tokens/s over the best system other than cgopipe; "
              "(within noise): the two systems' measured ranges (min..max) overlap. "
              "Memory in GiB, link bytes in decimal GB."]
    noisy = [r for r in rows if r.get("noisy")]
    for r in noisy:
        lines.append(f"NOISY {r['system']}: {r['noise']}")
    return "\n".join(lines)


CSV_FIELDS = ("system", "status", "kind", "where", "throughput_tok_s", "repeats", "throughput_stdev",
              "throughput_min", "throughput_max", "throughput_cv", "noisy", "noise", "ratio_to_best_baseline",
              "best_baseline", "ratio_within_noise", "decode_tok_s", "prefill_s",
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
