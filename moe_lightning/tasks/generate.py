"""task=generate: prompts in, outputs JSONL (input order) and a run document out."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moe_lightning.config import HOST_WAIT_S, check_host_wait, check_warmup
from moe_lightning.errors import ConfigError
from moe_lightning.report import Metrics, RunReport, Spread, as_dict, environment, peak_cpu_bytes

if TYPE_CHECKING:
    from collections.abc import Callable

    from moe_lightning.config import ModelSpec, Sampling, Workload
    from moe_lightning.engine.generation import GenerationParams, GenerationResult
    from moe_lightning.run_config import RunConfig  # type hints only: it sits above the tasks

log = logging.getLogger("moe_lightning.generate")


@dataclass
class Generation:
    """Everything a generation run produced, for the task that asked for it."""

    report: RunReport
    requests: list
    output_ids: list[list[int]]
    tokenizer: object | None
    runner: object = None


def run_generation(cfg: RunConfig, progress: bool = True, warmup_tokens: int = 0, repeats: int = 1,
                   max_cv: float = 0.10, min_repeat_s: float = 0.0, streamed=None,
                   turn: Callable[[GenerationResult | None], None] | None = None,
                   host_wait_s: float | None = None) -> Generation:
    """Load, (warm up,) generate for every request `repeats` times, and measure.

    Weight loading is never timed. With `warmup_tokens`, one batch is generated that far first and its
    timings are discarded. Each repeat runs the whole workload; with `min_repeat_s`, a workload that
    takes less is run several times per repeat (the same number for every repeat, found by one untimed
    pass), as pyperf calibrates its loops: a 40 ms run on a shared host is mostly scheduler noise. The
    headline figures are medians over the repeats, with their spread beside them. The timed part holds
    the host-wide measurement lock and records the host's load; a run whose throughput varies by more
    than `max_cv` (coefficient of variation), or beside other busy processes, is marked noisy.

    With `streamed` (a `tasks.outputs.StreamedOutputs`; one repeat, no loops), each batch's outputs are
    written as it finishes, and the batches an earlier, interrupted run finished are skipped.

    With `turn` (an interleaved comparison, `tasks.compare`), `turn(previous)` is called before each
    timed repeat and once after the last, with the repeat just timed (None the first time); it returns
    when this run may time again. The caller then holds the measurement lock, and the host's load is
    taken over this run's own repeats only.

    Around each repeat the host's own speed is probed (`hostload.HostSpeed`): a run waits while the host
    runs slowed (a shared VM's core taken by another tenant, which no load figure shows), and times a
    repeat the host slowed again, for up to `host_wait_s` seconds in all (None: HOST_WAIT_S; 0: never
    wait, only record); repeats kept slowed make the run noisy. Streamed outputs are never re-timed."""
    from tqdm import tqdm

    from moe_lightning.engine.generation import generate
    from moe_lightning.engine.parallel import current
    from moe_lightning.engine.weights import resolve_model
    from moe_lightning.hostload import HostLoad, HostSpeed, check_fits_host, measurement_lock
    from moe_lightning.systems import resolve_device
    from moe_lightning.threads import configure, main_threads, op_elements, set_thread_count
    from moe_lightning.tokenizer import tokenizer_for
    from moe_lightning.workload_io import describe, load_requests, longest_budget

    if repeats < 1:
        raise ConfigError(f"repeats: must be >= 1, got {repeats}")
    if streamed is not None and (repeats > 1 or min_repeat_s > 0):
        raise ValueError("streamed outputs are written by a single pass: repeats=1, min_repeat_s=0")
    configure(cfg.threads)
    spec, source = resolve_model(cfg.model)
    tokenizer = tokenizer_for(spec)
    requests = load_requests(cfg.workload, spec, tokenizer)
    device = resolve_device(cfg.device)
    main = main_threads(op_elements(spec), device.type == "cuda")
    set_thread_count(main)
    ranks = current()   # several ranks (moe_lightning.launch): each one measures, rank 0 reports them all
    dequantized = spec.total_params * spec.dtype_bytes if cfg.system.name == "reference" else None
    check_fits_host(spec, cfg.hardware, device, weight_bytes=dequantized, ranks=ranks.world_size if ranks else 1)
    # The memory plan is made for the prompts actually given (a JSONL file sets its own lengths) and for
    # the longest generation budget among them (no request runs longer: rows' own max_new_tokens).
    lengths = [len(r.input_ids) for r in requests]
    workload = requests_workload(cfg.workload, lengths, longest_budget(requests, cfg.workload))
    resolve = getattr(cfg.system, "resolve_policy", None)  # baselines pick their policy as their authors do
    if resolve is not None:
        cfg = dataclasses.replace(cfg, policy=resolve(spec, cfg.hardware, workload, cfg.policy, lengths=lengths))
    runner = cfg.system.build(spec, source, cfg.hardware, cfg.policy, workload, device, trace=cfg.trace,
                              prompt_lengths=lengths)
    params = generation_params(workload, cfg.sampling, spec)
    decoding = decoding_note(params, spec, cfg.sampling)
    prompts = [r.input_ids for r in requests]
    max_new = [r.max_new_tokens or params.max_new_tokens for r in requests]
    admits = getattr(runner, "admits", False)   # the engine's unpadded mode: Algorithm 2 admission
    # Data-parallel attention (expert groups with their own requests): requests finish out of input order.
    any_order = admits or getattr(runner, "lockstep", None) is not None
    batch_size = getattr(runner, "batch_size", cfg.policy.batch_size)   # padded: what the KV budget holds
    refill = getattr(cfg.system, "refill", True)
    done: list[int] = []
    start, callbacks = 0, {}
    if streamed is not None:
        from moe_lightning.tasks.outputs import run_fields

        if ranks is not None:   # every rank has loaded (and checked) its weights before rank 0 opens the part
            ranks.broadcast(None)   # file: a refusal in another rank leaves no part file behind

        done = streamed.begin(run_fields(cfg, spec, device), requests, None if any_order else batch_size, tokenizer)
        if ranks is not None:   # what rank 0's outputs hold is skipped by every rank
            done = ranks.broadcast(done)
        callbacks = ({"on_finished": streamed.write_finished, "skip": frozenset(done)} if any_order
                     else {"on_batch": streamed.write_batch, "start": len(done)})
        start = len(done)
        if start:
            log.info("resuming: %d of %d outputs were written by an earlier run", start, len(requests))
    done_set = set(done)
    run_args = {"max_new": max_new, **({"refill": refill} if admits else {})}
    results = []
    loops = 1
    load = HostLoad()   # over the timed repeats only
    started: list[float] = []   # each repeat's start (Unix time): when it was timed beside other runs
    timed_passes = 0   # the passes the runner's counters saw: kept repeats' and re-timed ones'
    with measurement_lock(enabled=(ranks is None or ranks.local_rank == 0) and turn is None) as lock_wait_s:
        if warmup_tokens:
            warm = dataclasses.replace(params, max_new_tokens=min(warmup_tokens, params.max_new_tokens))
            generate(runner, prompts[:batch_size], warm, batch_size)
        if min_repeat_s > 0:  # one untimed pass sizes the loops (and finishes the warm-up)
            once = generate(runner, prompts, params, batch_size, **run_args)
            loops = max(1, min(MAX_LOOPS, math.ceil(min_repeat_s / max(once.total_s, 1e-6))))
        if hasattr(runner, "reset_stats"):
            runner.reset_stats()
        # Several ranks run each pass together: rank 0 probes and decides for all of them.
        lead = ranks is None or ranks.rank == 0
        speed = HostSpeed(HOST_WAIT_S if host_wait_s is None else host_wait_s, retime=streamed is None)
        per_repeat = loops * sum(g for r, g in enumerate(max_new) if r not in done_set)
        with tqdm(total=repeats * per_repeat, desc=f"{cfg.system.name}", unit="tok", disable=not progress,
                  file=sys.stderr, leave=False) as bar:
            for _ in range(repeats):
                if turn is not None:
                    turn(results[-1] if results else None)
                while True:   # until a repeat the host did not slow (or the wait budget is spent)
                    before = speed.ready() if lead else 1.0
                    if ranks is not None:   # every rank starts the repeat once rank 0 has probed (or waited)
                        ranks.broadcast(None)
                    t0 = time.time()
                    with load:
                        passes = [generate(runner, prompts, params, batch_size, on_tokens=bar.update, **run_args,
                                           **callbacks)
                                  for _ in range(loops)]
                    timed_passes += loops
                    result = merge_passes(passes)
                    keep = speed.keep(before, result.total_s) if lead else None
                    if (ranks.broadcast(keep) if ranks is not None else keep):
                        break
                    bar.total += per_repeat
                started.append(t0)
                results.append(result)
        if turn is not None:
            turn(results[-1])
    speed.save()
    if ranks is not None:   # this run's other ranks on this host are not "other processes"
        cpu = ranks.gather((platform.node(), load.own_s))
        load.exclude(sum(s for i, (node, s) in enumerate(cpu) if node == platform.node() and i != ranks.rank))
    host = load.report
    host.lock_wait_s = lock_wait_s
    stats = runner.stats() if hasattr(runner, "stats") else {}
    metrics = measured_metrics(results, max_cv, host, speed.report)
    metrics.peak_gpu_bytes = stats.get("peak_gpu_bytes", _peak_gpu_bytes(device))
    metrics.peak_cpu_bytes = peak_cpu_bytes()
    # The runner counts every timed pass (repeats x loops, and re-timed ones); a pass's bytes go beside a
    # pass's tokens.
    passes = timed_passes
    metrics.link_bytes = {k: round(v / passes) for k, v in stats.get("link_bytes", {"h2d": 0, "d2h": 0}).items()}
    metrics.utilisation = stats.get("utilisation", {})
    threads = stats.get("threads", {"main": main, "engine": "runs on the main thread"})
    model = as_dict(spec)
    report = RunReport(
        system=cfg.system.name, task=cfg.task.name, model=model,
        hardware={"profile": as_dict(cfg.hardware), "detected": _detected(device)},
        workload={**as_dict(cfg.workload), "actual": describe(requests, cfg.workload) | {"gen_len": workload.gen_len}},
        policy=as_dict(cfg.policy), metrics=metrics,
        environment={**environment(), "threads": threads, "host_load": host.to_dict(),
                     "host_speed": speed.report.to_dict()},
        extra={"system": as_dict(cfg.system), "sampling": as_dict(cfg.sampling), "decoding": decoding,
               "outputs_identical_across_repeats": all(r.output_ids == results[0].output_ids for r in results),
               "loops_per_repeat": loops,
               "repeat_throughput_tok_s": [r.throughput_tok_s for r in results],   # in the order timed
               "repeat_started_unix_s": started,
               **({"resumed_outputs": start} if streamed is not None else {}),
               "batching": _batching(runner, results[0], batch_size, refill),
               **({"parallel": _parallel(ranks, metrics, device)} if ranks is not None else {}),
               **stats.get("extra", {})},
    )
    kept = [r for r in range(len(requests)) if r not in done_set]
    outputs = ([results[0].output_ids[r] for r in kept] if any_order else results[0].output_ids)
    return Generation(report, [requests[r] for r in kept], outputs, tokenizer, runner)


def generation_params(workload: Workload, sampling: Sampling, spec: ModelSpec) -> GenerationParams:
    """The run's `GenerationParams`: the workload's budget, `sampling.*`, and the model's stop ids and
    repetition penalty (its generation_config.json's, as transformers' generate takes them;
    sampling.repetition_penalty overrides the penalty, sampling.ignore_eos drops the stop ids)."""
    from moe_lightning.engine.generation import GenerationParams

    penalty = sampling.repetition_penalty if sampling.repetition_penalty is not None else spec.repetition_penalty
    return GenerationParams(max_new_tokens=workload.gen_len, temperature=sampling.temperature, top_p=sampling.top_p,
                            seed=sampling.seed, eos_token_id=None if sampling.ignore_eos else spec.stop_token_ids,
                            repetition_penalty=penalty)


def decoding_note(params: GenerationParams, spec: ModelSpec, sampling: Sampling) -> dict:
    """How tokens are picked, for the run document; a checkpoint whose generation_config.json asks for
    sampling (not applied: `engine.hf_generation`) is named in one warning line and here."""
    from moe_lightning.engine.hf_generation import sampling_not_applied

    note = {"mode": "greedy" if params.temperature == 0 else "sampled", "stop_token_ids": list(params.eos_ids),
            "repetition_penalty": params.repetition_penalty}
    ignored = sampling_not_applied(spec.path) if spec.weights == "checkpoint" else None
    if ignored:
        shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in ignored.items())
        note["sampling_not_applied"] = ignored
        log.warning("%s/generation_config.json asks for sampling (%s), which is not applied: tokens are picked as "
                    "sampling.* says (%s)", spec.path, shown,
                    "greedy" if params.temperature == 0 else f"temperature={sampling.temperature}, "
                    f"top_p={sampling.top_p}")
    return note


def _parallel(ranks, metrics: Metrics, device) -> dict:
    """The split and every rank's own measurement (the ranks step together: a tensor group's ranks time
    the same requests, and under expert parallelism each rank reports the whole machine's figures, its
    group's own in `batching.data_parallel_attention`; the headline figures are rank 0's)."""
    mine = {"rank": ranks.rank, "tensor_rank": ranks.tp_rank, "expert_rank": ranks.ep_rank,
            "host": platform.node(), "device": str(device), "throughput_tok_s": metrics.throughput_tok_s,
            "prefill_s": metrics.prefill_s, "decode_s": metrics.decode_s,
            "throughput_spread": metrics.spread["throughput_tok_s"].to_dict(),
            "peak_gpu_bytes": metrics.peak_gpu_bytes, "peak_cpu_bytes": metrics.peak_cpu_bytes}
    return {**ranks.describe(), "chunks": ranks.chunks, "ranks": ranks.gather(mine)}


def _batching(runner, result, batch_size: int, refill: bool) -> dict:
    """How requests were batched: Algorithm 2 admission (with or without refill) or static batches; with
    data-parallel attention, each expert group's own batching of its share."""
    out = _batching_of(runner, result, batch_size, refill)
    if result.groups is not None:
        out = {**out, "data_parallel_attention": {
            "groups": result.groups, "layout": "each expert group runs every E-th request; a finished group "
            "joins the others' forwards with ghost forwards (engine.data_parallel)",
            "per_group": "batch_size, kv_budget_tokens and micro_batches above are each group's"}}
    return out


