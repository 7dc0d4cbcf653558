"""task=report: tables and plots derived from run documents only (never typed by hand): a markdown
table and CSV of every run document found (in the run folder; `out=` takes one of them too, by its suffix:
`.md` or `.csv`), throughput bars, and the tuning plots used by task=tune."""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import logging
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from moe_lightning.errors import ConfigError
from moe_lightning.files import atomic_open, atomic_write
from moe_lightning.plots import save
from moe_lightning.report import KINDS, SCHEMA_VERSION, RunReport, where_of

if TYPE_CHECKING:
    from moe_lightning.run_config import RunConfig  # type hints only: it sits above the tasks

log = logging.getLogger("moe_lightning.report")

COLUMNS = ("system", "task", "kind", "where", "model", "hardware", "workload", "gen_len", "padding", "batch_size",
           "micro_batch_size", "attn_on_gpu", "expert_gpu_fraction", "tok_s", "tok_s_stdev", "cv", "repeats",
           "noisy", "hrm_tok_s", "sim_tok_s", "peak_gpu_gib", "file")
OLD_KINDS = {"simulate": "simulated", "plan": "predicted"}   # schema 1 documents carry no kind


def load_documents(patterns: list[str]) -> tuple[list[tuple[Path, RunReport]], list[str]]:
    """-> (the run documents the patterns match, a reason for each matched file that was skipped).

    JSON files that are not run documents (traces, plans of other tools) are skipped without a reason;
    a file that looks like a run document but cannot be read is skipped with one."""
    docs, skipped, seen = [], [], set()
    for pattern in patterns:
        for path in _files(pattern):
            if path.resolve() in seen:   # listed twice, or matched by two patterns: once
                continue
            seen.add(path.resolve())
            try:
                data = json.loads(path.read_bytes())
            except OSError as exc:
                skipped.append(f"{path}: cannot read ({exc.strerror or exc})")
                continue
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                skipped.append(f"{path}: not valid JSON (truncated or damaged)")
                continue
            if not (isinstance(data, dict) and "schema_version" in data and "metrics" in data):
                continue
            unknown = sorted(set(data) - {f.name for f in dataclasses.fields(RunReport)})
            newer = isinstance(data["schema_version"], int) and data["schema_version"] > SCHEMA_VERSION
            if unknown or newer:
                log.warning("%s: schema version %s (this reader: %d); ignored fields: %s", path,
                            data["schema_version"], SCHEMA_VERSION, ", ".join(unknown) or "none")
            wrong = malformed_field(data)
            if wrong is not None:   # read as is, it would end the report in a traceback or a wrong row
                skipped.append(f"{path}: a run document with a malformed field: {wrong}")
                continue
            try:
                docs.append((path, RunReport.from_dict(data)))
            except (TypeError, ValueError, KeyError, AttributeError):
                skipped.append(f"{path}: a run document with missing or malformed fields")
    return docs, skipped


def _files(pattern: str) -> list[Path]:
    """The files a pattern names: a glob's matches, and every .json under a folder it matches (a sweep's
    or a comparison's run folder given as it is)."""
    files = []
    for name in sorted(glob.glob(pattern, recursive=True)):
        path = Path(name)
        if path.is_dir():
            files += sorted(f for f in path.rglob("*.json") if f.is_file())
        elif path.is_file():
            files.append(path)
    return files


def _number(x, nullable: bool = False) -> bool:
    return (x is None and nullable) or (isinstance(x, (int, float)) and not isinstance(x, bool))


_METRIC_NUMBERS = {"throughput_tok_s": True, "prefill_s": False, "decode_s": False, "generated_tokens": False,
                   "decode_step_median_s": True, "decode_tok_s": True, "peak_gpu_bytes": False,
                   "peak_cpu_bytes": False, "repeats": False}   # field -> may be null


