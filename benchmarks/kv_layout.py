"""The CPU KV cache's layout in the CGOPipe engine, side by side on prompts of mixed lengths:

- blocks: the unpadded mode's block pool (`system.kv_block_size=16`), read in place by the CPU
  attention kernel (`moe_lightning/kernels/cpu_attention.py`);
- dense: one tensor per micro-batch, as wide as that micro-batch's longest prompt (the engine before
  the block pool, and the engine baselines today);
- padded: `workload.padding=true`, every prompt padded to the workload's longest (MoE-Lightning(p)).

One batch of every request, the same seeded prompts, round-robin over the layouts so that machine noise
hits each alike; prints median throughput and decode step with their spread, and the KV bytes each
layout used (GiB: for blocks, the most held at once). Outputs must be identical across layouts
(greedy, fp32), and are checked.

    python benchmarks/kv_layout.py [--model mid-mixtral] [--layers 4] [--requests 16] [--repeats 3] [--save]
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from moe_lightning.bench_args import Parser, busy_warning, guard, positive_int
from moe_lightning.config import GpuSpec, HardwareSpec, Policy, Sampling, Workload
from moe_lightning.report import Spread, environment
from moe_lightning.run_config import RunConfig
from moe_lightning.tuner.presets import load_preset

RESULTS = Path(__file__).resolve().parent.parent / "results"
LAYOUTS = {"blocks": (16, False), "dense": (0, False), "padded": (0, True)}


def kv_bytes(runner) -> int:
    """KV bytes the batch used: the most blocks held at once (the pool itself is the plan's budget), or
    the dense tensors of every micro-batch."""
    if runner.kv_pool is not None:
        return runner.kv_pool.peak_held * runner.kv_pool.block_nbytes
    return sum(2 * mb.k.numel() * mb.k.element_size() for mb in runner.mbs if mb.k is not None)


def main() -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mid-mixtral")
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--requests", type=positive_int, default=16)
    p.add_argument("--micro-batch", type=positive_int, default=8)
    p.add_argument("--prompt-avg", type=positive_int, default=64)
    p.add_argument("--prompt-max", type=positive_int, default=384)
    p.add_argument("--gen-len", type=positive_int, default=16)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--save", action="store_true")
    args = p.parse_args()

    from moe_lightning.files import write_json
    from moe_lightning.systems import CGOPipeSystem
    from moe_lightning.tasks.generate import GenerateTask, run_generation

    spec = dataclasses.replace(load_preset("model", args.model), num_layers=args.layers, dtype="float32")
    hardware = HardwareSpec(name="local", gpu=GpuSpec(memory_gib=64, shares_host=True))
    runs: dict[str, dict[str, list[float]]] = {k: {"tok_s": [], "decode_step_s": []} for k in LAYOUTS}
    allocated, outputs = {}, {}
    hosts: list[dict] = []   # each run's host load (the run report's), to say when others were busy
    for _ in range(args.repeats):
        for name, (block, padded) in LAYOUTS.items():
            workload = Workload(name="mixed", prompt_len_avg=args.prompt_avg, prompt_len_max=args.prompt_max,
                                gen_len=args.gen_len, num_requests=args.requests, padding=padded)
            cfg = RunConfig(task=GenerateTask(progress=False), system=CGOPipeSystem(kv_block_size=block),
                            model=spec, hardware=hardware, workload=workload, device="cpu",
                            policy=Policy(batch_size=args.requests, micro_batch_size=args.micro_batch,
                                          expert_gpu_fraction=1.0),
                            sampling=Sampling(ignore_eos=True))
            gen = run_generation(cfg, progress=False, warmup_tokens=2)
            runs[name]["tok_s"].append(gen.report.metrics.throughput_tok_s)
            runs[name]["decode_step_s"].append(gen.report.metrics.decode_step_median_s)
            allocated[name] = kv_bytes(gen.runner)
            outputs[name] = gen.output_ids
            lengths = gen.report.workload["actual"]
            hosts.append({"layout": name, **gen.report.environment["host_load"]})
            threads = gen.report.environment["threads"]
    identical = all(o == outputs["blocks"] for o in outputs.values())
    spreads = {k: {m: Spread.of(v) for m, v in r.items()} for k, r in runs.items()}
    print(f"{spec.name} ({spec.num_layers} layers, fp32), {args.requests} requests of {lengths['prompt_len_avg']} "
          f"tokens on average (max {lengths['prompt_len_max']}), {args.gen_len} new each, mu={args.micro_batch}, "
          f"CPU attention, all experts resident; measured on this host, {args.repeats} round-robin repeats")
    print(f"{'layout':<8}{'tok/s (median ± stdev)':>26}{'/ dense':>9}{'decode step ms':>16}{'KV GiB':>9}")
    for name in LAYOUTS:
        t, s = spreads[name]["tok_s"], spreads[name]["decode_step_s"]
        print(f"{name:<8}{t.show('.1f'):>26}{t.median / spreads['dense']['tok_s'].median:>9.2f}"
              f"{s.median * 1e3:>16.2f}{allocated[name] / 2**30:>9.3f}")
    print(f"outputs identical across layouts: {identical}")
    if warning := busy_warning(hosts):
        print(warning)
    if args.save:
        path = RESULTS / f"kv_layout_{dt.datetime.now():%Y%m%d-%H%M%S}.json"
        write_json(path, {
            "benchmark": "kv_layout", "kind": "measured", "where": "this host (cpu)", "device": "cpu",
            "model": dataclasses.asdict(spec), "args": vars(args),
            "prompts": lengths, "runs": runs,
            "spread": {k: {m: s.to_dict() for m, s in v.items()} for k, v in spreads.items()},
            "kv_bytes": allocated, "outputs_identical": identical, "threads": threads, "host_load": hosts,
            "environment": environment()}, indent=2)
        print(f"record: {path}")
    if not identical:
        raise SystemExit("outputs differ between layouts")


if __name__ == "__main__":
    raise SystemExit(guard(main))
