"""EPS-MoE kernel choice: `expert_kernel=auto` against every fixed expert kernel, side by side.

Runs the CGOPipe engine on a random mid-size Mixtral with experts streaming, once per kernel choice and
round-robin (auto, loop, grouped, padded, dense, auto, loop, ...) so that machine noise hits every
choice alike, then prints the median prefill and decode times of each (measured on this host, with their [min, max])
and their ratio to `auto`; the record says what was measured where (`kind`, `device`).
Random routers route unevenly, as trained ones do on real text: the padded kernel pays every expert
at the busiest one's load, which is what the routing-aware choice avoids.

    python benchmarks/kernel_choice.py [--device cpu] [--repeats 3] [--save]
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import statistics
from pathlib import Path

from moe_lightning.bench_args import Parser, busy_warning, guard, positive_int
from moe_lightning.config import EXPERT_KERNELS, GpuSpec, HardwareSpec, Policy, Sampling, Workload
from moe_lightning.report import Spread, environment
from moe_lightning.run_config import RunConfig
from moe_lightning.tuner.presets import load_preset

RESULTS = Path(__file__).resolve().parent.parent / "results"


def main() -> None:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default="mid-mixtral")
    p.add_argument("--layers", type=positive_int, default=4)
    p.add_argument("--requests", type=positive_int, default=16)
    p.add_argument("--micro-batch", type=positive_int, default=8)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--save", action="store_true")
    args = p.parse_args()

    from moe_lightning.engine.experts import KERNELS
    from moe_lightning.systems import CGOPipeSystem
    from moe_lightning.tasks.generate import GenerateTask, run_generation

    spec = dataclasses.replace(load_preset("model", args.model), num_layers=args.layers)
    workload = Workload(name="synthetic", prompt_len_avg=64, prompt_len_max=128, gen_len=8,
                        num_requests=args.requests)
    hardware = HardwareSpec(name="local", gpu=GpuSpec(memory_gib=64, shares_host=args.device == "cpu"))
    choices = ["auto"] + [k for k in KERNELS if k in EXPERT_KERNELS]
    times: dict[str, dict[str, list[float]]] = {c: {"prefill_s": [], "decode_s": []} for c in choices}
    used: dict[str, dict] = {}
    hosts: list[dict] = []   # each run's host load (the run report's), to say when others were busy
    for _ in range(args.repeats):
        for choice in choices:
            policy = Policy(batch_size=args.requests, micro_batch_size=args.micro_batch, expert_gpu_fraction=0.125,
                            expert_kernel=choice)
            cfg = RunConfig(task=GenerateTask(progress=False), system=CGOPipeSystem(), model=spec,
                            hardware=hardware, workload=workload, policy=policy, sampling=Sampling(ignore_eos=True),
                            device=args.device)
            gen = run_generation(cfg, progress=False, warmup_tokens=2)
            times[choice]["prefill_s"].append(gen.report.metrics.prefill_s)
            times[choice]["decode_s"].append(gen.report.metrics.decode_s)
            used[choice] = gen.report.extra.get("expert_kernels_used", {})
            hosts.append({"kernel": choice, **gen.report.environment["host_load"]})
            threads = gen.report.environment["threads"]
    med = {c: {k: statistics.median(v) for k, v in t.items()} for c, t in times.items()}
    spread = {c: {k: Spread.of(v) for k, v in t.items()} for c, t in times.items()}
    print(f"{spec.name} ({spec.num_layers} layers), {args.requests} requests, mu={args.micro_batch}; measured on "
          f"this host ({args.device}), median [min, max] of {args.repeats} round-robin runs")
    print(f"{'kernel':<10}{'prefill s':>22}{'/ auto':>8}{'decode s':>22}{'/ auto':>8}  expert-kernel calls (last run)")

    def cell(s: Spread) -> str:
        return f"{s.median:.3f} [{s.min:.3f}, {s.max:.3f}]"

    for c in choices:
        m, s = med[c], spread[c]
        print(f"{c:<10}{cell(s['prefill_s']):>22}{m['prefill_s'] / med['auto']['prefill_s']:>8.2f}"
              f"{cell(s['decode_s']):>22}{m['decode_s'] / med['auto']['decode_s']:>8.2f}  {used.get(c, {})}")
    if warning := busy_warning(hosts):
        print(warning)
    if args.save:
        from moe_lightning.files import write_json

        path = RESULTS / f"kernel_choice_{dt.datetime.now():%Y%m%d-%H%M%S}.json"
        write_json(path, {"benchmark": "kernel_choice", "kind": "measured", "where": f"this host ({args.device})",
                          "device": args.device, "args": vars(args), "model": dataclasses.asdict(spec),
                          "workload": dataclasses.asdict(workload), "times": times, "median": med,
                          "spread": {c: {k: v.to_dict() for k, v in s.items()} for c, s in spread.items()},
                          "kernels_used": used, "threads": threads, "host_load": hosts,
                          "environment": environment()}, indent=2)
        print(f"record: {path}")


if __name__ == "__main__":
    raise SystemExit(guard(main))