def malformed_field(data: dict) -> str | None:
    """The first field of a run document (a dict with schema_version and metrics) whose type the report
    cannot use, in words (`metrics.throughput_tok_s is 'abc', not a number`); None when all can be read.
    Fields a document leaves out take their defaults; a kind outside KINDS is refused, as every row
    must say whether it is measured, simulated or predicted."""
    if not isinstance(data["schema_version"], int) or isinstance(data["schema_version"], bool):
        return f"schema_version is {data['schema_version']!r}, not an integer"
    for key in ("system", "task"):
        if key in data and not isinstance(data[key], str):
            return f"{key} is {data[key]!r}, not a string"
    for key in ("model", "hardware", "workload", "policy", "prediction", "environment", "extra"):
        if key in data and not isinstance(data[key], dict):
            return f"{key} is {data[key]!r}, not an object"
    m = data["metrics"]
    if not isinstance(m, dict):
        return f"metrics is {m!r}, not an object"
    for key, nullable in _METRIC_NUMBERS.items():
        if key in m and not _number(m[key], nullable):
            return f"metrics.{key} is {m[key]!r}, not a number"
    if "kind" in m and m["kind"] not in KINDS:
        return f"metrics.kind is {m['kind']!r}, not one of {', '.join(KINDS)}"
    if "noisy" in m and not isinstance(m["noisy"], bool):
        return f"metrics.noisy is {m['noisy']!r}, not true or false"
    for key in ("link_bytes", "utilisation", "spread"):
        if key in m and not isinstance(m[key], dict):
            return f"metrics.{key} is {m[key]!r}, not an object"
    for name, spread in (m.get("spread") or {}).items():
        if not isinstance(spread, dict):
            return f"metrics.spread.{name} is {spread!r}, not an object"
        for key, value in spread.items():
            if not _number(value, nullable=key != "n"):
                return f"metrics.spread.{name}.{key} is {value!r}, not a number"
    for key in ("profile", "detected"):   # where_of and the hardware column read them
        value = (data.get("hardware") or {}).get(key)
        if value is not None and not isinstance(value, dict):
            return f"hardware.{key} is {value!r}, not an object"
    return None


def kind_of(r: RunReport) -> str:
    return r.metrics.kind if r.schema_version >= 2 else OLD_KINDS.get(r.task, "measured")


def row_of(path: Path, r: RunReport) -> dict:
    p, w = r.policy or {}, r.workload or {}
    kind = kind_of(r)
    spread = r.metrics.spread.get("throughput_tok_s")
    many = spread is not None and spread.n > 1
    return {"system": r.system, "task": r.task, "kind": kind, "where": where_of(r, kind), "model": r.model.get("name"),
            "hardware": (r.hardware.get("profile") or {}).get("name"), "workload": w.get("name"),
            "gen_len": w.get("gen_len"), "padding": w.get("padding"), "batch_size": p.get("batch_size"),
            "micro_batch_size": p.get("micro_batch_size"), "attn_on_gpu": p.get("attn_on_gpu"),
            "expert_gpu_fraction": p.get("expert_gpu_fraction"),
            "tok_s": round(r.metrics.throughput_tok_s, 3) if r.metrics.throughput_tok_s else None,
            "tok_s_stdev": _round(spread.stdev) if many else None, "cv": _round(spread.cv) if many else None,
            "repeats": r.metrics.repeats if kind == "measured" else None,
            "noisy": r.metrics.noisy if kind == "measured" else None,
            "hrm_tok_s": _round(r.prediction.get("hrm_tok_s")), "sim_tok_s": _round(r.prediction.get("sim_tok_s")),
            "peak_gpu_gib": round(r.metrics.peak_gpu_bytes / 2**30, 3) if r.metrics.peak_gpu_bytes else None,
            "file": str(path)}