def _batching_of(runner, result, batch_size: int, refill: bool) -> dict:
    stats = result.admission
    if stats is None:
        workload = getattr(runner, "workload", None)
        padded = workload is not None and workload.padding
        steps = (len(result.decode_step_s) // max(1, result.passes) if result.groups is None
                 else max(g["decode_steps"] for g in result.groups))   # the groups' steps run side by side
        return {"mode": "static batches", "batch_size": batch_size,
                "padded_to": workload.prompt_len_max if padded else None, "decode_steps": steps}
    b = runner.budget
    return {"mode": "admission, refill" if refill else "admission, batches", "kv_budget_tokens": b.tokens,
            "block_size": b.block_size, "micro_batches": b.partitions, "prefill_rounds": stats.prefill_rounds,
            "decode_steps": stats.decode_steps, "max_running": stats.max_active, "deferrals": stats.deferred}


MAX_LOOPS = 100


def merge_passes(passes: list):
    """Several timed passes over the workload as one repeat (outputs of the first; times summed)."""
    from moe_lightning.engine.generation import GenerationResult

    if len(passes) == 1:
        return passes[0]
    return GenerationResult(output_ids=passes[0].output_ids, prefill_s=sum(p.prefill_s for p in passes),
                            decode_s=sum(p.decode_s for p in passes),
                            decode_step_s=[s for p in passes for s in p.decode_step_s], passes=len(passes))


