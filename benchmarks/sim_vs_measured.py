"""Simulated vs measured vs HRM: how well the schedule simulator and the HRM predict a real run.

On this machine: calibrate (quick), plan a mid-size random Mixtral with HRM under a small "GPU" memory
budget (so experts must stream), run the CGOPipe engine with that policy through the Python API,
simulate the same run (same prompt lengths, same policy) and print end-to-end, prefill and decode
times of the three with the relative errors of the simulator and the HRM against the measurement.

Two simulator rows: the cost model on the calibrated profile (roofline with the measured GEMM and
expert-kernel curves, CPU attention throughput and executor overheads: everything `task=calibrate`
writes), which is the prediction; and the same graphs with per-op costs fitted to this run's measured
task records (in-sample: it isolates the error of the schedule model from the error of the cost model).

On a CPU-only machine the CPU plays the GPU, and the "GPU", CPU and copy threads share the same cores
and memory bus; the simulator shares the host equally between the tasks running at once (processor
sharing), which misses the OS scheduling of oversubscribed threads: small tasks beside a busy "GPU"
thread (CPU attention, activation copies) take many times their isolated time.

    python benchmarks/sim_vs_measured.py [--layers 4] [--requests 16] [--gen-len 12] [--repeats 3] [--save]
    python benchmarks/sim_vs_measured.py --device cuda --model mixtral-8x7b --layers 8 \
        --gpu-memory-gib 15 --requests 256 --gen-len 32 --max-batch 256 --save    # on a GPU

With CUDA the calibration is the full one (bf16 GEMM curves at Mixtral's shapes, pinned link) and the
budget is the GPU's (the paper's T4 setting: 15 GB).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import time
from pathlib import Path

from moe_lightning.bench_args import Parser, busy_warning, fraction, guard, positive_float, positive_int
from moe_lightning.config import Policy, Sampling, Workload
from moe_lightning.files import write_json
from moe_lightning.report import environment
from moe_lightning.run_config import RunConfig
from moe_lightning.tuner.calibrate import hardware_spec, measure
from moe_lightning.tuner.costs import TaskCosts, fit_op_scales
from moe_lightning.tuner.hrm import predict
from moe_lightning.tuner.optimizer import FFN_ON_GPU, optimize
from moe_lightning.tuner.presets import load_preset
from moe_lightning.tuner.simulator import batch_shapes, simulate_run

RESULTS = Path(__file__).resolve().parent.parent / "results"


def policy_overrides(text: str) -> dict:
    """`batch_size=8,micro_batch_size=4` -> Policy fields, each converted to its field's type."""
    defaults, names = Policy(), [f.name for f in dataclasses.fields(Policy)]
    out: dict = {}
    for item in text.split(","):
        key, eq, value = (part.strip() for part in item.partition("="))
        if not eq or key not in names:
            raise argparse.ArgumentTypeError(f"{item!r} is not field=value with a Policy field; fields: "
                                             + ", ".join(names))
        kind = type(getattr(defaults, key))
        if kind is bool:
            if value.lower() not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"{key}={value}: must be true or false")
            out[key] = value.lower() == "true"
            continue
        try:
            out[key] = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}={value}: must be {kind.__name__}") from None
    return out


def parse_args() -> argparse.Namespace:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default="mid-mixtral", help="a model preset (random weights at its shapes)")
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--requests", type=positive_int, default=16)
    p.add_argument("--prompt-avg", type=positive_int, default=64)
    p.add_argument("--prompt-max", type=positive_int, default=128)
    p.add_argument("--gen-len", type=positive_int, default=12)
    p.add_argument("--max-batch", type=positive_int, default=16)
    p.add_argument("--gpu-memory-gib", type=positive_float, default=1.5,
                   help="the 'GPU' budget of the calibrated profile, GiB (small, so experts stream)")
    p.add_argument("--usable-fraction", type=fraction, default=None,
                   help="of the 'GPU' budget (default: calibrated)")
    p.add_argument("--policy", type=policy_overrides, default=None,
                   help="override the plan, e.g. 'batch_size=8,micro_batch_size=4'")
    p.add_argument("--repeats", type=positive_int, default=3, help="measured runs (the median is compared)")
    p.add_argument("--save", action="store_true", help="write a JSON record under --out-dir")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.save:   # a folder that cannot be written is refused before the calibration and the runs
        from moe_lightning.bench_args import check_out_file

        check_out_file(p, args.out_dir / "sim_vs_measured_probe.json", "--out-dir")
    return args