def _round(x):
    return round(x, 3) if isinstance(x, (int, float)) else None


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    cols = [c for c in columns if any(r.get(c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


KIND_COLORS = {"measured": "tab:blue", "simulated": "tab:orange", "predicted": "tab:green"}


# Fields a bar's label adds when they differ between the plotted rows (a sweep's axis): bars that read the
# same would otherwise stand for different runs.
LABEL_FIELDS = ("task", "kind", "where", "gen_len", "padding", "attn_on_gpu", "expert_gpu_fraction")


def run_label(r: dict, varying: tuple[str, ...] = ()) -> str:
    """One bar's label: what ran, on what, with which batch, and the `varying` fields' values."""
    policy = f"N={r['batch_size']}, mu={r['micro_batch_size']}" if r.get("batch_size") else ""
    swept = ", ".join(f"{k}={r.get(k)}" for k in varying)
    return " · ".join(x for x in (r["system"], r.get("model") or "", f"{r['hardware']}/{r['workload']}", policy,
                                  swept) if x)


def bar_labels(rows: list[dict]) -> list[str]:
    """The rows' labels, each naming the LABEL_FIELDS that differ between rows; rows alike in all of them
    are told apart by their file."""
    varying = tuple(k for k in LABEL_FIELDS if len({str(r.get(k)) for r in rows}) > 1)
    labels = [run_label(r, varying) for r in rows]
    return [f"{label} ({Path(r['file']).name})" if labels.count(label) > 1 else label
            for label, r in zip(labels, rows)]


LABEL_WIDTH = 60   # characters per line of a bar's label (7 pt: about 3.3 of the figure's 9 inches)


def throughput_figure(rows: list[dict]):
    """Horizontal bars (one per run document, readable at any count), grouped by hardware and workload,
    coloured by kind (measured / simulated / predicted) with a legend, measured bars with their spread."""
    from moe_lightning.plots import pyplot

    plt = pyplot()
    rows = sorted((r for r in rows if r.get("tok_s")),
                  key=lambda r: (str(r["hardware"]), str(r["workload"]), str(r["system"]), r["tok_s"]))
    # A label naming several varying fields (kind, where, task ...) runs past 150 characters: on one line it
    # pushed the bars, title and axis label out of the image. Wrapped, it keeps the left ~40% of the width.
    labels = [textwrap.fill(label, LABEL_WIDTH) for label in bar_labels(rows)]
    lines = sum(label.count("\n") + 1 for label in labels)
    fig, ax = plt.subplots(figsize=(9, min(40.0, 1.2 + 0.28 * len(rows) + 0.12 * (lines - len(rows)))))
    y = range(len(rows))
    ax.barh(y, [r["tok_s"] for r in rows], xerr=[r.get("tok_s_stdev") or 0 for r in rows],
            color=[KIND_COLORS.get(r["kind"], "tab:gray") for r in rows])
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s, end to end (measured: median of repeats ± stdev)")
    kinds = sorted({r["kind"] for r in rows})
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=KIND_COLORS.get(k, "tab:gray")) for k in kinds],
              labels=kinds, loc="lower right", fontsize=8)
    ax.set_title(f"Throughput of {len(rows)} runs ({', '.join(kinds)})\nsimulated and predicted on the named "
                 "profile, measured on the detected device", fontsize=9)   # two lines: one would be clipped
    fig.tight_layout()
    return fig


def plot_throughput(rows: list[dict], path: Path) -> Path:
    return save(throughput_figure(rows), path)


REPORT_SUFFIXES = (".md", ".csv")   # out=: the markdown table or the CSV


def write_csv(path: str | Path, rows: list[dict]) -> None:
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class ReportTask:
    name: str = "report"
    inputs: list[str] = field(default_factory=lambda: ["runs/**/*.json"])
    plot: bool = True

    def run(self, cfg: RunConfig) -> RunReport:
        docs, skipped = load_documents(self.inputs)
        if not docs:   # the refusal's one line names the first skipped file (warnings would precede it)
            raise ConfigError(f"no run documents in task.inputs={self.inputs}"
                              + (f" ({len(skipped)} skipped: {skipped[0]})" if skipped else ""))
        for reason in skipped:
            log.warning("skipped %s", reason)
        rows = [row_of(p, r) for p, r in docs]
        run_dir = Path(cfg.run_dir or "runs/latest")
        run_dir.mkdir(parents=True, exist_ok=True)
        table = markdown_table(rows)
        atomic_write(run_dir / "report.md", table + "\n")
        write_csv(run_dir / "report.csv", rows)
        if cfg.out:   # its suffix picks the table (checked before the run: .md or .csv)
            if Path(cfg.out).suffix == ".csv":
                write_csv(cfg.out, rows)
            else:
                atomic_write(cfg.out, table + "\n")
        print(table)
        print(f"{len(rows)} run documents" + (f" ({len(skipped)} damaged files skipped)" if skipped else "")
              + f"; report: {run_dir / 'report.md'}, {run_dir / 'report.csv'}" + (f", {cfg.out}" if cfg.out else ""))
        if self.plot and rows:
            print(f"plot: {plot_throughput(rows, run_dir / 'throughput.png')}")
        return RunReport(system=cfg.system.name, task="report", model={}, hardware={}, workload={}, policy={},
                         extra={"documents": len(rows), "markdown": str(run_dir / "report.md")})