def measured_metrics(results: list, max_cv: float, host=None, speed=None) -> Metrics:
    """Medians over the repeats (`GenerationResult`s) with their spread, and the noise verdict (`host`: a
    `HostLoadReport`, `speed`: a `HostSpeedReport`)."""
    # A repeat that ran no request (a resumed run whose part file held every output) timed nothing: it
    # has no throughput (None) and no place in the spread.
    timed = [r for r in results if r.throughput_tok_s is not None] or results[:1]
    tok_s = [r.throughput_tok_s for r in timed if r.throughput_tok_s is not None]
    spread = {"throughput_tok_s": Spread.of(tok_s),
              "prefill_s": Spread.of([r.prefill_s / r.passes for r in timed]),
              "decode_step_s": Spread.of([s for r in timed for s in r.decode_step_s])}
    # the median repeat (lower for even k)
    mid = timed[tok_s.index(sorted(tok_s)[(len(tok_s) - 1) // 2])] if tok_s else timed[0]
    noise = []
    cv = spread["throughput_tok_s"].cv   # None with one repeat: no spread to judge
    if cv is not None and cv > max_cv:
        noise.append(f"throughput varies {cv:.1%} over {len(results)} repeats (> {max_cv:.0%})")
    if host is not None and host.busy:
        noise.append(f"other processes kept {host.others_busy_cores:.2f} cores busy while it ran")
    if speed is not None and speed.noise:
        noise.append(speed.noise)
    return Metrics(
        throughput_tok_s=spread["throughput_tok_s"].median,   # None: nothing timed (its spread has n 0)
        prefill_s=spread["prefill_s"].median,
        decode_s=mid.decode_s / mid.passes, generated_tokens=mid.generated_tokens,
        decode_step_median_s=spread["decode_step_s"].median,   # None: no decode step (one token each)
        decode_tok_s=mid.decode_tok_s,   # None: no decode step
        kind="measured", repeats=len(results), spread=spread, noisy=bool(noise), noise=noise)


def _peak_gpu_bytes(device) -> int:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def _detected(device) -> dict:
    import torch

    return {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def write_outputs(path: Path, gen: Generation) -> None:
    from moe_lightning.files import atomic_open
    from moe_lightning.tasks.outputs import dumps, output_row

    with atomic_open(path, "w", encoding="utf-8") as f:
        for req, out in zip(gen.requests, gen.output_ids):
            f.write(dumps(output_row(req, out, gen.tokenizer)))


def requests_workload(workload: Workload, lengths: list[int], gen_len: int | None = None) -> Workload:
    """The workload the runner and the policy rules are given for these prompts' lengths in tokens and
    `gen_len`, the longest generation budget (`workload_io.longest_budget`; None: workload.gen_len)."""
    return dataclasses.replace(workload, prompt_len_max=max(lengths), num_requests=len(lengths),
                               prompt_len_avg=min(max(lengths), round(sum(lengths) / len(lengths))),
                               gen_len=gen_len or workload.gen_len)


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
    where = report.hardware.get("detected", {}).get("gpu") or report.hardware.get("detected", {}).get("device", "")
    tput = m.spread.get("throughput_tok_s")
    done = report.workload["actual"]["num_requests"] - report.extra.get("resumed_outputs", 0)
    if m.throughput_tok_s is None:   # no request ran here: no figure to show (0 tok/s would read as measured)
        line = f"{report.system}: no request ran in this run, so nothing was timed (no tokens/s)"
    else:
        shown = tput.show(".1f") if tput and tput.n > 1 else f"{m.throughput_tok_s:.1f}"
        line = (f"{report.system}: {done} requests, "
                f"{m.generated_tokens} tokens in {m.prefill_s + m.decode_s:.2f} s -> "
                f"{shown} tok/s {m.kind} on {where or 'this host'} (prefill {m.prefill_s:.2f} s, "
                f"decode {m.decode_s:.2f} s, " + ("no decode step)" if m.decode_step_median_s is None else
                                                   f"median step {m.decode_step_median_s * 1e3:.1f} ms)"))
    if report.extra.get("resumed_outputs"):
        line += f"\n  resumed: {report.extra['resumed_outputs']} outputs came from an earlier run and are not timed"
    if m.noisy:
        line += "\n  NOISY: " + "; ".join(m.noise)
    return line


SHORT_PASS_S = 0.5   # task=generate's one timed pass, if shorter, is marked noisy (task=bench's min_repeat_s)


def mark_short_pass(m: Metrics) -> None:
    """task=generate times its one pass over the workload, which a short workload makes too short to
    time alone: the issue's tiny command (a 75 ms pass) varied by 16.9% over 7 fresh runs on an idle
    2-core VM, where task=bench's repeats of it varied by 1.5% (`benchmarks/measurement_stability.py`)."""
    timed = (m.prefill_s or 0.0) + (m.decode_s or 0.0)
    if m.repeats == 1 and 0 < timed < SHORT_PASS_S:
        m.noise.append(f"one timed pass of {timed:.3f} s: too short to time alone (task=bench repeats it and gives "
                       f"its spread)")
        m.noisy = True


@dataclass
class GenerateTask:
    name: str = "generate"
    progress: bool = True
    warmup_tokens: int = 2      # one batch this far first, untimed: first-run costs are not the engine's speed
    host_wait_s: float = HOST_WAIT_S   # waits this long at most for a slowed host before its one timed pass

    def __post_init__(self) -> None:
        check_warmup(self.warmup_tokens, "task")
        check_host_wait(self.host_wait_s, "task")

    def run(self, cfg: RunConfig) -> RunReport:
        from moe_lightning.engine.parallel import current
        from moe_lightning.errors import Interrupted
        from moe_lightning.tasks.outputs import StreamedOutputs

        run_dir = Path(cfg.run_dir or "runs/latest")
        outputs = Path(cfg.outputs) if cfg.outputs else run_dir / "outputs.jsonl"
        out = Path(cfg.out) if cfg.out else run_dir / "run.json"
        ranks = current()   # of several ranks, rank 0 writes the outputs
        streamed = StreamedOutputs(outputs, resume=cfg.resume, writes=ranks is None or ranks.rank == 0)
        try:
            gen = run_generation(cfg, progress=self.progress, warmup_tokens=self.warmup_tokens, streamed=streamed,
                                 host_wait_s=self.host_wait_s)
        except Interrupted as exc:
            streamed.close()
            if not streamed.total:
                raise
            raise Interrupted(f"{exc}: {len(streamed.rows)} of {streamed.total} outputs are kept in "
                              f"{streamed.part}; run again with resume=true to finish", exc.exit_code) from None
        finally:
            streamed.close()
        streamed.finish()
        mark_short_pass(gen.report.metrics)
        gen.report.extra["outputs"] = str(outputs)
        if cfg.trace:
            write_trace(gen, out.parent, out.stem)
        gen.report.to_json(out)
        print(summary_line(gen.report))
        print(f"outputs: {outputs}\nrun document: {out}")
        return gen.report