def measured_op_scales(timeline, spec, hw, workload: Workload, policy: Policy, lengths: list[int]) -> dict:
    """Per-op scales making the cost model's totals match the measured task records of this run."""
    costs = TaskCosts.for_policy(spec, hw, policy)
    graphs = timeline.graphs  # (phase, offset, records), in run order
    pairs, g = [], 0
    for a in range(0, len(lengths), policy.batch_size):
        mbs, _ = batch_shapes(lengths[a:a + policy.batch_size], policy, workload.padding)
        steps = [mbs] + [[dataclasses.replace(mb, slots=mb.slots + s + 1) for mb in mbs]
                         for s in range(workload.gen_len - 1)]
        for step_mbs in steps:
            _, _, records = graphs[g]
            pairs += [(r, step_mbs) for r in records]
            g += 1
    return fit_op_scales([r for r, _ in pairs], [costs.cost(r.task, mbs)[0] for r, mbs in pairs])


def rel(x: float, ref: float) -> str:
    return f"{(x - ref) / ref:+.1%}" if ref else "n/a"


def main() -> None:
    args = parse_args()
    from moe_lightning.systems import CGOPipeSystem
    from moe_lightning.tasks.generate import GenerateTask, run_generation
    from moe_lightning.workload_io import synthetic_lengths

    t0 = time.perf_counter()
    m = measure(quick=args.device == "cpu", device=args.device)
    hw = hardware_spec(m, name="calibrated-local")
    hw.gpu.memory_gib = args.gpu_memory_gib
    if args.usable_fraction is not None:
        hw.gpu.usable_fraction = args.usable_fraction
    print(f"calibrated in {m.seconds:.1f} s: peak {m.gpu_peak_tflops:.3f} TFLOP/s, copy {m.gpu_bandwidth_gbps:.1f} "
          f"GB/s, link {m.h2d_gbps:.1f} GB/s, CPU attention {m.cpu_attn_gbps:.1f} GB/s, executor "
          f"{m.task_overhead_s * 1e6:.0f} us/task, {m.step_overhead_s * 1e6:.0f} us/graph; GEMM at 1 / 16 / "
          f"{m.gemm_rows[-1]} rows {m.gemm_tflops[0]:.3f} / {m.gemm_tflops[2]:.3f} / {m.gemm_tflops[-1]:.3f} "
          f"TFLOP/s (measured, this host); 'GPU' budget {hw.gpu_budget_bytes / 2**30:.2f} GiB")
    spec = dataclasses.replace(load_preset("model", args.model), num_layers=args.layers)
    workload = Workload(name="synthetic", prompt_len_avg=args.prompt_avg, prompt_len_max=args.prompt_max,
                        gen_len=args.gen_len, num_requests=args.requests)
    lengths = synthetic_lengths(workload)
    if args.policy:
        policy = Policy(**args.policy)   # a value out of range: Policy's own ConfigError, one line (guard)
    else:
        policy = optimize(spec, hw, workload, placements=FFN_ON_GPU, max_batch_size=args.max_batch).policy
    print(f"policy: N={policy.batch_size} mu={policy.micro_batch_size} attn_on_gpu={policy.attn_on_gpu} "
          f"r_w={policy.expert_gpu_fraction:.3g} r_c={policy.kv_gpu_fraction:.3g} pages={policy.num_pages}")

    cfg = RunConfig(task=GenerateTask(progress=False), system=CGOPipeSystem(), model=spec, hardware=hw,
                    workload=workload, policy=policy, sampling=Sampling(ignore_eos=True), device=args.device,
                    trace=True)
    # Repeats in this process, each a fresh engine: the host's speed drifts by 5-15% from one minute to
    # the next, so the median run is compared and the spread is reported beside it.
    runs, hosts = [], []   # hosts: each run's host load (the run report's), to say when others were busy
    for _ in range(args.repeats):
        gen = run_generation(cfg, progress=False, warmup_tokens=2)
        meas = gen.report.metrics
        runs.append((meas.prefill_s + meas.decode_s, meas, gen.runner.timeline))
        hosts.append(gen.report.environment["host_load"])
        threads = gen.report.environment["threads"]
        del gen   # the model and its pools: one alive at a time
        print(f"measured run {len(runs)}: {runs[-1][0]:.3f} s", flush=True)
    totals = sorted(t for t, _, _ in runs)
    _, meas, timeline = sorted(runs, key=lambda r: r[0])[len(runs) // 2]   # the median run (upper of two)

    hrm = predict(spec, hw, workload, policy)
    costs = TaskCosts.for_policy(spec, hw, policy)  # the calibrated profile's curves and overheads
    sim = simulate_run(spec, hw, workload, policy, lengths, costs=costs)
    scales = measured_op_scales(timeline, spec, hw, workload, policy, lengths)
    # The fitted costs are measured under contention already: time them without sharing the host again.
    unshared = dataclasses.replace(hw, gpu=dataclasses.replace(hw.gpu, shares_host=False))
    fitted = simulate_run(spec, unshared, workload, policy, lengths,
                          costs=dataclasses.replace(costs, launch_s=0.0, thread_s=0.0, op_scale=scales))
    n_batches = -(-len(lengths) // policy.batch_size)
    # HRM prices one full batch: prefill + gen_len decode steps; scaled to the run's batches.
    hrm_prefill, hrm_decode = n_batches * hrm.prefill_s, n_batches * hrm.decode_s

    hrm_tok_s = meas.generated_tokens / (hrm_prefill + hrm_decode)   # the run's tokens over the scaled time
    rows = [("measured", meas.prefill_s, meas.decode_s, meas.throughput_tok_s),
            ("simulated", sim.prefill_s, sim.decode_s, sim.throughput_tok_s),
            ("sim, fitted ops", fitted.prefill_s, fitted.decode_s, fitted.throughput_tok_s),
            ("HRM", hrm_prefill, hrm_decode, hrm_tok_s)]
    ref = meas.prefill_s + meas.decode_s
    curves = "on every core" if costs.gpu_all_cores else "at its split share"
    # The compared run is one real run (its task records fit the per-op scales), not an average: with an
    # even count it is the slower of the middle two, and the line says so rather than calling it the median.
    which = "the median run" if len(totals) % 2 else "the slower middle run"
    print(f"\nmeasured on this host: {which} of {len(totals)}, e2e {ref:.3f} s (min {totals[0]:.3f}, "
          f"max {totals[-1]:.3f}); "
          f"simulated on the calibrated profile (GPU-role curves {curves})")
    print(f"{spec.name} ({spec.num_layers} layers) x {len(lengths)} requests, gen {workload.gen_len}, "
          f"{n_batches} batch(es), on {hw.name}")
    print(f"{'':18}{'prefill s':>11}{'decode s':>11}{'e2e s':>11}{'tok/s':>9}{'e2e error':>11}")
    for name, pre, dec, tok_s in rows:
        print(f"{name:<18}{pre:>11.3f}{dec:>11.3f}{pre + dec:>11.3f}{tok_s:>9.2f}"
              f"{rel(pre + dec, ref) if name != 'measured' else '':>11}")
    print(f"\nutilisation (decode)  measured {meas.utilisation}\n"
          f"                      simulated {sim.utilisation}")
    print("fitted per-op scales (measured / modelled): "
          + ", ".join(f"{op} {s:.2f}" for op, s in sorted(scales.items())))
    if warning := busy_warning(hosts):
        print(warning)
    record = {
        "benchmark": "sim_vs_measured", "device": args.device,
        "kind": {"measured": "measured", "simulated": "simulated", "simulated_fitted": "simulated", "hrm": "predicted"},
        "where": f"measured on this host ({args.device}); simulated and predicted on the profile calibrated here "
                 f"({hw.name}, 'GPU' budget {args.gpu_memory_gib} GiB)",
        "policy_source": "--policy" if args.policy else "HRM plan",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": dataclasses.asdict(spec), "workload": dataclasses.asdict(workload),
        "hardware": dataclasses.asdict(hw), "calibration": m.as_dict(), "policy": dataclasses.asdict(policy),
        "measured": {"prefill_s": meas.prefill_s, "decode_s": meas.decode_s, "tok_s": meas.throughput_tok_s,
                     "utilisation": meas.utilisation, "repeats": len(totals), "e2e_s_runs": totals,
                     "host_load": hosts, "threads": threads,
                     "what": "the median run of the repeats, the slower middle one when their number is even "
                             f"(this host, {args.device})"},
        "simulated": {"prefill_s": sim.prefill_s, "decode_s": sim.decode_s, "tok_s": sim.throughput_tok_s,
                      "utilisation": sim.utilisation, "gpu_role_curves": "all cores" if costs.gpu_all_cores
                      else "split share"},
        "simulated_fitted": {"prefill_s": fitted.prefill_s, "decode_s": fitted.decode_s,
                             "tok_s": fitted.throughput_tok_s, "op_scale": scales},
        "hrm": {"prefill_s": hrm_prefill, "decode_s": hrm_decode, "tok_s": hrm_tok_s,   # as printed
                "tok_s_one_full_batch": hrm.e2e_tok_s},
        "e2e_rel_error": {"simulated": (sim.total_s - ref) / ref, "simulated_fitted": (fitted.total_s - ref) / ref,
                          "hrm": (hrm_prefill + hrm_decode - ref) / ref},
        "environment": environment(), "wall_s": time.perf_counter() - t0,
    }
    if args.save:
        path = args.out_dir / f"sim_vs_measured_{dt.datetime.now():%Y%m%d-%H%M%S}.json"
        write_json(path, record, indent=2, default=str)
        print(f"record: {path}")
    print(f"wall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    raise SystemExit(guard(main))
