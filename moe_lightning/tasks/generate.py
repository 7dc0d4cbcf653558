"""task=generate: prompts in, outputs JSONL (input order) and a run document out."""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from moe_lightning.config import RunConfig
from moe_lightning.report import Metrics, RunReport, as_dict, environment, peak_cpu_bytes

log = logging.getLogger("moe_lightning.generate")


@dataclass
class Generation:
    """Everything a generation run produced, for the task that asked for it."""

    report: RunReport
    requests: list
    output_ids: list[list[int]]
    tokenizer: object | None
    runner: object = None


def run_generation(cfg: RunConfig, progress: bool = True, warmup_tokens: int = 0) -> Generation:
    """Load, (warm up,) generate for every request, and measure. Weight loading is never timed; with
    `warmup_tokens`, one batch is generated that far first and its timings are discarded."""
    from tqdm import tqdm

    from moe_lightning.engine.generation import GenerationParams, generate
    from moe_lightning.engine.tiny import load_tokenizer
    from moe_lightning.engine.weights import resolve_model
    from moe_lightning.systems import resolve_device
    from moe_lightning.workload_io import describe, load_requests

    spec, source = resolve_model(cfg.model)
    tokenizer = load_tokenizer(spec.path) if spec.path else None
    requests = load_requests(cfg.workload, spec, tokenizer)
    device = resolve_device(cfg.device)
    # The memory plan is made for the prompts actually given (a JSONL file sets its own lengths).
    lengths = [len(r.input_ids) for r in requests]
    workload = dataclasses.replace(cfg.workload, prompt_len_max=max(lengths),
                                   prompt_len_avg=min(max(lengths), round(sum(lengths) / len(lengths))),
                                   num_requests=len(requests))
    resolve = getattr(cfg.system, "resolve_policy", None)  # baselines pick their policy as their authors do
    if resolve is not None:
        cfg = dataclasses.replace(cfg, policy=resolve(spec, cfg.hardware, workload, cfg.policy))
    runner = cfg.system.build(spec, source, cfg.hardware, cfg.policy, workload, device, trace=cfg.trace)
    params = GenerationParams(max_new_tokens=cfg.workload.gen_len, temperature=cfg.sampling.temperature,
                              top_p=cfg.sampling.top_p, seed=cfg.sampling.seed,
                              eos_token_id=None if cfg.sampling.ignore_eos else spec.eos_token_id)
    if warmup_tokens:
        warm = dataclasses.replace(params, max_new_tokens=min(warmup_tokens, params.max_new_tokens))
        generate(runner, [r.input_ids for r in requests[:cfg.policy.batch_size]], warm, cfg.policy.batch_size)
        if hasattr(runner, "reset_stats"):
            runner.reset_stats()
    total = len(requests) * params.max_new_tokens
    with tqdm(total=total, desc=f"{cfg.system.name}", unit="tok", disable=not progress, file=sys.stderr,
              leave=False) as bar:
        result = generate(runner, [r.input_ids for r in requests], params, cfg.policy.batch_size,
                          on_tokens=bar.update)
    stats = runner.stats() if hasattr(runner, "stats") else {}
    n_seq = len(requests)
    metrics = Metrics(
        throughput_tok_s=result.generated_tokens / result.total_s if result.total_s else 0.0,
        prefill_s=result.prefill_s, decode_s=result.decode_s, generated_tokens=result.generated_tokens,
        decode_step_median_s=statistics.median(result.decode_step_s) if result.decode_step_s else 0.0,
        decode_tok_s=(result.generated_tokens - n_seq) / result.decode_s if result.decode_s else 0.0,
        peak_gpu_bytes=stats.get("peak_gpu_bytes", _peak_gpu_bytes(device)),
        peak_cpu_bytes=peak_cpu_bytes(),
        link_bytes=stats.get("link_bytes", {"h2d": 0, "d2h": 0}),
        utilisation=stats.get("utilisation", {}),
    )
    model = as_dict(spec)
    report = RunReport(
        system=cfg.system.name, task=cfg.task.name, model=model,
        hardware={"profile": as_dict(cfg.hardware), "detected": _detected(device)},
        workload={**as_dict(cfg.workload), "actual": describe(requests)},
        policy=as_dict(cfg.policy), metrics=metrics, environment=environment(),
        extra={"system": as_dict(cfg.system), "sampling": as_dict(cfg.sampling), **stats.get("extra", {})},
    )
    return Generation(report, requests, result.output_ids, tokenizer, runner)


def _peak_gpu_bytes(device) -> int:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def _detected(device) -> dict:
    import torch

    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def write_outputs(path: Path, gen: Generation) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for req, out in zip(gen.requests, gen.output_ids):
            row = {"id": req.id, "output_ids": out}
            if gen.tokenizer is not None:
                row["text"] = gen.tokenizer.decode(out, skip_special_tokens=True)
            f.write(json.dumps(row) + "\n")


def write_trace(gen: Generation, folder: Path, stem: str) -> None:
    """Chrome trace + Gantt PNG of the run (systems that execute task graphs)."""
    timeline = getattr(gen.runner, "timeline", None)
    if timeline is None:
        log.warning("system %s executes no task graph: no trace to write", gen.report.system)
        return
    chrome = timeline.write_chrome_trace(folder / f"{stem}.trace.json")
    gantt = timeline.write_gantt(folder / f"{stem}.gantt.png",
                                 title=f"{gen.report.system}: prefill and first decode steps")
    gen.report.extra["trace"] = {"chrome": str(chrome), "gantt": str(gantt)}
    print(f"trace: {chrome} (open in ui.perfetto.dev or chrome://tracing), gantt: {gantt}")


def summary_line(report: RunReport) -> str:
    m = report.metrics
    return (f"{report.system}: {report.workload['actual']['num_requests']} requests, "
            f"{m.generated_tokens} tokens in {m.prefill_s + m.decode_s:.2f} s -> "
            f"{m.throughput_tok_s:.1f} tok/s (prefill {m.prefill_s:.2f} s, decode {m.decode_s:.2f} s, "
            f"median step {m.decode_step_median_s * 1e3:.1f} ms)")


@dataclass
class GenerateTask:
    name: str = "generate"
    progress: bool = True

    def run(self, cfg: RunConfig) -> RunReport:
        gen = run_generation(cfg, progress=self.progress)
        run_dir = Path(cfg.run_dir or "runs/latest")
        outputs = Path(cfg.outputs) if cfg.outputs else run_dir / "outputs.jsonl"
        out = Path(cfg.out) if cfg.out else run_dir / "run.json"
        write_outputs(outputs, gen)
        gen.report.extra["outputs"] = str(outputs)
        if cfg.trace:
            write_trace(gen, out.parent, out.stem)
        gen.report.to_json(out)
        print(summary_line(gen.report))
        print(f"outputs: {outputs}\nrun document: {out}")
        return gen.report
